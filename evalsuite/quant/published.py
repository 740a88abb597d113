"""Low-bit checkpoints in the forms their publishers write, loaded as published: each quantized
projection's codes and scales become a module of the recipe that computes that form, and
nothing is quantized again.

  fine-grained FP8 (config.json ``quant_method: fp8``, ``weight_block_size [n, n]``; DeepSeek-V3's
  and Qwen3's *-FP8): an E4M3 ``weight`` and a float32 ``weight_scale_inv`` per n x n tile
      -> fp8-block's ``FP8BlockLinear``
  AutoAWQ's GEMM form (``quant_method: awq``, ``version: gemm``, 4 bits, zero point; what AutoAWQ
  and most AWQ checkpoints on the hub hold): ``qweight`` int32 [in, out / 8] and ``qzeros`` int32
  [in / g, out / 8], eight 4-bit values to an int32 in AutoAWQ's interleaved order (``AWQ_ORDER``),
  and FP16 ``scales`` [in / g, out]; w = (q - z)·scale
      -> int4-awq-asym's ``Int4WeightOnlyLinear`` (codes q - 8, zero points z, float32 scales)
  Model Optimizer's FP8 (``quant_method: modelopt``, ``quant_algo: FP8`` with an FP8 KV cache, in
  config.json or hf_quant_config.json; NVIDIA's *-FP8 checkpoints): an E4M3 ``weight`` with scalar
  float32 ``weight_scale`` and ``input_scale``, and K and V cache scales (``k_proj.k_scale`` and
  ``v_proj.v_scale``, or ``self_attn.k_scale`` and ``v_scale``)
      -> fp8-modelopt's ``FP8StaticLinear`` and ``FP8StaticQuantizer``

A projection the publisher left unquantized (lm_head, a mixture's routers) has no such tensors
and loads as stored. ``take`` runs inside the engine's loader; ``checkpoint.save_hf`` writes the
same three forms (``awq_pack``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..engine.config import ModelConfig
from ..engine.options import ModelLoadError

# nibble i of a packed int32 (bits 4i..4i+3) holds column 8j + AWQ_ORDER[i] of its group of eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

# what takes the place of the model's module at a name (a linear of its shape, with its bias; None
# where the model holds nothing there yet, as an attention's KV-cache quantizer)
Builder = Callable[[nn.Module | None], nn.Module]


def take(cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Take a published checkpoint's quantized tensors out of ``state`` (names as the engine
    holds them): for each quantized projection (and Model Optimizer's KV-cache quantizers), by
    name, what builds its module. {} for a checkpoint that is not quantized."""
    if cfg.fp8_block is not None:
        return _fp8_tiles(cfg.fp8_block, state, dtype, folder)
    if cfg.awq_group is not None:
        return _awq_gemm(cfg.awq_group, state, dtype, folder)
    if cfg.modelopt_fp8:
        return _modelopt_fp8(state, dtype, folder)
    stray = [k for k, v in state.items() if v.dtype == torch.float8_e4m3fn]
    if stray:
        raise ModelLoadError(f"{len(stray)} tensors in {folder} are E4M3 (e.g. {stray[:3]}), and config.json declares "
                             "no quantization_config that says how they are scaled; valid: an FP8 form the engine "
                             "loads as published (fine-grained FP8, Model Optimizer's FP8) or unquantized weights")
    return {}


def _replacing(name: str, shape: tuple[int, int], folder: Path | str,
               make: Callable[[Tensor | None], nn.Module]) -> Builder:
    def build(linear: nn.Module | None) -> nn.Module:
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != shape:
            raise ModelLoadError(f"{name} in {folder} is quantized as a {shape} linear; a model of this "
                                 f"config.json has {_described(linear)} there")
        return make(linear.bias)
    return build


def _described(module: nn.Module | None) -> str:
    if isinstance(module, nn.Linear):
        return f"a {tuple(module.weight.shape)} linear"
    return "nothing" if module is None else f"a {type(module).__name__}"


