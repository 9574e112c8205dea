"""CIPO's correction stream, top to bottom (docs/cipo.md): one CIPO step after the base groups are scored.

1. `select`: anchors, base completions shown back to the model: a share rho correct (the AdaptiveReplay callback's
   rho), the rest failed, from prompts of intermediate pass rate first (algorithms/cipo.py `select_anchors`).
2. `prompts`: each anchor's correction prompt, its problem and the model's own decoded attempt in the correction
   template, which never says whether the attempt was right.
3. The caller samples G_c corrections of each prompt with the same engine and weights (on-policy) and verifies them
   with the task's verifier against the anchor's original row (so the verifier sees the original problem and answer).
4. `shape`: the RiskShaping callback's advantage shift of every correction (c -> i penalty, improvement bonus); the
   loss adds it to the advantages after the group normalisation.
5. `stats`: anchors by kind and band, correction rewards, i->c, c->i, retention, lengths (reduced over ranks by the
   caller, like every step statistic).
6. `observe`: rho moves from the step's global retention, for the next step.

The two callbacks own the training state and the knobs (their own config sections, rho checkpointed); this class
holds the step's logic and reaches them through one path, `CorrectionStream.from_trainer`. Everything here is plain
Python over scored groups; the math is in algorithms/cipo.py.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cipo_lightning.algorithms import Anchor, correction_messages, retention_counts, select_anchors
from cipo_lightning.callbacks import AdaptiveReplay, RiskShaping, the_callback
from cipo_lightning.data.tasks import Row
from cipo_lightning.distributed import StepStats
from cipo_lightning.rollout.batch import ScoredGroup

# Samples G_c corrections of each prompt (chat messages) and scores them against the matching rows.
SampleFn = Callable[[list[Row], list[list[dict[str, str]]]], list[ScoredGroup]]


@dataclass
class CorrectionGroup:
    """The corrections sampled for one anchor, with their verifier rewards (in `scored`) and advantage shifts."""

    anchor: Anchor
    anchor_text: str
    anchor_reward: float
    scored: ScoredGroup
    advantage_shift: list[float]

    @property
    def training_group(self) -> ScoredGroup:
        """The group as the loss sees it: the verifier's rewards, and the shaping as an advantage shift."""
        return replace(self.scored, advantage_shift=self.advantage_shift)


@dataclass
class CorrectionStream:
    """The correction stream's settings and its two callbacks; `run` does steps 1-4 of one step. Its parts
    `select`, `requests` and `corrected` serve a caller that samples the corrections in one engine call with other
    prompts (RolloutCallback's anchors_from_previous_step)."""

    replay: AdaptiveReplay
    shaping: RiskShaping
    num_anchors: int | None  # None: half the step's base groups, rounded up
    band: tuple[float, float]
    max_anchors_per_prompt: int
    template: str
    correct_threshold: float

    @classmethod
    def from_trainer(cls, trainer: L.Trainer, **settings: Any) -> CorrectionStream:
        """The stream with the trainer's AdaptiveReplay and RiskShaping callbacks (the CLI's `replay` and `shaping`
        sections add them); a ConfigError naming the section when one is missing."""
        needed_by, hint = "rollout.algorithm cipo", "; or set algorithm grpo"
        replay = the_callback(trainer, AdaptiveReplay, "replay", needed_by, hint)
        shaping = the_callback(trainer, RiskShaping, "shaping", needed_by, hint)
        return cls(replay, shaping, **settings)

    def run(self, base: list[ScoredGroup], sample: SampleFn, rng: random.Random) -> list[CorrectionGroup]:
        """Anchors from the scored base groups, their corrections sampled and verified by `sample`, and shaped."""
        anchors = self.select(base, rng)
        if not anchors:
            return []
        return self.corrected(base, anchors, sample(*self.requests(base, anchors)))

    def select(self, base: list[ScoredGroup], rng: random.Random) -> list[Anchor]:
        return select_anchors(
            [g.rewards for g in base],
            self.num_anchors or (len(base) + 1) // 2,
            self.replay.rho,
            self.band,
            self.max_anchors_per_prompt,
            self.correct_threshold,
            rng,
        )

    def requests(self, base: list[ScoredGroup], anchors: list[Anchor]) -> tuple[list[Row], list[list[dict[str, str]]]]:
        """Each anchor's original row (what its corrections are verified against) and the chat messages of its
        correction prompt: the problem and the model's own decoded attempt."""
        rows = [base[a.group].row for a in anchors]
        attempts = [base[a.group].texts[a.sample] for a in anchors]
        return rows, [correction_messages(r["prompt"], a, self.template) for r, a in zip(rows, attempts, strict=True)]

    def corrected(
        self, base: list[ScoredGroup], anchors: list[Anchor], scored: list[ScoredGroup]
    ) -> list[CorrectionGroup]:
        """The anchors' sampled and verified corrections (one group each), shaped."""
        return [self.shape(base, anchor, group) for anchor, group in zip(anchors, scored, strict=True)]

    def shape(self, base: list[ScoredGroup], anchor: Anchor, corrections: ScoredGroup) -> CorrectionGroup:
        anchor_reward = base[anchor.group].rewards[anchor.sample]
        rewards = torch.tensor(corrections.rewards)
        shift = self.shaping.advantage_shift(rewards, torch.full_like(rewards, anchor_reward), self.correct_threshold)
        anchor_text = base[anchor.group].texts[anchor.sample]
        return CorrectionGroup(anchor, anchor_text, anchor_reward, corrections, shift.tolist())

    def stats(self, groups: list[CorrectionGroup]) -> StepStats:
        return correction_stats(groups, self.correct_threshold)

    def observe(self, logged: dict[str, float]) -> None:
        """Log the rho this step used, then move it with the step's global retention (NaN: no correct anchor, no
        update); the checkpoint written at the end of this step holds the new rho."""
        retention = logged["train/retention"]
        logged["train/rho"] = self.replay.rho
        self.replay.observe(None if math.isnan(retention) else retention)


