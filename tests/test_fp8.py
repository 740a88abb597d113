"""FP8 E4M3 numerics and the fp8-official recipe, against hand-computed values."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from evalsuite.engine.load import load
from evalsuite.quant.api import apply_recipe, get_recipe
from evalsuite.quant.fp8 import (
    MIN_SCALE,
    FP8OfficialConfig,
    FP8RowwiseLinear,
    per_channel_scale,
    per_token_scale,
    quantize_e4m3,
    round_e4m3,
)

from .conftest import fused_and_separate, needs_cpu_rowwise_scaled_mm

# (input, nearest E4M3 value) worked out by hand from the format: 3 mantissa bits, bias 7,
# subnormal step 2^-9, max 448, ties to the even mantissa.
E4M3_CASES = [
    (1.0, 1.0),
    (1.0625, 1.0),        # halfway 1.000b / 1.001b -> even 1.000b
    (1.1875, 1.25),       # halfway 1.001b / 1.010b -> even 1.010b
    (17.0, 16.0),         # step 2 in [16, 32): halfway 16 / 18 -> 16
    (19.0, 20.0),         # halfway 18 / 20 -> 20
    (0.3, 0.3125),        # step 1/32 in [0.25, 0.5): 9.6 steps -> 10
    (-3.3, -3.25),
    (2.0 ** -9, 2.0 ** -9),            # smallest subnormal
    (2.0 ** -10, 0.0),                 # halfway 0 / 2^-9 -> 0
    (3 * 2.0 ** -10, 2.0 ** -8),       # halfway 2^-9 / 2*2^-9 -> even 2^-8
    (1.01 * 2.0 ** -10, 2.0 ** -9),
    (448.0, 448.0),
    (460.0, 448.0),       # clamped before the cast
    (1e6, 448.0),
    (-1e6, -448.0),
]


@pytest.mark.parametrize("x,want", E4M3_CASES)
def test_round_e4m3(x, want):
    assert round_e4m3(torch.tensor([x])).item() == want
    assert quantize_e4m3(torch.tensor([x]), 1.0).item() == want


def test_fast_e4m3_rounding_is_the_cast_bit_for_bit():
    """The add-and-subtract rounding against torch's E4M3 cast: every finite BF16 value at several
    scales, every midpoint between neighbouring E4M3 values and one float32 step either side."""
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bf16 = bf16[torch.isfinite(bf16)]
    for scale in (1.0, 3.0, 1 / 448, 0.7, 1e-3):
        want = round_e4m3(bf16.float() / scale)
        assert torch.equal(quantize_e4m3(bf16, scale), want)
        assert torch.equal(quantize_e4m3(bf16.float(), scale), want)
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    for x in (mids, torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1e9))):
        x = torch.cat([x, -x])
        assert torch.equal(quantize_e4m3(x, 1.0), round_e4m3(x))


def test_per_token_scale_bound_and_floor():
    x = torch.tensor([[2000.0, -5.0], [0.0, 0.0], [-896.0, 1.0], [1e-6, 0.0]])
    s = per_token_scale(x, 1200.0).squeeze(1).tolist()
    assert s == pytest.approx([1200 / 448, 1 / (448 * 512), 2.0, 1 / (448 * 512)], rel=1e-6)
    assert MIN_SCALE == 1 / (448 * 512)


def test_per_channel_scale():
    w = torch.tensor([[1.0, -0.5], [3.0, 0.1], [0.0, 0.0]])
    assert per_channel_scale(w).tolist() == pytest.approx([1 / 448, 3 / 448, 1 / (448 * 512)], rel=1e-6)


def test_fp8_rowwise_linear_hand_computed():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.5], [3.0, 0.1]]))
    q = FP8RowwiseLinear.from_linear(lin, activation_scale_ub=1200.0)
    # row 1: 0.1 * 448 / 3 = 14.93 -> E4M3 15 -> 15 * 3/448 = 45/448
    # token 1: scale 2/448, exact; token 2: scale 1200/448 (bounded), 1300 -> 448 * 1200/448 = 1200
    y = q(torch.tensor([[2.0, 1.0], [1300.0, 0.0]]))
    want = torch.tensor([[1.5, 6.0 + 45 / 448], [1200.0, 3600.0]])
    assert torch.allclose(y, want, rtol=1e-6, atol=0)


def test_scale_upper_bound_is_configurable():
    with pytest.raises(ValueError, match="activation_scale_ub must be > 0"):
        FP8OfficialConfig(activation_scale_ub=0)
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.tensor([[3000.0]])
    assert FP8RowwiseLinear.from_linear(lin, 1200.0)(x).item() == pytest.approx(1200.0, rel=1e-6)
    assert FP8RowwiseLinear.from_linear(lin, 5000.0)(x).item() == pytest.approx(3000.0, rel=1e-6)


def test_fp8_official_layer_selection(tiny_dir):
    lm = load(str(tiny_dir), "float32")
    model = lm.model
    before = {n: m for n, m in model.named_modules()}
    tokens = torch.randint(0, 400, (1, 30))
    ref = model(tokens)
    record = apply_recipe(lm, "fp8-official")
    assert record["config"] == {"activation_scale_ub": 1200.0, "skip_first_and_last_layers": True, "kernel": "off"}
    layers = model.model.layers
    assert len(layers) == 3
    for i, layer in enumerate(layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(layer.mlp, name)
            if i == 1:
                assert isinstance(module, FP8RowwiseLinear)
            else:  # first and last layers untouched
                assert module is before[f"model.layers.{i}.mlp.{name}"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(layer.self_attn, name) is before[f"model.layers.{i}.self_attn.{name}"]
    assert model.lm_head is before["lm_head"]
    out = model(tokens)
    assert not torch.equal(out, ref)  # the quantized layer really runs
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_unknown_recipe_lists_valid():
    with pytest.raises(KeyError, match="valid: bf16, fp8-block, fp8-dynamic, fp8-modelopt, fp8-official"):
        get_recipe("fp8")


# ------------------------------------------------------------------------------ fp8-modelopt

from evalsuite.quant import calibrate as calib  # noqa: E402
from evalsuite.quant.calibrate import CalibrationSpec  # noqa: E402
from evalsuite.quant.fp8 import FP8StaticLinear, FP8StaticQuantizer, kv_scale  # noqa: E402


def test_static_quantizer_hand_computed():
    q = FP8StaticQuantizer(0.5)
    # 1.3 / 0.5 = 2.6 -> E4M3 step 0.25 in [2, 4) -> 2.5 -> 1.25; 300 / 0.5 = 600 -> 448 -> 224
    assert q(torch.tensor([1.3, 300.0, -0.1])).tolist() == [1.25, 224.0, -0.1015625]


def test_static_input_scale_is_not_recomputed_for_outliers():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    q = FP8StaticLinear.from_linear(lin, input_amax=2.0)
    assert q(torch.tensor([[1000.0]])).item() == pytest.approx(2.0)  # saturates at the calibrated amax
    assert q.input_scale == pytest.approx(2.0 / 448)


def test_kv_scale_modes():
    assert kv_scale(44.8, "simulate") == pytest.approx(0.1)
    assert kv_scale(44.8, "deploy") == 1.0
    assert kv_scale(896.0, "deploy") == kv_scale(896.0, "simulate") == pytest.approx(2.0)


def _hf_linear_input_amax(hf, sequences):
    """Reference: forward pre-hooks on transformers' own modules (same names as the engine's)."""
    amax = {}

    def hook(name):
        def fn(_module, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in hf.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for s in sequences:
            hf(torch.tensor([s]))
    for h in handles:
        h.remove()
    return amax


def _hf_attention_amax(hf, sequences, monkeypatch):
    """Reference: q and K right after RoPE, recorded by wrapping transformers' own
    apply_rotary_pos_emb (called once per layer, in layer order), and V at v_proj's output."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.apply_rotary_pos_emb
    calls = []

    def recording(q, k, *args, **kwargs):
        q_embed, k_embed = real(q, k, *args, **kwargs)
        calls.append((float(q_embed.abs().max()), float(k_embed.abs().max())))
        return q_embed, k_embed

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", recording)
    v_amax: dict[int, float] = {}
    handles = [layer.self_attn.v_proj.register_forward_hook(
        lambda _m, _a, out, i=i: v_amax.__setitem__(i, max(v_amax.get(i, 0.0), float(out.abs().max()))))
        for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for s in sequences:
            hf(torch.tensor([s]))
    for h in handles:
        h.remove()
    n = len(hf.model.layers)
    amax = {}
    for i in range(n):
        mine = calls[i::n]
        amax[f"model.layers.{i}.q_bmm_quant"] = max(q for q, _ in mine)
        amax[f"model.layers.{i}.k_cache_quant"] = max(k for _, k in mine)
        amax[f"model.layers.{i}.v_cache_quant"] = v_amax[i]
    return amax


def test_calibration_amax_matches_transformers_hooks(tiny_dir, hf_tiny, calib_file, monkeypatch):
    lm = load(str(tiny_dir), "float32")
    spec = CalibrationSpec(source=str(calib_file), num_samples=4, seq_len=32)
    seqs = calib.corpus(lm, spec)
    stats = calib.collect_amax(lm.model, seqs)
    ref = _hf_linear_input_amax(hf_tiny, seqs)
    assert len(ref) == 3 * 7
    for name, value in ref.items():
        assert stats[f"{name}.input"] == pytest.approx(value, rel=1e-5)
    attention = _hf_attention_amax(hf_tiny, seqs, monkeypatch)
    assert len(attention) == 3 * 3
    for name, value in attention.items():
        assert stats[name] == pytest.approx(value, rel=1e-5)
    # the model comes back unchanged
    assert all(type(m) is nn.Linear for n, m in lm.model.named_modules() if n.endswith("_proj"))
    assert lm.model.model.layers[0].self_attn.softmax_quant is None


def test_fp8_modelopt_recipe(tiny_dir, calib_file, monkeypatch):
    lm = load(str(tiny_dir), "float32")
    # text like the calibration corpus: activations stay inside the calibrated ranges
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    ref = lm.model(tokens)
    over = {"calibration": {"source": str(calib_file), "num_samples": 4, "seq_len": 32}}
    record = apply_recipe(lm, "fp8-modelopt", over)
    assert record["config"]["kv_scale_mode"] == "simulate" and record["config"]["calibration"]["num_samples"] == 4
    linears = [m for n, m in lm.model.named_modules() if n.endswith("_proj")]
    assert len(linears) == 21 and all(isinstance(m, FP8StaticLinear) for m in linears)
    assert type(lm.model.lm_head) is nn.Linear
    a = lm.model.model.layers[1].self_attn
    assert a.softmax_quant.scale == pytest.approx(1 / 448)
    assert isinstance(a.k_cache_quant, FP8StaticQuantizer) and isinstance(a.q_bmm_quant, FP8StaticQuantizer)
    out = lm.model(tokens)
    assert not torch.equal(out, ref)
    # every scale is the formula on the calibrated absmax: amax / 448 (Model Optimizer's max
    # calibration), K and V in ``simulate`` mode included
    stats = calib.collect_amax(load(str(tiny_dir), "float32").model,
                               calib.corpus(lm, CalibrationSpec(**over["calibration"])))
    for i, layer in enumerate(lm.model.model.layers):
        a = layer.self_attn
        for point in ("k_cache_quant", "v_cache_quant", "q_bmm_quant"):
            assert getattr(a, point).scale == pytest.approx(stats[f"model.layers.{i}.{point}"] / 448, rel=1e-6)
        for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            mod = getattr(a if name in ("q_proj", "o_proj") else layer.mlp, name)
            full = f"model.layers.{i}.{'self_attn' if name in ('q_proj', 'o_proj') else 'mlp'}.{name}"
            assert mod.input_scale == pytest.approx(stats[f"{full}.input"] / 448, rel=1e-6)
    # q/k/v and gate/up share one weight scale, the largest of their weights' absmax / 448, as a
    # deploying engine fuses them; o_proj and down_proj keep their own; fused_scales=false all own
    original = load(str(tiny_dir), "float32").model
    alone = load(str(tiny_dir), "float32")
    apply_recipe(alone, "fp8-modelopt", {**over, "fused_scales": False})
    for i in range(len(original.model.layers)):
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                      ["self_attn.o_proj"], ["mlp.down_proj"]):
            names = [f"model.layers.{i}.{n}" for n in group]
            amax = [float(original.get_submodule(n).weight.abs().max()) for n in names]
            for n, a in zip(names, amax):
                assert lm.model.get_submodule(n).weight_scale == pytest.approx(max(amax) / 448, rel=1e-6)
                assert alone.model.get_submodule(n).weight_scale == pytest.approx(a / 448, rel=1e-6)
    # deploy mode floors each K and V scale at 1.0 (Model Optimizer's export); the calibration
    # is reused from the cache
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("recalibrated")))
    lm2 = load(str(tiny_dir), "float32")
    apply_recipe(lm2, "fp8-modelopt", {**over, "kv_scale_mode": "deploy"})
    for i, layer in enumerate(lm2.model.model.layers):
        for point in ("k_cache_quant", "v_cache_quant"):
            want = max(stats[f"model.layers.{i}.{point}"] / 448, 1.0)
            assert getattr(layer.self_attn, point).scale == pytest.approx(want, rel=1e-6)
        assert layer.self_attn.q_bmm_quant.scale == pytest.approx(stats[f"model.layers.{i}.q_bmm_quant"] / 448)


