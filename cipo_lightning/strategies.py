"""Scale-out helpers on Lightning's own strategies: FSDP2 over every rank, and the decoder layers it shards.

Single device and DDP are Lightning's strategies as they come (configs/strategy/*.yaml). FSDP2
(`fully_shard`) runs through Lightning's ModelParallelStrategy, which leaves the sharding to the module's
`configure_model`; `FSDP2Strategy` fixes its mesh to pure data parallelism over all ranks (the parent's defaults
would make the GPUs of a node a tensor-parallel group) and says how to shard: every decoder layer, then the root,
with an optional mixed-precision policy. CIPOModule.configure_model calls `shard` on the policy and the frozen
reference. It runs on CPUs with gloo as well as on GPUs with NCCL (FSDP1, Lightning's FSDPStrategy, needs GPUs).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model: modules whose class is in its `_no_split_modules` (e.g.
    LlamaDecoderLayer, Qwen3DecoderLayer), the unit FSDP shards and checkpoints."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules")
    return layers


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks (data parallel, no tensor parallelism): parameters, gradients and optimizer states are
    sharded across every process; a forward gathers one decoder layer at a time."""

    def __init__(
        self,
        param_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = "float32",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            param_dtype: dtype of the gathered parameters in forward and backward (FSDP2 mixed precision, e.g.
                bfloat16 on GPUs); the sharded master weights and optimizer states stay in their own dtype.
                None: no cast.
            reduce_dtype: dtype of the gradient reduce-scatter (float32 keeps the sum exact enough).
            save_distributed_checkpoint: each rank writes its own shard (a checkpoint folder); False gathers the
                full weights on rank 0 into one file.
            process_group_backend: gloo on CPUs, nccl on GPUs by default.
            timeout: timeout of the collectives.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype

    def setup_environment(self) -> None:
        # Every rank in one data-parallel group (the parent's "auto" would be the number of nodes).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: torch.nn.Module) -> None:
        """fully_shard every decoder layer, then the whole model, over the data-parallel mesh (in place)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        policy = MixedPrecisionPolicy(param_dtype=dtype[self.param_dtype], reduce_dtype=dtype[self.reduce_dtype])
        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
