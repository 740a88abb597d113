"""Calibration: a text corpus disjoint from the evaluation data, and max (absmax) statistics.

Corpus sources:
  * ``sampled`` (the offline default): text the unquantized model writes itself, from seeded
    sampling on generic instructions that share nothing with MMLU or MT-Bench. It needs no
    download and follows the model's own activation distribution.
  * a path to a UTF-8 text file: split into chunks of ``seq_len`` tokens.

Statistics are collected by swapping every projection for an observing wrapper (a wrapper is
not a plain ``nn.Linear``, so the engine runs q/k/v and gate/up unfused and each projection sees
its input) and by observers on the attention hook points. They are cached on disk per model
weights, corpus and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..assets import cache_dir, read_utf8
from ..engine.generate import SamplingParams
from ..engine.linear import project
from ..engine.load import LoadedModel
from ..engine.model import CausalLM, DecoderLayer, SparseMoE, Step
from ..engine.options import NUMERICS_VERSION
from ..textgen import generate_text
from .configs import CalibrationSpec

log = logging.getLogger(__name__)

TOPICS = ("cooking pasta", "the water cycle", "a trip to the mountains", "how bicycles work", "gardening in spring",
          "the history of printing", "training a puppy", "ocean tides", "writing a good email", "saving money",
          "volcanoes", "learning a new language", "the night sky", "building a birdhouse", "coffee", "rainforests",
          "chess openings", "the human heart", "recycling", "jazz music", "planning a party", "electric cars",
          "baking bread", "honeybees", "a rainy afternoon", "public libraries", "marathon training", "glaciers",
          "origami", "tea ceremonies", "the moon landing", "city parks")


def token_batches(sequences: list[list[int]], max_tokens: int = 4096) -> list[list[list[int]]]:
    """Calibration sequences grouped for packed forwards, longest first, at most ``max_tokens``
    tokens per group (a longer sequence forms a group of its own)."""
    batches: list[list[list[int]]] = []
    batch: list[list[int]] = []
    for seq in sorted(sequences, key=len, reverse=True):
        if batch and sum(map(len, batch)) + len(seq) > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(seq)
    if batch:
        batches.append(batch)
    return batches


def corpus(lm: LoadedModel, spec: CalibrationSpec) -> list[list[int]]:
    """Token sequences to calibrate on. The sampled corpus is cached on disk per model weights and
    spec (writing it costs minutes on a CPU; every recipe that calibrates shares it)."""
    if lm.tokenizer is None:  # the commands refuse such a folder before loading it (models.check_model_args)
        raise ValueError(f"model {lm.info.name!r} has no tokenizer; calibration reads text through it")
    if spec.source == "sampled":
        path = _cache_path(lm, spec, "corpus", {}, ".json")
        try:
            return json.loads(path.read_text())["sequences"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError) as e:
            log.warning("calibration corpus cache %s is unreadable (%s); sampling it again", path, e)
        seqs = _sampled_corpus(lm, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"spec": spec.__dict__, "sequences": seqs}))
        tmp.replace(path)
        return seqs
    ids = lm.tokenizer.encode(read_utf8(spec.source, "calibration source"))
    chunks = [ids[i:i + spec.seq_len] for i in range(0, len(ids), spec.seq_len)]
    return [c for c in chunks if len(c) >= 8][:spec.num_samples]


def _sampled_corpus(lm: LoadedModel, spec: CalibrationSpec) -> list[list[int]]:
    asks = [f"Write a few paragraphs about {TOPICS[i % len(TOPICS)]}." for i in range(spec.num_samples)]
    chat = getattr(lm.tokenizer, "chat_template", None) is not None
    prompts = [[{"role": "user", "content": a}] for a in asks] if chat else asks
    # Seeded per sequence (see generate): the corpus does not depend on batching.
    results = generate_text(lm.model, lm.tokenizer, prompts, SamplingParams(
        max_new_tokens=spec.seq_len, temperature=0.8, top_p=0.95, seed=spec.seed), max_batch_size=32)
    return [lm.tokenizer.encode(r.text)[:spec.seq_len] or [0] for r in results]


class _Observer(nn.Module):
    """Identity that records the running absmax of what passes through."""

    def __init__(self):
        super().__init__()
        self.amax = 0.0

    def forward(self, x: Tensor) -> Tensor:
        self.amax = max(self.amax, float(x.detach().abs().max()))
        return x


class _ObservedLinear(nn.Module):
    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner, self.observer = inner, _Observer()

    def forward(self, x: Tensor) -> Tensor:
        return project(self.inner, self.observer(x))


ATTENTION_POINTS = ("k_cache_quant", "v_cache_quant", "q_bmm_quant")


def projections(model: CausalLM) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of every plain linear projection except lm_head and the
    routers of mixtures of experts (which Model Optimizer's and the deployed engines' recipes
    leave unquantized: a router's few outputs pick the experts)."""
    out = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            router = isinstance(module, SparseMoE) and child_name in SparseMoE.ROUTERS
            if type(child) is nn.Linear and child is not model.lm_head and not router:
                out.append((module, child_name, f"{name}.{child_name}".lstrip(".")))
    return out


