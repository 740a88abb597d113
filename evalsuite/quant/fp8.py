"""FP8 E4M3 numerics and three FP8 recipes, simulated in BF16: Meta's official Llama 3.1 recipe
(fbgemm_fp8), llm-compressor's FP8_DYNAMIC (the same row-wise product on every linear, unbounded)
and NVIDIA Model Optimizer's (static per-tensor scales, FP8 KV cache, static FP8 attention).

E4M3: largest finite value 448, round to nearest even, subnormals down to 2^-9. Values are always
clamped to ±448 before the cast: torch's cast of out-of-range values differs between versions and
devices (NaN on some, saturation on others), while the deployed kernels saturate.

Simulation computes what the FP8 GEMM computes: E4M3 inputs times E4M3 weights, products exact
and summed in float32, then the scales applied in float32 and one rounding to the output dtype.
The matmul runs in float32 on the E4M3 values (each is exact in float32 and in BF16): a BF16
matmul would round the unscaled sum to BF16 before scaling, one rounding more than the kernel,
which through 30 layers moves as many cloze answers as FP8 itself does (docs/PERF.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.load import LoadedModel
from ..engine.model import CausalLM, SparseMoE
from .api import handler, placement, register_module
from .calibrate import calibrate, check_published_scope, projections, shared_input_groups
from .configs import FP8DynamicConfig, FP8ModelOptConfig, FP8OfficialConfig

E4M3_MAX = 448.0
# fbgemm's floor on a per-token scale, so an all-zero (or tiny) token never divides by zero.
MIN_SCALE = 1.0 / (E4M3_MAX * 512.0)


def float32(value: float) -> float:
    """``value`` rounded to float32: static scales are float32 wherever they are deployed (in the
    checkpoint, in the kernel's scale operands), and the product of two such scales, exact in a
    Python float, rounds to float32 as the kernel's does."""
    return struct.unpack("f", struct.pack("f", value))[0]  # no tensor: whatever torch's default device


def round_e4m3(x: Tensor) -> Tensor:
    """Nearest E4M3 value of each element (saturating at ±448), as float32, through torch's cast."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


# 2^14 as float32 bits: the magic-number floor that puts E4M3's subnormal spacing 2^-9 on values below 2^-6
_SUBNORMAL_MAGIC = 0x46800000


def quantize_e4m3(x: Tensor, scale: float | Tensor) -> Tensor:
    """E4M3 values of ``x / scale`` (saturating at ±448) as float32: the same numbers as
    ``round_e4m3(x.float() / scale)``, about three times faster (torch's E4M3 to float32 cast is
    scalar code on CPU). Round to nearest even by adding and subtracting m = ±2^(e + 20), e the
    value's binary exponent: float32's 23 mantissa bits then keep 3 below the leading one; below
    2^-6 m is held at 2^14, which rounds to multiples of 2^-9, E4M3's subnormal spacing."""
    y = x / scale if x.dtype == torch.float32 else x.float().div_(scale)  # a new tensor, changed in place below
    y.clamp_(-E4M3_MAX, E4M3_MAX)
    m = y.view(torch.int32) & 0x7F800000
    m = m.add_(20 << 23).clamp_(min=_SUBNORMAL_MAGIC).view(torch.float32).copysign_(y)
    return y.add_(m).sub_(m)


def per_token_scale(x: Tensor, upper_bound: float) -> Tensor:
    """fbgemm's dynamic row scale: max(min(row absmax, ub) / 448, 1 / (448 * 512)), float32 [..., 1]."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    return (amax.clamp(max=upper_bound) / E4M3_MAX).clamp(min=MIN_SCALE)


def per_channel_scale(weight: Tensor) -> Tensor:
    """Static weight scale per output channel: row absmax / 448 (floored like the token scale so an
    all-zero row stays zero instead of dividing by zero), float32 [out]."""
    return (weight.abs().amax(dim=1).float() / E4M3_MAX).clamp(min=MIN_SCALE)


def _to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """``x / scale`` cast to E4M3 (saturating), the division in float32."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _to_e4m3_per_token(x: Tensor, upper_bound: float) -> tuple[Tensor, Tensor]:
    scale = per_token_scale(x, upper_bound)
    return _to_e4m3(x, scale), scale


class _Fused:
    """``fn`` compiled by ``torch.compile`` into one kernel on CUDA (the float32 intermediate of a
    quantization then never reaches memory); eager elsewhere, and eager on CUDA too if compiling
    fails (no Triton), after saying so once."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if args[0].device.type != "cuda":
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same
            if self.compiled is self.fn:
                raise
            warnings.warn(f"FP8 input quantization runs unfused: torch.compile failed ({type(e).__name__}: {e})")
            self.compiled = self.fn
            return self.fn(*args)


quantize_input = _Fused(_to_e4m3)
quantize_input_per_token = _Fused(_to_e4m3_per_token)


def scaled_mm(x8: Tensor, x_scale: Tensor, qweight: Tensor, w_scale: Tensor, shape: torch.Size,
              dtype: torch.dtype) -> Tensor:
    """The real FP8 GEMM: E4M3 inputs [rows, in] times the E4M3 weight by ``torch._scaled_mm``
    (float32 accumulation), scaled by x_scale * w_scale (x_scale per tensor or [rows, 1] per token;
    w_scale per tensor or [1, out] per channel), returned in ``dtype`` shaped ``shape[:-1] + (out,)``."""
    y = torch._scaled_mm(x8, qweight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=dtype)
    return y.view(*shape[:-1], -1)


@functools.cache
def scaled_mm_runs(device: str, dtype: torch.dtype, rowwise: bool) -> bool:
    """Whether ``torch._scaled_mm`` computes an FP8 product on ``device`` with ``dtype`` outputs and
    per-tensor (or row-wise) scales, tried once on 16 x 16 operands. It does not on NVIDIA GPUs
    before sm_89 (no FP8 tensor cores); torch's CUDA row-wise kernel (``f8f8bf16_rowwise``)
    returns BF16; torch's CPU kernel takes row-wise scales from 2.13 on. Where it does not, says
    so once."""
    dev = torch.device(device)
    ones = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn)
    scale_a = torch.ones(16, 1, device=dev) if rowwise else torch.ones((), device=dev)
    scale_b = torch.ones(1, 16, device=dev) if rowwise else torch.ones((), device=dev)
    try:
        runs = bool((scaled_mm(ones, scale_a, ones, scale_b, ones.shape, dtype) == 16).all())
        reason = "it computed a wrong product"
    except (RuntimeError, NotImplementedError) as e:
        runs, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if not runs:
        warnings.warn(f"torch._scaled_mm does not run on {device} with {'row-wise' if rowwise else 'per-tensor'} "
                      f"scales and {str(dtype).split('.')[-1]} outputs (torch {torch.__version__}; {reason}): "
                      "those FP8 products run simulated")
    return runs


class _KernelSwitch:
    """``use_kernel`` on an FP8 linear: whether ``torch._scaled_mm`` computes its product. Asked
    for where that kernel cannot run (``scaled_mm_runs``), the simulation runs instead, and
    ``kernel_asked`` keeps the request (a checkpoint saves it, for a device where it can run). The
    real kernel reads the E4M3 weight, the simulation a float32 copy of it (four bytes a weight),
    which exists only while the simulation is on."""

    rowwise = False  # the scales' form the kernel is called with: per-tensor, or row-wise
    kernel_asked = False

    @property
    def use_kernel(self) -> bool:
        return self.__dict__.get("_use_kernel", False)

    @use_kernel.setter
    def use_kernel(self, on: bool) -> None:
        self.kernel_asked = bool(on)
        on = self.kernel_asked and scaled_mm_runs(str(self.qweight.device), self.act_dtype, self.rowwise)
        self.__dict__["_use_kernel"] = on
        if on:
            self.qweight_f32 = torch.empty(0, device=self.qweight.device)
        elif self.qweight_f32.shape != self.qweight.shape:  # made again only where it was dropped
            self.qweight_f32 = self.qweight.float()


class _FusedFP8:
    """Projections of one input (q/k/v, gate/up) as one FP8 linear, ``inner``, over their
    concatenated weights; the modules' tensors named in ``names`` (and the simulation's float32
    weights) become views of its. Valid while the model holds these modules with those weights and
    kernel setting (``valid_for``)."""

    def __init__(self, inner: nn.Module, mods: list[nn.Module], names: tuple[str, ...]):
        self.inner = inner
        rows = [m.qweight.shape[0] for m in mods]
        for name in names + (() if inner.use_kernel else ("qweight_f32",)):
            for m, view in zip(mods, getattr(inner, name).split(rows)):
                setattr(m, name, view)
        self.mods = tuple(mods)
        self.views = tuple(m.qweight for m in mods)

    def valid_for(self, mods: list[nn.Module]) -> bool:
        return len(mods) == len(self.mods) and all(
            a is b and a.qweight is v and a.use_kernel == self.inner.use_kernel
            for a, b, v in zip(mods, self.mods, self.views))

    def __call__(self, x: Tensor) -> Tensor:
        return self.inner(x)


@register_module
class FP8RowwiseLinear(_KernelSwitch, nn.Module):
    """fbgemm_fp8 linear: E4M3 weights with one static scale per output channel; each input token
    quantized to E4M3 with its own dynamic scale, bounded by ``activation_scale_ub``; output in the
    activation dtype."""

    rowwise = True

    def __init__(self, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None, activation_scale_ub: float,
                 act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.act_dtype = act_dtype  # the inputs' and outputs' dtype
        self.register_buffer("qweight", qweight.to(torch.float8_e4m3fn))  # what the kernel and checkpoint hold
        self.register_buffer("qweight_f32", qweight.float(), persistent=False)  # the simulated matmul's copy
        self.register_buffer("weight_scale", weight_scale.float())  # [out]
        self.bias = bias
        self.activation_scale_ub = activation_scale_ub

    @staticmethod
    def fused(mods: list["FP8RowwiseLinear"]) -> "FusedFP8Rows | None":
        """One GEMM for projections that read one input (q/k/v, gate/up), when they share the
        input's bound and the kernel setting: each output row keeps its own scale, and each token's
        input would be quantized alike for every one of them, so the product is the same."""
        first = mods[0]
        same = all(type(m) is FP8RowwiseLinear and (m.activation_scale_ub, m.use_kernel, m.bias is None) ==
                   (first.activation_scale_ub, first.use_kernel, first.bias is None) for m in mods)
        return FusedFP8Rows(mods) if same else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_scale_ub: float) -> "FP8RowwiseLinear":
        w = linear.weight.detach()
        scale = per_channel_scale(w)
        qweight = round_e4m3(w.float() / scale[:, None]).to(torch.float8_e4m3fn)  # exact: already E4M3 values
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, scale, bias, activation_scale_ub, w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernel:  # torch._scaled_mm with row-wise scales (the recipe's kernel option)
            x8, scale = quantize_input_per_token(x.reshape(-1, x.shape[-1]), self.activation_scale_ub)
            y = scaled_mm(x8, scale, self.qweight, self.weight_scale.float()[None, :], x.shape, x.dtype)
        else:
            scale = per_token_scale(x, self.activation_scale_ub)
            y = F.linear(quantize_e4m3(x, scale), self.qweight_f32).mul_(scale).mul_(self.weight_scale).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def export(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"qweight": self.qweight, "weight_scale": self.weight_scale}
        return _with_bias(tensors, self.bias), {"activation_scale_ub": self.activation_scale_ub,
                                                "use_kernel": self.kernel_asked}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "FP8RowwiseLinear":
        q = cls(t["qweight"], t["weight_scale"], t.get("bias"), attrs["activation_scale_ub"], dtype)
        q.use_kernel = attrs["use_kernel"]
        return q

    def extra_repr(self) -> str:
        out, inp = self.qweight.shape
        return f"in_features={inp}, out_features={out}, activation_scale_ub={self.activation_scale_ub}"


class FusedFP8Rows(_FusedFP8):
    """Row-wise FP8 projections of one input as one FP8RowwiseLinear over their concatenated
    weights and row scales: each token's input quantized once."""

    def __init__(self, mods: list[FP8RowwiseLinear]):
        first = mods[0]
        bias = None if first.bias is None else torch.cat([m.bias for m in mods])
        inner = FP8RowwiseLinear(torch.cat([m.qweight for m in mods]), torch.cat([m.weight_scale for m in mods]),
                                 bias, first.activation_scale_ub, first.act_dtype)
        inner.use_kernel = first.kernel_asked
        super().__init__(inner, mods, ("qweight", "weight_scale"))


