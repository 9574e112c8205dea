"""Rollouts with transformers `generate`: slower than vLLM, but needs nothing beyond transformers.

The engine keeps its own inference copy of the model (eval mode, KV cache on, its own dtype), so it is synced with
the policy the same way as vLLM and the on-policy guarantee is tested the same way for both engines.

It samples exactly from softmax(logits / temperature) (cut to top_p where set), the distribution the trainer scores:
`generate` fills every setting left unset from the model's own generation_config (repetition_penalty, top_k, min_p,
typical_p, no_repeat_ngram_size, ...), so the engine replaces that config by one holding only the special tokens,
and passes top_k=0 (transformers' global default would be 50).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from cipo_lightning.rollout.engine import RolloutEngine, Sample, SamplingSettings, derived_seed


class HFEngine(RolloutEngine):
    """transformers `generate` on the trainer's device."""

    def __init__(self, dtype: str = "float32", max_batch_prompts: int = 16) -> None:
        """
        Args:
            dtype: dtype of the inference copy ("float32", "bfloat16", "float16").
            max_batch_prompts: prompts per `generate` call (each with n samples); bounds memory.
        """
        self.dtype = dtype
        self.max_batch_prompts = max_batch_prompts
        self.model = None
        self.pad_token_id: int | None = None
        self.eos_token_ids: set[int] = set()

    def start(self, model_path: str, seed: int, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, self.dtype))
        self.model = model.to(device).eval()
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else min(self.eos_token_ids)
        # Only the special tokens survive: the model's sampling settings would change the sampled distribution.
        self.model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=self.pad_token_id
        )
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        if sampling.seed is not None:
            # Seeded: one prompt per call, so a prompt's samples do not depend on what it is batched with (padding
            # changes the shapes, and the random draws would be shared across the batch).
            out = []
            for prompt in prompts:
                torch.manual_seed(derived_seed(sampling.seed, prompt))
                out.extend(self._generate_chunk([prompt], sampling))
            return out
        out: list[list[Sample]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            out.extend(self._generate_chunk(prompts[start : start + self.max_batch_prompts], sampling))
        return out

    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: generation continues from the last column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        greedy = sampling.temperature == 0.0
        result = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=0,  # not None: generate would fill in its global default, 50
            num_return_sequences=sampling.n,
            max_new_tokens=sampling.max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_token_id,
        )
        new_tokens = result.sequences[:, width:].cpu()
        # `scores` are the processed logits (after temperature and top-p) the token was drawn from.
        scores = torch.stack(result.scores, dim=1).float().log_softmax(-1).cpu()
        logprobs = scores.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        samples = [self._to_sample(new_tokens[i], logprobs[i]) for i in range(len(new_tokens))]
        return [samples[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _to_sample(self, tokens: Tensor, logprobs: Tensor) -> Sample:
        ids = tokens.tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_token_ids), None)
        if end is None:
            return Sample(token_ids=ids, logprobs=logprobs.tolist(), truncated=True)
        return Sample(token_ids=ids[:end], logprobs=logprobs[:end].tolist(), truncated=False)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                state[name].copy_(tensor)

    def shutdown(self) -> None:
        self.model = None
