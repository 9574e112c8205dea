"""The correction stream of a CIPO step, between the engine calls: which attempts become anchors, what the model
is shown, how the corrections are judged, and what gets logged.

The rollout callback samples the base groups, calls `correction_prompts` for the anchors' messages, samples G_c
corrections per anchor with the same engine and weights, scores them with the task's verifier against the anchor's
original row (so the verifier sees the original problem and answer), and wraps each group in a CorrectionGroup with
its shaped rewards. Everything here is plain Python over scored groups; the math is in algorithms/cipo.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cipo_lightning.algorithms import Anchor, correction_messages, retention_counts
from cipo_lightning.distributed import StepStats
from cipo_lightning.rollout.batch import ScoredGroup

CORRECT = 1.0  # rewards at or above this count as correct (binary verifiers give 1.0)


@dataclass
class CorrectionGroup:
    """The corrections sampled for one anchor, with their verifier rewards (in `scored`) and shaped rewards."""

    anchor: Anchor
    anchor_text: str
    anchor_reward: float
    scored: ScoredGroup
    shaped_rewards: list[float]

    @property
    def training_group(self) -> ScoredGroup:
        """The group as the loss sees it: the shaped rewards replace the verifier's."""
        return replace(self.scored, rewards=self.shaped_rewards)


def correction_prompts(base: list[ScoredGroup], anchors: list[Anchor], template: str) -> list[list[dict[str, str]]]:
    """Chat messages of each anchor's correction prompt: its problem and the model's own decoded attempt."""
    return [correction_messages(base[a.group].row["prompt"], base[a.group].texts[a.sample], template) for a in anchors]


def correction_stats(groups: list[CorrectionGroup]) -> StepStats:
    """Anchors by kind and band, correction rewards raw and shaped, i->c, c->i, retention, lengths.

    i->c: share of corrections of failed anchors that are correct; c->i: share of corrections of correct anchors
    that are wrong; retention = 1 - c->i (it drives rho). Reduced over ranks, a rate without anchors of its kind is
    NaN rather than missing: Lightning would otherwise log the previous step's value again.
    """
    anchors = [g.anchor for g in groups]
    rewards = [r for g in groups for r in g.scored.rewards]
    anchor_rewards = [g.anchor_reward for g in groups for _ in g.scored.rewards]
    kept, of_correct = retention_counts(torch.tensor(anchor_rewards), torch.tensor(rewards), CORRECT)
    of_failed = [r >= CORRECT for r, a in zip(rewards, anchor_rewards, strict=True) if a < CORRECT]
    lengths = [len(s.token_ids) for g in groups for s in g.scored.samples]
    return StepStats(
        means={
            "train/correction_reward_mean": (sum(rewards), len(rewards)),
            "train/correction_reward_shaped_mean": (sum(r for g in groups for r in g.shaped_rewards), len(rewards)),
            "train/i2c_rate": (sum(of_failed), len(of_failed)),
            "train/c2i_rate": (of_correct - kept, of_correct),
            "train/retention": (kept, of_correct),
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
    """One record per correction: the problem, the anchor attempt, the correction, and their rewards."""
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
            "shaped_reward": shaped,
        }
        for g in groups
        for text, reward, shaped in zip(g.scored.texts, g.scored.rewards, g.shaped_rewards, strict=True)
    ]


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
