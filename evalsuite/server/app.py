"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions
(streaming with server-sent events on both), /health.

Every request is validated before it reaches the scheduler; a bad one gets a 4xx in OpenAI's
error layout ({"error": {"message", "type", "param", "code"}}) naming the field and its valid
range, and the server keeps serving. With an API key configured, every /v1 request must carry
it as ``Authorization: Bearer <key>``.

``/v1/completions`` with ``echo`` and ``logprobs`` returns the prompt tokens' log-probabilities
as vLLM and OpenAI's legacy API do (the first token has none); ``max_tokens: 0`` scores a prompt
without generating. That is what lm-eval's ``local-completions`` model sends for log-likelihood
tasks. ``/v1/chat/completions`` with ``logprobs`` returns the reply tokens' log-probabilities in
the chat API's layout. Parameters that would change the output and are not implemented are
refused unless neutral (``_NEUTRAL``), never ignored.

``usage`` counts prompt and completion tokens as OpenAI does, with
``prompt_tokens_details.cached_tokens``: prompt tokens served from the prefix cache. A streamed
request gets it in a last chunk with no choices when it asks with
``stream_options: {"include_usage": true}``. A streamed request with several choices (``n`` or
a list of prompts) generates them together and interleaves their chunks, each naming its index.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.requests import SamplingParams
from ..textgen import encode_prompt, encode_text, with_stop_tokens
from .scheduler import GenerationJob, PromptLogprobJob, Scheduler

MAX_N = 16
MAX_LOGPROBS = 20


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