def check_published_scope(model: CausalLM, recipe: str, kind: type, word: str) -> None:
    """A published checkpoint runs as ``recipe`` only where its quantized projections (modules of
    type ``kind``) are the recipe's, every linear but lm_head and a mixture's routers (``projections``):
    its ignore list may keep others out, and the run record would name a recipe the checkpoint is not."""
    held = [n for n, m in model.named_modules() if isinstance(m, kind)]
    plain = [name for _parent, _attr, name in projections(model)]
    kept = {id(model.lm_head)} | {id(getattr(m, r)) for m in model.modules() if isinstance(m, SparseMoE)
                                  for r in SparseMoE.ROUTERS if isinstance(getattr(m, r, None), nn.Module)}
    extra = [n for n in held if id(model.get_submodule(n)) in kept]
    if plain or extra:
        what = [f"leaves {', '.join(plain[:3])}{', ...' if len(plain) > 3 else ''} unquantized"] if plain else []
        what += [f"quantizes {', '.join(extra[:3])}"] if extra else []
        raise ValueError(f"recipe {recipe!r}: the checkpoint holds {len(held)} {word} projections and "
                         f"{' and '.join(what)}, where the recipe quantizes every linear but lm_head and a mixture's "
                         "routers; valid: none (evaluate this checkpoint where a server runs it, --base-url)")


def shared_input_groups(model: CausalLM) -> list[tuple[nn.Module, list[str]]]:
    """(norm, names of the projections that read its output) for every decoder layer: q/k/v after
    input_layernorm, gate/up after the MLP's norm (``DecoderLayer.mlp_norm``: Llama's
    post_attention_layernorm, Gemma's pre_feedforward_layernorm); the norm is None in OLMo's layer,
    whose q/k/v and gate/up read the residual stream. Deployed engines run each group as one GEMM,
    so a checkpoint's per-projection scales are made one per group on export or loading."""
    groups = []
    for name, layer in model.named_modules():
        if isinstance(layer, DecoderLayer):
            groups.append((layer.input_layernorm, [f"{name}.self_attn.{p}_proj" for p in "qkv"]))
            mlps = [f"{name}.mlp.experts.{e}" for e in range(len(layer.mlp.experts))] + \
                ([f"{name}.mlp.shared_expert"] if layer.mlp.shared_expert is not None else []) \
                if isinstance(layer.mlp, SparseMoE) else [f"{name}.mlp"]  # each expert's gate/up: one GEMM
            groups += [(layer.mlp_norm, [f"{mlp}.{p}_proj" for p in ("gate", "up")]) for mlp in mlps]
    return groups


@torch.inference_mode()
def run_wrapped(model: CausalLM, sequences: list[list[int]], wrap, max_batch_tokens: int = 4096) -> dict[str, nn.Module]:
    """Run the calibration sequences with every projection replaced by ``wrap(linear, name)``;
    return the wrappers by projection name. The original modules are put back."""
    swapped = [(parent, attr, name, getattr(parent, attr)) for parent, attr, name in projections(model)]
    wrappers = {}
    for parent, attr, name, linear in swapped:
        wrappers[name] = wrap(linear, name)
        setattr(parent, attr, wrappers[name])
    try:
        for batch in token_batches(sequences, max_batch_tokens):
            _forward(model, batch)
    finally:
        for parent, attr, _, linear in swapped:
            setattr(parent, attr, linear)
    return wrappers


