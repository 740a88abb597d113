"""Any OpenAI-compatible endpoint as a backend (vLLM, TensorRT-LLM's trtllm-serve, SGLang, NIM,
OpenAI itself, or ``evalsuite serve``), through the ``openai`` client.

* Log-likelihood requests go to /v1/completions as token-id prompts (context + continuation),
  ``batch_size`` prompts per call, with ``echo``, ``logprobs`` and ``max_tokens: 0``, as lm-eval's
  ``local-completions`` sends them;
  the continuation's log-probability is the sum over its tokens, greedy when each token is the
  endpoint's top choice. Token ids need the served model's tokenizer on this side
  (``tokenizer``); an endpoint that returns no prompt log-probabilities is refused before the
  run starts (``check_loglikelihood``).
* Generation goes to /v1/chat/completions for chat messages and /v1/completions for text.
* Requests run ``concurrency`` at a time, each with a timeout; 429, 5xx, timeouts and connection
  errors are retried with exponential backoff, or after the wait a 429 or 503 asks for
  (``Retry-After``), whichever is longer (the client's own retries are off, so the policy here is
  the only one). A request that still fails becomes a ``Failure`` with its reason.
* The API key is read from an environment variable and never stored in a record.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..engine.requests import Message, SamplingParams, ScoreRequest, ScoreResult, TextResult
from .base import Backend, BackendError, Failure, Progress

T = TypeVar("T")
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def context_chunks(requests: Sequence[ScoreRequest], size: int) -> list[list[ScoreRequest]]:
    """The requests in order, at most ``size`` per chunk, consecutive requests of one context in
    one chunk (a run longer than ``size`` fills chunks of its own). A server that shares prefill
    between the prompts of a call then runs a question's answers as the in-process scorer runs
    them, together; split between calls, an answer alone is scored as one whole prompt, which in
    BF16 differs from a context shared with its other answers in the last bits."""
    chunks: list[list[ScoreRequest]] = []
    current: list[ScoreRequest] = []
    i = 0
    while i < len(requests):
        j = i + 1
        while j < len(requests) and requests[j].context == requests[i].context:
            j += 1
        run = list(requests[i:j])
        if current and len(current) + len(run) > size:
            chunks.append(current)
            current = []
        while len(run) > size:
            chunks.append(run[:size])
            run = run[size:]
        current += run
        i = j
    if current:
        chunks.append(current)
    return chunks


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment (where credentials may hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_base_url(url: str) -> None:
    """An endpoint's URL must be http(s) with a host (and a valid port, if any); else a ValueError
    naming it, without the credentials it may hold."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or out of range
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        shown = url.replace(parts.netloc, parts.netloc.rpartition("@")[2]) if parts.netloc else url
        raise ValueError(f"base URL {shown!r}; valid: an http(s) URL of the API root, e.g. http://127.0.0.1:8000/v1")


