"""Text generation on top of the engine: chat templates and stop strings."""

from __future__ import annotations

import pytest

from evalsuite.engine.generate import SamplingParams
from evalsuite.textgen import encode_prompt, generate_text


@pytest.mark.slow
def test_chat_messages_use_the_models_template(smollm2):
    """The chat template renders as transformers renders it, generation prompt included, with no
    second BOS added."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    want = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(want, list):  # transformers 5 returns a BatchEncoding
        want = want["input_ids"]
    assert encode_prompt(smollm2.tokenizer, messages) == list(want)
    text = smollm2.tokenizer.decode(want)
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>user") == 2


def test_a_tokenizer_without_a_template_refuses_messages(tiny):
    with pytest.raises(ValueError, match="has no chat template; pass a plain string prompt"):
        encode_prompt(tiny.tokenizer, [{"role": "user", "content": "hi"}])


def test_stop_strings_cut_the_text(tiny):
    free = generate_text(tiny.model, tiny.tokenizer, ["The quick"], SamplingParams(max_new_tokens=24))[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = generate_text(tiny.model, tiny.tokenizer, ["The quick"], SamplingParams(max_new_tokens=24), stop=[stop])[0]
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"


def test_per_prompt_params(tiny):
    outs = generate_text(tiny.model, tiny.tokenizer, ["The", "The"], [SamplingParams(3), SamplingParams(6)])
    assert [len(o.tokens) <= n for o, n in zip(outs, (3, 6))] == [True, True]
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        generate_text(tiny.model, tiny.tokenizer, ["The"], [SamplingParams(3)] * 2)
