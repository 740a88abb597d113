"""Capacity planner: the fewest GPUs that hold a model's weights and KV cache under a recipe.

Bytes are counted from the architecture, as each recipe stores them when deployed:
  bf16          every parameter in 2 bytes;
  fp8-official  FFN projections of all but the first and last layers in 1 byte plus a float32
                scale per output channel; the rest in BF16;
  fp8-modelopt  every linear but lm_head in 1 byte (per-tensor scales are negligible);
                embeddings and lm_head in BF16; KV cache in FP8;
  int4-awq      every linear but lm_head in 4 bits, a BF16 scale per 128 weights and a BF16
                pre-scale per input channel; embeddings and lm_head in BF16.
  int4-awq-asym every linear but lm_head in 4 bits, per 128 weights an FP16 scale and a 4-bit zero
                point (AutoAWQ's GEMM layout); the AWQ scales are folded into the weights.
KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per element, per token.
A GPU is usable up to ``usable_fraction`` of its memory (the rest: activations, workspace, the
runtime); tensor parallelism splits weights and cache evenly over a power-of-two GPU count.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine.config import ModelConfig

GPUS_GB = {"h100": 80.0, "h200": 141.0}
PLAN_RECIPES = ("bf16", "fp8-official", "fp8-modelopt", "int4-awq", "int4-awq-asym")


@dataclass(frozen=True)
class Plan:
    model: str
    recipe: str
    gpu: str
    weight_bytes: int
    kv_bytes: int
    gpus: int
    per_gpu_bytes: float
    capacity_bytes: float

    def summary(self) -> str:
        gb = 1e9
        return (f"{self.model} / {self.recipe} on {self.gpu}: weights {self.weight_bytes / gb:.1f} GB + KV cache "
                f"{self.kv_bytes / gb:.1f} GB -> {self.gpus} GPU(s), {self.per_gpu_bytes / gb:.1f} GB each of "
                f"{self.capacity_bytes / gb:.1f} GB usable")


def _linear_params(cfg: ModelConfig) -> tuple[int, int]:
    """(attention projection params, FFN projection params) per layer."""
    attn = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
    ffn = 3 * cfg.hidden_size * cfg.intermediate_size
    return attn, ffn


def weight_bytes(cfg: ModelConfig, recipe: str) -> int:
    if recipe not in PLAN_RECIPES:
        raise KeyError(f"unknown recipe {recipe!r} for planning; valid: {', '.join(PLAN_RECIPES)}")
    attn, ffn = _linear_params(cfg)
    linear = cfg.num_layers * (attn + ffn)
    other = cfg.num_parameters() - linear  # embeddings, lm_head, norms
    if recipe == "bf16":
        return 2 * cfg.num_parameters()
    if recipe == "fp8-official":
        quantized_layers = max(cfg.num_layers - 2, 0)
        q = quantized_layers * ffn
        channel_scales = quantized_layers * 4 * (2 * cfg.intermediate_size + cfg.hidden_size)
        return q + channel_scales + 2 * (cfg.num_parameters() - q)
    if recipe == "fp8-modelopt":
        return linear + 2 * other
    if recipe == "int4-awq-asym":
        blocks = linear // 128
        return linear // 2 + 2 * blocks + blocks // 2 + 2 * other
    # int4-awq: 4 bits per weight, a BF16 scale per block of 128, a BF16 pre-scale per input channel
    pre_scales = cfg.num_layers * 2 * (4 * cfg.hidden_size + cfg.intermediate_size)
    return linear // 2 + 2 * (linear // 128) + pre_scales + 2 * other


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
    w = weight_bytes(cfg, recipe)
    kv = kv_bytes_per_token(cfg, recipe) * context * batch
    capacity = GPUS_GB[gpu] * 1e9 * usable_fraction
    n = 1
    while (w + kv) / n > capacity:
        n *= 2
        if n > max_gpus:
            raise ValueError(f"{model} / {recipe} needs more than {max_gpus} {gpu} GPUs")
    return Plan(model, recipe, gpu, w, kv, n, (w + kv) / n, capacity)