def _with_bias(tensors: dict[str, Tensor], bias: Tensor | None) -> dict[str, Tensor]:
    return tensors if bias is None else {**tensors, "bias": bias}


FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def quantized_layers(num_layers: int, config: FP8OfficialConfig) -> list[int]:
    if config.skip_first_and_last_layers:
        return list(range(1, num_layers - 1))
    return list(range(num_layers))


def _ffn_projections(model: CausalLM, config: FP8OfficialConfig) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every projection the recipe quantizes: the FFN's, in its layers."""
    found = []
    for i in quantized_layers(len(model.model.layers), config):
        mlp = model.model.layers[i].mlp
        for ffn in mlp.mlps if isinstance(mlp, SparseMoE) else [mlp]:  # a mixture: each expert's (not the routers)
            found += [(ffn, name) for name in FFN_PROJECTIONS]
    return found


@handler(FP8OfficialConfig)
def apply_fp8_official(lm: LoadedModel, config: FP8OfficialConfig) -> None:
    model = lm.model
    if model.config.fbgemm_fp8_ub is not None:  # published in this form (Meta's *-FP8): its modules are loaded
        _check_published_rows(model, config)
        for m in model.modules():
            if isinstance(m, FP8RowwiseLinear):
                m.use_kernel = config.kernel == "scaled_mm"
        return
    for ffn, name in _ffn_projections(model, config):
        q = FP8RowwiseLinear.from_linear(getattr(ffn, name), config.activation_scale_ub)
        q.use_kernel = config.kernel == "scaled_mm"
        setattr(ffn, name, q)


