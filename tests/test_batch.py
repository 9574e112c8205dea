"""The rollout batch layout: prompts end at one column, completions start at the next."""

import torch

from cipo_lightning.rollout import Sample, collate_rollouts


def _batch():
    prompts = [[5, 6, 7], [8]]
    samples = [Sample([1, 2], [-0.1, -0.2], truncated=False), Sample([3, 4, 9, 2], [-1.0, -2.0, -3.0, -4.0], False)]
    return collate_rollouts(
        prompts, samples, rewards=[1.0, 0.0], group_ids=[0, 0], pad_token_id=0, temperature=0.5, max_completion_len=8
    )


def test_collate_layout():
    batch = _batch()
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0, 0], [0, 0, 8, 3, 4, 9, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert batch.completion_ids.tolist() == [[1, 2, 0, 0], [3, 4, 9, 2]]
    assert batch.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.allclose(batch.engine_logprobs, torch.tensor([[-0.1, -0.2, 0, 0], [-1.0, -2.0, -3.0, -4.0]]))
    # Positions skip left padding: the prompt of row 1 starts at position 0.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 4], [0, 0, 0, 1, 2, 3, 4]]


def test_rows_trims_unused_padding():
    first = _batch().rows(0, 1)
    assert first.prompt_width == 3
    assert first.input_ids.tolist() == [[5, 6, 7, 1, 2]]
    assert first.completion_ids.tolist() == [[1, 2]]
    second = _batch().rows(1, 2)
    # One prompt column is kept; the leading padding goes.
    assert second.prompt_width == 1
    assert second.input_ids.tolist() == [[8, 3, 4, 9, 2]]
    assert second.completion_mask.tolist() == [[1, 1, 1, 1]]