def test_requantize_fused_hand_computed():
    """Two projections fused with the larger weight scale (1.5): the other's codes are
    dequantized in BF16, divided by 1.5 in BF16 and cast to E4M3 again."""
    from evalsuite.quant.fp8 import requantize_fused

    big = FP8StaticLinear(torch.tensor([[448.0, -2.0, 0.5]]), 1.5, 0.25, None)
    small = FP8StaticLinear(torch.tensor([[448.0, 13.0, 0.875]]), 0.5, 0.5, None)
    a, b = requantize_fused([big, small], torch.bfloat16)
    assert (a.weight_scale, a.input_scale, b.weight_scale, b.input_scale) == (1.5, 0.5, 1.5, 0.5)
    assert a.qweight.float().tolist() == [[448.0, -2.0, 0.5]]  # already at the shared scale
    # 448·0.5 / 1.5 = 149.33 -> BF16 149 -> E4M3 (spacing 16 in [128, 256)) 144;
    # 13·0.5 / 1.5 = 4.333 -> BF16 4.34375 -> E4M3 (spacing 0.5 in [4, 8)) 4.5;
    # 0.875·0.5 / 1.5 = 0.29167 -> BF16 0.291016 -> E4M3 (spacing 1/32 in [0.25, 0.5)) 0.28125
    assert b.qweight.float().tolist() == [[144.0, 4.5, 0.28125]]


