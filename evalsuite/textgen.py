"""Text on top of the token engine: chat templates, stop strings, decoding."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .engine.generate import SamplingParams, generate
from .engine.model import CausalLM
from .engine.requests import Message, TextResult


def encode_text(tokenizer, text: str) -> list[int]:
    """A plain string with the tokenizer's own BOS rule, except that a string that already begins
    with the BOS token (a chat template rendered to text, as lm-eval's --apply_chat_template sends
    it) gets no second one: what lm-eval's hf model does."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_prompt(tokenizer, prompt: str | Sequence[Message], template_kwargs: dict[str, Any] | None = None
                  ) -> list[int]:
    """A plain string is encoded as is (``encode_text``); a list of chat messages goes through
    the tokenizer's chat template with the generation prompt appended, and ``template_kwargs``
    (the template's own switches, such as Qwen3's ``enable_thinking``). The rendered template
    already holds its special tokens, so it is encoded without adding more."""
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt)
    if tokenizer.chat_template is None:
        raise ValueError("this tokenizer has no chat template; pass a plain string prompt")
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False,
                                         **(template_kwargs or {}))
    return tokenizer.encode(text, add_special_tokens=False)


def with_stop_tokens(params: SamplingParams, tokenizer) -> SamplingParams:
    """``params`` with the tokenizer's EOS among its stop tokens."""
    eos = tuple(t for t in dict.fromkeys((*params.stop_token_ids, tokenizer.eos_token_id)) if t is not None)
    return dataclasses.replace(params, stop_token_ids=eos)


def generate_text(model: CausalLM, tokenizer, prompts: Sequence[str | Sequence[Message]],
                  params: SamplingParams | Sequence[SamplingParams], stop: Sequence[str] = (), *,
                  max_batch_size: int = 64, max_prefill_tokens: int = 4096, progress=None,
                  prefix_cache: bool = True, template_kwargs: dict[str, Any] | None = None) -> list[TextResult]:
    """Generate text (one ``params`` for all prompts, or one per prompt); the tokenizer's EOS ends
    a sequence, and so does any string in ``stop`` (the returned text is cut before it)."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    params = [with_stop_tokens(p, tokenizer) for p in params]
    encoded = [encode_prompt(tokenizer, p, template_kwargs) for p in prompts]
    stops = [s for s in stop if s]

    def hit_stop(_index: int, tokens: list[int]) -> bool:
        # Decode only the tail: a stop string is found once it is complete.
        tail = tokenizer.decode(tokens[-16:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    gens = generate(model, encoded, params, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                    stop_fn=hit_stop if stops else None, progress=progress, prefix_cache=prefix_cache)
    results = []
    for g in gens:
        text = tokenizer.decode(g.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        results.append(TextResult(text[:cut] if cut >= 0 else text, g.tokens, g.finish_reason or "length"))
    return results
