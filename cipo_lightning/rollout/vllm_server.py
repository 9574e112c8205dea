"""Rollouts from a separate vLLM server (other GPUs or nodes), with the trainer's weights pushed after each step.

The server is vLLM's own OpenAI-compatible server, started with scripts/vllm_server.sh (docs/scaling.md): dev mode
on, for the two endpoints weight sync needs, and log-probs after temperature scaling, as the colocated engine.
Generation is one `/v1/completions` request per prompt (token ids in, token ids and their log-probs out), sent
concurrently so the server batches them.

Weight sync goes through files: rank 0 writes the policy's full tensors as safetensors buckets (one bucket in memory
at a time) into a folder the server can read, then asks the server's workers to `reload_weights` from it
(`/collective_rpc`) and drops the prefix cache (cached KV of old weights is stale). That works wherever a folder is
shared (the same machine, or a network filesystem between nodes) and on any vLLM backend, the CPU one included;
NCCL transfer between trainer and server GPUs is not implemented here. Under data parallelism every rank talks to the
same server (vLLM's `--data-parallel-size` scales it behind one URL); rank 0 alone pushes weights and the others
wait at a barrier.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cipo_lightning.distributed import is_distributed, rank
from cipo_lightning.rollout.engine import RolloutEngine, Sample, SamplingSettings, derived_seed, regroup

_LAUNCH_HINT = "start it with `bash scripts/vllm_server.sh MODEL` (docs/scaling.md)"


class VLLMServerEngine(RolloutEngine):
    """A vLLM server reached over HTTP; weights pushed through a shared folder."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        weight_dir: str | None = None,
        dtype: str = "bfloat16",
        bucket_mb: int = 512,
        max_concurrent_requests: int = 64,
        request_timeout_s: float = 600.0,
        startup_timeout_s: float = 600.0,
    ) -> None:
        """
        Args:
            url: the server's base URL (scheme, host, port).
            weight_dir: a folder both the trainer's rank 0 and the server can read and write; each sync writes a
                subfolder and removes it once loaded. Default: a new temporary folder on this machine (/dev/shm
                where it exists), which serves a server on the same machine; set a shared filesystem path for a
                server on another node.
            dtype: dtype the weights are written in; use the server's --dtype (it casts otherwise).
            bucket_mb: the most megabytes of weights held in memory and written per file while syncing.
            max_concurrent_requests: prompts in flight at once (the server batches them).
            request_timeout_s: the longest one request (a prompt's samples, a weight reload) may take.
            startup_timeout_s: how long to wait for the server to come up (it may still be loading the model).
        """
        self.url = url.rstrip("/")
        self.weight_dir = weight_dir
        self.dtype = dtype
        self.bucket_bytes = bucket_mb * 2**20
        self.max_concurrent_requests = max_concurrent_requests
        self.request_timeout_s = request_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.served_model: str | None = None
        self._own_weight_dir = False
        self._syncs = 0

    def start(self, model_path: str, seed: int, device: torch.device) -> None:
        # The server holds its own model; the trainer pushes its weights before the first generation, so the
        # server may have been started on any checkpoint of the same architecture.
        self._wait_until_up()
        info = self._request("GET", "/server_info?config_format=json", allow_missing=True)
        if info is None:
            raise RuntimeError(
                f"The vLLM server at {self.url} has no /server_info: it runs without VLLM_SERVER_DEV_MODE=1, which "
                f"weight sync needs; {_LAUNCH_HINT}"
            )
        model_config = info["vllm_config"]["model_config"]
        if model_config["logprobs_mode"] != "processed_logprobs":
            raise RuntimeError(
                f"The vLLM server at {self.url} returns {model_config['logprobs_mode']}; the trainer needs the "
                f"log-probs it sampled from (after temperature): restart it with --logprobs-mode processed_logprobs; "
                f"{_LAUNCH_HINT}"
            )
        self.max_model_len = model_config.get("max_model_len")
        self.served_model = self._request("GET", "/v1/models")["data"][0]["id"]
        if rank() == 0 and self.weight_dir is None:
            shm = Path("/dev/shm")
            self.weight_dir = tempfile.mkdtemp(prefix="cipo_weights_", dir=shm if shm.is_dir() else None)
            self._own_weight_dir = True

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        return self.generate_many([(prompts, sampling)])[0]

    def generate_many(self, requests: list[tuple[list[list[int]], SamplingSettings]]) -> list[list[list[Sample]]]:
        """Every prompt of every request sent concurrently, so the server batches them all."""
        jobs = [
            (p, sampling, None if sampling.seed is None else derived_seed(sampling.seed, p))
            for prompts, sampling in requests
            for p in prompts
        ]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrent_requests, len(jobs)))) as pool:
            samples = list(pool.map(lambda job: self._complete(*job), jobs))
        return regroup(samples, (len(prompts) for prompts, _ in requests))

    def _complete(self, prompt: list[int], sampling: SamplingSettings, seed: int | None) -> list[Sample]:
        body = {
            "model": self.served_model,
            "prompt": prompt,
            "n": sampling.n,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            # Explicit neutral values: the server would otherwise apply the model's generation_config defaults
            # (top_k, repetition penalty), and the trainer's log-probs assume plain temperature / top-p sampling.
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "logprobs": 0,
            "return_token_ids": True,
            "seed": seed,
        }
        choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        return [
            Sample(
                token_ids=choice["token_ids"],
                logprobs=choice["logprobs"]["token_logprobs"],
                truncated=choice["finish_reason"] == "length",
            )
            for choice in choices
        ]

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        from safetensors.torch import save_file

        # Every rank walks the tensors: under FSDP2 each full tensor is a collective gather.
        writer = rank() == 0
        folder = Path(self.weight_dir or ".") / f"sync_{self._syncs:06d}"
        self._syncs += 1
        if writer:
            folder.mkdir(parents=True)
        bucket: dict[str, Tensor] = {}
        size = 0
        files = 0
        for name, tensor in named_tensors:
            if not writer:
                continue
            # A copy on the CPU in the server's dtype (tied tensors share storage, which one file cannot hold).
            bucket[name] = tensor.detach().to(device="cpu", dtype=getattr(torch, self.dtype), copy=True).contiguous()
            size += bucket[name].nbytes
            if size >= self.bucket_bytes:
                save_file(bucket, folder / f"model-{files:05d}.safetensors")
                bucket, size, files = {}, 0, files + 1
        if writer:
            if bucket:
                save_file(bucket, folder / f"model-{files:05d}.safetensors")
            try:
                self._request("POST", "/collective_rpc", {"method": "reload_weights",
                                                          "kwargs": {"weights_path": str(folder)}})  # fmt: skip
                self._request("POST", "/reset_prefix_cache", {})
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        if is_distributed():
            torch.distributed.barrier()  # no rank samples before the server holds the new weights

    def shutdown(self) -> None:
        if self._own_weight_dir and self.weight_dir is not None:
            shutil.rmtree(self.weight_dir, ignore_errors=True)
            self.weight_dir = None
            self._own_weight_dir = False

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"No vLLM server answered at {self.url} within {self.startup_timeout_s:.0f} s ({err}); "
                        f"{_LAUNCH_HINT}, or set rollout.engine.init_args.url"
                    ) from err
            time.sleep(2)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, allow_missing: bool = False) -> Any:
        """The JSON answer of one request; None for an empty answer, or for HTTP 404 with allow_missing."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 404 and allow_missing:
                return None
            detail = err.read().decode(errors="replace")[:2000]
            raise RuntimeError(f"vLLM server {method} {path} failed with HTTP {err.code}: {detail}") from err
        return json.loads(payload) if payload else None