def test_recipe_overrides_are_validated(tiny_dir):
    lm = load(str(tiny_dir), "float32")
    with pytest.raises(ValueError, match="has no settings \\['scale_ub'\\]; valid: activation_scale_ub"):
        apply_recipe(lm, "fp8-official", {"scale_ub": 3})
    with pytest.raises(ValueError, match="kv_scale_mode='exact'; valid: simulate, deploy"):
        apply_recipe(lm, "fp8-modelopt", {"kv_scale_mode": "exact"})


@pytest.mark.parametrize("kind", [pytest.param("rowwise", marks=needs_cpu_rowwise_scaled_mm), "static"])
def test_scaled_mm_kernel_matches_simulation(kind):
    """torch._scaled_mm (CPU) against the simulation: same E4M3 operands, float32 accumulation,
    scales applied before the one rounding to BF16, so at most a rare last-bit difference."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    q = FP8RowwiseLinear.from_linear(lin, 1200.0) if kind == "rowwise" else FP8StaticLinear.from_linear(lin, 3.0)
    x = torch.randn(5, 7, 256, dtype=torch.bfloat16)
    sim = q(x)
    q.use_kernel = True
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("this torch has no torch._scaled_mm")
    real = q(x)
    assert real.shape == sim.shape
    rel = (real.float() - sim.float()).norm() / sim.float().norm()
    assert rel < 1e-4  # a BF16 rounding of the unscaled sum (one more than the kernel) gives ~3e-3
    assert (real != sim).float().mean() < 0.01
    # the kernel reads the E4M3 weight only: the simulation's float32 copy exists while it runs
    assert q.qweight_f32.numel() == 0
    q.use_kernel = False
    assert torch.equal(q.qweight_f32, q.qweight.float()) and torch.equal(q(x), sim)


@needs_cpu_rowwise_scaled_mm
def test_scaled_mm_kernel_through_the_recipe(tiny_dir):
    """kernel=scaled_mm reaches every FP8 module, and the model computes what the simulation
    computes up to the kernel's summation order."""
    sim = load(str(tiny_dir), "bfloat16")
    apply_recipe(sim, "fp8-official")
    real = load(str(tiny_dir), "bfloat16")
    record = apply_recipe(real, "fp8-official", {"kernel": "scaled_mm"})
    assert record["config"]["kernel"] == "scaled_mm"
    mods = [m for m in real.model.modules() if isinstance(m, FP8RowwiseLinear)]
    assert len(mods) == 3 and all(m.use_kernel for m in mods)
    tokens = torch.tensor([real.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    a, b = sim.model(tokens).float(), real.model(tokens).float()
    assert (a - b).norm() / a.norm() < 1e-2


@needs_cpu_rowwise_scaled_mm
def test_a_kernel_that_cannot_run_here_falls_back_to_the_simulation(tiny_dir, tmp_path, monkeypatch):
    """Where torch._scaled_mm refuses the scales (torch 2.11's CPU kernel takes per-tensor scales
    only and fails an internal assert on row-wise ones; NVIDIA GPUs before sm_89 refuse FP8
    altogether), the recipe runs simulated, says so in a warning and in the kernel path, and its
    checkpoint keeps the request for a device where the kernel runs."""
    from evalsuite.bench import kernel_path
    from evalsuite.quant import fp8
    from evalsuite.quant.checkpoint import load_quantized, save_quantized

    real_scaled_mm = torch._scaled_mm

    def per_tensor_only(a, b, *, scale_a, scale_b, **kw):  # what torch 2.11 does on the CPU
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("(scale_a.numel() == 1 && scale_b.numel() == 1) INTERNAL ASSERT FAILED")
        return real_scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    def fresh():  # the probe with a cache of this test's own
        return functools.cache(fp8.scaled_mm_runs.__wrapped__)

    sim = load(str(tiny_dir), "bfloat16")
    apply_recipe(sim, "fp8-official")
    lm = load(str(tiny_dir), "bfloat16")
    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    monkeypatch.setattr(fp8, "scaled_mm_runs", fresh())
    with pytest.warns(UserWarning, match=r"torch._scaled_mm does not run on cpu with row-wise scales and "
                                         r"bfloat16 outputs .*INTERNAL ASSERT.*: those FP8 products run simulated"):
        record = apply_recipe(lm, "fp8-official", {"kernel": "scaled_mm"})
    mods = [m for m in lm.model.modules() if isinstance(m, FP8RowwiseLinear)]
    assert len(mods) == 3 and all(m.kernel_asked and not m.use_kernel for m in mods)
    assert kernel_path(record, lm.model) == kernel_path(get_recipe("fp8-official").record(), sim.model) + \
        " (the FP8 kernel asked for does not run on cpu)"
    tokens = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    assert torch.equal(lm.model(tokens), sim.model(tokens))  # the simulation's own numbers
    assert fp8.scaled_mm_runs("cpu", torch.bfloat16, False)  # per-tensor scales still run

    save_quantized(lm, record, tmp_path / "ckpt")
    monkeypatch.setattr(torch, "_scaled_mm", real_scaled_mm)
    monkeypatch.setattr(fp8, "scaled_mm_runs", fresh())
    loaded, _ = load_quantized(tmp_path / "ckpt")
    mods = [m for m in loaded.model.modules() if isinstance(m, FP8RowwiseLinear)]
    assert len(mods) == 3 and all(m.use_kernel for m in mods)
    assert kernel_path(record, loaded.model) == "FP8 torch._scaled_mm"


@pytest.mark.parametrize("kernel", ["off", "scaled_mm"])
def test_fp8_projections_with_shared_scales_run_fused(tiny_dir, calib_file, kernel):
    """With one scale per group, q/k/v and gate/up run as one FP8 product each (the modules'
    weights become views of it), simulated or on torch._scaled_mm, and compute what the
    separate projections compute; with per-projection scales they stay apart."""
    from evalsuite.quant.fp8 import FusedFP8

    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}, "kernel": kernel}
    lm = load(str(tiny_dir), "bfloat16")
    apply_recipe(lm, "fp8-modelopt", over)
    attn, mlp = lm.model.model.layers[1].self_attn, lm.model.model.layers[1].mlp
    assert isinstance(attn._fused, FusedFP8) and isinstance(mlp._fused, FusedFP8)
    assert attn.k_proj.qweight.untyped_storage().data_ptr() == attn._fused.inner.qweight.untyped_storage().data_ptr()
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox.")[:12]])
    fused, separate = fused_and_separate(lm.model, tokens)
    assert (fused - separate).norm() / separate.norm() < 1e-3
    apart = load(str(tiny_dir), "bfloat16")
    apply_recipe(apart, "fp8-modelopt", {**over, "fused_scales": False})
    assert apart.model.model.layers[1].self_attn._fused is None