def _refuse_embeddings(name: str, form: str, folder: Path | str) -> None:
    if name == "lm_head" or name.endswith("embed_tokens"):
        raise ModelLoadError(f"{name} in {folder} is stored in {form}; the engine runs lm_head and the embeddings "
                             "as published checkpoints keep them, in the model's dtype")


def _fp8_tiles(block: int, state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each E4M3 ``weight`` beside its float32 ``weight_scale_inv`` (one per tile)."""
    from .fp8_block import FP8BlockLinear

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale_inv")]:
        name, scale = key.removesuffix(".weight_scale_inv"), state.pop(key)
        codes = state.pop(f"{name}.weight", None)
        if codes is None or codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
            raise ModelLoadError(f"{key} in {folder} scales no 2-D E4M3 weight ({name}.weight: "
                                 f"{None if codes is None else (tuple(codes.shape), codes.dtype)})")
        _refuse_embeddings(name, "FP8", folder)
        shape = (-(-codes.shape[0] // block), -(-codes.shape[1] // block))
        if tuple(scale.shape) != shape:
            raise ModelLoadError(f"{key} in {folder} has shape {tuple(scale.shape)}; the tiles of {block} x {block} "
                                 f"of a {tuple(codes.shape)} weight need {shape}")
        built[name] = _replacing(name, tuple(codes.shape), folder, lambda bias, codes=codes, scale=scale.float():
                                 FP8BlockLinear(codes, scale, block, bias, dtype))
    if not built:
        raise ModelLoadError(f"config.json in {folder} declares fine-grained FP8, and no weight there has a "
                             "weight_scale_inv")
    stray = [k for k, v in state.items() if v.dtype == torch.float8_e4m3fn]
    if stray:
        raise ModelLoadError(f"{len(stray)} E4M3 tensors in {folder} have no weight_scale_inv, e.g. {stray[:3]}")
    return built


def awq_pack(values: Tensor) -> Tensor:
    """Integers 0..15 [rows, cols] (cols a multiple of 8) as int32 [rows, cols / 8] in AutoAWQ's order."""
    v = values.to(torch.int32).view(values.shape[0], -1, 8)
    packed = torch.zeros(v.shape[:2], dtype=torch.int32, device=values.device)
    for i, column in enumerate(AWQ_ORDER):
        packed |= v[..., column] << (4 * i)  # the top nibble wraps into the sign bit, as AutoAWQ's does
    return packed


def awq_unpack(packed: Tensor) -> Tensor:
    """int32 [rows, n] in AutoAWQ's order -> integers 0..15 [rows, 8n] (uint8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # an arithmetic shift: the mask drops the sign's copies
    values = torch.empty_like(nibbles)
    values[..., list(AWQ_ORDER)] = nibbles
    return values.view(packed.shape[0], -1).to(torch.uint8)


def _awq_gemm(group: int, state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each ``qweight`` with its ``qzeros`` and ``scales``, as the engine's zero-point INT4 form."""
    from .int4 import Int4WeightOnlyLinear

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name, qweight = key.removesuffix(".qweight"), state.pop(key)
        qzeros, scales = state.pop(f"{name}.qzeros", None), state.pop(f"{name}.scales", None)
        _refuse_embeddings(name, "INT4", folder)
        if qzeros is None or scales is None:
            raise ModelLoadError(f"{key} in {folder} has no {'qzeros' if qzeros is None else 'scales'} beside it; "
                                 "AutoAWQ's GEMM form stores qweight, qzeros and scales for every quantized linear")
        in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
        groups = -(-in_features // group)
        want = {"qweight": (qweight, torch.int32, None), "qzeros": (qzeros, torch.int32, (groups, out_features // 8)),
                "scales": (scales, None, (groups, out_features))}
        for part, (tensor, kind, shape) in want.items():
            if tensor.dim() != 2 or (kind is not None and tensor.dtype != kind) or \
                    (kind is None and not tensor.is_floating_point()) or (shape and tuple(tensor.shape) != shape):
                raise ModelLoadError(
                    f"{name}.{part} in {folder} is {tuple(tensor.shape)} {tensor.dtype}; AutoAWQ's GEMM form with "
                    f"group_size {group} and a {tuple(qweight.shape)} qweight needs "
                    f"{shape or 'a 2-D tensor'} {kind or 'floating point'}")
        if in_features % group:
            raise ModelLoadError(f"{key} in {folder}: {in_features} inputs are not whole groups of {group}")
        codes = (awq_unpack(qweight).t().to(torch.int8) - 8).contiguous()  # [out, in], q - 8
        zero = awq_unpack(qzeros).t().contiguous()  # [out, groups]
        scale = scales.float().t().contiguous()  # FP16 values, exact in float32
        built[name] = _replacing(name, (out_features, in_features), folder,
                                 lambda bias, codes=codes, zero=zero, scale=scale, in_features=in_features:
                                 Int4WeightOnlyLinear(codes, scale, in_features, group, bias, None, dtype,
                                                      zero_point=zero))
    if not built:
        raise ModelLoadError(f"config.json in {folder} declares AWQ, and no linear there has a qweight")
    return built


# Model Optimizer's names for the K and V cache scales: on k_proj and v_proj (its HF export), or on
# the attention (vLLM's own name for them, which its other exporters write)
_KV_SCALES = {".k_proj.k_scale": "k_cache_quant", ".v_proj.v_scale": "v_cache_quant", ".k_scale": "k_cache_quant",
              ".v_scale": "v_cache_quant"}


def _modelopt_fp8(state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each E4M3 ``weight`` with its scalar ``weight_scale`` and ``input_scale``, and each
    attention's K and V cache scales, as Model Optimizer's HF export writes them."""
    from .fp8 import FP8StaticLinear, FP8StaticQuantizer

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name = key.removesuffix(".weight_scale")
        weight_scale, input_scale = state.pop(key), state.pop(f"{name}.input_scale", None)
        codes = state.pop(f"{name}.weight", None)
        if codes is None or codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
            raise ModelLoadError(f"{key} in {folder} scales no 2-D E4M3 weight ({name}.weight: "
                                 f"{None if codes is None else (tuple(codes.shape), codes.dtype)})")
        _refuse_embeddings(name, "FP8", folder)
        if input_scale is None or weight_scale.numel() != 1 or input_scale.numel() != 1:
            raise ModelLoadError(
                f"{name} in {folder} has weight_scale {tuple(weight_scale.shape)} and input_scale "
                f"{None if input_scale is None else tuple(input_scale.shape)}; Model Optimizer's FP8 has one "
                "weight scale and one (static) input scale per linear")
        built[name] = _replacing(name, tuple(codes.shape), folder,
                                 lambda bias, codes=codes, ws=float(weight_scale), xs=float(input_scale):
                                 FP8StaticLinear(codes, ws, xs, bias, dtype))
    for key in [k for k in state if k.endswith(tuple(_KV_SCALES))]:
        suffix = next(s for s in _KV_SCALES if key.endswith(s))
        attention = key.removesuffix(suffix)
        scale = state.pop(key)
        if scale.numel() != 1:
            raise ModelLoadError(f"{key} in {folder} has shape {tuple(scale.shape)}; a KV-cache scale is one number")
        built[f"{attention}.{_KV_SCALES[suffix]}"] = lambda _none, scale=float(scale): FP8StaticQuantizer(scale)
    if not any(name.endswith("_proj") for name in built):
        raise ModelLoadError(f"config.json in {folder} declares Model Optimizer's FP8, and no weight there has a "
                             "weight_scale")
    attentions = {n.rsplit(".", 1)[0] for n in built if n.endswith(("q_proj", "k_proj", "v_proj"))}
    missing = sorted(f"{a}.{kv}" for a in attentions for kv in ("k_cache_quant", "v_cache_quant")
                     if f"{a}.{kv}" not in built)
    if missing:
        raise ModelLoadError(f"{folder} declares an FP8 KV cache and has no scale for {missing[:2]} (k_proj.k_scale, "
                             "v_proj.v_scale)")
    stray = [k for k, v in state.items() if v.dtype == torch.float8_e4m3fn]
    if stray:
        raise ModelLoadError(f"{len(stray)} E4M3 tensors in {folder} have no weight_scale, e.g. {stray[:3]}")
    return built