def _check_published_rows(model: CausalLM, config: FP8OfficialConfig) -> None:
    """A checkpoint in Meta's FP8 form runs as fp8-official only where its FP8 projections are the
    recipe's (the FFN's, in the layers ``skip_first_and_last_layers`` says): otherwise the run
    record would name a recipe the checkpoint is not."""
    held = {id(m) for m in model.modules() if isinstance(m, FP8RowwiseLinear)}
    if held == {id(getattr(ffn, name)) for ffn, name in _ffn_projections(model, config)}:
        return
    other = dataclasses.replace(config, skip_first_and_last_layers=not config.skip_first_and_last_layers)
    fits = held == {id(getattr(ffn, name)) for ffn, name in _ffn_projections(model, other)}
    names = sorted(n for n, m in model.named_modules() if isinstance(m, FP8RowwiseLinear))
    skip, other_skip = (str(c.skip_first_and_last_layers).lower() for c in (config, other))
    raise ValueError(
        f"recipe 'fp8-official': the checkpoint holds {len(names)} FP8 projections ({', '.join(names[:3])}, ...), "
        f"not the FFN projections of the layers skip_first_and_last_layers={skip} quantizes; valid: "
        + (f"--recipe-config skip_first_and_last_layers={other_skip}" if fits
           else "none (evaluate this checkpoint where a server runs it, --base-url)"))


