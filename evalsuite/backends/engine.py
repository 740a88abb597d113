"""The in-process engine as a backend: a loaded model (with its recipe applied) in this process."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..engine.load import LoadedModel
from ..engine.options import NUMERICS_VERSION
from ..engine.requests import Message, SamplingParams, ScoreRequest, ScoreResult, TextResult
from ..engine.score import score
from ..textgen import generate_text
from .base import Backend, BackendError, Failure, Progress


class EngineBackend(Backend):
    """``max_batch_size`` sequences and ``max_batch_tokens`` packed tokens per forward: execution
    settings that change speed, never scores (sequences are batch-invariant; see engine.model).
    ``prefix_cache``: generation reuses the K/V of earlier sequences a prompt begins with
    (engine.prefix); scoring has its own context sharing and is unaffected."""

    def __init__(self, lm: LoadedModel, recipe: dict[str, Any] | None = None, *, max_batch_size: int = 32,
                 max_batch_tokens: int = 4096, prefix_cache: bool = True,
                 chat_template_kwargs: dict[str, Any] | None = None):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"batch_size={max_batch_size} and max_batch_tokens={max_batch_tokens} must be >= 1")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.recipe = recipe or {"name": "bf16"}
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.prefix_cache = prefix_cache
        self.chat_template_kwargs = chat_template_kwargs or None

    def identity(self) -> dict[str, Any]:
        model = {**dataclasses.asdict(self.lm.info), "numerics": NUMERICS_VERSION}  # what computes the scores too
        return {"kind": "engine", "model": model, "recipe": self.recipe,
                **({"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {})}

    def describe(self) -> dict[str, Any]:
        from ..bench import device_info, kernel_path

        device = str(self.lm.model.device)
        return {"kind": "engine", "device": device, **device_info(device),
                "kernel_path": kernel_path(self.recipe, self.lm.model),
                "max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens,
                "prefix_cache": self.prefix_cache}

    def check_loglikelihood(self) -> None:
        if self.tokenizer is None:
            raise BackendError(f"model {self.lm.info.name!r} has no tokenizer; log-likelihood tasks need one")

    def context_length(self) -> int:
        return self.lm.model.config.max_position_embeddings

    def loglikelihood(self, requests: Sequence[ScoreRequest], progress: Progress | None = None
                      ) -> list[ScoreResult | Failure]:
        return list(score(self.lm.model, requests, max_batch_tokens=self.max_batch_tokens,
                          max_batch_size=self.max_batch_size, progress=progress))

    def generate(self, prompts: Sequence[str | Sequence[Message]], params: SamplingParams | Sequence[SamplingParams],
                 stop: Sequence[str] = (), progress: Progress | None = None) -> list[TextResult | Failure]:
        if self.tokenizer is None:
            raise BackendError(f"model {self.lm.info.name!r} has no tokenizer; generation needs one")
        return list(generate_text(self.lm.model, self.tokenizer, prompts, params, stop,
                                  max_batch_size=self.max_batch_size, max_prefill_tokens=self.max_batch_tokens,
                                  progress=progress, prefix_cache=self.prefix_cache,
                                  template_kwargs=self.chat_template_kwargs))