def test_fp8_official_every_layer_when_asked(tiny_dir):
    lm = load(str(tiny_dir), "float32")
    apply_recipe(lm, "fp8-official", {"skip_first_and_last_layers": False})
    for layer in lm.model.model.layers:
        assert all(isinstance(getattr(layer.mlp, n), FP8RowwiseLinear) for n in ("gate_proj", "up_proj", "down_proj"))
        assert type(layer.self_attn.q_proj) is nn.Linear


def test_fp8_kv_cache_in_e4m3_gives_the_simulated_numbers(tiny_dir, calib_file):
    """fp8-modelopt as deployed on a GPU stores its KV cache as E4M3 codes (half the memory);
    the values read back are the quantizer's own, so scores and greedy tokens are the BF16-stored
    cache's exactly (forced here on the CPU, where the recipe keeps the BF16 cache)."""
    from evalsuite.engine.generate import DecodeBatch, SamplingParams, generate
    from evalsuite.engine.score import ScoreRequest, score

    lm = load(str(tiny_dir), "bfloat16")
    over = {"calibration": {"source": str(calib_file), "num_samples": 4, "seq_len": 32}, "kernel": "scaled_mm"}
    apply_recipe(lm, "fp8-modelopt", over)
    assert lm.model.cache_dtype == torch.bfloat16  # the CPU keeps the simulated (BF16-stored) cache
    prompts = [lm.tokenizer.encode(t) for t in ("The lazy dog jumps over", "A quick brown fox")]
    requests = [ScoreRequest(tuple(prompts[0]), (5, 6, 7)), ScoreRequest(tuple(prompts[0]), (9,)),
                ScoreRequest(tuple(prompts[1]), (11, 12))]
    params = SamplingParams(max_new_tokens=8)
    want = score(lm.model, requests), [g.tokens for g in generate(lm.model, prompts, params)]
    bf16_bytes = DecodeBatch(lm.model, 2, 64).cache.nbytes()
    lm.model.cache_dtype = torch.float8_e4m3fn
    got = score(lm.model, requests), [g.tokens for g in generate(lm.model, prompts, params)]
    assert got == want
    assert DecodeBatch(lm.model, 2, 64).cache.nbytes() * 2 == bf16_bytes