def channel_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """llm-compressor's FP8 weight per output channel, in compressed-tensors' arithmetic (its
    ``calculate_qparams`` and ``quantize``): scale = row absmax / 448 in the weight's dtype (an
    all-zero row takes that dtype's eps), codes = E4M3(w / scale) with the quotient rounded to the
    weight's dtype first, as its division of two such tensors rounds. Returns the E4M3 codes and
    the scales [out, 1] in the weight's dtype, the tensors its checkpoints hold."""
    w = w.detach()
    scale = (w.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).to(w.dtype)
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    codes = (w.float() / scale.float()).to(w.dtype).float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


@handler(FP8DynamicConfig)
@torch.no_grad()
def apply_fp8_dynamic(lm: LoadedModel, config: FP8DynamicConfig) -> None:
    """Every projection row-wise FP8 with unbounded per-token inputs, as vLLM runs llm-compressor's
    FP8_DYNAMIC checkpoints (per-token scales in float32, floored at 1 / (448 · 512)); a checkpoint
    published in that form loaded as it is, if its FP8 projections are the recipe's."""
    model = lm.model
    if model.config.compressed_fp8:
        check_published_scope(model, "fp8-dynamic", FP8RowwiseLinear, "FP8")
    else:
        for parent, attr, _name in projections(model):
            linear = getattr(parent, attr)
            codes, scale = channel_weight(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach()
            setattr(parent, attr, FP8RowwiseLinear(codes, scale.float().view(-1), bias, math.inf, linear.weight.dtype))
    for m in model.modules():
        if isinstance(m, FP8RowwiseLinear):
            m.use_kernel = config.kernel == "scaled_mm"


@register_module
class FP8StaticQuantizer(nn.Module):
    """Fake-quantize to E4M3 with one fixed per-tensor scale (never recomputed at run time)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float32(scale)

    def forward(self, x: Tensor) -> Tensor:
        return quantize_e4m3(x, self.scale).mul_(self.scale).to(x.dtype)

    def export(self) -> tuple[dict[str, Tensor], dict]:
        return {}, {"scale": self.scale}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "FP8StaticQuantizer":
        return cls(attrs["scale"])

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


@register_module
class FP8StaticLinear(_KernelSwitch, nn.Module):
    """Model Optimizer FP8 linear: E4M3 weights and inputs, each with one static per-tensor scale
    (amax / 448; the input amax from calibration)."""

    def __init__(self, qweight: Tensor, weight_scale: float, input_scale: float, bias: Tensor | None,
                 act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.act_dtype = act_dtype  # the inputs' and outputs' dtype
        self.register_buffer("qweight", qweight.to(torch.float8_e4m3fn))  # what the kernel and checkpoint hold
        self.register_buffer("qweight_f32", qweight.float(), persistent=False)  # the simulated matmul's copy
        self.weight_scale, self.input_scale = float32(weight_scale), float32(input_scale)
        # the kernel's scale operands, kept on the model's device (never built per call), each in
        # its own allocation: cuBLASLt refuses a scale pointer that is not 16-byte aligned
        dev = self.qweight.device
        self.register_buffer("input_scale_t", torch.tensor(self.input_scale, device=dev), persistent=False)
        self.register_buffer("weight_scale_t", torch.tensor(self.weight_scale, device=dev), persistent=False)
        self.bias = bias

    @staticmethod
    def fused(mods: list["FP8StaticLinear"]) -> "FusedFP8 | None":
        """One GEMM for projections that read one input (q/k/v, gate/up), when they share both
        scales (``requantize_fused``) and the kernel setting."""
        first = mods[0]
        same = all(type(m) is FP8StaticLinear and
                   (m.input_scale, m.weight_scale, m.use_kernel, m.bias is None) ==
                   (first.input_scale, first.weight_scale, first.use_kernel, first.bias is None) for m in mods)
        return FusedFP8(mods) if same else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_amax: float) -> "FP8StaticLinear":
        w = linear.weight.detach()
        w_scale = static_scale(float(w.abs().max()))
        qweight = round_e4m3(w.float() / w_scale).to(torch.float8_e4m3fn)  # exact: already E4M3 values
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, w_scale, static_scale(input_amax), bias, w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernel:  # torch._scaled_mm with per-tensor scales (the recipe's kernel option)
            x8 = quantize_input(x.reshape(-1, x.shape[-1]), self.input_scale_t)
            y = scaled_mm(x8, self.input_scale_t, self.qweight, self.weight_scale_t, x.shape, x.dtype)
        else:
            y = F.linear(self._quantized_input(x), self.qweight_f32).mul_(self.input_scale * self.weight_scale)
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    # q/k/v (and gate/up) are called one after another on one input tensor with one calibrated
    # scale: quantize it once. The memo holds that tensor, so its identity cannot be reused; its
    # version counter (absent on inference tensors, which the engine never changes in place)
    # catches an in-place change between calls.
    _last: tuple[Tensor, int | None, float, Tensor] | None = None

    def _quantized_input(self, x: Tensor) -> Tensor:
        version = None if x.is_inference() else x._version
        last = FP8StaticLinear._last
        if last is not None and last[0] is x and last[1] == version and last[2] == self.input_scale:
            return last[3]
        xq = quantize_e4m3(x, self.input_scale)  # float32, like the weights it meets
        FP8StaticLinear._last = (x, version, self.input_scale, xq)
        return xq

    def export(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"qweight": self.qweight}
        return _with_bias(tensors, self.bias), {"weight_scale": self.weight_scale, "input_scale": self.input_scale,
                                                "use_kernel": self.kernel_asked}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "FP8StaticLinear":
        q = cls(t["qweight"], attrs["weight_scale"], attrs["input_scale"], t.get("bias"), dtype)
        q.use_kernel = attrs["use_kernel"]
        return q

    def extra_repr(self) -> str:
        out, inp = self.qweight.shape
        return f"in_features={inp}, out_features={out}, input_scale={self.input_scale:.6g}, " \
               f"weight_scale={self.weight_scale:.6g}"


class FusedFP8(_FusedFP8):
    """Projections of one input with shared scales as one FP8StaticLinear over their concatenated
    weights."""

    def __init__(self, mods: list[FP8StaticLinear]):
        first = mods[0]
        bias = None if first.bias is None else torch.cat([m.bias for m in mods])
        inner = FP8StaticLinear(torch.cat([m.qweight for m in mods]), first.weight_scale, first.input_scale, bias,
                                first.act_dtype)
        inner.use_kernel = first.use_kernel
        super().__init__(inner, mods, ("qweight",))


def static_scale(amax: float) -> float:
    """Per-tensor scale from a calibrated absmax: amax / 448 (floored so a zero amax stays usable),
    in float32."""
    return float32(max(amax / E4M3_MAX, MIN_SCALE))


def kv_scale(amax: float, mode: str) -> float:
    scale = static_scale(amax)
    return max(scale, 1.0) if mode == "deploy" else scale


def requantize_fused(mods: list[FP8StaticLinear], dtype: torch.dtype) -> list[FP8StaticLinear]:
    """Projections that a deploying engine runs as one FP8 GEMM (q/k/v, gate/up), as TensorRT-LLM
    loads them from a checkpoint with a scale per projection: the input scale and the weight scale
    become the largest of the group's; each weight is dequantized in the model's dtype (codes x
    its own scale), divided by the shared scale in that dtype and cast to E4M3 again. vLLM does
    the same (``requantize_with_max_scale``). Weights already at the shared scale stay as they are."""
    w_scale, in_scale = max(m.weight_scale for m in mods), max(m.input_scale for m in mods)
    out = []
    for m in mods:
        q = m.qweight
        if m.weight_scale != w_scale:
            dequantized = (q.to(dtype) * m.weight_scale).to(dtype)
            q = round_e4m3((dequantized / w_scale).to(dtype)).to(torch.float8_e4m3fn)
        r = FP8StaticLinear(q, w_scale, in_scale, m.bias, dtype)
        r.use_kernel = m.kernel_asked
        out.append(r)
    return out


@placement(FP8ModelOptConfig)
def place_kv_cache(lm: LoadedModel, config: dict) -> None:
    """As deployed: with the FP8 kernels on a CUDA device, the KV cache holds E4M3 codes (half the
    memory; read back, exactly the quantizer's values). The CPU keeps the BF16-stored cache, which
    holds the same values."""
    if config.get("kernel") == "scaled_mm" and lm.model.device.type == "cuda":
        lm.model.cache_dtype = torch.float8_e4m3fn


def experts_share_input_amax(model: CausalLM, stats: dict[str, float]) -> dict[str, float]:
    """In a mixture of experts, every expert's projection of one kind (gate, up, down) takes the
    largest input amax among the layer's experts: the deployed FP8 MoE kernels take one
    activation scale per layer and projection (vLLM loads the max of the experts'), and an expert
    no calibration token reached gets it too, as Model Optimizer's export gives it."""
    stats = dict(stats)
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, SparseMoE):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys = [f"model.layers.{i}.mlp.experts.{e}.{proj}.input" for e in range(len(layer.mlp.experts))]
                top = max(stats[k] for k in keys)
                stats.update(dict.fromkeys(keys, top))
    return stats


def _as_published(model: CausalLM, config: FP8ModelOptConfig) -> None:
    """A checkpoint published in Model Optimizer's FP8 (loaded by ``published``: its codes and
    scales are the modules already) as the recipe's settings deploy it: the kernel setting, q/k/v
    and gate/up requantized to one scale per group (``fused_scales``), the K and V scales floored
    at 1 for ``kv_scale_mode=deploy``."""
    dtype = model.lm_head.weight.dtype
    for m in model.modules():
        if isinstance(m, FP8StaticLinear):
            m.use_kernel = config.kernel == "scaled_mm"
    if config.fused_scales:
        for _norm, names in shared_input_groups(model):
            mods = [model.get_submodule(n) for n in names]
            if all(isinstance(m, FP8StaticLinear) for m in mods):
                for n, r in zip(names, requantize_fused(mods, dtype)):
                    parent, attr = n.rsplit(".", 1)
                    setattr(model.get_submodule(parent), attr, r)
    if config.kv_scale_mode == "deploy":
        for layer in model.model.layers:
            for kv in ("k_cache_quant", "v_cache_quant"):
                q = getattr(layer.self_attn, kv)
                setattr(layer.self_attn, kv, FP8StaticQuantizer(max(q.scale, 1.0)))


@handler(FP8ModelOptConfig)
def apply_fp8_modelopt(lm: LoadedModel, config: FP8ModelOptConfig) -> None:
    model = lm.model
    if model.config.modelopt == "FP8":
        _as_published(model, config)
        return
    stats = experts_share_input_amax(model, calibrate(lm, config.calibration))
    dtype = model.lm_head.weight.dtype
    made = {}
    for parent, attr, name in projections(model):
        q = FP8StaticLinear.from_linear(getattr(parent, attr), stats[f"{name}.input"])
        q.use_kernel = config.kernel == "scaled_mm"
        made[name] = (parent, attr, q)
    if config.fused_scales:
        for _norm, names in shared_input_groups(model):
            for n, r in zip(names, requantize_fused([made[n][2] for n in names], dtype)):
                made[n] = (*made[n][:2], r)
    for parent, attr, q in made.values():
        setattr(parent, attr, q)
    for i, layer in enumerate(model.model.layers):
        a, key = layer.self_attn, f"model.layers.{i}"
        a.k_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.k_cache_quant"], config.kv_scale_mode))
        a.v_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.v_cache_quant"], config.kv_scale_mode))
        if config.quantize_attention:
            a.q_bmm_quant = FP8StaticQuantizer(static_scale(stats[f"{key}.q_bmm_quant"]))
            # softmax output lies in [0, 1]: its amax is 1 without calibration
            a.softmax_quant = FP8StaticQuantizer(1.0 / E4M3_MAX)
