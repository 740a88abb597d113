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
                 are folded into the weights).
The engine keeps INT4 block scales in float32; deployed INT4 kernels hold them in 16 bits, which
would save 2 bytes per 128 weights (under 1%).
KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per element, per token.
A GPU is usable up to ``usable_fraction`` of its memory (the rest: activations, workspace, the
runtime); tensor parallelism splits weights and cache evenly over a power-of-two GPU count.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine.config import ModelConfig

GPUS_GB = {"h100": 80.0, "h200": 141.0}
PLAN_RECIPES = ("bf16", "fp8-official", "fp8-modelopt", "int4-awq", "int4-rtn", "int4-awq-asym")
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

    def summary(self) -> str:
        gb = 1e9
        return (f"{self.model} / {self.recipe} on {self.gpu}: weights {self.deployed_weight_bytes / gb:.1f} GB + "
                f"KV cache {self.kv_bytes / gb:.1f} GB -> {self.gpus} GPU(s), {self.per_gpu_bytes / gb:.1f} GB "
                f"each of {self.capacity_bytes / gb:.1f} GB usable")


def _check_recipe(recipe: str) -> None:
    if recipe not in PLAN_RECIPES:
        raise KeyError(f"unknown recipe {recipe!r} for planning; valid: {', '.join(PLAN_RECIPES)}")


# The projections whose AWQ pre-scale stays a run-time input scaling under int4-awq (the others
# share one folded into their norm: int4_awq.resmooth).
PRESCALED = ("self_attn.o_proj", "mlp.down_proj")


def _quantized_projection_bytes(recipe: str, name: str, out: int, inp: int) -> int:
    """Bytes of one quantized projection's weight and scales (its bias, if any, stays BF16)."""
    if recipe == "fp8-official":
        return out * inp + 4 * out
    if recipe == "fp8-modelopt":
        return out * inp + 4 + 4
    blocks = -(-inp // INT4_BLOCK)
    codes_and_scales = out * blocks * INT4_BLOCK // 2 + 4 * out * blocks
    if recipe == "int4-awq":
        return codes_and_scales + (2 * inp if name in PRESCALED else 0)
    if recipe == "int4-awq-asym":
        return codes_and_scales + -(-out * blocks // 2)
    return codes_and_scales  # int4-rtn


def _is_quantized(recipe: str, layer: int, name: str, num_layers: int) -> bool:
    if recipe == "bf16":
        return False
    if recipe == "fp8-official":
        return name.startswith("mlp.") and 0 < layer < num_layers - 1
    return True


def deployed_weight_bytes(cfg: ModelConfig, recipe: str) -> int:
    _check_recipe(recipe)
    total = 2 * cfg.num_parameters()
    for layer in range(cfg.num_layers):
        for name, out, inp in cfg.layer_projections():
            if _is_quantized(recipe, layer, name, cfg.num_layers):
                total += _quantized_projection_bytes(recipe, name, out, inp) - 2 * out * inp
    if recipe == "fp8-modelopt":
        total += cfg.num_layers * 4 * 4  # K, V, q and softmax scales
    return total


def kv_bytes_per_token(cfg: ModelConfig, recipe: str) -> int:
    elem = 1 if recipe == "fp8-modelopt" else 2
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem


def plan(model: str, recipe: str, gpu: str, context: int = 8192, batch: int = 1,
         usable_fraction: float = 0.9, max_gpus: int = 64) -> Plan:
    cfg = ModelConfig.from_name(model)
    if gpu not in GPUS_GB:
        raise KeyError(f"unknown GPU {gpu!r}; valid: {', '.join(GPUS_GB)}")
    if context < 1 or batch < 1 or not 0 < usable_fraction <= 1:
        raise ValueError(f"context={context} and batch={batch} must be >= 1, usable_fraction in (0, 1]")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds {model}'s {cfg.max_position_embeddings} positions")
    w = deployed_weight_bytes(cfg, recipe)
    kv = kv_bytes_per_token(cfg, recipe) * context * batch
    capacity = GPUS_GB[gpu] * 1e9 * usable_fraction
    n = 1
    while (w + kv) / n > capacity:
        n *= 2
        if n > max_gpus:
            raise ValueError(f"{model} / {recipe} needs more than {max_gpus} {gpu} GPUs")
    return Plan(model, recipe, gpu, w, kv, n, (w + kv) / n, capacity)
