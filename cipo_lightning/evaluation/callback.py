"""The Evaluation callback: pass@k and correction metrics in Lightning's validate and test loops.

`python -m cipo_lightning validate|test --config ...` and validation during fit (`trainer.val_check_interval: N`
steps) run the same code: the DataModule serves each eval set's problems in batches (each rank its own share),
CIPOModule.validation_step / test_step hand every batch to this callback, which samples with the rollout engine
(vLLM or transformers, already holding the policy's current weights), scores with the set's verifier and updates
that set's metrics. At the epoch's end the metrics are reduced over ranks and logged as `val/<set>/<metric>` (or
`test/...`) with the averages over sets as `val/<metric>`, and rank 0 writes eval/<stage>_step<N>.json, .md
(the table) and .png (pass@k curves) plus the samples (eval/<stage>_step<N>_samples.jsonl, one file per rank).

It lives in a callback because the engine does: generation during training is the rollout callback's, and one
engine (one copy of the weights, one KV cache) serves both. CIPOModule adds a default one to a Trainer that has
none. Lightning's sanity check before fit is skipped here: it would sample a whole eval batch for nothing.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L

from cipo_lightning.callbacks import the_callback
from cipo_lightning.data.tasks import Row
from cipo_lightning.errors import ConfigError
from cipo_lightning.evaluation.core import EvalMetrics, evaluate_rows
from cipo_lightning.evaluation.report import averages, write_report
from cipo_lightning.rollout.callback import RolloutCallback
from cipo_lightning.rollout.corrections import append_jsonl
from cipo_lightning.rollout.engine import SamplingSettings

if TYPE_CHECKING:  # the data module imports the rollout package, which imports these callbacks
    from cipo_lightning.data.datamodule import EvalSet


class Evaluation(L.Callback):
    """Evaluates the policy on the DataModule's eval sets in validate, test and validation during fit."""

    def __init__(
        self,
        n: int = 4,
        max_new_tokens: int | None = None,
        max_new_tokens_per_set: dict[str, int] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        two_turn: bool = True,
        write_samples: bool = True,
    ) -> None:
        """
        Args:
            n: samples per problem: mean@n, pass@k for k = 1, 2, 4, ..., n, maj@k; n corrections per given attempt
                in fix-given-solution sets.
            max_new_tokens: longest reply; default: rollout.max_new_tokens.
            max_new_tokens_per_set: longest reply for some sets, by label, e.g. {basic_arithmetic: 48}: a short
                answer task scored on the last number of the reply loses to rambling under a long budget.
            temperature: sampling temperature (> 0: pass@k needs distinct samples); default: rollout.temperature.
            top_p: nucleus sampling threshold; default: rollout.top_p.
            two_turn: also sample one correction of every first attempt (the training correction template) and
                report acc@t1, acc@t2, delta, delta_i2c, delta_c2i.
            write_samples: write every sample with its reward (and correction) to eval/<stage>_step<N>_samples.jsonl.
        """
        if n < 1:
            raise ConfigError(f"eval.n must be >= 1, got {n}")
        if temperature is not None and temperature <= 0:
            raise ConfigError(f"eval.temperature must be > 0 (pass@k needs distinct samples), got {temperature}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.n = n
        self.max_new_tokens = max_new_tokens
        self.max_new_tokens_per_set = dict(max_new_tokens_per_set or {})
        self.temperature = temperature
        self.top_p = top_p
        self.two_turn = two_turn
        self.write_samples = write_samples
        self._sets: list[EvalSet] = []
        self._metrics: list[EvalMetrics] = []
        self._rollout: RolloutCallback | None = None
        self._sampling: SamplingSettings | None = None
        self._stem = Path()
        self._rank_suffix = ""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(trainer, pl_module, "test")

    def _begin(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        """Fresh metrics for every eval set, and the engine started with the policy's current weights."""
        if trainer.sanity_checking:
            return
        rollout = the_callback(trainer, RolloutCallback, "rollout", "evaluation")
        rollout.start_engine(trainer, pl_module)
        rollout.sync_weights(pl_module, {})
        self._rollout = rollout
        self._rank_suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self._sampling = SamplingSettings(
            n=self.n,
            max_new_tokens=self.max_new_tokens or rollout.max_new_tokens,
            temperature=self.temperature or rollout.temperature,
            top_p=self.top_p if self.top_p is not None else rollout.top_p,
        )
        if not hasattr(trainer.datamodule, "eval_sets"):
            raise ConfigError("evaluation needs the RolloutDataModule (it holds the eval sets), not bare dataloaders")
        self._sets = trainer.datamodule.eval_sets
        unknown = set(self.max_new_tokens_per_set) - {s.label for s in self._sets}
        if unknown:
            raise ConfigError(
                f"eval.max_new_tokens_per_set: no eval set {sorted(unknown)} (sets: {[s.label for s in self._sets]})"
            )
        self._metrics = [EvalMetrics(self.n, s.fix, self.two_turn).to(pl_module.device) for s in self._sets]
        # log_dir is a broadcast from rank 0, so every rank asks for it here, not only the one that writes.
        self._stem = Path(trainer.log_dir or trainer.default_root_dir) / "eval" / f"{prefix}_step{trainer.global_step}"
        self._samples_path().unlink(missing_ok=True)  # batches append to it; a rerun into the same folder starts over

    def _set_sampling(self, label: str) -> SamplingSettings:
        if label not in self.max_new_tokens_per_set:
            return self._sampling
        return replace(self._sampling, max_new_tokens=self.max_new_tokens_per_set[label])

    def _samples_path(self) -> Path:
        return self._stem.with_name(f"{self._stem.name}_samples{self._rank_suffix}.jsonl")

    def evaluate_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[Row], index: int) -> None:
        """Sample, verify and count one batch of eval set `index` (called by validation_step / test_step)."""
        if trainer.sanity_checking:
            return
        eval_set = self._sets[index]
        scored = evaluate_rows(
            self._rollout.engine,
            pl_module.tokenizer,
            eval_set.task,
            rows,
            self._set_sampling(eval_set.label),
            eval_set.fix,
            self.two_turn,
            self._rollout.correction_template,
            self._rollout.correct_threshold,
        )
        self._metrics[index].update(scored)
        if self.write_samples:
            append_jsonl(self._samples_path(), [{"set": eval_set.label} | record for record in scored.records])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        if trainer.sanity_checking:
            return
        # Every rank computes (the reduce is collective), so every rank logs the same global values.
        results = {s.label: m.compute() for s, m in zip(self._sets, self._metrics, strict=True)}
        logged = {f"{prefix}/{label}/{key}": value for label, m in results.items() for key, value in m.items()}
        logged |= {f"{prefix}/{key}": value for key, value in averages(results).items()}
        pl_module.log_dict(logged, on_step=False, on_epoch=True, add_dataloader_idx=False)
        if trainer.is_global_zero:
            info = {
                "title": f"{prefix} step {trainer.global_step}",
                "stage": prefix,
                "step": trainer.global_step,
                "model": str(pl_module.hparams.get("model")),
                "ckpt_path": trainer.ckpt_path,
                "sampling": asdict(self._sampling)
                | {"two_turn": self.two_turn, "max_new_tokens_per_set": self.max_new_tokens_per_set},
                "problems": {s.label: len(s.rows) for s in self._sets},
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            write_report(self._stem, results, info)