def test_fp8_modelopt_gives_a_layers_experts_one_input_scale(qwen3_moe_dir, calib_file, monkeypatch):
    """A mixture of experts' deployed FP8 kernels take one activation scale per layer and
    projection (the largest of the experts'); an expert that no calibration token reaches takes
    it too, not a scale of zero (here expert 0 of layer 0: its statistics are zeroed as an
    unrouted expert's are)."""
    from evalsuite.quant import fp8

    lm = load(str(qwen3_moe_dir), "float32")
    real = fp8.calibrate
    seen = {}

    def calibrate_without_expert_0(lm, spec):
        stats = dict(real(lm, spec))
        stats.update({f"model.layers.0.mlp.experts.0.{p}.input": 0.0 for p in ("gate_proj", "up_proj", "down_proj")})
        seen.update(stats)
        return stats

    monkeypatch.setattr(fp8, "calibrate", calibrate_without_expert_0)
    apply_recipe(lm, "fp8-modelopt", {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}})
    for i in (0, 2, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            scales = [lm.model.get_submodule(f"model.layers.{i}.mlp.experts.{e}.{proj}").input_scale for e in range(4)]
            top = max(seen[f"model.layers.{i}.mlp.experts.{e}.{proj}.input"] for e in range(4))
            assert top > 0 and scales == pytest.approx([top / 448.0] * 4), (i, proj)
