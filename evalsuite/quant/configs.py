"""Each recipe's settings: a frozen dataclass validated in ``__post_init__``, with no torch.

The settings are what a run record stores and what ``--recipe-config`` overrides; the code that
applies them lives in the recipe modules (fp8, int4_awq, int4_awq_asym), registered per config
type in ``api``. Kept apart so that commands validate a recipe before importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..assets import read_utf8


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "sampled"
    num_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 8:
            raise ValueError(f"calibration needs num_samples >= 1 and seq_len >= 8, got {self.num_samples}, "
                             f"{self.seq_len}")
        if self.source != "sampled" and not Path(self.source).is_file():
            raise ValueError(f"calibration source {self.source!r} is neither 'sampled' nor an existing text file")
        if self.source != "sampled":
            read_utf8(self.source, "calibration source")  # checked here, before a model loads


def calibrates(config) -> bool:
    """Whether applying a recipe config reads calibration text (int4-rtn's, AWQ's without AWQ, does not)."""
    return hasattr(config, "calibration") and getattr(config, "awq", True) and \
        (getattr(config, "smoothquant", True) or getattr(config, "gptq", True))


def coerce_calibration(config) -> None:
    """In a recipe config's ``__post_init__``: a ``calibration`` given as a dict (from a run record
    or a ``--recipe-config`` override) becomes a validated CalibrationSpec."""
    if isinstance(config.calibration, dict):
        object.__setattr__(config, "calibration", CalibrationSpec(**config.calibration))


@dataclass(frozen=True)
class Unquantized:
    """The reference: weights and activations stay in the engine dtype (BF16 by default)."""


# --- FP8 -------------------------------------------------------------------------------------

FP8_KERNELS = ("off", "scaled_mm")
KV_SCALE_MODES = ("simulate", "deploy")


def check_fp8_kernel(kernel: str) -> None:
    if kernel not in FP8_KERNELS:
        raise ValueError(f"kernel={kernel!r}; valid: {', '.join(FP8_KERNELS)}")


@dataclass(frozen=True)
class FP8OfficialConfig:
    """Meta's Llama 3.1 FP8 recipe: FFN projections only, first and last layers left in BF16."""

    activation_scale_ub: float = 1200.0
    skip_first_and_last_layers: bool = True
    kernel: str = "off"  # off: simulated in BF16 (the reference); scaled_mm: torch._scaled_mm where it runs

    def __post_init__(self) -> None:
        check_fp8_kernel(self.kernel)
        if not self.activation_scale_ub > 0:
            raise ValueError(f"activation_scale_ub must be > 0, got {self.activation_scale_ub!r}")


@dataclass(frozen=True)
class FP8DynamicConfig:
    """llm-compressor's FP8_DYNAMIC scheme (compressed-tensors; Red Hat's *-FP8-dynamic models):
    every linear but lm_head (and a mixture's routers) with E4M3 weights and a static scale per
    output channel, inputs quantized per token at run time without a bound."""

    kernel: str = "off"  # off: simulated in BF16 (the reference); scaled_mm: torch._scaled_mm where it runs

    def __post_init__(self) -> None:
        check_fp8_kernel(self.kernel)


@dataclass(frozen=True)
class FP8ModelOptConfig:
    """Model Optimizer FP8: every linear but lm_head; FP8 KV cache; static FP8 attention inputs.

    kv_scale_mode: ``simulate`` uses amax / 448 for K and V, as Model Optimizer's HF checkpoint
    export writes them; ``deploy`` floors those scales at 1.0, as its TensorRT-LLM checkpoint
    export does (``get_kv_cache_scaling_factor``; its issue #20: all-1.0 KV scales).
    fused_scales: q/k/v and gate/up as a deploying engine loads them into one GEMM each
    (``fp8.requantize_fused``); off, every projection keeps its own scales (the model as calibrated)."""

    kv_scale_mode: str = "simulate"
    quantize_attention: bool = True
    fused_scales: bool = True
    calibration: CalibrationSpec = CalibrationSpec()
    kernel: str = "off"  # off: simulated in BF16 (the reference); scaled_mm: torch._scaled_mm where it runs

    def __post_init__(self) -> None:
        check_fp8_kernel(self.kernel)
        if self.kv_scale_mode not in KV_SCALE_MODES:
            raise ValueError(f"kv_scale_mode={self.kv_scale_mode!r}; valid: {', '.join(KV_SCALE_MODES)}")
        coerce_calibration(self)


