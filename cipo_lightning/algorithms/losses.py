"""Per-token pieces of the policy objective.

Everything here works on [rows, completion_tokens] tensors aligned with the completion, and returns per-token values;
the caller masks and normalises. Keeping aggregation out of the loss terms is what lets one batch be processed whole
or in micro-batches with the same gradient: the normaliser is computed once for the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampled_token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log p(token) under softmax(logits / T), and the (detached) entropy of that distribution, per position.

    Logits are divided by the sampling temperature so the trainer scores tokens under the distribution the engine
    sampled from, as TRL and verl do. logsumexp instead of log_softmax avoids a second [rows, tokens, vocab] tensor.
    """
    logits = logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """PPO/GRPO token loss -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) and where clipping was active.

    `advantages` is per row ([rows, 1]) or per token. The clip mask marks tokens whose gradient the clip removed.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (non-negative)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` over positions where `mask` is 1."""
    return (values * mask).sum()
