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
    sampled from, as TRL and verl do. The entropy is detached unless `entropy_grad` (an entropy bonus needs its
    gradient). One autograd node (_TokenLogProbsAndEntropy) with a hand-written backward instead of autograd's
    composition of torch ops, see there for why.
    """
    return _TokenLogProbsAndEntropy.apply(logits, tokens, temperature, entropy_grad)


class _TokenLogProbsAndEntropy(torch.autograd.Function):
    """sampled_token_logprobs_and_entropy with few [tokens, vocab] tensors.

    Composed from torch ops (divide, logsumexp, gather, softmax) the forward and backward allocate about a dozen
    tensors of the logits' size (the gather's and the division's gradients, logsumexp's and softmax's own
    temporaries, their sum); at ~290 scored tokens of a 49k vocabulary each is 58 MB, which malloc maps fresh and
    the kernel page-faults in: 95-108 ms an op on the 2-core CPU machine, ~10x its arithmetic (docs/benchmarks.md).
    Here the forward allocates the scaled logits and the probabilities, keeps only the probabilities (and the scaled
    logits when the entropy needs a gradient), and the backward writes the logits' gradient into the probabilities'
    storage: d log p(t) / dz = (onehot(t) - p) / T and d H / dz = -p (z / T - logsumexp + H) / T. The graph cannot be
    backpropagated twice (autograd then reports the in-place change of a saved tensor).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, entropy_grad: bool) -> tuple[Tensor, Tensor]:
        scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # 16-bit logits in fp32
        row_max = scaled.amax(-1, keepdim=True)
        probs = torch.sub(scaled, row_max).exp_()
        total = probs.sum(-1, keepdim=True)
        lse = (row_max + total.log()).squeeze(-1)
        probs.div_(total)
        logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
        # p * z / T in the scaled logits' storage unless the backward needs them (a batched dot product would
        # allocate nothing either, but it summed 49k terms 2-45x less accurately than torch's sum here).
        weighted = scaled * probs if entropy_grad else scaled.mul_(probs)
        entropy = lse - weighted.sum(-1)
        ctx.temperature, ctx.entropy_grad, ctx.logits_dtype = temperature, entropy_grad, logits.dtype
        ctx.save_for_backward(probs, tokens, lse - entropy if entropy_grad else None, scaled if entropy_grad else None)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> tuple[Tensor, None, None, None]:
        probs, tokens, shift, scaled = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(tokens, dtype=probs.dtype)
        if ctx.entropy_grad and grad_entropy is not None:
            # -p * (g_logp + g_H * (z / T - (logsumexp - H))) for every vocabulary entry.
            coef = scaled.sub_(shift.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(grad_logprobs.unsqueeze(-1))
            grad = probs.mul_(coef).neg_()
        else:
            grad = probs.mul_(-grad_logprobs.unsqueeze(-1))
        grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
        return grad.div_(ctx.temperature).to(ctx.logits_dtype), None, None, None


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
