"""Per-token pieces of the policy objective.

Everything here works on [rows, completion_tokens] tensors aligned with the completion, and returns per-token values;
the caller masks and weights them (aggregation.py). Keeping aggregation out of the loss terms is what lets one batch
be processed whole or in micro-batches with the same gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def sampled_token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float, entropy_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """log p(token) under softmax(logits / T), and the entropy of that distribution, per position.

    Logits are divided by the sampling temperature so the trainer scores tokens under the distribution the engine
    sampled from, as TRL and verl do. logsumexp instead of log_softmax avoids a second [rows, tokens, vocab] tensor.
    The entropy is detached unless `entropy_grad` (an entropy bonus needs its gradient).
    """
    logits = logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's per-token log-ratio: the sequence's mean token log-ratio in value, the token's own in gradient.

    log s_i = mean_t(logp - old) over the completion; returned per token as sg(log s_i) + logp_t - sg(logp_t), so
    every token of a sequence shares the ratio s_i (and its clipping) while gradients flow through each token.
    """
    token = (logprobs - old_logprobs) * mask
    mean = token.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return mean.detach() + logprobs - logprobs.detach()


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO/GRPO loss -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A), r = exp(log_ratio).

    `dual_clip` c > 1 bounds the loss of negative-advantage tokens by -c * A (dual-clip PPO), so a token whose ratio
    exploded cannot dominate the batch. Returns the loss and where the low / high clip removed the gradient.
    `advantages` is per row ([rows, 1]) or per token.
    """
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    active = clipped < unclipped
    return loss, (active & (ratio < 1.0)).float(), (active & (ratio > 1.0)).float()


def cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1): -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp.

    The importance weight is clipped and detached instead of the update: every token keeps a gradient. Returns the
    loss and where the weight was clipped from below / above.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * advantages * logprobs
    return loss, (ratio < 1.0 - eps_low).float(), (ratio > 1.0 + eps_high).float()


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3), d = logp - ref.

    k1 = d (unbiased, can be negative); k2 = d^2 / 2; k3 = exp(-d) + d - 1 (unbiased, non-negative).
    """
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta**2
    return torch.exp(-delta) + delta - 1.0


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` over positions where `mask` is non-zero, weighted by the mask."""
    return (values * mask).sum()


PolicyLoss = Literal["ppo", "gspo", "cispo"]


def policy_token_loss(
    kind: PolicyLoss,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The configured policy loss per token, with its low / high clip masks.

    ppo: token-level ratio, clipped surrogate (GRPO, DAPO, Dr. GRPO); gspo: sequence-level ratio, clipped surrogate;
    cispo: clipped, detached importance weight times log-prob.
    """
    if kind == "cispo":
        return cispo_loss(logprobs, old_logprobs, advantages, eps_low, eps_high)
    log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask) if kind == "gspo" else logprobs - old_logprobs
    return clipped_surrogate(log_ratio, advantages, eps_low, eps_high, dual_clip)


def truncated_is_weights(
    trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, level: Literal["token", "sequence"], cap: float
) -> Tensor:
    """Truncated importance weights that correct for the engine sampling from a slightly different distribution.

    The engine (other kernels, other precision) is the behaviour policy; the trainer's old log-probs are the policy
    the surrogate assumes. Per token: min(exp(old - engine), cap); per sequence: min(exp(sum_t(old - engine)), cap)
    for every token of the sequence. Detached: a weight, not a path for gradients.
    """
    delta = (trainer_logprobs - engine_logprobs).detach() * mask
    if level == "sequence":
        delta = delta.sum(-1, keepdim=True).expand_as(delta)
    return torch.exp(delta).clamp(max=cap) * mask


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to -factor at max_len."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -factor * (excess / buffer).clamp(max=1.0)