@dataclass(frozen=True)
class FP8BlockConfig:
    """Fine-grained FP8, as DeepSeek-V3's and Qwen3's published FP8 checkpoints carry it
    (``quant_method: fp8``, ``weight_block_size``): every linear but lm_head with E4M3 weights in
    tiles of block_size x block_size, a float32 scale each, and inputs quantized at run time per
    token in groups of block_size (dynamic: no calibration)."""

    block_size: int = 128

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}; valid: an integer >= 1 (the checkpoints use 128)")


@dataclass(frozen=True)
class NVFP4Config:
    """Model Optimizer NVFP4 (NVFP4_DEFAULT_CFG, max calibration): every linear but lm_head with
    FP4 weights and inputs in blocks of 16 (E4M3 block scales, a float32 scale per tensor), the
    input's tensor scale static from calibration and its block scales dynamic; FP8 KV cache.
    fused_scales: q/k/v and gate/up with one weight and one input tensor scale per group, as the
    export unifies them for fused GEMMs; off, each projection keeps its own."""

    fused_scales: bool = True
    fp8_kv_cache: bool = True
    calibration: CalibrationSpec = CalibrationSpec()

    def __post_init__(self) -> None:
        coerce_calibration(self)


# --- INT4 ------------------------------------------------------------------------------------

# Rows up to which the packed INT4 CPU kernel beats a BF16 matmul on the dequantized weight
# (decode); larger batches and prefill use the dense path. See docs/PERF.md.
KERNEL_MAX_ROWS = 4
# The recipes' ``kernel`` setting: off (simulated only), auto (the kernel for decode-sized calls),
# always (the kernel for every call: the real path end to end, for parity checks).
INT4_KERNEL_MODES = {"off": 0, "auto": KERNEL_MAX_ROWS, "always": 1 << 62}


def check_kernel_mode(kernel: str) -> None:
    if kernel not in INT4_KERNEL_MODES:
        raise ValueError(f"kernel={kernel!r}; valid: {', '.join(INT4_KERNEL_MODES)}")


@dataclass(frozen=True)
class Int4AWQConfig:
    """Model Optimizer INT4 AWQ (awq_lite): weight-only symmetric INT4 [-8, 7], blocks of 128 along
    the input dimension, every linear but lm_head; ``awq=False`` gives plain INT4 rounding.
    fp8_kv_cache: K and V cached in FP8 with static per-tensor scales from max calibration, as
    Model Optimizer's checkpoints made with an FP8 KV cache (its hf_ptq's default) run."""

    block_size: int = 128
    awq: bool = True
    alpha_steps: int = 10
    calibration: CalibrationSpec = CalibrationSpec()
    kernel: str = "auto"  # torch's packed INT4 kernel (CPU; tinygemm on CUDA): auto (decode-sized calls), always, off
    resmooth: bool = True  # the exported form: q/k/v and gate/up share a scale, folded into the norm
    fp8_kv_cache: bool = False
    ADDED_SETTINGS: ClassVar[dict[str, object]] = {"fp8_kv_cache": False}  # Recipe.record leaves them out there

    def __post_init__(self) -> None:
        check_kernel_mode(self.kernel)
        if self.block_size < 1 or self.alpha_steps < 1:
            raise ValueError(f"block_size and alpha_steps must be >= 1, got {self.block_size}, {self.alpha_steps}")
        coerce_calibration(self)


@dataclass(frozen=True)
class Int4AutoAWQConfig:
    """AutoAWQ (GEMM, version 'gemm' defaults): w_bit 4, q_group_size 128, zero_point True,
    a 20-point ratio grid with duo scaling, clip search with max_shrink 0.5 on 512 tokens."""

    block_size: int = 128
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    calibration: CalibrationSpec = CalibrationSpec()
    kernel: str = "auto"  # torch's packed INT4 kernel (CPU; tinygemm on CUDA): auto (decode-sized calls), always, off

    def __post_init__(self) -> None:
        check_kernel_mode(self.kernel)
        if self.block_size < 1 or self.n_grid < 1 or self.clip_grid < 1 or self.clip_tokens < 1:
            raise ValueError(f"block_size, n_grid, clip_grid and clip_tokens must be >= 1, got {self.block_size}, "
                             f"{self.n_grid}, {self.clip_grid}, {self.clip_tokens}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink={self.max_shrink}; valid: 0 <= max_shrink < 1")
        coerce_calibration(self)


