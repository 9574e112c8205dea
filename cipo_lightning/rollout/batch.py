"""The tensors one RL step trains on, laid out so completions share columns.

Each row is [left padding][prompt][completion][right padding], with every prompt ending at the same column. The
completion of every row then starts at column `prompt_width`, so the model's logits are needed only at the
`completion_width` positions before the last (`logits_to_keep`), and all per-token tensors are [rows, completion_width].

The same rows can also be fed packed (`RolloutBatch.packed`): every row's real tokens one after the other in a single
sequence, positions restarting at each row, so the model processes no padding at all; the logits are then taken only
at the positions that predict a completion token. Packed, consecutive rows of one prompt (a group's completions) can
also share that prompt: it is fed once and each completion attends to it and to itself (an explicit attention mask),
so a group of G completions costs one prompt instead of G. Each completion's hidden states are what its own row
would give, and the gradient reaching the shared prompt is the sum of what each row would send it.

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
    position_ids: Tensor  # [tokens], each token's position in its own unpadded row
    keep: Tensor  # [completion tokens], positions whose logits predict a completion token
    targets: Tensor  # [completion tokens], the completion token each kept position predicts
    rows: Tensor  # [completion tokens], its row ...
    cols: Tensor  # [completion tokens], ... and column in the [rows, completion_width] layout
    # [tokens, tokens], True where a query token (row) may attend a key token (column): only when a prompt is shared.
    # None: every row carries its own prompt, and positions restarting at 0 at each row keep attention within it.
    attends: Tensor | None = None


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

    def sorted_by_length(self, keep_groups: bool = False) -> RolloutBatch:
        """The rows longest first (ties in their order), so that rows of like length can share a micro-batch; with
        `keep_groups` the groups longest (in all their rows' tokens) first and each group's rows together, longest
        first, so that a micro-batch can feed a group's prompt once (packed(share_prompts=True))."""
        lengths = self.attention_mask.sum(-1)
        order = torch.argsort(lengths, descending=True, stable=True)
        if not keep_groups:
            return self.take(order)
        # Stable sorts, the least significant key first: row length (above), group, then the group's tokens. Group
        # ids are unique across both streams (collate_groups numbers every group of the batch); made dense here.
        _, group = torch.unique(self.group_ids, return_inverse=True)
        group_tokens = torch.zeros_like(lengths).index_add_(0, group, lengths)[group]
        for key in (group, -group_tokens):
            order = order[torch.argsort(key[order], stable=True)]
        return self.take(order)

    def shares_prompt(self) -> Tensor:
        """[rows] bool: the row's prompt is the previous row's, token for token (never for row 0)."""
        prompt = self.input_ids[:, : self.prompt_width] * self.attention_mask[:, : self.prompt_width]
        lengths, _ = self.real_lengths()  # padding tokens are zeroed above, so equal lengths tell them apart
        same = (prompt[1:] == prompt[:-1]).all(-1) & (lengths[1:] == lengths[:-1])
        return torch.cat([same.new_zeros(1), same])

    def fed_tokens(self, share_prompts: bool = False) -> int:
        """How many positions packed(share_prompts) feeds: the real tokens, less the prompts of rows sharing one."""
        prompt_lengths, _ = self.real_lengths()
        shared = prompt_lengths[self.shares_prompt()].sum() if share_prompts else 0
        return int(self.attention_mask.sum() - shared)

    def packed(self, share_prompts: bool = False) -> PackedRows:
        """The rows packed into one sequence without padding, in order; with `share_prompts` a row whose prompt is
        the previous row's contributes only its completion (see the module docstring)."""
        prompt_lengths, completion_lengths = self.real_lengths()
        device = self.input_ids.device
        index = torch.arange(len(self), device=device)
        shared = self.shares_prompt() if share_prompts else torch.zeros(len(self), dtype=torch.bool, device=device)
        fed_prompts = prompt_lengths * ~shared
        lengths = fed_prompts + completion_lengths
        starts = torch.cumsum(lengths, 0) - lengths
        # The attention mask selects each row's real tokens in order; a shared prompt's columns are left out.
        in_prompt_columns = torch.arange(self.input_ids.shape[1], device=device) < self.prompt_width
        fed = self.attention_mask.bool() & ~(shared[:, None] & in_prompt_columns)
        # The row whose copy of the prompt each row reads: the last row at or before it that fed its own.
        owner = torch.cummax(torch.where(shared, 0, index), 0).values
        rows = index.repeat_interleave(completion_lengths)
        cols = torch.arange(len(rows), device=device) - (torch.cumsum(completion_lengths, 0) - completion_lengths)[rows]
        # Token 0 is predicted by the owner's last prompt token, token c > 0 by the row's own token c - 1.
        first = (starts[owner] + prompt_lengths - 1)[rows]
        keep = torch.where(cols == 0, first, (starts + fed_prompts)[rows] + cols - 1)
        packed = PackedRows(
            self.input_ids[fed], self.position_ids[fed], keep, self.completion_ids[rows, cols], rows, cols
        )
        if bool(shared.any()):
            token_row = index.repeat_interleave(lengths)
            in_prompt = torch.arange(len(token_row), device=device) < (starts + fed_prompts)[token_row]
            token_owner = owner[token_row]
            causal = torch.ones(len(token_row), len(token_row), dtype=torch.bool, device=device).tril()
            same_prompt = token_owner[:, None] == token_owner[None, :]
            same_row = token_row[:, None] == token_row[None, :]
            # A query reads its prompt (the owner's prompt tokens) and its own row's tokens, never a sibling's.
            packed.attends = causal & same_prompt & (in_prompt[None, :] | same_row)
        return packed

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
