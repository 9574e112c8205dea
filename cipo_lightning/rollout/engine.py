"""The one interface every rollout engine implements, and the sample it returns.

An engine turns prompt token ids into sampled completions with the sampled tokens' log-probabilities, and accepts
new weights from the trainer. Engines take token ids, not text, so the trainer trains on exactly the tokens that were
sampled (re-tokenising decoded text can split differently).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: n completions per prompt, at most max_new_tokens each.

    With a `seed`, each prompt's samples depend only on (seed, the prompt's tokens), not on the other prompts of the
    call, their order or the process: `derived_seed` gives each prompt its own seed. Without one, the engine's own
    random state decides.
    """

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


def derived_seed(seed: int, values: Sequence[int]) -> int:
    """A 63-bit seed from `seed` and integers (a prompt's tokens, a step), the same in every process (unlike
    Python's salted hash)."""
    digest = hashlib.blake2b(f"{seed}:{','.join(map(str, values))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def regroup(items: Sequence[T], sizes: Iterable[int]) -> list[list[T]]:
    """`items` cut into consecutive runs of `sizes` items: a flat batch (one engine call, one verifier call) back
    into its requests or groups."""
    runs, start = [], 0
    for size in sizes:
        runs.append(list(items[start : start + size]))
        start += size
    return runs


@dataclass
class Sample:
    """One sampled completion: its token ids (stop token included), their log-probs, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    truncated: bool


class RolloutEngine(ABC):
    """Generates completions for the trainer and takes its weights after each optimizer step."""

    # The longest prompt + completion the engine accepts, checked against the longest prompts when fit starts (None:
    # no fixed limit known to us).
    max_model_len: int | None = None

    @abstractmethod
    def start(self, model_path: str, seed: int, device: torch.device) -> None:
        """Load the model from a local HF folder, next to the policy on `device` where the engine runs in the
        trainer's framework. Called once, before the first generate."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        """For each prompt (token ids), `sampling.n` samples, in prompt order."""

    def generate_many(self, requests: list[tuple[list[list[int]], SamplingSettings]]) -> list[list[list[Sample]]]:
        """Several `generate` calls, each (prompts, settings) with its own settings (e.g. its own n); the results in
        request order. This default runs them one after another. An engine that batches across requests (vLLM)
        decodes them all in one loop: at a decode step whose cost is reading the weights, a few more sequences cost
        little, while a second call costs a second loop."""
        return [self.generate(prompts, sampling) for prompts, sampling in requests]

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights by the policy's (HF parameter names)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, engines without resources need not override it
        """Release the model and its memory."""
