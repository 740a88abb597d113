"""What a runner asks of the model under evaluation, whatever runs it.

Two request types, with lm-eval's contracts:
  * log-likelihood: (context tokens, continuation tokens) -> the continuation's summed
    log-probability and whether every token was the greedy choice. Tokenization, and with it
    where the space between words goes, is the runner's business (through ``Backend.tokenizer``).
  * generation: a text prompt or chat messages, sampling parameters and stop strings -> text.

A backend may fail a single request (an endpoint that times out or answers 500 after its
retries): that request's result is a ``Failure`` with the reason, never a made-up score, and the
runner records it so a rerun retries exactly the failed ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.requests import Message, SamplingParams, ScoreRequest, ScoreResult, TextResult

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Failure:
    """A request the backend could not answer, and why."""

    reason: str


class BackendError(RuntimeError):
    """The backend cannot serve this kind of request at all (checked before any work starts)."""


class Backend(ABC):
    tokenizer: Any  # a transformers tokenizer of the served model, or None where none is known
    # the chat template's own switches (Qwen3's enable_thinking, ...) for every chat prompt; they
    # change what the model writes, so a backend's identity holds them when set
    chat_template_kwargs: dict[str, Any] | None = None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a run record says about the backend (never a credential)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes scores comparable: the model and recipe as served. Part of a run's
        identity, so a run resumes only against the same model; execution settings (batch
        sizes, concurrency, URLs that change with a restart) stay out of it."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[ScoreRequest], progress: Progress | None = None
                      ) -> list[ScoreResult | Failure]:
        ...

    @abstractmethod
    def generate(self, prompts: Sequence[str | Sequence[Message]], params: SamplingParams | Sequence[SamplingParams],
                 stop: Sequence[str] = (), progress: Progress | None = None) -> list[TextResult | Failure]:
        ...

    def check_loglikelihood(self) -> None:
        """Raise ``BackendError`` unless log-likelihood requests can be served."""

    def context_length(self) -> int | None:
        """Tokens per sequence the model takes (prompt and continuation), None where unknown."""
        return None

    def longest_window(self) -> int | None:
        """The most tokens a rolling log-likelihood window may feed (lm-eval's ``max_seq_len``):
        a window scores its tokens in one forward of all but the last one, so the context itself;
        None where unknown."""
        return self.context_length()

    def usage(self) -> dict[str, int] | None:
        """Requests answered and the tokens they were billed (as the endpoint reported them) since
        this backend was made; None where nothing is billed (the in-process engine)."""
        return None
