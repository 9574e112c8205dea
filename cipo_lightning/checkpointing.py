"""Checkpoints that survive a kill: atomic writes, and `--ckpt_path last` across runs.

Lightning writes a local checkpoint through an fsspec transaction whose temporary file lives in the system's temp
folder; when that is another filesystem than the run's, the final move is a copy, and a kill during it leaves a
truncated `.ckpt` where the resume looks first. `AtomicCheckpointIO` writes next to the target and renames (a rename
within one folder is atomic on POSIX filesystems), so a checkpoint path holds either the previous complete file or
the new complete one. CIPOModule installs it in place of Lightning's default.

Each run logs into a new version_N folder, so Lightning's own `ckpt_path="last"` (which looks in the current run's
checkpoint folder) would find nothing and silently start over; `latest_checkpoint` finds the newest complete
checkpoint of earlier runs under the root folder instead.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_MARK = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file in the target's folder, fsync, then rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
        try:
            with temporary.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        # The rename itself reaches the disk with the folder's entry.
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def latest_checkpoint(root_dir: str | Path) -> Path | None:
    """The most recently written complete checkpoint under root_dir/version_*/checkpoints/ (files, or folders of a
    sharded checkpoint), or None. Links (last.ckpt) are followed; a dangling one or a temporary file is skipped."""
    candidates = []
    for path in Path(root_dir).glob("version_*/checkpoints/*.ckpt"):
        resolved = path.resolve()
        if TEMP_MARK in resolved.name or not resolved.exists():
            continue
        if resolved.is_dir() and not (resolved / ".metadata").is_file():
            continue  # a sharded (DCP) checkpoint writes its .metadata last: without it the folder is incomplete
        candidates.append((resolved.stat().st_mtime, resolved))
    return max(candidates)[1] if candidates else None


def rng_states() -> dict[str, Any]:
    """This process's random states (torch, CUDA, numpy, Python) as tensors and plain values, which a
    `weights_only` checkpoint load accepts (numpy's own state holds an ndarray, which it refuses)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