@dataclass(frozen=True)
class Int4GPTQConfig:
    """llm-compressor's GPTQ in its W4A16 scheme (compressed-tensors ``pack-quantized``; Red Hat's
    *-quantized.w4a16 models): weight-only symmetric INT4 [-8, 7] in groups of ``block_size`` along
    the input, every linear but lm_head (and a mixture's routers); each group's scale from its
    weights' min and max (absmax / 7.5, in the model's dtype), fixed before GPTQ rounds the columns
    one by one and spreads each column's error over the columns not yet rounded, weighted by the
    inverse Hessian of the layer's calibration inputs (2·XᵀX, damped by ``dampening`` times its
    mean diagonal); ``actorder``: columns taken in order of decreasing Hessian diagonal (the groups
    stay where they are, so the checkpoint holds no g_idx); ``gptq_block``: columns whose updates
    are applied together. Layer by layer, each layer calibrated on the outputs of the layers
    already quantized."""

    block_size: int = 128
    actorder: bool = True
    dampening: float = 0.01
    gptq_block: int = 128
    calibration: CalibrationSpec = CalibrationSpec()
    kernel: str = "auto"  # torch's packed INT4 kernel (CPU; tinygemm on CUDA): auto (decode-sized calls), always, off

    def __post_init__(self) -> None:
        check_kernel_mode(self.kernel)
        if self.block_size < 1 or self.gptq_block < 1:
            raise ValueError(f"block_size and gptq_block must be >= 1, got {self.block_size}, {self.gptq_block}")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"dampening={self.dampening}; valid: 0 <= dampening < 1 (llm-compressor's default 0.01)")
        coerce_calibration(self)


# --- INT8 W8A8 ------------------------------------------------------------------------------

INT8_KERNELS = ("auto", "int_mm", "off")


@dataclass(frozen=True)
class Int8W8A8Config:
    """llm-compressor's W8A8 INT8 (compressed-tensors ``int-quantized``; Red Hat's *-quantized.w8a8
    models, which vLLM serves with INT8 GEMMs): every linear but lm_head (and a mixture's routers)
    with symmetric INT8 weights, one scale per output channel (absmax / 127.5 in the model's dtype),
    and inputs quantized per token at run time (absmax / 127, as vLLM's kernel does it).
    ``smoothquant``: SmoothQuant first (Xiao et al., 2022), as llm-compressor's SmoothQuantModifier:
    per input channel of q/k/v and of gate/up (attention only in a mixture's layers), s =
    range^α / (2·max|w|)^(1-α) from the calibration inputs' range, the norm before them divided by s
    and their weights multiplied by it; α is ``smoothing_strength`` (0.8, llm-compressor's W8A8
    example). ``gptq``: the weights rounded by GPTQ (``actorder``, ``dampening``, ``gptq_block`` as
    int4-gptq's), layer by layer on the quantized layers' outputs; off, rounded plainly.
    ``kernel``: the INT8 product by ``torch._int_mm`` (int32 sums; ``auto``: on CUDA only) or by
    float32 GEMMs over as many inputs as keep their sums of integer products exact: the same
    numbers either way."""

    smoothquant: bool = True
    smoothing_strength: float = 0.8
    gptq: bool = True
    actorder: bool = True
    dampening: float = 0.01
    gptq_block: int = 128
    calibration: CalibrationSpec = CalibrationSpec()
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in INT8_KERNELS:
            raise ValueError(f"kernel={self.kernel!r}; valid: {', '.join(INT8_KERNELS)}")
        if not 0 <= self.smoothing_strength <= 1:
            raise ValueError(f"smoothing_strength={self.smoothing_strength}; valid: 0 to 1 (llm-compressor's W8A8 "
                             "example: 0.8)")
        if self.gptq_block < 1:
            raise ValueError(f"gptq_block must be >= 1, got {self.gptq_block}")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"dampening={self.dampening}; valid: 0 <= dampening < 1 (llm-compressor's default 0.01)")
        coerce_calibration(self)
