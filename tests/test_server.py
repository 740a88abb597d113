"""`evalsuite serve` end to end on localhost through the real `openai` client, and the endpoint
backend against it: the same MMLU predictions as in process, retries and recorded failures
(with a scripted stand-in server for fault injection), a server killed mid-run and resumed."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from fastapi import Request  # at module level: FastAPI resolves the proxy route's annotations here

from evalsuite.backends.base import BackendError
from evalsuite.backends.openai import OpenAIBackend, redact_url
from evalsuite.cli import main
from evalsuite.engine.generate import SamplingParams, generate
from evalsuite.engine.load import load
from evalsuite.engine.score import ScoreRequest, score
from evalsuite.runners.mmlu import MMLUConfig, run_mmlu
from evalsuite.server.serve import BackgroundServer, served_model
from evalsuite.textgen import encode_prompt, generate_text

from .conftest import app_on_localhost

SUBSET = MMLUConfig(formulations=("letter", "cloze"), subjects=("abstract_algebra", "anatomy", "marketing"),
                    per_subject=3)


@pytest.fixture(scope="module")
def chat_dir(tiny_chat_dir):
    """The tiny model with a chat template (conftest)."""
    return tiny_chat_dir


@pytest.fixture(scope="module")
def lm(chat_dir):
    return load(str(chat_dir), "float32")


@pytest.fixture(scope="module")
def server(lm):
    with BackgroundServer(served_model(lm, {"name": "bf16"}, "tiny", max_batch_size=8, max_len=512)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model_and_its_recipe(client, lm):
    (m,) = client.models.list().data
    card = m.model_dump()
    assert m.id == "tiny" and card["max_model_len"] == 512
    assert card["evalsuite"]["recipe"] == {"name": "bf16"}
    assert card["evalsuite"]["model"]["weights_sha256"] == lm.info.weights_sha256


def test_greedy_completion_equals_in_process_generate(client, lm):
    prompt = "The quick brown fox"
    want = generate_text(lm.model, lm.tokenizer, [prompt], SamplingParams(max_new_tokens=12))[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(want.tokens)


def test_greedy_output_is_the_same_alone_and_under_concurrent_load(client, lm):
    prompts = [f"The {w} fox jumps over" for w in ("quick", "lazy", "brown", "red", "old", "small", "big", "sly",
                                                      "grey", "young", "swift", "calm")]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda p: client.completions.create(
            model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text, prompts))
    assert together == alone
    want = generate_text(lm.model, lm.tokenizer, prompts, SamplingParams(max_new_tokens=10))
    assert alone == [w.text for w in want]


def test_chat_uses_the_template_and_streams_the_same_text(client, lm):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    want = generate_text(lm.model, lm.tokenizer, [messages], SamplingParams(max_new_tokens=10))[0].text
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = list(client.completions.create(model="tiny", prompt="The lazy dog", max_tokens=8, temperature=0,
                                              stream=True))
    plain = client.completions.create(model="tiny", prompt="The lazy dog", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_a_stop_string_across_chunks_ends_a_stream_where_it_ends_the_reply(client):
    """A stream holds back text that may begin a stop string: before, a stop string split over
    two chunks left its first part in the stream (" Paris.\n" streamed against " Paris." replied,
    stop "\n\n" on SmolLM2)."""
    prompt = [{"role": "user", "content": "The quick brown fox"}]
    kw = {"model": "tiny", "messages": prompt, "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)]
    text = "".join(chunks)
    assert text == client.chat.completions.create(**kw).choices[0].message.content
    ends = [len("".join(chunks[:j + 1])) for j in range(len(chunks) - 1) if chunks[j] and chunks[j + 1]]
    # the last character of one chunk and the first of the next, where that pair first occurs
    end = next(e for e in ends if text.index(text[e - 1:e + 1]) == e - 1)
    stop = text[end - 1:end + 1]
    plain = client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert plain.message.content == text[:end - 1] and plain.finish_reason == "stop"
    streamed = client.chat.completions.create(**kw, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:end - 1]
    completion = {"model": "tiny", "prompt": "The lazy dog", "max_tokens": 16, "temperature": 0, "stop": [stop]}
    assert "".join(c.choices[0].text for c in client.completions.create(**completion, stream=True)) == \
        client.completions.create(**completion).choices[0].text


def test_prompt_logprobs_are_the_engines_scores(client, lm, hf_tiny):
    """echo + logprobs + max_tokens 0: every prompt token's log-probability given its prefix
    (transformers' own), none for the first; the top alternative is the greedy one."""
    tokens = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    r = client.completions.create(model="tiny", prompt=[tokens], max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(tokens)
    with torch.no_grad():
        ref = torch.log_softmax(hf_tiny(torch.tensor([tokens])).logits[0].double(), dim=-1)
    for i in range(1, len(tokens)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, tokens[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
        assert len(lp.top_logprobs[i]) == 2
    assert r.choices[0].text == lm.tokenizer.decode(tokens)
    assert "".join(lp.tokens) == lm.tokenizer.decode(tokens)
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_a_batch_of_prompts_in_one_request_scores_each_as_alone(client, lm, hf_tiny):
    """A list of prompts in one request (the endpoint backend sends an MMLU question's answers so):
    the prompts sharing a context run it once, and every prompt's log-probabilities and top
    alternatives are what it gets alone (up to float32 rounding: alone, its context and answer run
    in one prefill), and what transformers gives it."""
    ctx = lm.tokenizer.encode("Question: Which animal is the fastest?\nAnswer:")
    prompts = [ctx + lm.tokenizer.encode(a) for a in (" cheetah", " a slow snail", " horse")]
    prompts.append(lm.tokenizer.encode("An unrelated prompt of its own."))
    together = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=3)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    for tokens, c in zip(prompts, together.choices):
        alone = client.completions.create(model="tiny", prompt=[tokens], max_tokens=0, echo=True, logprobs=3)
        one = alone.choices[0].logprobs
        assert c.logprobs.token_logprobs[1:] == pytest.approx(one.token_logprobs[1:], abs=1e-5)
        for mine, its in zip(c.logprobs.top_logprobs[1:], one.top_logprobs[1:]):
            assert list(mine) == list(its) and list(mine.values()) == pytest.approx(list(its.values()), abs=1e-5)
        with torch.no_grad():
            ref = torch.log_softmax(hf_tiny(torch.tensor([tokens])).logits[0].double(), dim=-1)
        for i in range(1, len(tokens)):
            assert c.logprobs.token_logprobs[i] == pytest.approx(float(ref[i - 1, tokens[i]]), abs=1e-4)
            best = sorted(c.logprobs.top_logprobs[i].values(), reverse=True)
            assert best[0] == pytest.approx(float(ref[i - 1].max()), abs=1e-4)


@pytest.mark.parametrize("body,status,msg", [
    ({"model": "nope", "prompt": "x"}, 404, "model 'nope' is not served here; valid: 'tiny'"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature=-0.5; valid: a number in [0.0, 2.0]"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p=0; valid: a number in (0.0, 1.0]"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p=1.5"),
    ({"model": "tiny", "prompt": "x", "n": 1000}, 400, "n=1000; valid: an integer in [1, 16]"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens=1000000000; valid: an integer in [0, 512]"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 512}, 400, "exceeds this server's context of 512 tokens"),
    ({"model": "tiny", "prompt": "word " * 800}, 400, "this server's context is 512 tokens"),
    ({"model": "tiny", "prompt": [[5, 99999]]}, 400, "token id 99999; valid: 0..399"),
    ({"model": "tiny", "prompt": 3}, 400, "prompt must be a string or a non-empty list of token ids"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs=50; valid: an integer in [0, 20]"),
    ({"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop=5; valid: a string or a list"),
    # parameters that would change the output and are not implemented: refused, never ignored
    ({"model": "tiny", "prompt": "x", "frequency_penalty": 0.5}, 400,
     "frequency_penalty=0.5 is not supported by this server; valid: 0, 0.0"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias={'5': 100} is not supported"),
    ({"model": "tiny", "prompt": "x", "top_k": 5}, 400, "top_k=5 is not supported by this server; valid: -1, 0"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of=3 is not supported"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     400, "response_format={'type': 'json_object'} is not supported by this server (no constrained decoding)"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs=true"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs=21; valid: an integer in [0, 20]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "stream": True}, 400,
     "stream=true cannot be combined with logprobs"),
    # a flag must be a boolean: "no" is truthy in Python and would have streamed
    ({"model": "tiny", "prompt": "x", "stream": "no"}, 400, "stream='no'; valid: true or false"),
    ({"model": "tiny", "prompt": "x", "echo": 1}, 400, "echo=1; valid: true or false"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "stream='yes'; valid: true or false"),
    ({"model": "tiny", "prompt": "x", "ignore_eos": "true"}, 400, "ignore_eos='true'; valid: true or false"),
    ({"prompt": "x"}, 400, "model is missing; valid: 'tiny'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/cat.png"}}]}]}, 400,
     "messages[0] holds the content part {'type': 'image_url'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, "messages[0] is {'role': 'user'"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, body, status, msg):
    r = httpx.post(f"{server.base_url}/{'chat/completions' if 'messages' in body else 'completions'}", json=body)
    assert r.status_code == status and msg in r.json()["error"]["message"]
    assert httpx.get(server.base_url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_neutral_values_of_unsupported_parameters_are_served(client):
    """Clients that send the API's defaults explicitly (penalties 0, no logit bias, plain text)
    get the same reply as without them."""
    plain = client.completions.create(model="tiny", prompt="The lazy dog", max_tokens=6, temperature=0)
    explicit = client.completions.create(model="tiny", prompt="The lazy dog", max_tokens=6, temperature=0,
                                         frequency_penalty=0, presence_penalty=0.0, logit_bias={}, best_of=1)
    assert explicit.choices[0].text == plain.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, response_format={"type": "text"})
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_are_transformers_scores_of_the_reply(client, lm, hf_tiny):
    """logprobs=true, top_logprobs=3 on chat: per generated token its text, bytes and
    log-probability after the templated prompt (transformers' own), and the three best
    alternatives, the greedy token first."""
    from evalsuite.engine.generate import generate

    messages = [{"role": "user", "content": "The quick brown fox"}]
    prompt = encode_prompt(lm.tokenizer, messages)  # the templated prompt (the template is tested elsewhere)
    out = generate(lm.model, [prompt], SamplingParams(max_new_tokens=8))[0].tokens  # no stop token: 8 tokens
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == lm.tokenizer.decode(out, skip_special_tokens=True)
    assert len(content) == len(out) == 8
    with torch.no_grad():
        ref = torch.log_softmax(hf_tiny(torch.tensor([prompt + out])).logits[0].double(), dim=-1)
    for i, (tok, entry) in enumerate(zip(out, content)):
        row = ref[len(prompt) + i - 1]
        assert entry.token == lm.tokenizer.decode([tok]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [float(v) for v in row.topk(3).values], abs=1e-4)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def test_a_second_turn_reuses_the_first_turns_cache_and_replies_as_transformers(client, server, lm, hf_tiny):
    """A chat sent again with the reply and one more message: the server's prefix cache serves
    the first turn's positions, and the reply is transformers' greedy one for the whole
    conversation (ignore_eos: the full 12 tokens, whatever the random model emits)."""
    def hf_reply(messages):
        prompt = encode_prompt(lm.tokenizer, messages)
        out = hf_tiny.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        return lm.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)

    stats = server.served.scheduler.batch.prefixes.stats
    messages = [{"role": "user", "content": "Question: What is the largest bone in the human body?"}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
    assert first == hf_reply(messages)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "The quick brown fox"}]
    hits, reused = stats["hits"], stats["reused_tokens"]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert stats["hits"] == hits + 1 and stats["reused_tokens"] - reused >= len(encode_prompt(lm.tokenizer,
                                                                                              messages[:1])) - 16
    assert second.choices[0].message.content == hf_reply(messages)
    # the reply's usage says how many prompt tokens the cache served, as OpenAI's and vLLM's do
    assert second.usage.prompt_tokens_details.cached_tokens == stats["reused_tokens"] - reused
    assert second.usage.prompt_tokens == len(encode_prompt(lm.tokenizer, messages))


def test_streamed_choices_generate_together_and_end_with_the_usage(client, server):
    """n=3 streamed: the three choices' chunks interleave (one batch, not one after another), each
    choice's text is the one the same seeded request gets unstreamed, and with include_usage a
    last chunk without choices carries the usage."""
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ask = dict(model="tiny", messages=messages, max_tokens=24, temperature=0.9, seed=11, n=3,
               extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    texts = {}
    for c in body:
        (choice,) = c.choices
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {i: c.message.content for i, c in enumerate(plain.choices)}
    order = [c.choices[0].index for c in body if c.choices[0].delta.content]
    assert order != sorted(order)
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens == 3 * 24
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    plain_usage = client.chat.completions.create(**{**ask, "n": 1}).usage
    streamed = list(client.chat.completions.create(**{**ask, "n": 1}, stream=True))
    assert all(c.usage is None for c in streamed) and plain_usage.completion_tokens == 24
    r = httpx.post(f"{server.base_url}/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                           "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options is only valid with stream=true" in r.text


def test_text_parts_are_the_text_they_join(client):
    """A content given as a list of text parts (the API's other form, what many clients send)
    is the parts' text joined by newlines, as vLLM and TensorRT-LLM join them."""
    parts = [{"type": "text", "text": "The quick brown"}, {"type": "text", "text": "fox"}]
    as_parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                              max_tokens=8, temperature=0)
    joined = [{"role": "user", "content": "The quick brown\nfox"}]
    as_text = client.chat.completions.create(model="tiny", messages=joined, max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_malformed_json_and_bad_chat_messages(server):
    r = httpx.post(f"{server.base_url}/completions", content=b'{"model": "tiny", "prompt": ', 
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": "tiny", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server.base_url}/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_api_key_is_checked_on_every_request(lm):
    with BackgroundServer(served_model(lm, {"name": "bf16"}, "tiny", max_len=128), api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).completions.create(
                model="tiny", prompt="x", max_tokens=1)
        ok = openai.OpenAI(base_url=srv.base_url, api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, lm):
    sched = server.served.scheduler
    before = sched.stats["cancelled"]
    with httpx.stream("POST", f"{server.base_url}/completions",
                      json={"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0.0,
                            "stream": True, "stop": ["<never>"]}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
        assert sched.running == 1
    deadline = time.time() + 10
    while sched.running and time.time() < deadline:
        time.sleep(0.05)
    assert sched.running == 0 and sched.stats["cancelled"] > before


def test_the_serve_command_takes_its_address_before_loading_and_serves_on_it(chat_dir):
    """`evalsuite serve` as users start it, a process of its own: a port in use is an error naming
    the address before the model loads; --port 0 serves on a free port that the startup line
    names, and the real openai client completes through it. A --max-model-len beyond the model's
    context (4,096 positions) is served at that context, with a warning."""
    import re
    import socket
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "evalsuite", "serve", "--model", str(chat_dir), "--dtype", "float32",
           "--max-model-len", "8192", "--served-model-name", "tiny"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(cmd + ["--port", str(port)], capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr
    assert "serving" not in busy.stderr  # nothing was loaded

    proc = subprocess.Popen(cmd + ["--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert "--max-model-len 8192 exceeds tiny's context of 4096 tokens; serving 4096" in "".join(lines)
        found = re.search(r"context 4096 tokens\) on (http://127\.0\.0\.1:(\d+)/v1)", line)
        assert found and int(found.group(2)) > 0, line
        client = openai.OpenAI(base_url=found.group(1), api_key="unused", max_retries=0)
        deadline = time.time() + 60  # the socket listens from the start; uvicorn accepts once its app is up
        while True:
            try:
                assert [(m.id, m.model_dump()["max_model_len"]) for m in client.models.list().data] == [("tiny", 4096)]
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        done = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=4, temperature=0)
        assert done.usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_redacted_url_drops_credentials():
    assert redact_url("http://user:pw@host:8000/v1?key=abc#x") == "http://host:8000/v1"


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "localhost:8000", "ftp://host/v1", "http:///v1",
                                 "http://user:s3cret@host:99999/v1", "http://host:port/v1"])
def test_a_base_url_that_is_no_http_url_is_refused_before_any_request(url):
    with pytest.raises(ValueError, match="valid: an http\\(s\\) URL") as e:
        OpenAIBackend(url, "m")
    assert "s3cret" not in str(e.value)


# ------------------------------------------------------------------ the endpoint backend

def test_mmlu_through_the_endpoint_gives_the_in_process_predictions(server, lm, tmp_path):
    local = run_mmlu(lm, SUBSET, tmp_path / "local", progress=False)
    proxy = FaultyProxy(server.base_url, {})  # no faults: it counts the requests
    with proxy as url:
        remote = run_mmlu(OpenAIBackend(url, "tiny", tokenizer=lm.tokenizer), SUBSET, tmp_path / "remote",
                          progress=False)
    assert remote.run["status"] == "complete" and remote.run["backend"]["kind"] == "openai"
    assert remote.run["backend"]["base_url"] == url
    assert remote.run["recipe"] == {"name": "bf16"} and remote.run["model"]["name"] == "tiny"
    # served by `evalsuite serve`: the run states where and how, as the local run does
    for key in ("device", "device_name", "kernel_path"):
        assert remote.run["backend"][key] == local.run["backend"][key] is not None
    recs = {}
    for name in ("local", "remote"):
        recs[name] = {(r["formulation"], r["id"]): r for r in map(json.loads, open(tmp_path / name / "samples.jsonl"))}
    assert recs["local"].keys() == recs["remote"].keys() and len(recs["local"]) == 18
    for k, r in recs["local"].items():
        assert recs["remote"][k]["prediction"] == r["prediction"]
        assert recs["remote"][k]["logprobs"] == pytest.approx(r["logprobs"], abs=1e-4)
        assert recs["remote"][k]["is_greedy"] == r["is_greedy"]
    for form in ("letter", "cloze"):
        assert remote.metrics[form]["acc"]["overall"] == local.metrics[form]["acc"]["overall"]
    # the session records what the endpoint reported for every completions request (all but the
    # one listing of /v1/models the proxy counted): prompt tokens scored, nothing generated
    billed = remote.run["sessions"][-1]["endpoint_usage"]
    assert billed["requests"] == proxy.count - 1 > 1
    assert billed["prompt_tokens"] > 0 and billed["completion_tokens"] == 0
    assert billed["requests_without_usage"] == 0 and "endpoint_usage" not in local.run["sessions"][-1]


def test_endpoint_run_from_the_command_line(server, chat_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-do-not-write-me")
    out = tmp_path / "cli"
    argv = ["run", "mmlu", "--base-url", server.base_url, "--model", "tiny", "--tokenizer", str(chat_dir),
            "--api-key-env", "MY_KEY", "--per-subject", "1", "--subjects", "anatomy", "--formulation", "letter",
            "cloze", "generative", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "[cloze] acc" in capsys.readouterr().out
    for f in out.iterdir():
        assert "sk-do-not-write-me" not in f.read_text()
    assert main(argv[:4] + ["--model", "nope"] + argv[6:]) == 2
    assert "model 'nope' is not served at" in capsys.readouterr().err
    for flag in ("--prompts-per-request", "--concurrency"):
        assert main(argv + [flag, "0"]) == 2
        assert f"{flag}=0; valid: an integer >= 1" in capsys.readouterr().err


def test_log_likelihood_needs_a_tokenizer(server):
    with pytest.raises(BackendError, match="need the served model's tokenizer"):
        OpenAIBackend(server.base_url, "tiny").check_loglikelihood()


# ------------------------------------------------------------------ fault injection

class FaultyProxy:
    """A scripted stand-in (a test tool, not the product): forwards to the real server, except
    that request number k (counting from 1) gets the fault ``faults[k]``: "500", "429", "hang"
    (no answer until the client times out) or "truncated" (half a JSON body)."""

    def __init__(self, target: str, faults: dict[int, str]):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response

        self.faults, self.count, self.lock = faults, 0, threading.Lock()
        app = FastAPI()

        @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request):
            with self.lock:
                self.count += 1
                fault = self.faults.get(self.count)
            if fault in ("500", "429"):
                return JSONResponse({"error": {"message": f"injected {fault}"}}, status_code=int(fault))
            if fault == "hang":
                import asyncio

                await asyncio.sleep(5)
            async with httpx.AsyncClient(timeout=60) as c:
                r = await c.request(request.method, f"{target}/{path}", content=await request.body(),
                                    headers={"content-type": "application/json"})
            body = r.content[: len(r.content) // 2] if fault == "truncated" else r.content
            return Response(body, status_code=r.status_code, media_type="application/json")

        self._serving = app_on_localhost(app)

    def __enter__(self) -> str:
        return self._serving.__enter__()

    def __exit__(self, *exc):
        return self._serving.__exit__(*exc)


def test_retries_recover_from_500_429_hangs_and_truncated_json(server, lm):
    reqs = [ScoreRequest(tuple(lm.tokenizer.encode(f"Question {i}: which?\nAnswer:")), (lm.tokenizer.encode(" A")[0],))
            for i in range(6)]
    want = score(lm.model, reqs)
    # request 1 is /v1/models; then one fault of each kind, each recovered by a retry
    with FaultyProxy(server.base_url, {2: "500", 3: "429", 4: "hang", 5: "truncated"}) as url:
        backend = OpenAIBackend(url, "tiny", tokenizer=lm.tokenizer, concurrency=1, timeout=1.0, backoff=0.01)
        got = backend.loglikelihood(reqs)
    assert [g.logprob for g in got] == pytest.approx([w.logprob for w in want], abs=1e-4)


def test_failures_are_recorded_with_their_reason_and_a_rerun_completes_them(server, lm, tmp_path):
    cfg = MMLUConfig(formulations=("letter",), subjects=("anatomy",), per_subject=4)
    # no retries: every injected 500 is final for its request (one prompt per request here)
    # requests 1-2 are the log-probability probe and /v1/models; then every seventh one fails
    with FaultyProxy(server.base_url, {n: "500" for n in range(4, 40, 7)}) as url:
        backend = OpenAIBackend(url, "tiny", tokenizer=lm.tokenizer, concurrency=1, batch_size=1, max_retries=0)
        first = run_mmlu(backend, cfg, tmp_path / "run", progress=False)
    assert first.run["status"] == "incomplete" and 0 < first.metrics["letter"]["failed"] < 4
    failed = [r for r in map(json.loads, open(tmp_path / "run" / "samples.jsonl")) if "failed" in r]
    assert failed and all("HTTP 500: injected 500" in r["failed"] for r in failed)
    assert all("logprobs" not in r for r in failed)  # never a made-up score
    again = run_mmlu(OpenAIBackend(server.base_url, "tiny", tokenizer=lm.tokenizer), cfg, tmp_path / "run",
                     progress=False)
    assert again.run["status"] == "complete" and again.metrics["letter"]["failed"] == 0
    assert again.metrics["letter"]["n"] == 4
    records = [json.loads(x) for x in open(tmp_path / "run" / "samples.jsonl")]
    scored = [r["id"] for r in records if "failed" not in r]
    assert len(scored) == len(set(scored)) == 4  # nothing scored twice


def test_a_server_killed_mid_run_then_restarted_resumes(lm, tmp_path):
    cfg = MMLUConfig(formulations=("letter",), subjects=("anatomy", "marketing"), per_subject=6)
    srv = BackgroundServer(served_model(lm, {"name": "bf16"}, "tiny", max_len=512)).__enter__()
    port = srv.port
    backend = OpenAIBackend(srv.base_url, "tiny", tokenizer=lm.tokenizer, concurrency=1, max_retries=0, timeout=2)
    calls = {"n": 0}
    real = backend.loglikelihood

    def killing(requests, progress=None):  # the server dies after the first chunk's 8th request
        calls["n"] += 1
        if calls["n"] == 1:
            out = real(requests[:8])
            srv.__exit__(None, None, None)
            return out + real(requests[8:])
        return real(requests, progress)

    backend.loglikelihood = killing
    try:
        first = run_mmlu(backend, cfg, tmp_path / "run", chunk_size=4, progress=False)
    finally:
        srv.__exit__(None, None, None)  # already stopped unless the run failed before the kill
    assert first.run["status"] == "incomplete"
    done_before = {r["id"] for r in map(json.loads, open(tmp_path / "run" / "samples.jsonl")) if "failed" not in r}
    assert 0 < len(done_before) < 12
    with BackgroundServer(served_model(lm, {"name": "bf16"}, "tiny", max_len=512), port=port) as again:
        resumed = run_mmlu(OpenAIBackend(again.base_url, "tiny", tokenizer=lm.tokenizer), cfg, tmp_path / "run",
                           progress=False)
    assert resumed.run["status"] == "complete" and resumed.metrics["letter"]["n"] == 12
    records = [json.loads(x) for x in open(tmp_path / "run" / "samples.jsonl")]
    scored = [r["id"] for r in records if "failed" not in r]
    assert len(scored) == len(set(scored)) == 12 and done_before <= set(scored)


def test_ignore_eos_generates_exactly_max_tokens(client):
    r = client.completions.create(model="tiny", prompt="The", max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_prompts_sharing_a_prefix_run_it_once():
    from evalsuite.server.scheduler import prefix_groups

    ctx = list(range(100, 120))
    prompts = [ctx + [7], [1, 2, 3], ctx + [5, 6], ctx + [9], list(range(100, 110)) + [4]]
    groups = sorted((plen, sorted(m)) for plen, m in prefix_groups(prompts))
    # the three continuations of ctx share all 20 context tokens; the 10-token prompt shares only
    # 10 with them, and joining would make each of them run 10 more tokens of its own: it stays out
    # (a prompt alone runs all but its last token, as the scorer runs a pair it does not share)
    assert groups == [(2, [1]), (10, [4]), (20, [0, 2, 3])]
    # two questions under one 12-token instruction line, four answers each: one group per question
    head = list(range(200, 212))
    q1, q2 = head + list(range(300, 330)), head + list(range(400, 425))
    prompts = [q + [a] for q in (q1, q2) for a in (1, 2, 3, 4)]
    assert sorted((plen, sorted(m)) for plen, m in prefix_groups(prompts)) == [(37, [4, 5, 6, 7]),
                                                                                (42, [0, 1, 2, 3])]
    assert sorted(prefix_groups([ctx + [1], ctx[:5] + [2]])) == [(5, [1]), (20, [0])]  # 5 shared: too few
    # four answers of which two share their first words: one group at the context (before, the
    # answer sorted first was left alone, its 20-token context run again: 36 tokens saved of 60,
    # against 60 now; and in BF16 its numbers were not the in-process scorer's)
    answers = [ctx + [3, 4], ctx + [50, 60, 70], ctx + [50, 60, 80], ctx + [90]]
    assert prefix_groups(answers) == [(20, [0, 1, 2, 3])]


def test_prefix_sharing_gives_the_in_process_scores_exactly(lm):
    """Four answers of one question sent together: each log-likelihood is what engine.score gives
    the (context, answer) pair, in float32 to the last bit."""
    from evalsuite.server.scheduler import prompt_logprobs

    ctx = lm.tokenizer.encode("Question: Which animal is the fastest?\nAnswer:")
    answers = [lm.tokenizer.encode(a) for a in (" cheetah", " a slow snail", " horse", " the falcon")]
    got = prompt_logprobs(lm.model, [ctx + a for a in answers], [0] * 4)
    want = score(lm.model, [ScoreRequest(tuple(ctx), tuple(a)) for a in answers])
    for g, w in zip(got, want):
        assert tuple(g.token_logprobs[len(ctx):]) == w.token_logprobs


# ------------------------------------------------------------------ chat template switches

THINKING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>"
                     "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")


def test_chat_template_kwargs_reach_the_template_locally_and_through_an_endpoint(tiny_chat_dir, tmp_path):
    """A chat template's own switches (Qwen3's enable_thinking): the engine renders them, the
    server takes them as vLLM does (`chat_template_kwargs` in the body), and the endpoint backend
    sends them there: the same prompt tokens (counted by the tokenizer's own template) and the
    same greedy reply either way; a malformed value is a 400."""
    import shutil

    from evalsuite.backends.engine import EngineBackend

    folder = tmp_path / "m"
    shutil.copytree(tiny_chat_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": THINKING_TEMPLATE}))
    lm = load(str(folder), "float32")
    msgs = [{"role": "user", "content": "Name a colour."}]
    off = {"enable_thinking": False}
    rendered = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert rendered.endswith("<|assistant|><think></think>")
    want = lm.tokenizer.encode(rendered, add_special_tokens=False)
    assert encode_prompt(lm.tokenizer, msgs, off) == want != encode_prompt(lm.tokenizer, msgs)
    params = SamplingParams(max_new_tokens=6)
    local = EngineBackend(lm, chat_template_kwargs=off).generate([msgs], params)[0].text
    with BackgroundServer(served_model(lm, {"name": "bf16"}, "m", max_len=256)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        reply = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0,
                                               extra_body={"chat_template_kwargs": off})
        assert reply.usage.prompt_tokens == len(want) and reply.choices[0].message.content == local
        remote = OpenAIBackend(srv.base_url, "m", chat_template_kwargs=off).generate([msgs], params)[0].text
        assert remote == local
        bad = httpx.post(f"{srv.base_url}/chat/completions",
                         json={"model": "m", "messages": msgs, "chat_template_kwargs": "off"})
        assert bad.status_code == 400 and "chat_template_kwargs='off'" in bad.json()["error"]["message"]


def test_a_stopped_server_lets_its_model_and_kv_cache_go(chat_dir):
    """A study runs one embedded judge server per MT-Bench run in one process: once a server
    stops, nothing may keep its model and KV cache alive (FastAPI keeps every endpoint function
    it has seen in a process-wide cache, so a handler closing over the model held them: 6 GB per
    judge server, until the study's process ran out of memory)."""
    import gc
    import weakref

    served = served_model(load(str(chat_dir), "float32"), {"name": "bf16"}, "tiny", max_batch_size=2, max_len=64)
    with BackgroundServer(served) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        assert client.completions.create(model="tiny", prompt="The", max_tokens=2).choices[0].text is not None
        assert client.chat.completions.create(model="tiny", max_tokens=2,
                                              messages=[{"role": "user", "content": "Hi"}]).choices
        assert httpx.get(srv.base_url.replace("/v1", "/health")).status_code == 200
        assert client.models.list().data
    gone = [weakref.ref(served.scheduler.model), weakref.ref(served)]
    del served, srv, client
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_nothing_listening_is_named_at_once_while_requests_still_retry_a_dropped_connection(lm):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "tiny", tokenizer=lm.tokenizer, max_retries=5,
                            sleep=waits.append)
    with pytest.raises(BackendError) as err:
        backend.model_card()
    assert waits == []  # no backoff: before, six attempts took about 23 s to say the same
    assert f"127.0.0.1:{port}/v1" in str(err.value) and "Connection refused" in str(err.value)
    assert "is the server running" in str(err.value)
    # a request of a run that loses its connection is retried with backoff, as before
    req = ScoreRequest(tuple(lm.tokenizer.encode("Question: which?\nAnswer:")), (lm.tokenizer.encode(" A")[0],))
    (failed,) = backend.loglikelihood([req])
    assert len(waits) == 5 and "after 6 attempts" in failed.reason


def test_prompt_logprobs_past_longropes_original_context_are_transformers(longrope):
    """Prompts that share a context, some reaching past LongRoPE's original context (40 positions
    here): a prompt that crosses it runs whole, not on its group's shorter prefix (which would
    be rotated with the short factors), and every prompt gets transformers' log-probabilities."""
    from evalsuite.server.scheduler import prompt_logprobs

    from .conftest import LONGROPE_ORIGINAL as N

    g = torch.Generator().manual_seed(9)
    ctx = torch.randint(1, 400, (N - 10,), generator=g).tolist()
    prompts = [ctx + torch.randint(1, 400, (n,), generator=g).tolist() for n in (3, 5, 14, 30)]
    got = prompt_logprobs(longrope.model, prompts, [0] * len(prompts))
    for tokens, lp in zip(prompts, got):
        with torch.no_grad():
            ref = torch.log_softmax(longrope.hf(torch.tensor([tokens])).logits[0].double(), dim=-1)
        want = [float(ref[i - 1, tokens[i]]) for i in range(1, len(tokens))]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4), len(tokens)


def test_a_sequence_that_ends_at_its_first_token_leaves_the_others_running(lm):
    """A reply whose first sampled token is a stop token (EOS: an empty answer) ends at admission
    with no token. The scheduler stepped the batch before retiring it, and the step failed on
    that sequence, failing every request of the batch (found serving SmolLM2 to a generative
    MMLU run: 47 of 57 questions failed)."""
    from evalsuite.server.scheduler import GenerationJob, Scheduler

    tokens = lm.tokenizer.encode
    first = generate(lm.model, [tokens("The lazy dog")], SamplingParams(max_new_tokens=1))[0].tokens[0]
    want = generate(lm.model, [tokens("The quick brown fox")], SamplingParams(max_new_tokens=8))[0].tokens
    sched = Scheduler(lm.model, max_batch_size=4, max_len=128).start()
    try:
        running = GenerationJob(tokens("The quick brown fox"), SamplingParams(max_new_tokens=8))
        empty = GenerationJob(tokens("The lazy dog"), SamplingParams(max_new_tokens=8, stop_token_ids=(first,)))
        sched.submit(running)
        while running.events.empty():  # the first one is decoding when the second arrives
            time.sleep(0.01)
        sched.submit(empty)

        def events(job):
            out = []
            while not out or out[-1][0] in ("tokens",):
                out.append(job.events.get(timeout=60))
            return out
        assert events(empty) == [("done", "stop")]
        got = events(running)
        assert got[-1] == ("done", "length") and [t for kind, v in got[:-1] for t in v] == want
    finally:
        sched.shutdown()


def test_a_failed_prefill_fails_its_requests_and_the_server_goes_on(lm, monkeypatch):
    """Fault injection: the model's forward raises once, at a prefill. The joining request gets
    the error (before: it was neither waiting nor running, and its client waited forever), the
    one already decoding ends with an error or its tokens, and the next request is served."""
    from evalsuite.server.scheduler import GenerationJob, Scheduler

    tokens = lm.tokenizer.encode
    sched = Scheduler(lm.model, max_batch_size=4, max_len=128).start()
    real, calls = lm.model.hidden, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    def final(job):
        while (event := job.events.get(timeout=60))[0] == "tokens":
            pass
        return event
    try:
        monkeypatch.setattr(lm.model, "hidden", failing_once)
        job = GenerationJob(tokens("The quick brown fox"), SamplingParams(max_new_tokens=4))
        sched.submit(job)
        assert final(job) == ("error", "RuntimeError: injected fault")
        after = GenerationJob(tokens("The quick brown fox"), SamplingParams(max_new_tokens=4))
        sched.submit(after)
        assert final(after) == ("done", "length") and not sched.batch.running
    finally:
        sched.shutdown()



def test_a_contexts_requests_stay_in_one_call():
    """The endpoint backend's calls: at most batch_size prompts, consecutive requests of one
    context never split between two calls (a question's answers reach the server together); a
    context with more requests than a call holds fills calls of its own."""
    from evalsuite.backends.openai import context_chunks

    reqs = [ScoreRequest((c,), (k,)) for c, n in ((1, 3), (2, 5), (3, 2), (4, 9), (5, 1)) for k in range(n)]
    chunks = context_chunks(reqs, 8)
    assert [[r.context[0] for r in ch] for ch in chunks] == [
        [1, 1, 1, 2, 2, 2, 2, 2], [3, 3], [4] * 8, [4, 5]]
    assert [r for ch in chunks for r in ch] == reqs  # in order, each once


def test_prefix_groups_compute_the_fewest_tokens_of_any_grouping():
    """Against a brute force over every split of the sorted prompts into groups (a group of
    several needs MIN_SHARED_PREFIX shared tokens and leaves each member one of its own): the
    grouping computes as few tokens as the best of them, on 300 random prompt sets."""
    import random

    from evalsuite.server.scheduler import MIN_SHARED_PREFIX, prefix_groups

    def common(a, b):
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    rng = random.Random(0)
    for _ in range(300):
        base = [rng.randint(0, 3) for _ in range(rng.randint(0, 30))]
        prompts = [base[:rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(2, 12))]
                   for _ in range(rng.randint(1, 7))]
        groups = prefix_groups(prompts)
        assert sorted(i for _, members in groups for i in members) == list(range(len(prompts)))
        for plen, members in groups:
            assert all(prompts[i][:plen] == prompts[members[0]][:plen] and len(prompts[i]) > plen for i in members)
        computed = sum(plen + sum(len(prompts[i]) - plen for i in members) for plen, members in groups)
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        best = None
        for mask in range(1 << (len(order) - 1)):
            cuts = [0] + [k + 1 for k in range(len(order) - 1) if mask >> k & 1] + [len(order)]
            total = 0
            for a, b in zip(cuts, cuts[1:]):
                members = order[a:b]
                shared = min([len(prompts[i]) - 1 for i in members]
                             + [common(prompts[members[0]], prompts[i]) for i in members[1:]])
                if len(members) > 1 and shared < MIN_SHARED_PREFIX:
                    break
                total += sum(len(prompts[i]) for i in members) - (len(members) - 1) * shared
            else:
                best = total if best is None else min(best, total)
        assert computed == best


def test_answers_sharing_their_first_words_score_as_the_server_scores_them(tiny_dir):
    """In BF16: four answers to one context, three beginning with the same two tokens and one
    sharing nothing more. The server shares each group's whole common prefix; the scorer shares
    the context and the continuation tokens all of a context's answers begin with. Both run the
    same forwards, to the last bit."""
    from evalsuite.server.scheduler import prompt_logprobs

    bf16 = load(str(tiny_dir), "bfloat16")
    ctx = bf16.tokenizer.encode("Question: Which animal is the fastest of all the animals that live on land?\\nAnswer:")
    for answers in ([" the cheetah", " the falcon", " the horse"], [" the cheetah", " the falcon", " a snail"]):
        conts = [bf16.tokenizer.encode(a) for a in answers]
        got = prompt_logprobs(bf16.model, [ctx + c for c in conts], [0] * len(conts))
        want = score(bf16.model, [ScoreRequest(tuple(ctx), tuple(c)) for c in conts])
        for g, w in zip(got, want):
            assert tuple(g.token_logprobs[len(ctx):]) == w.token_logprobs