def collect_amax(model: CausalLM, sequences: list[list[int]], max_batch_tokens: int = 4096) -> dict[str, float]:
    """Absmax of every projection's input (``<name>.input``) and of q, K and V at the attention
    hook points (``model.layers.<i>.<point>``), over the calibration sequences. The model is restored."""
    # q_bmm_quant is only consulted on the explicit attention path: an identity softmax
    # "quantizer" forces that path without changing the numbers.
    attn_obs = []
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        obs = {p: _Observer() for p in ATTENTION_POINTS}
        for p, o in obs.items():
            setattr(a, p, o)
        a.softmax_quant = nn.Identity()
        attn_obs.append((i, a, obs))
    try:
        wrappers = run_wrapped(model, sequences, lambda linear, _name: _ObservedLinear(linear), max_batch_tokens)
    finally:
        for _, a, _ in attn_obs:
            for p in ATTENTION_POINTS:
                setattr(a, p, None)
            a.softmax_quant = None
    stats = {f"{name}.input": w.observer.amax for name, w in wrappers.items()}
    for i, _, obs in attn_obs:
        stats.update({f"model.layers.{i}.{p}": o.amax for p, o in obs.items()})
    return stats


def _forward(model: CausalLM, batch: list[list[int]]) -> None:
    tokens = torch.tensor([t for s in batch for t in s], device=model.device).view(1, -1)
    model.hidden(tokens, Step.for_prefill([len(s) for s in batch], device=model.device))


# What wrote a sampled corpus besides the model and the spec: the engine's sampler and decode
# numerics. A change to either writes another corpus, so the cached corpus and every statistic
# computed on it are keyed by this. 2: inverse-transform sampling, decode attention by SDPA in row chunks.
# 3: RMSNorm rounded as transformers rounds it (before the weight).
SAMPLED_CORPUS_VERSION = 3


def _cache_path(lm: LoadedModel, spec: CalibrationSpec, kind: str, settings: dict, suffix: str) -> Path:
    # the engine's numerics too: the forwards that collect the statistics, and the searches that
    # score candidates, compute what that version computes
    key = {"weights": lm.info.weights_sha256, "dtype": lm.info.dtype, "spec": spec.__dict__,
           "file": _file_hash(spec.source), "kind": kind, "settings": settings, "numerics": NUMERICS_VERSION}
    if spec.source == "sampled":
        key["sampler"] = SAMPLED_CORPUS_VERSION
    key_src = json.dumps(key, sort_keys=True)
    return cache_dir() / "calibration" / f"{kind}-{hashlib.sha256(key_src.encode()).hexdigest()[:24]}{suffix}"


def _provenance(spec: CalibrationSpec, seqs: list[list[int]], settings: dict) -> dict:
    return {"spec": spec.__dict__, "corpus_sha256": hashlib.sha256(json.dumps(seqs).encode()).hexdigest(),
            "tokens": sum(map(len, seqs)), "settings": settings}


def cached(lm: LoadedModel, spec: CalibrationSpec, kind: str, settings: dict, compute):
    """``compute(sequences)`` once per model weights, corpus spec, kind and settings; JSON on disk."""
    path = _cache_path(lm, spec, kind, settings, ".json")
    if path.is_file():
        try:
            return json.loads(path.read_text())["result"]
        except (ValueError, KeyError) as e:
            log.warning("calibration cache entry %s is unreadable (%s); computing it again", path, e)
    seqs = corpus(lm, spec)
    result = compute(seqs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**_provenance(spec, seqs, settings), "result": result}))
    tmp.replace(path)
    return result


def cached_tensors(lm: LoadedModel, spec: CalibrationSpec, kind: str, settings: dict, compute) -> dict[str, Tensor]:
    """Like ``cached`` for a result of named tensors, kept as safetensors (provenance in its metadata);
    read back onto the model's device, where ``compute`` makes them."""
    path = _cache_path(lm, spec, kind, settings, ".safetensors")
    if path.is_file():
        try:
            return load_file(path, device=str(lm.model.device))
        except (SafetensorError, OSError) as e:
            log.warning("calibration cache entry %s is unreadable (%s); computing it again", path, e)
    seqs = corpus(lm, spec)
    result = {k: v.contiguous() for k, v in compute(seqs).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(result, tmp, metadata={"provenance": json.dumps(_provenance(spec, seqs, settings))})
    tmp.replace(path)
    return result


def calibrate(lm: LoadedModel, spec: CalibrationSpec) -> dict[str, float]:
    """Absmax statistics for ``lm`` on ``spec``'s corpus, cached per weights, corpus and settings."""
    return cached(lm, spec, "amax", {}, lambda seqs: collect_amax(lm.model, seqs))


def _file_hash(source: str) -> str | None:
    if source == "sampled":
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()
