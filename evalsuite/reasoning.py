"""A reasoning model's output split into its thinking and its answer (no torch: commands check
``--reasoning-parser`` before anything slow)."""

from __future__ import annotations

# Reasoning models write their thinking before the answer. "think": between <think> and </think>
# (Qwen3 with thinking on, QwQ, DeepSeek-R1 and its distillations, whose chat template opens the
# <think> itself, so the output holds only the closing tag), as vLLM's deepseek_r1 and qwen3
# reasoning parsers split it.
REASONING_PARSERS = ("think",)


def split_reasoning(text: str, parser: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a reasoning model's output under ``parser``: the answer is what
    follows the end of the thinking (stripped), None where the thinking never ended (the token
    budget ran out inside it); an output with no thinking at all is all answer."""
    if parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning parser {parser!r}; valid: {', '.join(REASONING_PARSERS)}")
    head, end, tail = text.partition("</think>")
    if end:
        return head.split("<think>", 1)[-1].strip(), tail.strip()
    if "<think>" in text:
        return text.split("<think>", 1)[1].strip(), None
    return "", text
