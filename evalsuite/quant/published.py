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
  Meta's FP8 (``quant_method: fbgemm_fp8``; Llama 3.1's *-FP8, as transformers' FbgemmFp8Linear
  holds it): an E4M3 ``weight`` with a float32 ``weight_scale`` [out, 1] per output row, inputs
  quantized per token at run time with scales bounded by config.json's ``activation_scale_ub``
      -> fp8-official's ``FP8RowwiseLinear``
  llm-compressor's FP8_DYNAMIC (``quant_method: compressed-tensors``, format float-quantized; Red
  Hat's *-FP8-dynamic): the same tensors, the ``weight_scale`` [out, 1] in the model's dtype, inputs
  quantized per token without a bound
      -> fp8-dynamic's ``FP8RowwiseLinear``
  llm-compressor's W4A16 (``quant_method: compressed-tensors``, format pack-quantized; Red Hat's
  *-quantized.w4a16, GPTQ): ``weight_packed`` int32 [out, ceil(in / 8)], eight codes q + 8 to an
  int32 along the input (column 8j + i in bits 4i..4i+3), ``weight_scale`` [out, in / g] in the
  model's dtype, ``weight_shape`` [out, in]; w = q·scale
      -> int4-gptq's ``Int4WeightOnlyLinear``
  llm-compressor's W8A8 INT8 (``quant_method: compressed-tensors``, format int-quantized; Red Hat's
  *-quantized.w8a8, SmoothQuant and GPTQ): an int8 ``weight`` [out, in] with a ``weight_scale``
  [out, 1] in the model's dtype, inputs quantized per token at run time
      -> int8-w8a8's ``Int8W8A8Linear``
  Model Optimizer's checkpoints (``quant_method: modelopt``, in config.json or hf_quant_config.json),
  with K and V cache scales where their KV cache is FP8 (``k_proj.k_scale`` and ``v_proj.v_scale``,
  or ``self_attn.k_scale`` and ``v_scale``; -> ``FP8StaticQuantizer``):
    FP8 (NVIDIA's *-FP8): an E4M3 ``weight`` with scalar float32 ``weight_scale`` and ``input_scale``
      -> fp8-modelopt's ``FP8StaticLinear``
    NVFP4 (NVIDIA's *-FP4): ``weight`` uint8 [out, in / 2], two E2M1 codes a byte (the even input in
    the low nibble), E4M3 ``weight_scale`` [out, in / 16] per block, scalar float32 ``weight_scale_2``
    (the weight's tensor scale) and ``input_scale`` (the input's)
      -> nvfp4's ``NVFP4Linear``
    W4A16_AWQ: ``weight`` uint8 [out / 2, in], two signed INT4 codes a byte (the even output row in
    the low nibble), ``weight_scale`` [out, in / g] per block, ``pre_quant_scale`` [in] where the
    input is scaled at run time (the rest is folded into the norm before); w = q·scale
      -> int4-awq's ``Int4WeightOnlyLinear`` (x · pre_quant_scale, as its deployed kernels scale)

A projection the publisher left unquantized (lm_head, a mixture's routers) has no such tensors
and loads as stored. ``take`` runs inside the engine's loader; ``checkpoint.save_hf`` writes these
forms (``awq_pack``, ``modelopt_int4_pack``).
"""

from __future__ import annotations

import math
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
    if cfg.fbgemm_fp8_ub is not None:
        return _fp8_rows(cfg.fbgemm_fp8_ub, "Meta's FP8 (fbgemm_fp8)", state, dtype, folder)
    if cfg.compressed_fp8:
        return _fp8_rows(math.inf, "llm-compressor's FP8_DYNAMIC", state, dtype, folder)
    if cfg.compressed_int4 is not None:
        return _packed_int4(cfg.compressed_int4, state, dtype, folder)
    if cfg.compressed_int8:
        return _int8_rows(state, dtype, folder)
    if cfg.modelopt is not None:
        return _modelopt(cfg, state, dtype, folder)
    stray = [k for k, v in state.items() if v.dtype == torch.float8_e4m3fn]
    if stray:
        raise ModelLoadError(f"{len(stray)} tensors in {folder} are E4M3 (e.g. {stray[:3]}), and config.json declares "
                             "no quantization_config that says how they are scaled; valid: a form the engine loads "
                             "as published (fine-grained FP8, Meta's FP8, Model Optimizer's FP8 or NVFP4) or "
                             "unquantized weights")
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


def _scaled_weight(state: dict[str, Tensor], name: str, key: str, folder: Path | str,
                 dtype: torch.dtype = torch.float8_e4m3fn, word: str = "FP8") -> Tensor:
    """The 2-D E4M3 (or ``dtype``) ``weight`` that ``key`` (a scale of ``name``) scales, taken out
    of ``state``."""
    codes = state.pop(f"{name}.weight", None)
    if codes is None or codes.dtype != dtype or codes.dim() != 2:
        kind = "E4M3" if dtype == torch.float8_e4m3fn else word
        raise ModelLoadError(f"{key} in {folder} scales no 2-D {kind} weight ({name}.weight: "
                             f"{None if codes is None else (tuple(codes.shape), codes.dtype)})")
    _refuse_embeddings(name, word, folder)
    return codes


def _refuse_unscaled(state: dict[str, Tensor], scale: str, folder: Path | str,
                     low_bit: tuple[torch.dtype, ...] = (torch.float8_e4m3fn,)) -> None:
    """Low-bit tensors left in ``state`` once every scaled weight is taken have no scale."""
    stray = [k for k, v in state.items() if v.dtype in low_bit]
    if stray:
        raise ModelLoadError(f"{len(stray)} low-bit tensors in {folder} have no {scale} beside them, e.g. {stray[:3]}")


def _fp8_tiles(block: int, state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each E4M3 ``weight`` beside its float32 ``weight_scale_inv`` (one per tile)."""
    from .fp8_block import FP8BlockLinear

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale_inv")]:
        name, scale = key.removesuffix(".weight_scale_inv"), state.pop(key)
        codes = _scaled_weight(state, name, key, folder)
        shape = (-(-codes.shape[0] // block), -(-codes.shape[1] // block))
        if tuple(scale.shape) != shape:
            raise ModelLoadError(f"{key} in {folder} has shape {tuple(scale.shape)}; the tiles of {block} x {block} "
                                 f"of a {tuple(codes.shape)} weight need {shape}")
        built[name] = _replacing(name, tuple(codes.shape), folder, lambda bias, codes=codes, scale=scale.float():
                                 FP8BlockLinear(codes, scale, block, bias, dtype))
    if not built:
        raise ModelLoadError(f"config.json in {folder} declares fine-grained FP8, and no weight there has a "
                             "weight_scale_inv")
    _refuse_unscaled(state, "weight_scale_inv", folder)
    return built


def _fp8_rows(bound: float, form: str, state: dict[str, Tensor], dtype: torch.dtype,
              folder: Path | str) -> dict[str, Builder]:
    """Each E4M3 ``weight`` beside its per-row ``weight_scale`` [out, 1]; inputs per token,
    their scales bounded by ``bound``."""
    from .fp8 import FP8RowwiseLinear

    return _row_scaled(form, state, folder, torch.float8_e4m3fn, "FP8",
                       lambda codes, scale, bias: FP8RowwiseLinear(codes, scale, bias, bound, dtype))


def _int8_rows(state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each INT8 ``weight`` beside its per-row ``weight_scale`` [out, 1]; inputs per token."""
    from .int8 import Int8W8A8Linear

    return _row_scaled("llm-compressor's W8A8 INT8", state, folder, torch.int8, "INT8",
                       lambda codes, scale, bias: Int8W8A8Linear(codes, scale, bias, dtype))


def _row_scaled(form: str, state: dict[str, Tensor], folder: Path | str, codes_dtype: torch.dtype, word: str,
                make: Callable[[Tensor, Tensor, Tensor | None], nn.Module]) -> dict[str, Builder]:
    """Each 2-D ``codes_dtype`` ``weight`` beside its ``weight_scale`` [out, 1]: ``make(codes,
    float32 scales [out], bias)`` builds its module."""
    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name, scale = key.removesuffix(".weight_scale"), state.pop(key)
        codes = _scaled_weight(state, name, key, folder, codes_dtype, word)
        if not scale.is_floating_point() or tuple(scale.shape) not in ((codes.shape[0], 1), (codes.shape[0],)):
            raise ModelLoadError(f"{key} in {folder} is {tuple(scale.shape)} {scale.dtype}; {form} has one scale "
                                 f"per output row of the {tuple(codes.shape)} weight: ({codes.shape[0]}, 1)")
        built[name] = _replacing(name, tuple(codes.shape), folder, lambda bias, codes=codes, scale=scale.float():
                                 make(codes, scale.reshape(-1), bias))
    if not built:
        raise ModelLoadError(f"config.json in {folder} declares {form}, and no weight there has a weight_scale")
    _refuse_unscaled(state, "weight_scale", folder, (codes_dtype,))
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


def pack_int32(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] [rows, cols] -> int32 [rows, ceil(cols / 8)] as compressed-tensors
    packs them: q + 8 of column 8j + i in bits 4i..4i+3 of int32 j (the last padded with zeros)."""
    v = (codes.to(torch.int32) + 8)
    v = torch.nn.functional.pad(v, (0, -v.shape[1] % 8)).view(v.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    return (v << shifts).sum(dim=-1, dtype=torch.int32)  # disjoint bits: the sum is their OR (the top wraps)


def unpack_int32(packed: Tensor, cols: int) -> Tensor:
    """``pack_int32``'s inverse: int8 codes in [-8, 7] [rows, cols]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # an arithmetic shift: the mask drops the sign's copies
    return (nibbles.view(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)


def _packed_int4(group: int, state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each ``weight_packed`` with its ``weight_scale`` and ``weight_shape``, as int4-gptq's module."""
    from .int4 import Int4WeightOnlyLinear, pad_to_blocks

    form = f"compressed-tensors' W4A16 form with group_size {group}"
    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name, packed = key.removesuffix(".weight_packed"), state.pop(key)
        scale, shape = state.pop(f"{name}.weight_scale", None), state.pop(f"{name}.weight_shape", None)
        zero, g_idx = state.pop(f"{name}.weight_zero_point", None), state.pop(f"{name}.weight_g_idx", None)
        _refuse_embeddings(name, "INT4", folder)
        if scale is None or shape is None:
            raise ModelLoadError(f"{key} in {folder} has no {'weight_scale' if scale is None else 'weight_shape'} "
                                 f"beside it; {form} stores weight_packed, weight_scale and weight_shape")
        if shape.numel() != 2 or shape.is_floating_point():
            raise ModelLoadError(f"{name}.weight_shape in {folder} is {shape.tolist()}; valid: [out, in]")
        out_features, in_features = (int(v) for v in shape.tolist())
        groups = -(-in_features // group)
        for part, tensor, kind, want in (("weight_packed", packed, torch.int32, (out_features, -(-in_features // 8))),
                                         ("weight_scale", scale, None, (out_features, groups))):
            if (kind is not None and tensor.dtype != kind) or (kind is None and not tensor.is_floating_point()) \
                    or tuple(tensor.shape) != want:
                raise ModelLoadError(f"{name}.{part} in {folder} is {tuple(tensor.shape)} {tensor.dtype}; {form} and "
                                     f"a weight of shape {(out_features, in_features)} need {want} "
                                     f"{kind or 'floating point'}")
        if zero is not None and zero.any():
            raise ModelLoadError(f"{name}.weight_zero_point in {folder} is not zero; {form} is symmetric")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features, device=g_idx.device) // group):
            raise ModelLoadError(f"{name}.weight_g_idx in {folder} permutes the groups (activation order 'group'); "
                                 "the engine loads W4A16 whose groups are consecutive inputs")
        if in_features % group:
            raise ModelLoadError(f"{key} in {folder}: {in_features} inputs are not whole groups of {group}")
        codes = unpack_int32(packed, in_features)
        built[name] = _replacing(name, (out_features, in_features), folder,
                                 lambda bias, codes=codes, scale=scale.float(), in_features=in_features:
                                 Int4WeightOnlyLinear(pad_to_blocks(codes, group), scale, in_features, group, bias,
                                                      None, dtype))
    if not built:
        raise ModelLoadError(f"config.json in {folder} declares {form}, and no linear there has a weight_packed")
    return built


def _modelopt(cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """The quantized linears of Model Optimizer's form ``cfg.modelopt``, and the K and V cache
    scales where its KV cache is FP8."""
    if cfg.modelopt == "FP8":
        built = _modelopt_fp8(state, dtype, folder)
    elif cfg.modelopt == "NVFP4":
        built = _modelopt_nvfp4(state, dtype, folder)
    else:
        built = _modelopt_int4(cfg.modelopt_group, state, dtype, folder)
    if not built:
        raise ModelLoadError(f"config.json in {folder} declares Model Optimizer's {cfg.modelopt}, and no weight there "
                             "has a weight_scale")
    if cfg.modelopt_fp8_kv:
        built.update(_modelopt_kv_scales(state, built, folder))
    _refuse_unscaled(state, "weight_scale", folder, (torch.float8_e4m3fn, torch.uint8))
    return built


def _scalar(name: str, part: str, tensor: Tensor | None, folder: Path | str, form: str) -> float:
    if tensor is None or tensor.numel() != 1:
        raise ModelLoadError(f"{name}.{part} in {folder} is {None if tensor is None else tuple(tensor.shape)}; Model "
                             f"Optimizer's {form} has one {part} (a float32 number) per linear")
    return float(tensor)


def _checked(name: str, part: str, tensor: Tensor | None, dtype: torch.dtype | None, shape: tuple[int, ...],
             folder: Path | str, form: str) -> Tensor:
    """``tensor`` of ``shape`` and ``dtype`` (None: any floating point), else a ModelLoadError naming both."""
    fits = tensor is not None and tuple(tensor.shape) == shape and \
        (tensor.dtype == dtype if dtype is not None else tensor.is_floating_point())
    if not fits:
        found = None if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
        raise ModelLoadError(f"{name}.{part} in {folder} is {found}; Model Optimizer's {form} needs "
                             f"{shape} {dtype or 'floating point'} there")
    return tensor


def _modelopt_nvfp4(state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each packed E2M1 ``weight`` with its E4M3 block scales, its tensor scale ``weight_scale_2``
    and its input's tensor scale ``input_scale``."""
    from .nvfp4 import BLOCK, NVFP4Linear

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale_2")]:
        name = key.removesuffix(".weight_scale_2")
        _refuse_embeddings(name, "NVFP4", folder)
        packed = state.pop(f"{name}.weight", None)
        if packed is None or packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 % BLOCK:
            raise ModelLoadError(f"{key} in {folder} scales no NVFP4 weight ({name}.weight: "
                                 f"{None if packed is None else (tuple(packed.shape), packed.dtype)}; valid: uint8 "
                                 f"[out, in / 2], in a multiple of {BLOCK})")
        out, inputs = packed.shape[0], packed.shape[1] * 2
        blocks = _checked(name, "weight_scale", state.pop(f"{name}.weight_scale", None), torch.float8_e4m3fn,
                          (out, inputs // BLOCK), folder, "NVFP4")
        tensor_scale = _scalar(name, "weight_scale_2", state.pop(key), folder, "NVFP4")
        input_scale = _scalar(name, "input_scale", state.pop(f"{name}.input_scale", None), folder, "NVFP4")
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(out, inputs)  # the low nibble first
        built[name] = _replacing(name, (out, inputs), folder,
                                 lambda bias, codes=codes, blocks=blocks.float(), ts=tensor_scale, xs=input_scale:
                                 NVFP4Linear(codes, blocks, ts, xs, bias, dtype))
    return built


def modelopt_int4_pack(codes: Tensor) -> Tensor:
    """Signed INT4 codes [out, in] (out even) as Model Optimizer's W4A16_AWQ weight: uint8
    [out / 2, in], row 2j in the low nibble and row 2j + 1 in the high, two's complement."""
    nibbles = codes.to(torch.uint8) & 0x0F
    return nibbles[0::2] | (nibbles[1::2] << 4)


def modelopt_int4_unpack(packed: Tensor) -> Tensor:
    """uint8 [out / 2, in] in Model Optimizer's W4A16_AWQ order -> signed codes [out, in] (int8)."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).to(torch.int8)  # [out / 2, 2, in]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).reshape(-1, packed.shape[1])


def _modelopt_int4(group: int, state: dict[str, Tensor], dtype: torch.dtype,
                   folder: Path | str) -> dict[str, Builder]:
    """Each packed INT4 ``weight`` with its block ``weight_scale`` (groups of ``group`` inputs) and,
    where its input is scaled at run time, its ``pre_quant_scale``."""
    from .int4 import Int4WeightOnlyLinear

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name = key.removesuffix(".weight_scale")
        _refuse_embeddings(name, "INT4", folder)
        packed = state.pop(f"{name}.weight", None)
        if packed is None or packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % group:
            raise ModelLoadError(f"{key} scales no W4A16_AWQ weight in {folder} ({name}.weight: "
                                 f"{None if packed is None else (tuple(packed.shape), packed.dtype)}; valid: uint8 "
                                 f"[out / 2, in], in whole groups of {group})")
        out, inputs = packed.shape[0] * 2, packed.shape[1]
        scale = _checked(name, "weight_scale", state.pop(key), None, (out, inputs // group), folder, "W4A16_AWQ")
        pre = state.pop(f"{name}.pre_quant_scale", None)
        if pre is not None:
            pre = _checked(name, "pre_quant_scale", pre, None, (inputs,), folder, "W4A16_AWQ").to(dtype)
        codes = modelopt_int4_unpack(packed)
        built[name] = _replacing(name, (out, inputs), folder,
                                 lambda bias, codes=codes, scale=scale.float(), pre=pre, inputs=inputs:
                                 Int4WeightOnlyLinear(codes, scale, inputs, group, bias, pre, dtype))
    return built


# Model Optimizer's names for the K and V cache scales: on k_proj and v_proj (its HF export), or on
# the attention (vLLM's own name for them, which its other exporters write)
_KV_SCALES = {".k_proj.k_scale": "k_cache_quant", ".v_proj.v_scale": "v_cache_quant", ".k_scale": "k_cache_quant",
              ".v_scale": "v_cache_quant"}


def _modelopt_fp8(state: dict[str, Tensor], dtype: torch.dtype, folder: Path | str) -> dict[str, Builder]:
    """Each E4M3 ``weight`` with its scalar ``weight_scale`` and ``input_scale``, as Model
    Optimizer's HF export writes them."""
    from .fp8 import FP8StaticLinear

    built: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name = key.removesuffix(".weight_scale")
        weight_scale, input_scale = state.pop(key), state.pop(f"{name}.input_scale", None)
        codes = _scaled_weight(state, name, key, folder)
        if input_scale is None or weight_scale.numel() != 1 or input_scale.numel() != 1:
            raise ModelLoadError(
                f"{name} in {folder} has weight_scale {tuple(weight_scale.shape)} and input_scale "
                f"{None if input_scale is None else tuple(input_scale.shape)}; Model Optimizer's FP8 has one "
                "weight scale and one (static) input scale per linear")
        built[name] = _replacing(name, tuple(codes.shape), folder,
                                 lambda bias, codes=codes, ws=float(weight_scale), xs=float(input_scale):
                                 FP8StaticLinear(codes, ws, xs, bias, dtype))
    return built


def _modelopt_kv_scales(state: dict[str, Tensor], built: dict[str, Builder], folder: Path | str) -> dict[str, Builder]:
    """Each attention's K and V cache scales, one for every attention whose projections are quantized."""
    from .fp8 import FP8StaticQuantizer

    made: dict[str, Builder] = {}
    for key in [k for k in state if k.endswith(tuple(_KV_SCALES))]:
        suffix = next(s for s in _KV_SCALES if key.endswith(s))
        attention = key.removesuffix(suffix)
        scale = state.pop(key)
        if scale.numel() != 1:
            raise ModelLoadError(f"{key} in {folder} has shape {tuple(scale.shape)}; a KV-cache scale is one number")
        made[f"{attention}.{_KV_SCALES[suffix]}"] = lambda _none, scale=float(scale): FP8StaticQuantizer(scale)
    attentions = {n.rsplit(".", 1)[0] for n in built if n.endswith(("q_proj", "k_proj", "v_proj"))}
    missing = sorted(f"{a}.{kv}" for a in attentions for kv in ("k_cache_quant", "v_cache_quant")
                     if f"{a}.{kv}" not in made)
    if missing:
        raise ModelLoadError(f"{folder} declares an FP8 KV cache and has no scale for {missing[:2]} (k_proj.k_scale, "
                             "v_proj.v_scale)")
    return made
