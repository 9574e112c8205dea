"""The tensors one RL step trains on, laid out so completions share columns.

Each row is [left padding][prompt][completion][right padding], with every prompt ending at the same column. The
completion of every row then starts at column `prompt_width`, so the model's logits are needed only for the last
`completion_width + 1` positions (`logits_to_keep`), and all per-token tensors are [rows, completion_width].

The same rows can also be fed packed (`RolloutBatch.packed`): every row's real tokens one after the other in a single
sequence, positions restarting at each row, so the model processes no padding at all; the logits are then taken only
at the positions that predict a completion token.

Under CIPO one batch holds two streams: the base groups (problem -> attempt) and the correction groups (problem and
an anchor attempt -> correction). A stream label per row lets the loss normalise and weight each stream on its own;
only completion tokens are ever trained, so a correction prompt's anchor text never is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from cipo_lightning.rollout.engine import Sample

BASE_STREAM = 0
CORRECTION_STREAM = 1
STREAM_NAMES = ("base", "correction")


@dataclass
class ScoredGroup:
    """The completions sampled for one prompt, decoded and scored: the unit advantages are computed over."""

    row: dict[str, Any]  # the task row: problem messages and the columns the verifier reads
    prompt_ids: list[int]  # the rendered prompt the samples continue
    samples: list[Sample]
    texts: list[str]
    rewards: list[float]
    # Added to each sample's advantage after the group normalisation (CIPO's risk shaping); None: nothing added.
    advantage_shift: list[float] | None = None

    @property
    def informative(self) -> bool:
        """Whether the rewards differ, i.e. the group's advantages are not all zero."""
        return max(self.rewards) > min(self.rewards)


@dataclass
class PackedRows:
    """The rows of a batch as one padding-free sequence (see RolloutBatch.packed)."""

    input_ids: Tensor  # [tokens], every row's prompt and completion tokens, row after row
    position_ids: Tensor  # [tokens], restarting at 0 at each row: the model keeps attention within a row
    keep: Tensor  # [completion tokens], positions whose logits predict a completion token
    targets: Tensor  # [completion tokens], the completion token each kept position predicts
    rows: Tensor  # [completion tokens], its row ...
    cols: Tensor  # [completion tokens], ... and column in the [rows, completion_width] layout


