"""The reward function contract shared by every verifier."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RewardFunction(Protocol):
    """Scores completions: one float per completion. Dataset columns of each completion's row arrive by name, as
    lists aligned with `completions`; a verifier reads the columns it needs and ignores the rest (`**columns`)."""

    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]: ...
