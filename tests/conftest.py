import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a hub: loaders must work (or fail clearly) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer Llama (hidden 128, head_dim 64) with the embedded tokenizer, built once per session."""
    from cipo_lightning.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