@dataclass
class RolloutBatch:
    """Scored completions of one step, ready for the loss."""

    input_ids: Tensor  # [rows, prompt_width + completion_width]
    attention_mask: Tensor  # [rows, prompt_width + completion_width]
    completion_mask: Tensor  # [rows, completion_width], 1 on trainable completion tokens
    engine_logprobs: Tensor  # [rows, completion_width], the engine's log-prob of each sampled token
    rewards: Tensor  # [rows]
    advantage_shift: Tensor  # [rows], added to the advantages after normalisation (0 but for shaped corrections)
    truncated: Tensor  # [rows], bool: the completion hit the sampling limit before its stop token
    group_ids: Tensor  # [rows], completions of one prompt share an id
    streams: Tensor  # [rows], BASE_STREAM or CORRECTION_STREAM
    prompt_width: int
    temperature: float
    max_completion_len: int  # the sampling limit (max_new_tokens): Dr. GRPO's constant length normaliser

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def position_ids(self) -> Tensor:
        """Positions that ignore left padding, so a prompt's tokens sit where they would unpadded."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def real_lengths(self) -> tuple[Tensor, Tensor]:
        """Each row's prompt and completion length in real (unpadded) tokens, [rows] each."""
        real = self.attention_mask.bool()
        return real[:, : self.prompt_width].sum(-1), real[:, self.prompt_width :].sum(-1)

    def sorted_by_length(self) -> RolloutBatch:
        """The rows longest first (ties in their order), so that rows of like length can share a micro-batch."""
        return self.take(torch.argsort(self.attention_mask.sum(-1), descending=True, stable=True))

    def packed(self) -> PackedRows:
        """The rows packed into one sequence without padding (the attention mask selects each row's tokens in
        order, so flattening it concatenates the rows)."""
        real = self.attention_mask.bool()
        prompt_lengths, completion_lengths = self.real_lengths()
        lengths = prompt_lengths + completion_lengths
        device = self.input_ids.device
        starts = torch.cumsum(lengths, 0) - lengths
        position_ids = torch.arange(int(lengths.sum()), device=device) - starts.repeat_interleave(lengths)
        rows = torch.arange(len(self), device=device).repeat_interleave(completion_lengths)
        cols = torch.arange(len(rows), device=device) - (torch.cumsum(completion_lengths, 0) - completion_lengths)[rows]
        keep = (starts + prompt_lengths - 1)[rows] + cols
        return PackedRows(self.input_ids[real], position_ids, keep, self.completion_ids[rows, cols], rows, cols)

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: value.to(device) for name, value in moved.items() if isinstance(value, Tensor)})

    def take(self, indices: Tensor) -> RolloutBatch:
        """The rows at `indices`, in that order, with the batch's columns."""
        per_row = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: value[indices] for name, value in per_row.items() if isinstance(value, Tensor)})

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Rows [start, stop), with the padding columns that no remaining row uses cut away."""
        attention = self.attention_mask[start:stop]
        used = attention.any(0).nonzero()
        first, last = int(used.min()), int(used.max()) + 1
        first = min(first, self.prompt_width - 1)  # keep one prompt column: the logit that predicts token one
        completion_last = max(last - self.prompt_width, 1)
        return RolloutBatch(
            input_ids=self.input_ids[start:stop, first:last],
            attention_mask=attention[:, first:last],
            completion_mask=self.completion_mask[start:stop, :completion_last],
            engine_logprobs=self.engine_logprobs[start:stop, :completion_last],
            rewards=self.rewards[start:stop],
            advantage_shift=self.advantage_shift[start:stop],
            truncated=self.truncated[start:stop],
            group_ids=self.group_ids[start:stop],
            streams=self.streams[start:stop],
            prompt_width=self.prompt_width - first,
            temperature=self.temperature,
            max_completion_len=self.max_completion_len,
        )


def collate_rollouts(
    prompts: list[list[int]],
    samples: list[Sample],
    rewards: list[float],
    group_ids: list[int],
    pad_token_id: int,
    temperature: float,
    max_completion_len: int,
    streams: list[int] | None = None,
    advantage_shift: list[float] | None = None,
) -> RolloutBatch:
    """One row per sample; `prompts[i]` is the prompt of `samples[i]`; every row is a base row unless `streams`, and
    no advantage is shifted unless `advantage_shift`."""
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(1, max(len(s.token_ids) for s in samples))
    rows = len(samples)
    input_ids = torch.full((rows, prompt_width + completion_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(rows, completion_width)
    engine_logprobs = torch.zeros(rows, completion_width)
    for row, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
        length = len(sample.token_ids)
        input_ids[row, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt)
        input_ids[row, prompt_width : prompt_width + length] = torch.tensor(sample.token_ids, dtype=torch.long)
        attention_mask[row, prompt_width - len(prompt) : prompt_width + length] = 1
        completion_mask[row, :length] = 1
        engine_logprobs[row, :length] = torch.tensor(sample.logprobs)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        engine_logprobs=engine_logprobs,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        advantage_shift=torch.tensor(advantage_shift or [0.0] * rows, dtype=torch.float32),
        truncated=torch.tensor([s.truncated for s in samples], dtype=torch.bool),
        group_ids=torch.tensor(group_ids, dtype=torch.long),
        streams=torch.tensor(streams if streams is not None else [BASE_STREAM] * rows, dtype=torch.long),
        prompt_width=prompt_width,
        temperature=temperature,
        max_completion_len=max_completion_len,
    )


def collate_groups(
    groups: list[ScoredGroup],
    streams: list[int],
    pad_token_id: int,
    temperature: float,
    max_completion_len: int,
) -> RolloutBatch:
    """One row per completion, one group id per group; `streams[i]` labels group i's rows."""
    return collate_rollouts(
        prompts=[g.prompt_ids for g in groups for _ in g.samples],
        samples=[s for g in groups for s in g.samples],
        rewards=[r for g in groups for r in g.rewards],
        group_ids=[i for i, g in enumerate(groups) for _ in g.samples],
        pad_token_id=pad_token_id,
        temperature=temperature,
        max_completion_len=max_completion_len,
        streams=[stream for g, stream in zip(groups, streams, strict=True) for _ in g.samples],
        advantage_shift=[shift for g in groups for shift in (g.advantage_shift or [0.0] * len(g.samples))],
    )