@dataclass
class ServedModel:
    name: str  # the id clients ask for
    tokenizer: Any
    scheduler: Scheduler
    card: dict[str, Any]  # what /v1/models reports beside the id: source, weights hash, recipe, dtype
    _pieces: dict[int, str] = field(default_factory=dict, repr=False)

    def piece(self, token: int) -> str:
        """One token's text as ``decode([token])`` gives it (cached: echo replies name every token)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text


def _json(reply):
    """A reply dict as JSON as is: FastAPI's default encoder walks every value in Python first,
    which an echo reply (a log-probability and alternatives per prompt token) makes slow."""
    return JSONResponse(reply) if isinstance(reply, dict) else reply


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                        status_code=e.status)


def create_app(served: ServedModel, api_key: str | None = None) -> FastAPI:
    """The app serving ``served``. Its handlers find the model in ``app.state``, never in a closure:
    FastAPI keeps every endpoint function it has seen in a process-wide cache, so a closure over
    the model would keep its weights and KV cache alive after the server stops (a study runs one
    embedded judge server per MT-Bench run in one process)."""
    app = FastAPI(title="evalsuite", docs_url=None, redoc_url=None)
    app.state.served = served

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(RequestError("missing or wrong API key (send Authorization: Bearer <key>)",
                                           status=401, kind="authentication_error"))
        return await call_next(request)

    @app.get("/health")
    async def health(request: Request):
        served = request.app.state.served
        s = served.scheduler
        return {"status": "ok", "model": served.name, "running": s.running, "waiting": len(s.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        served = request.app.state.served
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "evalsuite", "max_model_len": served.scheduler.max_len,
                                            **served.card}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await _body(request)
            return _json(await _completions(request.app.state.served, body, request))
        except RequestError as e:
            return _error(e)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await _body(request)
            return _json(await _chat(request.app.state.served, body, request))
        except RequestError as e:
            return _error(e)

    return app


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


# ------------------------------------------------------------------------------ validation

def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        bracket = "(" if lo_open else "["
        raise RequestError(f"{key}={v!r}; valid: a number in {bracket}{lo}, {hi}]", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"{key}={v!r}; valid: an integer in [{lo}, {hi}]", key)
    return v


def _boolean(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"{key}={v!r}; valid: true or false", key)
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 16:
        raise RequestError(f"stop={stop!r}; valid: a string or a list of up to 16 strings", "stop")
    return [s for s in stops if s]


def _check_model(served: ServedModel, body: dict) -> None:
    model = body.get("model")
    if model is None:
        raise RequestError(f"model is missing; valid: {served.name!r}", "model")
    if model != served.name:
        raise RequestError(f"model {model!r} is not served here; valid: {served.name!r}", "model", status=404,
                           kind="not_found_error")
    _refuse_unsupported(body)


# Parameters of the OpenAI API (and vLLM's extensions) that would change the output and that this
# server does not implement, with the values that leave the output unchanged. Clients that send
# those neutral values explicitly are served; any other value is refused with a 400 rather than
# ignored, so no reply is produced under settings other than the ones asked for. Other unknown
# fields (user, metadata, ...) do not change the output and are ignored.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "logit_bias": ({},), "top_k": (-1, 0), "min_p": (0, 0.0), "min_tokens": (0,), "best_of": (1,),
    "suffix": ("",), "tools": ([],), "functions": ([],), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (),
}


def _refuse_unsupported(body: dict) -> None:
    def neutral(v: Any, n: Any) -> bool:  # 0 and 0.0 alike; True is not 1
        if isinstance(n, (int, float)):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == n
        return v == n

    for key, values in _NEUTRAL.items():
        v = body.get(key)
        if v is not None and not any(neutral(v, n) for n in values):
            shown = ", ".join(map(repr, values)) or "none: omit it"
            raise RequestError(f"{key}={v!r} is not supported by this server; valid: {shown}", key)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(f"response_format={fmt!r} is not supported by this server (no constrained decoding); "
                           "valid: {'type': 'text'}", "response_format")


def _sampling(served: ServedModel, body: dict, prompt_len: int, default_max: int) -> tuple[list[SamplingParams], int]:
    limit = served.scheduler.max_len
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, max_key, default_max, 0, limit)
    # a completions prompt only scored (max_tokens 0: its log-probabilities) may fill the context;
    # one that generates (a chat reply always does) needs a position for its first new token
    if prompt_len > limit or (prompt_len == limit and (max_tokens != 0 or "messages" in body)):
        raise RequestError(f"the prompt has {prompt_len} tokens; this server's context is {limit} tokens "
                           "(prompt + max_tokens)", "prompt" if "prompt" in body else "messages")
    if max_tokens and prompt_len + max_tokens > limit:
        raise RequestError(f"{max_key}={max_tokens} with a prompt of {prompt_len} tokens exceeds this server's "
                           f"context of {limit} tokens; valid: {max_key} <= {limit - prompt_len}", max_key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = _integer(body, "n", 1, 1, MAX_N)
    seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
    if max_tokens == 0:
        return [], n
    params = [SamplingParams(max_tokens, temperature, top_p, None if seed is None else seed + i) for i in range(n)]
    if not _boolean(body, "ignore_eos"):  # vLLM's extension: benchmarks ask for exactly max_tokens
        params = [with_stop_tokens(p, served.tokenizer) for p in params]
    return params, n


def _prompts(served: ServedModel, body: dict) -> list[list[int]]:
    """A completions prompt: a string (with the tokenizer's BOS rule, no second BOS before a
    rendered chat template: ``encode_text``), a list of token ids, or a batch of either."""
    prompt = body.get("prompt")
    vocab = served.scheduler.model.config.vocab_size

    def ids(x, where: str) -> list[int]:
        if isinstance(x, str):
            return encode_text(served.tokenizer, x)
        if isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            bad = next((t for t in x if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"{where} holds token id {bad}; valid: 0..{vocab - 1}", "prompt")
            return list(x)
        raise RequestError(f"{where} must be a string or a non-empty list of token ids", "prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        out = [ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        out = [ids(prompt, "prompt")]
    if any(not p for p in out):
        raise RequestError("prompt encodes to no tokens", "prompt")
    return out


# ------------------------------------------------------------------------------ running

def _stop_fn(tokenizer, stops: list[str]):
    if not stops:
        return None

    def hit(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-16:], skip_special_tokens=True)
        return any(s in tail for s in stops)
    return hit


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _stop_prefix_at_end(text: str, stops: list[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop string: a stream holds it back
    until the next tokens show whether the stop string follows (which cuts it) or not, so that a
    streamed reply is the reply."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _job(served: ServedModel, prompt: list[int], params: SamplingParams, stops: list[str]
         ) -> tuple[GenerationJob, asyncio.Queue]:
    """A generation job whose events arrive on an asyncio queue of the calling event loop (the
    scheduler thread hands them over with call_soon_threadsafe: no polling)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = GenerationJob(prompt, params, _stop_fn(served.tokenizer, stops),
                        post=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
    served.scheduler.submit(job)
    return job, events


@dataclass
class Reply:
    """One generated sequence: its tokens, why it ended, and how many of its prompt's tokens the
    prefix cache served."""

    tokens: list[int]
    finish_reason: str
    cached_tokens: int = 0


async def _generate(served: ServedModel, prompt: list[int], params: SamplingParams, stops: list[str],
                    request: Request) -> Reply:
    job, events = _job(served, prompt, params, stops)
    tokens: list[int] = []
    try:
        while True:
            kind, value = await events.get()
            if kind == "tokens":
                tokens.extend(value)
            elif kind == "done":  # job.gen was written by the scheduler thread before it posted this
                return Reply(tokens, value, job.gen.cached_tokens)
            else:
                raise RequestError(f"generation failed: {value}", status=500, kind="server_error")
    except asyncio.CancelledError:
        job.cancel()
        raise


async def _prompt_logprobs(served: ServedModel, prompts: list[list[int]], top: int):
    job = PromptLogprobJob(prompts, top)
    served.scheduler.submit(job)
    return await asyncio.wrap_future(job.future)


def _logprobs_block(served: ServedModel, tokens: list[int], lps, top_n: int, offset0: int = 0) -> dict[str, Any]:
    pieces = [served.piece(t) for t in tokens]
    offsets, pos = [], offset0
    for piece in pieces:
        offsets.append(pos)
        pos += len(piece)
    tops = [None if alt is None else _top_by_text(served, alt, top_n) for alt in lps.top]
    return {"tokens": pieces, "token_logprobs": lps.token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _top_by_text(served: ServedModel, alt: dict[int, float], top_n: int) -> dict[str, float]:
    """The ``top_n`` best alternatives keyed by their text, as the API has it; where two token ids
    decode to the same text the better one keeps the key (the first seen: ``alt`` is best first)."""
    out: dict[str, float] = {}
    for i, v in alt.items():
        if len(out) == top_n:
            break
        out.setdefault(served.piece(i), v)
    return out


def _chat_logprobs(served: ServedModel, tokens: list[int], lps, top_n: int) -> dict[str, Any]:
    """The chat API's layout: per generated token its text, bytes, log-probability and the
    ``top_n`` best alternatives (``top_logprobs``), best first, a list by token (unlike the
    completions API's dict by text, two tokens of the same text both appear). Every generated token
    is listed, a stop string's too (the reply text is cut there, its tokens are not). ``bytes`` is
    the UTF-8 of the token's text as decoded alone, as vLLM gives it: a token that holds part of a
    character decodes to U+FFFD."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = served.piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, logprob, alt in zip(tokens, lps.token_logprobs, lps.top):
        tops = [entry(t, v) for t, v in list((alt or {}).items())[:top_n]]
        content.append({**entry(token, logprob), "top_logprobs": tops})
    return {"content": content, "refusal": None}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _include_usage(body: dict) -> bool:
    """``stream_options: {"include_usage": true}``: a last chunk with the usage (streaming only)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not _boolean(body, "stream"):
        raise RequestError("stream_options is only valid with stream=true", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(f"stream_options={options!r}; valid: {{'include_usage': true or false}}",
                           "stream_options")
    return options.get("include_usage", False)


def _prompt_usage(replies: list[Reply], n: int) -> int:
    """Cached prompt tokens of a request whose replies are ``n`` per prompt: each prompt counted
    once, as its prompt tokens are (by its first reply)."""
    return sum(r.cached_tokens for r in replies[::n])


async def _completions(served: ServedModel, body: dict, request: Request):
    _check_model(served, body)
    prompts = _prompts(served, body)
    stops = _stops(body)
    echo = _boolean(body, "echo")
    top = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    stream = _boolean(body, "stream")
    plans = [_sampling(served, body, len(p), 16) for p in prompts]
    n = plans[0][1]
    include_usage = _include_usage(body)
    if stream and (echo or top is not None):
        raise RequestError("stream=true cannot be combined with echo or logprobs here", "stream")
    created, rid = int(time.time()), f"cmpl-{secrets.token_hex(12)}"
    jobs = [(prompt, params[i] if params else None) for prompt, (params, _) in zip(prompts, plans) for i in range(n)]
    if stream:
        return _sse(_stream_completion(served, jobs, n, stops, request, created, rid, include_usage))
    tok = served.tokenizer

    async def one(prompt: list[int], params: SamplingParams | None) -> Reply:
        return Reply([], "length") if params is None else await _generate(served, prompt, params, stops, request)

    generated = await asyncio.gather(*(one(prompt, params) for prompt, params in jobs))
    lps = [None] * len(jobs)
    if echo or top is not None:
        # a few alternatives more than asked: some may decode to the same text (partial bytes)
        lps = await _prompt_logprobs(served, [p + r.tokens for (p, _), r in zip(jobs, generated)],
                                     max(top or 0, 1) + 8)
    choices = []
    for i, ((prompt, _), reply, lp) in enumerate(zip(jobs, generated, lps)):
        out = reply.tokens
        text, stopped = _cut(tok.decode(out, skip_special_tokens=True), stops)
        choice = {"index": i, "text": text, "logprobs": None,
                  "finish_reason": "stop" if stopped else reply.finish_reason}
        if lp is not None:
            start = 0 if echo else len(prompt)
            choice["logprobs"] = _logprobs_block(served, (prompt + out)[start:], _slice(lp, start), top or 0)
        if echo:
            choice["text"] = tok.decode(prompt) + text
        choices.append(choice)
    usage = _usage(sum(len(p) for p in prompts), sum(len(r.tokens) for r in generated), _prompt_usage(generated, n))
    return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
            "choices": choices, "usage": usage}


def _slice(lps, start: int):
    from .scheduler import PromptLogprobs

    return PromptLogprobs(lps.token_logprobs[start:], lps.top[start:], lps.greedy[start:])


def _messages(body: dict) -> list[dict[str, str]]:
    """The chat messages as the template takes them: a role and a text each. A content given as a
    list of parts, the API's other form, is its text parts joined by newlines, as vLLM joins them
    for templates that take text; any other part (an image, audio) is refused, since the models
    served here read text only."""
    messages = body.get("messages")
    shape = ("messages must be a non-empty list of {role, content} objects, each content a string or a list "
             "of {type: 'text', text} parts")
    if not isinstance(messages, list) or not messages:
        raise RequestError(shape, "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, (str, list)):
            raise RequestError(f"{shape}; messages[{i}] is {m!r}", "messages")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}] holds the content part {part!r}; valid: "
                                       "{'type': 'text', 'text': a string} (this server's models read text only)",
                                       "messages")
            content = "\n".join(part["text"] for part in content)
        out.append({"role": m["role"], "content": content})
    return out