def correction_stats(groups: list[CorrectionGroup], correct_threshold: float = 1.0) -> StepStats:
    """Anchors by kind and band, correction rewards and shifts, i->c, c->i, retention, lengths.

    i->c: share of corrections of failed anchors that are correct; c->i: share of corrections of correct anchors
    that are wrong; retention = 1 - c->i (it drives rho). Reduced over ranks, a rate without anchors of its kind is
    NaN rather than missing: Lightning would otherwise log the previous step's value again.
    """
    anchors = [g.anchor for g in groups]
    rewards = [r for g in groups for r in g.scored.rewards]
    anchor_rewards = [g.anchor_reward for g in groups for _ in g.scored.rewards]
    kept, of_correct = retention_counts(torch.tensor(anchor_rewards), torch.tensor(rewards), correct_threshold)
    of_failed = [r >= correct_threshold for r, a in zip(rewards, anchor_rewards, strict=True) if a < correct_threshold]
    lengths = [len(s.token_ids) for g in groups for s in g.scored.samples]
    return StepStats(
        means={
            "train/correction_reward_mean": (sum(rewards), len(rewards)),
            "train/correction_advantage_shift_mean": (sum(s for g in groups for s in g.advantage_shift), len(rewards)),
            "train/i2c_rate": (sum(of_failed), len(of_failed)),
            "train/c2i_rate": (of_correct - kept, of_correct),
            "train/retention": (kept, of_correct),
            "train/anchor_correct_frac": (sum(a.correct for a in anchors), len(anchors)),
            "train/correction_prompt_len_mean": (sum(len(g.scored.prompt_ids) for g in groups), len(groups)),
            "train/correction_len_mean": (sum(lengths), len(lengths)),
        },
        sums={
            "train/anchors_correct": sum(a.correct for a in anchors),
            "train/anchors_failed": sum(not a.correct for a in anchors),
            "train/anchors_in_band": sum(a.in_band for a in anchors),
            "train/anchors_fallback": sum(not a.in_band for a in anchors),
        },
    )


def sample_table(groups: list[CorrectionGroup], step: int) -> list[dict[str, Any]]:
    """One record per correction: the problem, the anchor attempt, the correction, its reward and advantage shift."""
    return [
        {
            "step": step,
            "problem": g.scored.row["prompt"][-1]["content"],
            "answer": str(g.scored.row.get("answer", "")),
            "anchor": g.anchor_text,
            "anchor_reward": g.anchor_reward,
            "anchor_in_band": g.anchor.in_band,
            "correction": text,
            "reward": reward,
            "advantage_shift": shift,
        }
        for g in groups
        for text, reward, shift in zip(g.scored.texts, g.scored.rewards, g.advantage_shift, strict=True)
    ]


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
