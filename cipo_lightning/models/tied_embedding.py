"""A sparse gradient for an input embedding that shares its weight with the output head.

With tied weights (SmolLM2, Qwen2.5 up to 3B, Llama 3.2) the weight's gradient is the head's, which is dense anyway,
plus the embedding's, which touches only the rows of the tokens fed. nn.Embedding's dense backward writes the latter
into a zero-filled [vocab, hidden] tensor and autograd then adds the two, so each micro-batch pays two passes over a
vocabulary-sized tensor (113 MB for SmolLM2-135M in fp32) for a few hundred rows. A sparse embedding gradient is added
into the head's gradient in place, row by row. The sum the optimizer sees is the same dense tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


class SparseGradEmbedding(torch.nn.Embedding):
    """nn.Embedding whose weight gradient is sparse while its `sparse` flag stays False: DDP reads that flag to expect
    a sparse gradient, and a tied weight's gradient reaches it dense (the head's plus this one)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse=True
        )


def sparse_tied_embedding_gradient(model: torch.nn.Module) -> bool:
    """Give `model`'s input embedding a sparse gradient (SparseGradEmbedding) if it is a plain nn.Embedding whose
    weight is the output head's; True if it did. An untied embedding keeps its dense gradient: alone it would reach
    the optimizer sparse, which AdamW refuses."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not torch.nn.Embedding or head is None or head.weight is not embedding.weight:
        return False
    embedding.__class__ = SparseGradEmbedding
    return True
