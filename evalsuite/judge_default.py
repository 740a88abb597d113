"""Which judge an MT-Bench run uses: an endpoint the user names, or the embedded default.

With no judge configured, the suite starts its own server (127.0.0.1, a free port) with the
strongest instruct model available offline, unquantized, and calls it through the `openai`
client exactly as it would call a remote judge. No package in the registries this suite pins
from ships a stronger instruct model than the default SmolLM2-135M-Instruct under a clear
licence, so the judge is that model, and its default rating is the probability-weighted one (it
does not write [[n]] ratings; see docs/RESULTS.md). Every result names its judge and carries its
calibration, so nobody mistakes it for a GPT-4-judged score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .backends.base import Failure
from .backends.openai import OpenAIBackend, redact_url
from .judge import Judge, JudgeConfig

EMBEDDED_JUDGE = "smollm2-135m"


PROBE = [{"role": "user", "content": "Reply with the word OK."}]


def judge_config(args) -> JudgeConfig:
    return JudgeConfig.load().with_temperature(getattr(args, "judge_temperature", None))


def check_judge_endpoint(args) -> None:
    """Before any model loads: the endpoint serves the judge and takes one short request with the
    judge's own settings (its temperature and token limit), which a judgment would otherwise learn
    only after every answer is written. A ValueError says what the endpoint refused. (This
    request is not in the run's judge usage.)"""
    config = judge_config(args)
    client = OpenAIBackend(args.judge_base_url, args.judge_model, api_key_env=args.judge_api_key_env, max_retries=1)
    client.model_card()
    (reply,) = client.generate([PROBE], config.sampling())
    if isinstance(reply, Failure):
        raise ValueError(
            f"the judge {args.judge_model!r} at {redact_url(args.judge_base_url)} refused a request with the judge's "
            f"settings (temperature {config.raw['temperature']:g}, at most {config.raw['max_tokens']} tokens): "
            f"{reply.reason}; --judge-temperature sets another temperature (FastChat judges at 0)")


@contextlib.contextmanager
def judge_for(args, backend=None) -> Iterator[Judge]:
    config = judge_config(args)
    if args.judge_base_url:
        from .engine.load import tokenizer_for

        tokenizer = tokenizer_for(args.judge_tokenizer) if args.judge_tokenizer else None
        rating = args.judge_rating or ("both" if tokenizer is not None else "parsed")
        client = OpenAIBackend(args.judge_base_url, args.judge_model, tokenizer=tokenizer,
                               api_key_env=args.judge_api_key_env, concurrency=args.judge_concurrency)
        client.model_card()  # the judge is there, or a clear error now
        yield Judge(client, config, rating=rating, tokenizer=tokenizer)
        return
    from .engine.load import load
    from .server.serve import BackgroundServer, served_model

    lm = load(EMBEDDED_JUDGE, "bfloat16", getattr(args, "device", None))  # where the evaluated model runs
    # as many KV cache slots as the client sends requests at once: more would sit empty (32 slots
    # of 8,192 tokens held 6 GB; results do not depend on the batch)
    served = served_model(lm, {"name": "bf16"}, f"{EMBEDDED_JUDGE}-judge", max_batch_size=args.judge_concurrency,
                          max_len=8192, max_prefill_tokens=4096)
    with BackgroundServer(served) as srv:
        client = OpenAIBackend(srv.base_url, served.name, tokenizer=lm.tokenizer, concurrency=args.judge_concurrency,
                               timeout=1800)
        yield Judge(client, config, rating=args.judge_rating or "probability", tokenizer=lm.tokenizer)