async def _chat(served: ServedModel, body: dict, request: Request):
    _check_model(served, body)
    messages = _messages(body)
    template_kwargs = body.get("chat_template_kwargs")  # vLLM's and SGLang's extension: the template's switches
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise RequestError(f"chat_template_kwargs={template_kwargs!r}; valid: an object of the chat template's "
                           "variables, e.g. {\"enable_thinking\": false}", "chat_template_kwargs")
    try:
        prompt = encode_prompt(served.tokenizer, messages, template_kwargs)
    except Exception as e:  # a template that rejects the roles or their order
        raise RequestError(f"the chat template cannot render these messages: {e}", "messages") from None
    stops = _stops(body)
    params, n = _sampling(served, body, len(prompt), served.scheduler.max_len - len(prompt))
    if not params:
        raise RequestError("max_tokens=0; valid for chat: at least 1", "max_tokens")
    want_logprobs = body.get("logprobs")
    if want_logprobs not in (None, True, False):
        raise RequestError(f"logprobs={want_logprobs!r}; valid for chat: true or false", "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    include_usage = _include_usage(body)
    created, rid = int(time.time()), f"chatcmpl-{secrets.token_hex(12)}"
    if _boolean(body, "stream"):
        if want_logprobs:
            raise RequestError("stream=true cannot be combined with logprobs here", "stream")
        return _sse(_stream_chat(served, prompt, params, stops, request, created, rid, include_usage))
    results = await asyncio.gather(*(_generate(served, prompt, p, stops, request) for p in params))
    lps = [None] * len(results)
    if want_logprobs:  # the reply's tokens scored after the prompt, as the completions endpoint does
        lps = await _prompt_logprobs(served, [prompt + r.tokens for r in results], max(top or 0, 1))
    choices = []
    for i, (reply, lp) in enumerate(zip(results, lps)):
        out = reply.tokens
        text, stopped = _cut(served.tokenizer.decode(out, skip_special_tokens=True), stops)
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": None if lp is None else _chat_logprobs(served, out, _slice(lp, len(prompt)),
                                                                           top or 0),
                        "finish_reason": "stop" if stopped else reply.finish_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": served.name, "choices": choices,
            "usage": _usage(len(prompt), sum(len(r.tokens) for r in results), results[0].cached_tokens)}


