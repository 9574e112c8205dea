"""The reward function contract shared by every verifier.

A reward function scores completions: `fn(prompts: list[str], completions: list[str], **columns) -> list[float]`,
one float per completion. Dataset columns of each completion's row arrive by name, as lists aligned with
`completions`; a verifier reads the columns it needs and ignores the rest (`**columns`).

A verifier whose replies end in a final answer may also define `extract_answer(completion: str) -> str | None`, the
answer it grades, normalised so that equal strings are the same answer; evaluation then reports majority-vote
maj@k (samples vote with their extracted answers). Code verifiers have no such answer and define none.

The type is a plain Callable rather than a Protocol: jsonargparse checks a Protocol's exact signature, which would
reject verifiers that name the columns they read (`answer`, `test`, ...).
"""

from __future__ import annotations

from collections.abc import Callable

RewardFunction = Callable[..., list[float]]
