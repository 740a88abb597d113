"""The requests the engine and every backend take, and what they return: plain data, no torch.

Commands, runners and the OpenAI-compatible backend build and check these without importing the
engine, so a bad argument is reported before anything slow is imported or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]  # a chat message: {"role": ..., "content": ...}


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class ScoreRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.context:
            raise ValueError("ScoreRequest.context is empty; put a BOS or prefix token first")
        if not self.continuation:
            raise ValueError("ScoreRequest.continuation is empty; nothing to score")


@dataclass(frozen=True)
class ScoreResult:
    logprob: float  # sum over continuation tokens, natural log
    is_greedy: bool
    token_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class TextResult:
    text: str
    tokens: list[int]
    finish_reason: str
    reasoning: str | None = None  # the thinking an endpoint returned apart from the answer