# ------------------------------------------------------------------------------ streaming

def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for e in events:
            yield f"data: {json.dumps(e)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


@dataclass
class _Tally:
    """What a streamed sequence produced, for the usage chunk."""

    completion_tokens: int = 0
    cached_tokens: int = 0


async def _stream_tokens(served: ServedModel, prompt: list[int], params: SamplingParams, stops: list[str],
                         request: Request, tally: _Tally):
    """(text delta, finish_reason or None) as tokens arrive; the job is cancelled when the
    client goes away (its slot is freed at the scheduler's next turn)."""
    job, events = _job(served, prompt, params, stops)
    tokens: list[int] = []
    sent = ""
    try:
        while True:
            if await request.is_disconnected():
                job.cancel()
                return
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                continue
            if kind == "error":
                raise RuntimeError(value)
            tally.cached_tokens = job.gen.cached_tokens  # set by the scheduler at the prefill, before any event
            if kind == "tokens":
                tokens.extend(value)
                tally.completion_tokens = len(tokens)
            text = served.tokenizer.decode(tokens, skip_special_tokens=True)
            text, stopped = _cut(text, stops)
            if kind == "done" or stopped:
                yield text[len(sent):], "stop" if stopped else value
                if stopped:
                    job.cancel()
                return
            ready = len(text) - _stop_prefix_at_end(text, stops)  # held back: it may begin a stop string
            if not text.endswith("\ufffd") and ready > len(sent):  # and the rest of a multi-byte character
                yield text[len(sent):ready], None
                sent = text[:ready]
    finally:
        job.cancel()


