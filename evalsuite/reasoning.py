"""A reasoning model's output split into its thinking and its answer (no torch: commands check
``--reasoning-parser`` before anything slow)."""

from __future__ import annotations

# Reasoning models write their thinking before the answer.
# "think": between <think> and </think> (Qwen3 with thinking on, QwQ, DeepSeek-R1 and its
#   distillations, whose chat template opens the <think> itself, so the output holds only the
#   closing tag), as vLLM's deepseek_r1 and qwen3 reasoning parsers split it.
# "harmony": gpt-oss's messages, each on a channel; the answer is the "final" channel's, the
#   thinking the others' ("analysis", and "commentary" before a tool call). Its markers are
#   special tokens, so the output is read with them kept (``needs_special_tokens``).
REASONING_PARSERS = ("think", "harmony")

# harmony's markers (openai/harmony): a message is <|start|>{role}<|channel|>{channel}<|message|>
# {content} and ends with <|end|>, or, as the last of a reply, with <|return|> (or <|call|>)
_HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")


def needs_special_tokens(parser: str | None) -> bool:
    """Whether ``parser`` reads the output decoded with its special tokens kept."""
    return parser == "harmony"


def split_reasoning(text: str, parser: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a reasoning model's output under ``parser``: the answer is what
    follows the end of the thinking (stripped), None where the thinking never ended (the token
    budget ran out inside it); an output with no thinking at all is all answer."""
    if parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning parser {parser!r}; valid: {', '.join(REASONING_PARSERS)}")
    if parser == "harmony":
        return _split_harmony(text)
    head, end, tail = text.partition("</think>")
    if end:
        return head.split("<think>", 1)[-1].strip(), tail.strip()
    if "<think>" in text:
        return text.split("<think>", 1)[1].strip(), None
    return "", text


def _split_harmony(text: str) -> tuple[str, str | None]:
    """gpt-oss's reply: the prompt ends with ``<|start|>assistant``, so the output opens inside the
    first message's header (``<|channel|>analysis<|message|>...``). The final channel's content is
    the answer (as much of it as was written, if the budget ran out inside it); every other
    channel's is thinking. Text with no markers at all (an endpoint that split the reply itself)
    is all answer."""
    if "<|channel|>" not in text and "<|message|>" not in text:
        return "", text.strip()
    thinking, final = [], None
    for part in text.split("<|start|>"):
        header, sep, content = part.partition("<|message|>")
        if not sep:  # a header the budget cut short, or the role before the next message
            continue
        for end in _HARMONY_ENDS:
            content = content.split(end, 1)[0]
        # "<|channel|>final", "assistant<|channel|>commentary to=functions.x <|constrain|>json"
        channel = header.partition("<|channel|>")[2].split("<|", 1)[0].split(" ", 1)[0].strip()
        if channel in ("final", ""):  # a message on no channel is addressed to the user
            final = (final or "") + content
        elif content.strip():
            thinking.append(content.strip())
    return "\n\n".join(thinking), None if final is None else final.strip()
