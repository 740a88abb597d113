"""Capacity planner: the fewest GPUs that hold a model's weights and KV cache under a recipe.

Weight bytes are counted from the architecture exactly as ``evalsuite quantize`` stores them
(``quant.checkpoint.deployed_weight_bytes`` gives the same number for a loaded model; a test
holds the two equal). Everything a recipe leaves alone is BF16, a tied embedding counted once.
  bf16           every parameter in 2 bytes;
  fp8-official   FFN projections of all but the first and last layers: 1 byte per weight and a
                 float32 scale per output channel;
  fp8-modelopt   every projection: 1 byte per weight, float32 weight and input scales; per layer
                 float32 K, V, q and softmax scales; KV cache in FP8;
  int4-awq       every projection: 4 bits per weight, in_features padded to whole blocks of 128,
                 a float32 scale per block; o_proj and down_proj a BF16 AWQ pre-scale per input
                 channel (q/k/v and gate/up have theirs folded into the norm before them);
  int4-rtn       the same without the pre-scale;
  int4-awq-asym  as int4-rtn plus a 4-bit zero point per block (AutoAWQ's layout; the AWQ scales
                 are folded into the weights);
  int4-gptq      as int4-rtn (GPTQ changes the codes, not their layout);
  int8-w8a8      every projection: 1 byte per weight and a float32 scale per output channel
                 (SmoothQuant's scales are folded into the norms).
The engine keeps INT4 block scales in float32; deployed INT4 kernels hold them in 16 bits, which
would save 2 bytes per 128 weights (under 1%).
KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per element, per token.
A GPU is usable up to ``usable_fraction`` of its memory (the rest: activations, workspace, the
runtime); tensor parallelism splits the weights evenly over a power-of-two GPU count, and the KV
cache by KV head: past as many GPUs as KV heads, each GPU holds a replica of one head (as vLLM and
TensorRT-LLM do), so its share of the cache stops shrinking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .engine.config import MOE_ROUTERS, PRESETS, ModelConfig


@dataclass(frozen=True)
class GPU:
    memory_gb: float  # as NVIDIA's datasheet gives it
    compute_capability: tuple[int, int]

    @property
    def has_fp8(self) -> bool:
        return self.compute_capability >= (8, 9)

    @property
    def has_fp4(self) -> bool:
        return self.compute_capability >= (10, 0)


GPUS = {
    "a100-40gb": GPU(40.0, (8, 0)), "a100-80gb": GPU(80.0, (8, 0)), "l40s": GPU(48.0, (8, 9)),
    "h100": GPU(80.0, (9, 0)), "h200": GPU(141.0, (9, 0)), "b200": GPU(180.0, (10, 0)),
}
PLAN_RECIPES = ("bf16", "fp8-official", "fp8-dynamic", "fp8-modelopt", "fp8-block", "nvfp4", "int4-awq", "int4-rtn",
                "int4-awq-asym", "int4-gptq", "int8-w8a8")
PLAN_GPUS = ("h100", "h200")  # `evalsuite plan` without --gpu
NVFP4_BLOCK = 16
FP8_BLOCK = 128
INT4_BLOCK = 128


@dataclass(frozen=True)
class Plan:
    model: str
    recipe: str
    gpu: str
    deployed_weight_bytes: int
    kv_bytes: int
    gpus: int
    per_gpu_bytes: float
    capacity_bytes: float
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        line = (f"{self.model} / {self.recipe} on {self.gpu}: weights {_size(self.deployed_weight_bytes)} + "
                f"KV cache {_size(self.kv_bytes)} -> {self.gpus} GPU(s), {_size(self.per_gpu_bytes)} "
                f"each of {_size(self.capacity_bytes)} usable")
        return "\n".join([line] + [f"  note: {n}" for n in self.notes])


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def model_config(model: str) -> ModelConfig:
    """An architecture preset, an HF model folder (its config.json) or a config.json file."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KeyError(f"unknown model config {model!r}: not a preset ({', '.join(sorted(PRESETS))}), "
                       "nor an HF model folder or config.json file")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON config: {e}") from None
    return ModelConfig.from_hf(hf)


def check_recipe(recipe: str) -> None:
    if recipe not in PLAN_RECIPES:
        raise KeyError(f"unknown recipe {recipe!r} for planning; valid: {', '.join(PLAN_RECIPES)}")


# The projections whose AWQ pre-scale stays a run-time input scaling under int4-awq (the others
# share one folded into their norm: int4_awq.resmooth).
PRESCALED = ("self_attn.o_proj", "down_proj")  # an expert's down_proj too