async def _interleaved(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as their items arrive: the choices of one
    request generate together, in one batch, rather than one after another."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, e))
        await queue.put((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _nothing_to_generate():  # max_tokens 0
    yield "", "length"


async def _stream_completion(served, jobs, n, stops, request, created, rid, include_usage):
    tallies = [_Tally() for _ in jobs]
    streams = [_nothing_to_generate() if p is None else _stream_tokens(served, prompt, p, stops, request, t)
               for (prompt, p), t in zip(jobs, tallies)]
    async for index, (delta, finish) in _interleaved(streams):
        yield {"id": rid, "object": "text_completion", "created": created, "model": served.name,
               "choices": [{"index": index, "text": delta, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": served.name, "choices": [],
               "usage": _usage(sum(len(prompt) for prompt, _ in jobs[::n]),
                               sum(t.completion_tokens for t in tallies),
                               sum(t.cached_tokens for t in tallies[::n]))}


async def _stream_chat(served, prompt, params, stops, request, created, rid, include_usage):
    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                "choices": choices, **extra}

    for index in range(len(params)):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    tallies = [_Tally() for _ in params]
    streams = [_stream_tokens(served, prompt, p, stops, request, t) for p, t in zip(params, tallies)]
    async for index, (delta, finish) in _interleaved(streams):
        yield chunk([{"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": finish}])
    if include_usage:
        yield chunk([], usage=_usage(len(prompt), sum(t.completion_tokens for t in tallies),
                                     tallies[0].cached_tokens))