class OpenAIBackend(Backend):
    def __init__(self, base_url: str, model: str, *, tokenizer: Any = None, api_key_env: str = DEFAULT_KEY_ENV,
                 concurrency: int = 8, batch_size: int = 8, timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                 chat_template_kwargs: dict[str, Any] | None = None):
        import openai

        check_base_url(base_url)
        bad = [f"{name}={value!r}; valid: {valid}" for name, value, ok, valid in (
            ("concurrency", concurrency, concurrency >= 1, "an integer >= 1"),
            ("batch_size", batch_size, batch_size >= 1, "an integer >= 1"),
            ("timeout", timeout, timeout > 0, "seconds > 0"),
            ("max_retries", max_retries, max_retries >= 0, "an integer >= 0")) if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        self.base_url, self.model, self.tokenizer = base_url.rstrip("/"), model, tokenizer
        self.concurrency, self.batch_size = concurrency, batch_size
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._sleep = sleep
        key = os.environ.get(api_key_env) or "EMPTY"  # local servers take any key
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout, max_retries=0)
        self._card: dict[str, Any] | None = None
        self._usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "requests_without_usage": 0}
        self._usage_lock = threading.Lock()  # requests run on a thread pool
        # OpenAI's reasoning models refuse chat's max_tokens and want max_completion_tokens, which
        # older servers do not know: max_tokens until the endpoint asks for the other
        self._chat_max_key = "max_tokens"
        # sent as vLLM and SGLang take them (`chat_template_kwargs` in the request body)
        self.chat_template_kwargs = chat_template_kwargs or None

    # ------------------------------------------------------------------ identity
    def context_length(self) -> int | None:
        length = self.model_card().get("max_model_len")  # vLLM and evalsuite serve report it
        return int(length) if length else None

    def longest_window(self) -> int | None:
        """One token less than the context: an endpoint receives a window's whole prompt, the
        last token too (its log-probability is read from the echoed prompt), and its context
        must hold all of them."""
        length = self.context_length()
        return length - 1 if length else None

    def model_card(self) -> dict[str, Any]:
        """What /v1/models reports for the served model (an error if it is not served there)."""
        if self._card is None:
            # nothing listening is final at once (retrying it only delays the error); a server that
            # answers 5xx or 429 while it starts, or one that times out, is retried as any request
            models = self._call(lambda: self.client.models.list(), retry_refused=False)
            if isinstance(models, Failure):
                hint = ("; is the server running, and is this its API root (e.g. http://HOST:PORT/v1)?"
                        if models.reason.startswith("APIConnectionError") else "")
                raise BackendError(f"cannot list models at {redact_url(self.base_url)}: {models.reason}{hint}")
            cards = {m.id: m.model_dump() for m in models.data}
            if self.model not in cards:
                raise BackendError(f"model {self.model!r} is not served at {redact_url(self.base_url)}; "
                                   f"served: {', '.join(sorted(cards)) or 'none'}")
            self._card = cards[self.model]
        return self._card

    def identity(self) -> dict[str, Any]:
        card = self.model_card()
        mine = card.get("evalsuite") or {}  # evalsuite serve says which weights and recipe it serves
        return {"kind": "openai", "model": {"name": self.model, **(mine.get("model") or {})},
                "recipe": mine.get("recipe") or {"name": "as served"},
                **({"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {})}

    def usage(self) -> dict[str, int]:
        with self._usage_lock:
            return dict(self._usage)

    def describe(self) -> dict[str, Any]:
        # where `evalsuite serve` serves it: its device and kernel path, as a local run states them
        mine = self.model_card().get("evalsuite") or {}
        where = {k: mine[k] for k in ("device", "device_name", "kernel_path") if k in mine}
        return {"kind": "openai", "base_url": redact_url(self.base_url), "model": self.model, **where,
                "served": self.model_card(), "concurrency": self.concurrency, "batch_size": self.batch_size,
                "timeout": self.timeout,
                "max_retries": self.max_retries}

    # ------------------------------------------------------------------ requests
    def check_loglikelihood(self) -> None:
        if self.tokenizer is None:
            raise BackendError("log-likelihood tasks through an endpoint need the served model's tokenizer here "
                               "(pass --tokenizer: a model name, HF folder or .gguf file); the generative "
                               "formulation needs none")
        probe = self._call(lambda: self.client.completions.create(
            model=self.model, prompt=[self.tokenizer.encode("Hello world")], max_tokens=0, echo=True, logprobs=1))
        lps = None if isinstance(probe, Failure) else getattr(probe.choices[0], "logprobs", None)
        if lps is None or not getattr(lps, "token_logprobs", None):
            reason = probe.reason if isinstance(probe, Failure) else "no prompt log-probabilities in the reply"
            raise BackendError(f"the endpoint {redact_url(self.base_url)} does not return prompt log-probabilities "
                               f"(echo + logprobs): {reason}; log-likelihood formulations need them, use the "
                               "generative one")

    def loglikelihood(self, requests: Sequence[ScoreRequest], progress: Progress | None = None
                      ) -> list[ScoreResult | Failure]:
        """Up to ``batch_size`` consecutive requests per completions call (a list of prompts, as
        lm-eval's ``local-completions`` batches them), the requests of one context never split
        between calls (``context_chunks``): the answers of one question reach the server together,
        and one that shares prefill between the prompts of a call does so."""
        chunks = context_chunks(requests, self.batch_size)

        def one(chunk: list[ScoreRequest]) -> list[ScoreResult | Failure]:
            prompts = [list(r.context) + list(r.continuation) for r in chunk]
            # the reply is read as plain JSON: it holds a log-probability and its alternatives for
            # every prompt token, and building the client's typed objects for them costs more than
            # the request
            reply = self._call(lambda: json.loads(self.client.completions.with_raw_response.create(
                model=self.model, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0).content))
            if isinstance(reply, Failure):
                return [reply] * len(chunk)
            choices = reply.get("choices") if isinstance(reply, dict) else None
            by_index = {c.get("index"): c for c in choices or [] if isinstance(c, dict)}
            if sorted(by_index, key=str) != list(range(len(chunk))):
                return [Failure(f"the endpoint returned choices {sorted(by_index)} for {len(chunk)} prompts")] * len(chunk)
            return [_continuation_score(r, by_index[i]) for i, r in enumerate(chunk)]

        def counted(chunk):
            out = one(chunk)
            if progress is not None:
                progress(len(chunk))
            return out

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return [x for part in pool.map(counted, chunks) for x in part]

    def generate(self, prompts: Sequence[str | Sequence[Message]], params: SamplingParams | Sequence[SamplingParams],
                 stop: Sequence[str] = (), progress: Progress | None = None) -> list[TextResult | Failure]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        stops = [s for s in stop if s] or None

        def one(item) -> TextResult | Failure:
            prompt, p = item
            common = dict(model=self.model, max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                          stop=stops, **({"seed": p.seed} if p.seed is not None else {}))
            if isinstance(prompt, str):
                reply = self._call(lambda: self.client.completions.create(prompt=prompt, **common))
                if isinstance(reply, Failure):
                    return reply
                c = reply.choices[0]
                return TextResult(c.text, [], c.finish_reason or "length")
            reply = self._chat(list(prompt), common)
            if isinstance(reply, Failure):
                return reply
            c = reply.choices[0]
            # vLLM with a reasoning parser returns the thinking apart: "reasoning_content", later "reasoning"
            reasoning = getattr(c.message, "reasoning_content", None) or getattr(c.message, "reasoning", None)
            return TextResult(c.message.content or "", [], c.finish_reason or "length",
                              reasoning if isinstance(reasoning, str) else None)

        return self._map(one, list(zip(prompts, params)), progress)

    def _chat(self, messages: list, common: dict[str, Any]) -> Any:
        key = self._chat_max_key
        args = {**{k: v for k, v in common.items() if k != "max_tokens"}, key: common["max_tokens"]}
        if self.chat_template_kwargs:
            args["extra_body"] = {"chat_template_kwargs": self.chat_template_kwargs}
        reply = self._call(lambda: self.client.chat.completions.create(messages=messages, **args))
        if key == "max_tokens" and isinstance(reply, Failure) and _wants_max_completion_tokens(reply.reason):
            self._chat_max_key = "max_completion_tokens"
            return self._chat(messages, common)
        return reply

    # ------------------------------------------------------------------ retries and concurrency
    def _map(self, fn: Callable[[Any], T], items: Sequence[Any], progress: Progress | None) -> list[T]:
        def run(item):
            out = fn(item)
            if progress is not None:
                progress(1)
            return out

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(run, items))

    def _call(self, fn: Callable[[], T], retry_refused: bool = True) -> T | Failure:
        """``fn()`` with retries on 429, 5xx, timeouts and connection errors (exponential backoff
        with jitter); other errors and the last retryable one become a Failure. With
        ``retry_refused=False`` a connection error other than a timeout is final at once."""
        import openai

        for attempt in range(self.max_retries + 1):
            asked = 0.0  # what the server asked us to wait (Retry-After)
            try:
                reply = fn()
                self._count(reply)
                return reply
            except openai.APITimeoutError as e:
                reason = f"{type(e).__name__}: {e}"
            except openai.APIConnectionError as e:
                reason = f"{type(e).__name__}: {e}{_cause(e)}"
                if not retry_refused:
                    return Failure(f"{reason} (not retried)")
            except openai.APIStatusError as e:
                reason = f"HTTP {e.status_code}: {_message(e)}"
                if e.status_code != 429 and e.status_code < 500:
                    return Failure(reason)
                asked = _retry_after(e.response.headers)
            except (ValueError, KeyError, TypeError, openai.APIResponseValidationError) as e:
                reason = f"malformed reply: {type(e).__name__}: {e}"  # e.g. truncated JSON: retried
            if attempt < self.max_retries:
                self._sleep(max(self.backoff * 2 ** attempt * (1 + random.random()), asked))
        return Failure(f"{reason} (after {self.max_retries + 1} attempts)")


    def _count(self, reply: Any) -> None:
        """Add a completion reply (the client's object, or plain JSON) to the usage; the listing of
        /v1/models is none."""
        def field(obj: Any, name: str) -> Any:
            return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

        if field(reply, "choices") is None:
            return
        usage = field(reply, "usage")
        with self._usage_lock:
            self._usage["requests"] += 1
            if usage is None:
                self._usage["requests_without_usage"] += 1
                return
            self._usage["prompt_tokens"] += int(field(usage, "prompt_tokens") or 0)
            self._usage["completion_tokens"] += int(field(usage, "completion_tokens") or 0)


MAX_RETRY_AFTER = 120.0  # seconds: a longer wait asked for is capped (a run should not stall for hours)


def _retry_after(headers) -> float:
    """The wait a 429 or 503 asks for: ``retry-after-ms`` (OpenAI's), or ``Retry-After`` in seconds
    or as an HTTP date (RFC 9110); 0 when there is none or it cannot be read."""
    import email.utils

    try:
        if headers.get("retry-after-ms"):
            return min(float(headers["retry-after-ms"]) / 1000, MAX_RETRY_AFTER)
        value = headers.get("retry-after")
        if not value:
            return 0.0
        try:
            seconds = float(value)
        except ValueError:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    except (TypeError, ValueError, OverflowError):
        return 0.0


def _wants_max_completion_tokens(reason: str) -> bool:
    """OpenAI's refusal of max_tokens for its reasoning models: HTTP 400, "Unsupported parameter:
    'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead." """
    return reason.startswith("HTTP 400") and "max_tokens" in reason and "max_completion_tokens" in reason


def _continuation_score(r: ScoreRequest, choice: dict) -> ScoreResult | Failure:
    """The continuation's summed log-probability from an echoed prompt's token log-probabilities."""
    n = len(r.context) + len(r.continuation)
    try:
        lps = choice["logprobs"]
        cont = lps["token_logprobs"][len(r.context):n]
        tops = lps["top_logprobs"][len(r.context):n]
        if len(cont) != len(r.continuation) or any(x is None for x in cont):
            return Failure(f"the endpoint returned {len(cont)} continuation log-probabilities for "
                           f"{len(r.continuation)} tokens")
        greedy = all(top and lp >= max(top.values()) for lp, top in zip(cont, tops))
        return ScoreResult(float(sum(cont)), bool(greedy), tuple(float(x) for x in cont))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        return Failure(f"malformed reply: {type(e).__name__}: {e}")


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    return str(e)


def _cause(e: BaseException) -> str:
    """The innermost cause of a connection error, which the client's own message ("Connection
    error.") leaves out: e.g. " ([Errno 111] Connection refused)"."""
    inner = e
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    return f" ({inner})" if inner is not e and str(inner) else ""
