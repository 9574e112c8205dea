"""A tied input embedding's sparse gradient: the same dense gradient as nn.Embedding's, over several micro-batches."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cipo_lightning.models.tied_embedding import SparseGradEmbedding, sparse_tied_embedding_gradient
from cipo_lightning.module import CIPOModule
from tests.helpers import two_stream_batch


def test_tied_embedding_gradient_is_the_dense_one(tiny_model):
    module = CIPOModule(model=tiny_model, micro_batch_size=2, gradient_checkpointing=False)
    module.configure_model()
    embedding = module.policy.get_input_embeddings()
    assert type(embedding) is SparseGradEmbedding  # the tiny Llama ties its embedding to the head

    def gradients() -> list[torch.Tensor]:
        module.policy.zero_grad(set_to_none=True)
        module.accumulate_policy_gradient(two_stream_batch(), backward=lambda loss: loss.backward())  # 8 passes
        return [p.grad.clone() for p in module.policy.parameters()]

    sparse = gradients()
    assert all(grad.layout == torch.strided for grad in sparse)  # what AdamW and the norm clipping need
    embedding.__class__ = torch.nn.Embedding
    dense = gradients()
    assert dense[0].abs().max() > 0
    for got, expected in zip(sparse, dense, strict=True):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_an_untied_embedding_keeps_its_dense_gradient():
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    assert not sparse_tied_embedding_gradient(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
