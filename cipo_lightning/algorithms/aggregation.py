"""How per-token losses become one number: a weight per token, fixed for the whole batch before any split.

The weights depend only on batch-wide counts (sequences, tokens) passed in, never on the micro-batch, so the
gradient is the same whether the batch is processed whole, in micro-batches, or split across data-parallel ranks
(where the counts are the global ones).

- token_mean (DAPO): every completion token of the batch weighs 1 / total tokens.
- seq_mean_token_mean (GRPO): mean over each sequence's tokens, then over sequences: 1 / (len_i * sequences).
- seq_mean_token_sum_norm (Dr. GRPO): token sums divided by one constant length, then mean over sequences:
  1 / (max_len * sequences); no length bias.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def token_weights(
    mask: Tensor, mode: Aggregation, num_sequences: int, num_tokens: int, max_len: int | None = None
) -> Tensor:
    """Weight of every token ([rows, tokens]) so that loss = sum(token_loss * weights) over the whole batch."""
    if mode == "token_mean":
        return mask / max(num_tokens, 1)
    if mode == "seq_mean_token_mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / num_sequences
    if max_len is None:
        raise ValueError("seq_mean_token_sum_norm needs max_len (the constant length normaliser)")
    return mask / (max_len * num_sequences)
