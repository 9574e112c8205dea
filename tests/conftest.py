import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a hub: loaders must work (or fail clearly) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# What a test session may leave in the checkout: Python's byte-code and the tools' caches.
_ALLOWED_IN_CHECKOUT = ("__pycache__/", ".pytest_cache/", ".ruff_cache/")


def checkout_changes() -> set[str] | None:
    """Every untracked, ignored or modified path in the checkout (one `git status` line each), or None outside a
    git checkout. Ignored files are listed too: runs/, wandb/ and lightning_logs/ are in .gitignore. The set-up's
    .venv is left out: its ~80k files took 0.11 of the 0.25 s a call (measured on the 2-core CI-like machine), and
    this runs twice a test."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "-z", "--", ".", ":(exclude).venv"],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    entries = {entry for entry in status.stdout.split("\0") if entry}
    return {entry for entry in entries if not any(allowed in entry for allowed in _ALLOWED_IN_CHECKOUT)}


@pytest.fixture(autouse=True)
def _checkout_stays_clean() -> Iterator[None]:
    """Fails the test that wrote into the checkout (a run folder under runs/, a wandb run, an edited notebook...):
    every test keeps its outputs under its own tmp_path (`--trainer.default_root_dir`)."""
    before = checkout_changes()
    yield
    after = checkout_changes()
    if before is not None and after is not None and after - before:
        added = sorted(after - before)
        pytest.fail(f"the test wrote into the checkout {REPO}: {added[:10]}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer Llama (hidden 128, head_dim 64) with the embedded tokenizer, built once per session."""
    from cipo_lightning.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
