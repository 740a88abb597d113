"""The engine as an lm-eval model: ``lm_eval --model evalsuite --model_args model=...,recipe=...``
(through ``evalsuite lm-eval ...``, which registers it first), or from Python with a model object
(``lm_eval.simple_evaluate(model=EvalsuiteLM(...), ...)``), whose requests are batched.

lm-eval's contracts, as its ``LM`` docstrings state them:
  * ``loglikelihood``: the space between words belongs to the continuation (``TemplateLM``'s
    ``_encode_pair`` moves a context's trailing spaces into it); an empty context is conditioned
    on the prefix token;
  * ``loglikelihood_rolling``: the whole string's log-likelihood in windows of at most the
    model's context, each token scored exactly once (lm-eval's own ``get_rolling_token_windows``
    and ``make_disjoint_window``);
  * ``generate_until``: greedy (or the request's temperature and top_p) up to ``max_gen_toks``
    new tokens, cut before the first of the ``until`` strings; other generation settings of a
    task are refused unless neutral (``_check_generation_settings``).
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..backends.base import Backend
from ..backends.engine import EngineBackend
from ..engine.requests import SamplingParams, ScoreRequest
from ..textgen import encode_text

DEFAULT_MAX_GEN_TOKS = 256
log = logging.getLogger(__name__)


@register_model("evalsuite")
class EvalsuiteLM(TemplateLM):
    def __init__(self, model: str = "smollm2-135m", recipe: str = "bf16", dtype: str = "bfloat16",
                 batch_size: int | str = 32, max_batch_tokens: int = 4096, max_length: int | None = None,
                 backend: Backend | None = None, device: str | None = None, max_batch_size: int | None = None,
                 **recipe_config: Any):
        """``model_args`` as lm-eval passes them; any other key is a recipe setting. ``device`` is
        lm-eval's ``--device``; ``max_batch_size``, also lm-eval's, is accepted and unused: the
        engine runs ``batch_size`` sequences per forward."""
        super().__init__()
        if backend is None:
            from ..models import load_model_and_recipe

            lm, record = load_model_and_recipe(model, recipe, dtype, recipe_config or None, _device(device))
            size = 32 if batch_size in ("auto", None) else int(batch_size)
            backend = EngineBackend(lm, record, max_batch_size=size, max_batch_tokens=int(max_batch_tokens))
        self.backend = backend
        self.tokenizer = backend.tokenizer
        if max_length is None:  # the engine's context, or what an endpoint reports, less its last token
            max_length = backend.longest_window() or 2048
        self.max_length = int(max_length)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "evalsuite").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **(self.backend.chat_template_kwargs or {}))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return encode_text(self.tokenizer, string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for (_, context, continuation) in requests:
            context, continuation = list(context), list(continuation)
            overflow = len(context) + len(continuation) - self.max_length
            if overflow > 0:  # keep the end, as lm-eval's hf model does
                context = context[min(overflow, len(context) - 1):]
            out.append(ScoreRequest(tuple(context), tuple(continuation)))
        return [(r.logprob, r.is_greedy) for r in _ok(self.backend.loglikelihood(out))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(ScoreRequest(tuple(ctx), tuple(pred)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, r in zip(owners, _ok(self.backend.loglikelihood(windows))):
            totals[i] += r.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", None) is not False else 0.0
            top_p = float(kw.pop("top_p", None) or 1.0)
            _check_generation_settings(kw, sampling=temperature > 0)
            prompts.append(context)
            params.append(SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                         top_p=top_p if temperature > 0 else 1.0))
            stops.append(until)
        # one engine call per distinct stop set keeps requests batched (lm-eval tasks share theirs)
        results: list[str | None] = [None] * len(requests)
        for until in {tuple(s) for s in stops}:
            idx = [i for i, s in enumerate(stops) if tuple(s) == until]
            outs = _ok(self.backend.generate([prompts[i] for i in idx], [params[i] for i in idx], stop=until))
            for i, o in zip(idx, outs):
                results[i] = o.text
        return results  # type: ignore[return-value]


# Generation settings a task may give that the engine does not implement: ignored when decoding is
# greedy if they only shape sampling, accepted anywhere at their neutral value, refused otherwise
# (never silently ignored: they change what a model writes).
SAMPLING_ONLY = {"top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}
NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
           "top_k": 0, "min_p": 0.0, "typical_p": 1.0}


def _check_generation_settings(kw: dict[str, Any], sampling: bool) -> None:
    refused = sorted(k for k, v in kw.items()
                     if NEUTRAL.get(k, object()) != v and v is not None and (sampling or k not in SAMPLING_ONLY))
    if refused:
        raise ValueError(f"this task's generation settings {', '.join(f'{k}={kw[k]!r}' for k in refused)} are not "
                         "implemented by the engine, which decodes greedily or samples with temperature and top_p; "
                         f"neutral values ({', '.join(f'{k}={NEUTRAL[k]!r}' for k in refused if k in NEUTRAL)}) "
                         "are accepted: set them in a copy of the task's YAML, or with lm-eval's --gen_kwargs")


def _ok(results: list) -> list:
    from ..backends.base import Failure

    for r in results:
        if isinstance(r, Failure):
            raise RuntimeError(f"a request failed: {r.reason}")
    return results


def _device(device: str | None) -> str | None:
    """lm-eval's device for the engine. lm-eval's command line passes cuda:0 when no --device is
    given, whether or not there is a GPU, and its own hf model then takes the default device for a
    numbered CUDA device that is not here; so does this (None: cuda when available, else cpu),
    with a warning. Plain ``cuda`` and anything else are checked by the engine as for ``--device``:
    a GPU asked for by name that is not here is an error, as it is for lm-eval's hf model."""
    import torch

    kind, _, index = (device or "").partition(":")
    if kind == "cuda" and index.isdigit() and int(index) >= torch.cuda.device_count():
        log.warning("device %r is not available here; using the default device", device)
        return None
    return device