def _quantized_projection_bytes(recipe: str, name: str, out: int, inp: int) -> int:
    """Bytes of one quantized projection's weight and scales (its bias, if any, stays BF16)."""
    if recipe in ("fp8-official", "fp8-dynamic", "int8-w8a8"):  # a float32 scale per output row, as kernels take it
        return out * inp + 4 * out
    if recipe == "fp8-modelopt":
        return out * inp + 4 + 4
    if recipe == "fp8-block":  # a float32 scale per tile of 128 x 128
        return out * inp + 4 * -(-out // FP8_BLOCK) * -(-inp // FP8_BLOCK)
    if recipe == "nvfp4":  # two E2M1 codes a byte, an E4M3 scale per block of 16, two float32 tensor scales
        return out * inp // 2 + out * inp // NVFP4_BLOCK + 4 + 4
    blocks = -(-inp // INT4_BLOCK)
    codes_and_scales = out * blocks * INT4_BLOCK // 2 + 4 * out * blocks
    if recipe == "int4-awq":
        return codes_and_scales + (2 * inp if name.endswith(PRESCALED) else 0)
    if recipe == "int4-awq-asym":
        return codes_and_scales + -(-out * blocks // 2)
    return codes_and_scales  # int4-rtn, int4-gptq


def _is_quantized(recipe: str, layer: int, name: str, num_layers: int) -> bool:
    if recipe == "bf16" or name in MOE_ROUTERS:  # a mixture of experts' routers stay BF16
        return False
    if recipe == "fp8-official":
        return name.startswith("mlp.") and 0 < layer < num_layers - 1
    return True


def deployed_weight_bytes(cfg: ModelConfig, recipe: str) -> int:
    check_recipe(recipe)
    total = 2 * cfg.num_parameters()
    for layer in range(cfg.num_layers):
        for name, out, inp in cfg.layer_projections(layer):
            if _is_quantized(recipe, layer, name, cfg.num_layers):
                total += _quantized_projection_bytes(recipe, name, out, inp) - 2 * out * inp
    if recipe == "fp8-modelopt":
        total += cfg.num_layers * 4 * 4  # K, V, q and softmax scales
    if recipe == "nvfp4":
        total += cfg.num_layers * 2 * 4  # K and V scales
    return total


def kv_bytes_per_token(cfg: ModelConfig, recipe: str) -> int:
    elem = 1 if recipe in ("fp8-modelopt", "nvfp4") else 2
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem


def check_gpu(gpu: str) -> GPU:
    if gpu not in GPUS:
        raise KeyError(f"unknown GPU {gpu!r}; valid: {', '.join(GPUS)}")
    return GPUS[gpu]


def _per_gpu_bytes(cfg: ModelConfig, weights: int, kv: int, n: int) -> float:
    """One GPU's share under tensor parallelism over n GPUs: 1/n of the weights, and the KV cache
    of its KV heads, at least one (replicated once n exceeds the KV head count)."""
    return weights / n + kv / min(n, cfg.num_kv_heads)


def _notes(cfg: ModelConfig, recipe: str, gpu: str, n: int, context: int) -> tuple[str, ...]:
    notes = []
    windowed = [i for i in range(cfg.num_layers) if cfg.layer_window(i)]
    if windowed and context > cfg.sliding_window:
        notes.append(f"{len(windowed)} of the {cfg.num_layers} layers attend to the last {cfg.sliding_window} "
                     f"tokens only: the KV cache is counted at the full context; an engine that keeps just the "
                     f"window for those layers needs less")
    if n > 1 and cfg.num_heads % n:
        notes.append(f"tensor parallelism over {n} GPUs needs {n} to divide the {cfg.num_heads} attention "
                     "heads; split the layers instead (pipeline parallelism)")
    if n > cfg.num_kv_heads:
        notes.append(f"{n} GPUs exceed the {cfg.num_kv_heads} KV heads: each GPU holds one KV head, "
                     "replicated, and the KV cache counts that")
    if recipe == "nvfp4" and not GPUS[gpu].has_fp4:
        cc = ".".join(map(str, GPUS[gpu].compute_capability))
        notes.append(f"{gpu} (sm {cc}) has no FP4 tensor cores (Blackwell, sm 10.0, has): the FP4 weights fit as "
                     "counted, but no engine there runs the recipe's FP4 GEMMs")
    if recipe.startswith("fp8") and not GPUS[gpu].has_fp8:
        cc = ".".join(map(str, GPUS[gpu].compute_capability))
        notes.append(f"{gpu} (sm {cc}) has no FP8 tensor cores: the FP8 weights fit as counted, but run "
                     "through weight-only kernels, not the recipe's FP8 GEMMs")
    return tuple(notes)


def plan(model: str, recipe: str, gpu: str, context: int = 8192, batch: int = 1,
         usable_fraction: float = 0.9, max_gpus: int = 64) -> Plan:
    """``model``: an architecture preset, an HF model folder or a config.json file."""
    cfg = model_config(model)
    spec = check_gpu(gpu)
    if context < 1 or batch < 1 or not 0 < usable_fraction <= 1:
        raise ValueError(f"context={context} and batch={batch} must be >= 1, usable_fraction in (0, 1]")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds {model}'s {cfg.max_position_embeddings} positions")
    w = deployed_weight_bytes(cfg, recipe)
    kv = kv_bytes_per_token(cfg, recipe) * context * batch
    capacity = spec.memory_gb * 1e9 * usable_fraction
    if kv / cfg.num_kv_heads > capacity:
        raise ValueError(f"the KV cache of one of {model}'s {cfg.num_kv_heads} KV heads ({_size(kv / cfg.num_kv_heads)} "
                         f"at context {context}, batch {batch}) exceeds one {gpu}'s {_size(capacity)} usable, "
                         "and tensor parallelism splits the cache no finer than by KV head: lower --batch or --context")
    n = 1
    while _per_gpu_bytes(cfg, w, kv, n) > capacity:
        n *= 2
        if n > max_gpus:
            raise ValueError(f"{model} / {recipe} needs more than {max_gpus} {gpu} GPUs")
    return Plan(model, recipe, gpu, w, kv, n, _per_gpu_bytes(cfg, w, kv, n), capacity,
                _notes(cfg, recipe, gpu, n, context))
