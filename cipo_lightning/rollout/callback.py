"""The rollout stage of every RL step: prompts -> sampled completions -> verifier rewards -> a training batch.

It runs in `on_train_batch_start`, that is after the previous optimizer step and before training_step pulls the
batch, so step k always trains on completions sampled with the weights after step k-1 (on-policy). Before
generating it pushes the policy's weights into the engine whenever they changed since the last push (and once at the
start, which also covers a run resumed from a checkpoint).

With dynamic sampling (DAPO) groups whose completions all got the same reward are dropped, since their advantages
are zero, and new prompts are sampled until the step has data.prompts_per_step informative groups or
max_generation_rounds is reached.

With `algorithm: cipo` the step also runs the correction stream (docs/cipo.md; rollout/corrections.py holds it top
to bottom): anchors are chosen from the scored base groups with the AdaptiveReplay callback's rho, the model is shown
each anchor attempt and samples correction_group_size corrections with the same engine and weights, the task's
verifier scores them, and the RiskShaping callback's advantage shift is attached. Base and correction groups go to
the loss in one batch with a stream label per row. `algorithm: grpo` runs the same code with that stream off. With
`anchors_from_previous_step` the anchors come from the previous step's groups instead, so their corrections are
sampled in the same engine call as this step's base groups.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from cipo_lightning.algorithms import group_stats
from cipo_lightning.algorithms.cipo import DEFAULT_CORRECTION_TEMPLATE, check_correction_template, correction_messages
from cipo_lightning.data.tasks import Row, Task, prompt_token_ids
from cipo_lightning.distributed import StepStats, gather_objects, max_over_ranks
from cipo_lightning.errors import ConfigError
from cipo_lightning.rollout.batch import (
    BASE_STREAM,
    CORRECTION_STREAM,
    RolloutBatch,
    ScoredGroup,
    collate_groups,
)
from cipo_lightning.rollout.corrections import CorrectionGroup, CorrectionStream, append_jsonl, sample_table
from cipo_lightning.rollout.engine import RolloutEngine, SamplingSettings, derived_seed, regroup

SAMPLE_TABLE_FILE = "correction_samples.jsonl"


class RolloutCallback(L.Callback):
    """Generates and scores each step's groups (and, under CIPO, correction groups) and streams them to the
    DataModule."""

    def __init__(
        self,
        engine: RolloutEngine,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        dynamic_sampling: bool = False,
        max_generation_rounds: int = 3,
        algorithm: Literal["cipo", "grpo"] = "cipo",
        num_anchors: int | None = None,
        correction_group_size: int = 8,
        anchor_band: tuple[float, float] = (0.25, 0.75),
        max_anchors_per_prompt: int = 1,
        correction_template: str = DEFAULT_CORRECTION_TEMPLATE,
        sample_table_every_n_steps: int = 10,
        reproducible_sampling: bool = False,
        correct_threshold: float = 1.0,
        anchors_from_previous_step: bool = False,
    ) -> None:
        """
        Args:
            engine: the rollout engine (cipo_lightning.rollout.VLLMEngine or HFEngine).
            group_size: completions sampled per prompt (G); advantages compare completions within a group.
            max_new_tokens: longest completion (attempts and corrections); longer ones are cut and marked truncated.
            temperature: sampling temperature; the trainer scores tokens at the same temperature.
            top_p: nucleus sampling threshold. Below 1 the engines' log-probs are renormalised over the nucleus
                while the trainer scores the full softmax(logits / temperature), so they differ (a warning says so).
            dynamic_sampling: drop base groups whose completions all got the same reward (no gradient signal) and
                sample new prompts to refill the step (DAPO).
            max_generation_rounds: with dynamic_sampling, the most generation rounds per step; the step trains on
                the informative groups found by then (or, if none, on the last round's groups: a zero gradient).
            algorithm: cipo (base groups plus the correction stream) or grpo (base groups only: the baseline).
                cipo needs the AdaptiveReplay and RiskShaping callbacks (the CLI's `replay` and `shaping` sections).
            num_anchors: anchors per step on each rank (K), each giving one correction group; default: half the
                step's base groups, rounded up. The paper's K is not known (docs/cipo.md).
            correction_group_size: corrections sampled per anchor (G_c).
            anchor_band: pass-rate band [low, high] of the prompts anchors come from first (intermediate
                difficulty); other prompts are the fallback when the band has too few.
            max_anchors_per_prompt: the most anchors taken from one prompt's group.
            correction_template: the correction prompt's user turn, with the fields {problem} and {attempt};
                rendered through the model's chat template. It must not say whether the attempt was right.
            sample_table_every_n_steps: every N steps write the correction samples (problem, anchor, correction,
                rewards) to correction_samples.jsonl in the log directory and to wandb; 0 turns it off.
            reproducible_sampling: seed every prompt's samples from (seed_everything, step, prompt), so they do not
                depend on batching, the number of ranks or a resume: a data-parallel run samples what one process
                would. Slower: HFEngine then generates prompt by prompt, vLLM keeps a generator per request.
            correct_threshold: a reward at or above this counts as correct, everywhere "correct" is decided: pass
                rates and the anchor band, correct and failed anchors, retention, risk shaping, i->c and c->i,
                train/accuracy and evaluation. 1.0 suits binary verifiers; lower it for partial-credit rewards.
            anchors_from_previous_step: under cipo, take each step's anchors from the previous step's scored base
                groups and sample their corrections in the same engine call as this step's base groups: one decode
                loop a step instead of two (vLLM decodes both streams together). The anchors are then one update
                old; the corrections are sampled with this step's weights, on-policy as before. The first step has
                no previous groups and takes its own. Checkpoints keep the groups, so a resumed run corrects what
                the uninterrupted one would. Off by default: docs/cipo.md's step takes anchors from its own groups.
        """
        if group_size < 2:
            raise ConfigError(
                f"rollout.group_size must be >= 2 (advantages compare samples of a prompt), got {group_size}"
            )
        if correction_group_size < 2:
            raise ConfigError(
                f"rollout.correction_group_size must be >= 2 (advantages compare corrections of an anchor), "
                f"got {correction_group_size}"
            )
        for key, value in {
            "max_generation_rounds": max_generation_rounds,
            "max_anchors_per_prompt": max_anchors_per_prompt,
            "num_anchors": 1 if num_anchors is None else num_anchors,
        }.items():
            if value < 1:
                raise ConfigError(f"rollout.{key} must be >= 1, got {value}")
        if temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for RL sampling, got {temperature}")
        low, high = anchor_band
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"rollout.anchor_band must satisfy 0 <= low <= high <= 1, got {list(anchor_band)}")
        try:
            check_correction_template(correction_template)
        except ValueError as err:
            raise ConfigError(f"rollout.correction_template: {err}") from err
        if top_p < 1.0:
            warnings.warn(
                f"rollout.top_p {top_p} < 1: the engine's log-probs are renormalised over the nucleus while the "
                "trainer scores softmax(logits / temperature) over the whole vocabulary, so train/logp_mismatch grows "
                "and the samples are not exactly on-policy (model.rollout_is corrects for it)",
                stacklevel=2,
            )
        if sample_table_every_n_steps < 0:
            raise ConfigError(f"rollout.sample_table_every_n_steps must be >= 0, got {sample_table_every_n_steps}")
        self.engine = engine
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.dynamic_sampling = dynamic_sampling
        self.max_generation_rounds = max_generation_rounds
        self.algorithm = algorithm
        self.num_anchors = num_anchors
        self.correction_group_size = correction_group_size
        self.anchor_band = (low, high)
        self.max_anchors_per_prompt = max_anchors_per_prompt
        self.correction_template = correction_template
        self.sample_table_every_n_steps = sample_table_every_n_steps
        self.reproducible_sampling = reproducible_sampling
        self.correct_threshold = correct_threshold
        self.anchors_from_previous_step = anchors_from_previous_step
        self.corrections: CorrectionStream | None = None  # built at fit start under cipo
        # Under anchors_from_previous_step: the last step's base groups, and every rank's as restored from a checkpoint.
        self._previous_groups: list[ScoredGroup] = []
        self._restored_groups: list[list[dict[str, Any]]] | None = None
        self._synced_version: int | None = None
        self._started = False
        self._seed = 0
        self._run_seed = 0
        self._step_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.algorithm == "cipo":
            self.corrections = CorrectionStream.from_trainer(
                trainer,
                num_anchors=self.num_anchors,
                band=self.anchor_band,
                max_anchors_per_prompt=self.max_anchors_per_prompt,
                template=self.correction_template,
                correct_threshold=self.correct_threshold,
            )
        datamodule = trainer.datamodule
        datamodule.check_prompt_lengths(pl_module.tokenizer)
        tasks = {id(t): t for t in [datamodule.task, *(s.task for s in datamodule.eval_sets)] if t is not None}
        skipped = sum(len(t.skipped_rows) for t in tasks.values())
        for logger in trainer.loggers if skipped else []:  # once per run: rows dropped by skip_bad_rows
            logger.log_metrics({"data/skipped_rows": float(skipped)}, step=trainer.global_step)
        self.start_engine(trainer, pl_module)
        self.check_model_len(pl_module.tokenizer, datamodule.train_rows)  # a server engine knows its limit once up

    def start_engine(self, trainer: L.Trainer, pl_module: L.LightningModule) -> RolloutEngine:
        """The engine, started on the policy's model the first time (fit, validate or test), seeded per rank."""
        if not self._started:
            self._run_seed = torch.initial_seed() % 2**31  # seed_everything's seed, the same on every rank
            self._seed = self._run_seed + trainer.global_rank
            self.engine.start(pl_module.model_path, seed=self._seed, device=pl_module.device)
            self._started = True
        return self.engine

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restored, self._restored_groups = self._restored_groups, None
        if restored is not None and len(restored) == trainer.world_size:
            self._previous_groups = [
                ScoredGroup(g["row"], [], [], g["texts"], g["rewards"]) for g in restored[trainer.global_rank]
            ]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shutdown_engine()

    def state_dict(self) -> dict[str, Any]:
        """Under anchors_from_previous_step, every rank's last base groups (what anchors need of them: row, texts,
        rewards), gathered from all ranks. A collective: Lightning asks every rank for the state it checkpoints."""
        if not self.anchors_from_previous_step:
            return {}
        mine = [{"row": g.row, "texts": g.texts, "rewards": g.rewards} for g in self._previous_groups]
        return {"previous_groups": gather_objects(mine)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Set up per rank at train start, once the world size is known.
        self._restored_groups = state_dict.get("previous_groups")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation during fit keeps the engine for the next training step.
        if trainer.state.fn != "fit":
            self.shutdown_engine()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shutdown_engine()

    def shutdown_engine(self) -> None:
        if self._started:
            self.engine.shutdown()
        self._started = False
        self._synced_version = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_start = time.perf_counter()
        times = {"time/rollout": 0.0, "time/verify": 0.0}
        self.sync_weights(pl_module, times)
        datamodule = trainer.datamodule
        corrections: list[CorrectionGroup] = []
        if self.corrections is None:
            groups, stats, _ = self.base_groups(pl_module, datamodule, times)
        else:
            times["time/correction_rollout"] = 0.0
            groups, corrections, stats = self.both_streams(pl_module, datamodule, trainer.global_step, times)
            stats.update(self.corrections.stats(corrections))
        rollout_batch = collate_groups(
            groups + [c.training_group for c in corrections],
            [BASE_STREAM] * len(groups) + [CORRECTION_STREAM] * len(corrections),
            pl_module.tokenizer.pad_token_id,
            self.temperature,
            self.max_new_tokens,
        )
        datamodule.push(rollout_batch)
        stats.update(rollout_stats(rollout_batch, self.correct_threshold)).maxima.update(times)
        logged = stats.reduce()  # over all ranks: every rank logs, and moves rho, with the same numbers
        if self.corrections is not None:
            self.corrections.observe(logged)
            self.write_sample_table(trainer, corrections)
        reward = logged.pop("train/reward_mean")
        size = len(groups)
        pl_module.log("train/reward_mean", reward, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=size)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The whole step (weight sync, rollouts, verification, corrections, the module's updates), slowest rank.
        step = StepStats(maxima={"time/step": time.perf_counter() - self._step_start}).reduce()
        pl_module.log_dict(step, on_step=True, on_epoch=False, batch_size=1)

    def sync_weights(self, pl_module: L.LightningModule, times: dict[str, float]) -> None:
        """Push the policy's weights into the engine if they changed since the last push."""
        start = time.perf_counter()
        if self._synced_version != pl_module.policy_version:
            self.engine.load_weights(pl_module.policy_weights())
            self._synced_version = pl_module.policy_version
        times["time/weight_sync"] = time.perf_counter() - start

    def base_groups(
        self,
        pl_module: L.LightningModule,
        datamodule: Any,
        times: dict[str, float],
        also: list[GroupRequest] | None = None,
    ) -> tuple[list[ScoredGroup], StepStats, list[list[ScoredGroup]]]:
        """This step's base groups: one per prompt (with dynamic sampling, the informative ones); the requests in
        `also` are sampled in the first round's engine call, and their groups come third."""
        task = datamodule.task
        sampling = self.sampling(pl_module, self.group_size)

        def sample(rows: list[Row], also: list[GroupRequest]) -> list[list[ScoredGroup]]:
            requests = [GroupRequest(rows, [row["prompt"] for row in rows], sampling), *also]
            return sample_scored_requests(self.engine, pl_module.tokenizer, task, requests, times, "time/rollout")

        groups, *also_groups = sample(datamodule.next_prompts(), also or [])
        if not self.dynamic_sampling:
            return groups, StepStats(), also_groups
        sampled, kept, rounds = len(groups), [g for g in groups if g.informative], 1
        # Rounds are decided over all ranks: every rank draws the same number of prompt blocks, so the shared
        # prompt order stays aligned; a rank that already has enough draws its block without sampling it.
        while rounds < self.max_generation_rounds and max_over_ranks(int(len(kept) < datamodule.prompts_per_step)):
            rows = datamodule.next_prompts()
            rounds += 1
            if len(kept) < datamodule.prompts_per_step:
                (more,) = sample(rows, [])
                sampled += len(more)
                kept += [g for g in more if g.informative]
        stats = StepStats(
            means={"train/informative_group_frac": (len(kept), sampled)}, maxima={"train/generation_rounds": rounds}
        )
        return kept[: datamodule.prompts_per_step] or groups, stats, also_groups

    def both_streams(
        self, pl_module: L.LightningModule, datamodule: Any, step: int, times: dict[str, float]
    ) -> tuple[list[ScoredGroup], list[CorrectionGroup], StepStats]:
        """Base groups and the correction stream (rollout/corrections.py). Anchors come from this step's base groups,
        their corrections sampled after them; or, under anchors_from_previous_step and once there is a previous
        step, from the previous step's, their corrections sampled in the base groups' engine call (timed in
        time/rollout). The anchor draw is seeded by (seed, rank, step), so a resumed run draws what the original
        would."""
        rng = random.Random(f"{self._seed}-{step}")
        sampling = self.sampling(pl_module, self.correction_group_size)
        previous = self._previous_groups if self.anchors_from_previous_step else []
        if previous:
            anchors = self.corrections.select(previous, rng)
            rows, messages = self.corrections.requests(previous, anchors)
            also = [GroupRequest(rows, messages, sampling)] if anchors else []
            groups, stats, scored = self.base_groups(pl_module, datamodule, times, also)
            corrections = self.corrections.corrected(previous, anchors, scored[0] if anchors else [])
        else:
            groups, stats, _ = self.base_groups(pl_module, datamodule, times)

            def sample(rows: list[Row], messages: list[list[dict[str, str]]]) -> list[ScoredGroup]:
                return sample_scored_groups(
                    self.engine, pl_module.tokenizer, datamodule.task, rows, messages, sampling, times,
                    "time/correction_rollout",
                )  # fmt: skip

            corrections = self.corrections.run(groups, sample, rng)
        if self.anchors_from_previous_step:
            self._previous_groups = groups
        return groups, corrections, stats

    def check_model_len(self, tokenizer: Any, rows: list[Row]) -> None:
        """Stop before any generation when the engine's max_model_len cannot hold the longest base prompt plus
        max_new_tokens or, under cipo, the longest correction prompt (its problem in the template with an attempt
        of max_new_tokens tokens) plus max_new_tokens."""
        limit = self.engine.max_model_len
        if limit is None or not rows:
            return
        # Token counts follow character counts closely: tokenising the longest rows by characters keeps this check
        # to a fraction of a second on large datasets.
        candidates = sorted(rows, key=lambda row: sum(len(m["content"]) for m in row["prompt"]))[-256:]
        lengths = [len(prompt_token_ids(tokenizer, row["prompt"])) for row in candidates]
        longest = max(range(len(candidates)), key=lengths.__getitem__)
        needs = {f"the longest training prompt ({lengths[longest]} tokens)": lengths[longest]}
        if self.algorithm == "cipo":
            # The correction prompt of the longest problem, measured with an empty attempt; the attempt adds at most
            # max_new_tokens tokens.
            messages = correction_messages(candidates[longest]["prompt"], "", self.correction_template)
            empty = len(prompt_token_ids(tokenizer, messages))
            what = f"the longest correction prompt ({empty} tokens + an attempt of up to {self.max_new_tokens})"
            needs[what] = empty + self.max_new_tokens
        for what, tokens in needs.items():
            if tokens + self.max_new_tokens > limit:
                raise ConfigError(
                    f"rollout.engine.init_args.max_model_len {limit} cannot hold {what} plus rollout.max_new_tokens "
                    f"{self.max_new_tokens} = {tokens + self.max_new_tokens} tokens: raise max_model_len, or lower "
                    "rollout.max_new_tokens or data.max_prompt_tokens"
                )

    def sampling(self, pl_module: L.LightningModule, n: int) -> SamplingSettings:
        """How this step samples n completions of a prompt (seeded per step under reproducible_sampling)."""
        step = pl_module.trainer.global_step
        return SamplingSettings(
            n=n,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=derived_seed(self._run_seed, [step]) if self.reproducible_sampling else None,
        )

    def write_sample_table(self, trainer: L.Trainer, groups: list[CorrectionGroup]) -> None:
        """Every sample_table_every_n_steps steps: this rank-0 step's corrections to JSONL and to wandb."""
        every = self.sample_table_every_n_steps
        if not every or trainer.global_step % every:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast from rank 0: every rank must ask
        if trainer.global_rank != 0 or not groups:
            return
        records = sample_table(groups, trainer.global_step)
        append_jsonl(Path(log_dir) / SAMPLE_TABLE_FILE, records)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(records[0])
                data = [[record[c] for c in columns] for record in records]
                logger.log_table("train/correction_samples", columns=columns, data=data, step=trainer.global_step)


@dataclass(frozen=True)
class GroupRequest:
    """Prompts (chat messages) to sample groups of, the task rows their samples are scored against, and how."""

    rows: list[Row]
    messages: list[list[dict[str, str]]]
    sampling: SamplingSettings


def sample_scored_groups(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    rows: list[Row],
    messages: list[list[dict[str, str]]],
    sampling: SamplingSettings,
    times: dict[str, float] | None = None,
    timer: str = "time/rollout",
) -> list[ScoredGroup]:
    """Render `messages` with the chat template, sample `sampling.n` completions of each with `engine`, decode them
    and score them with the task's verifier against `rows[i]`. Adds seconds to times[timer] and times["time/verify"]."""
    return sample_scored_requests(engine, tokenizer, task, [GroupRequest(rows, messages, sampling)], times, timer)[0]


def sample_scored_requests(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    requests: list[GroupRequest],
    times: dict[str, float] | None = None,
    timer: str = "time/rollout",
) -> list[list[ScoredGroup]]:
    """`sample_scored_groups` of several requests in one engine call (`RolloutEngine.generate_many`) and one
    verifier call; the groups of each request, in request order."""
    times = times if times is not None else {}
    prompts = [[prompt_token_ids(tokenizer, m) for m in request.messages] for request in requests]
    start = time.perf_counter()
    sampled = engine.generate_many([(p, r.sampling) for p, r in zip(prompts, requests, strict=True)])
    times[timer] = times.get(timer, 0.0) + time.perf_counter() - start

    groups = [
        (row, prompt, samples)
        for request, request_prompts, request_sampled in zip(requests, prompts, sampled, strict=True)
        for row, prompt, samples in zip(request.rows, request_prompts, request_sampled, strict=True)
    ]
    texts = tokenizer.batch_decode([s.token_ids for _, _, samples in groups for s in samples], skip_special_tokens=True)
    start = time.perf_counter()
    rewards = task.score([row for row, _, samples in groups for _ in samples], texts)
    times["time/verify"] = times.get("time/verify", 0.0) + time.perf_counter() - start
    sizes = [len(samples) for _, _, samples in groups]
    scored = [
        ScoredGroup(row, prompt, samples, group_texts, group_rewards)
        for (row, prompt, samples), group_texts, group_rewards in zip(
            groups, regroup(texts, sizes), regroup(rewards, sizes), strict=True
        )
    ]
    return regroup(scored, (len(request.rows) for request in requests))


def rollout_stats(batch: RolloutBatch, correct_threshold: float = 1.0) -> StepStats:
    """What the base groups look like: reward, accuracy, how many groups carry no signal, lengths."""
    base = batch.streams == BASE_STREAM
    rewards, lengths = batch.rewards[base], batch.completion_mask[base].sum(-1)
    _, std, _ = group_stats(rewards, batch.group_ids[base])
    rows = len(rewards)
    prompt_lengths = batch.attention_mask[base, : batch.prompt_width].sum(-1)
    return StepStats(
        means={
            "train/reward_mean": (rewards.sum().item(), rows),
            "train/accuracy": ((rewards >= correct_threshold).sum().item(), rows),
            "train/zero_variance_frac": ((std == 0).sum().item(), rows),
            "train/completion_len_mean": (lengths.sum().item(), rows),
            "train/truncated_frac": (batch.truncated[base].sum().item(), rows),
            "train/prompt_len_mean": (prompt_lengths.sum().item(), rows),
        },
        maxima={"train/completion_len_max": lengths.max().item()},
    )
