"""int8-w8a8 against llm-compressor itself (0.14.0.1, pinned in scripts/reference.txt) and against
vLLM's INT8 kernels as their source states them (hand-computed vectors).

Checked: inputs are quantized per token as vLLM's dynamic kernel does (scale absmax / 127, codes
rounded half to even from x · (127 / absmax), not x / scale); the product's int32 sums are exact
on both routes (``torch._int_mm`` and float32 GEMMs, whole rows and slices) with 3,000 inputs; the
weight scales are
compressed-tensors' ``calculate_qparams`` and GPTQ's INT8 codes are llm-compressor's
``quantize_weight`` bit for bit; llm-compressor's ``oneshot`` with SmoothQuantModifier(0.8) and
GPTQModifier(W8A8) on the tiny Llama and the recipe on the same calibration sequences give the
same norms, codes and scales (float32: every tensor), and the engine loads llm-compressor's
checkpoint as published and computes the recipe's logits exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evalsuite.models import check_model_args, load_model_and_recipe

from .conftest import calibration_sequences, changed_config_groups, llm_compressor_oneshot, on_meta_default


def test_inputs_are_quantized_per_token_as_vllms_kernel():
    """Row 0: 1.0 -> 127, -0.5 -> -63.5 -> -64 (half to even). Row 1: all zero -> codes 0, scale 0.
    Row 2 (absmax 3, 127 / 3 = 42.33333206 in float32): 1.807086706161499 (a float32) times it is
    76.5 in float32 -> 76 (half to even), where dividing by the scale 3 / 127 = 0.023622047 gives
    76.50000763 -> 77: vLLM multiplies; -3 -> -127; 0.1 -> 4.23 -> 4."""
    from evalsuite.quant.int8 import quantize_tokens

    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.807086706161499, -3.0, 0.1]])
    codes, scale = quantize_tokens(x)
    assert codes.dtype == torch.float32 and scale.dtype == torch.float32
    assert codes.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0], [127, 76, -127, 4]]
    assert scale.flatten().tolist() == [torch.tensor(1 / 127).item(), 0.0, torch.tensor(3 / 127).item()]


@pytest.mark.parametrize("largest, float32_gemms", [(127, 3), (20, 1)])
def test_the_int32_sums_are_exact_on_both_routes(largest, float32_gemms, monkeypatch):
    """3,000 inputs: both routes give the exact integer sums (float64 reference), rounded once to
    float32. Input codes up to 127 (one row all 127: its sums pass 2^24) take three float32 slices;
    codes up to 20 (128 · 20 · 3,000 < 2^24) one GEMM over the whole row."""
    import torch.nn.functional as F

    from evalsuite.quant.int8 import int_sums

    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-largest, largest + 1, (5, 3000), generator=g).float()
    xq[0] = largest
    codes = torch.randint(-128, 128, (24, 3000), generator=g, dtype=torch.int8)
    codes[0] = 127
    want = (xq.double() @ codes.double().t())
    assert (want[0, 0] > 2 ** 24) == (largest == 127)  # where one float32 GEMM over all 3,000 could be inexact
    assert torch.equal(int_sums(xq, codes, codes.float(), True), want.float())
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or linear(*a))
    assert torch.equal(int_sums(xq, codes, codes.float(), False), want.float())
    assert len(calls) == float32_gemms


def test_the_product_is_vllms_epilogue():
    """y = (acc · s_w) · s_x + bias in float32, rounded once to BF16; every route and the fused
    q/k/v product give the same bits."""
    from evalsuite.quant.int8 import Int8W8A8Linear, quantize_tokens

    g = torch.Generator().manual_seed(1)
    codes = [torch.randint(-128, 128, (n, 96), generator=g, dtype=torch.int8) for n in (32, 16, 16)]
    scales = [torch.rand(n, generator=g) / 50 for n in (32, 16, 16)]
    biases = [torch.randn(n, generator=g).bfloat16() for n in (32, 16, 16)]
    x = (torch.randn(2, 7, 96, generator=g) * 3).bfloat16()
    xq, xs = quantize_tokens(x.reshape(-1, 96))
    mods = [Int8W8A8Linear(c, s, b, torch.bfloat16) for c, s, b in zip(codes, scales, biases)]
    for c, s, b, m in zip(codes, scales, biases, mods):
        want = ((xq.double() @ c.double().t()).float() * s * xs + b.float()).bfloat16().view(2, 7, -1)
        for kernel in ("int_mm", "off", "auto"):
            m.kernel = kernel
            assert torch.equal(m(x), want), kernel
        assert m.last_path == "float32"  # auto: _int_mm on CUDA only
    fused = Int8W8A8Linear.fused(mods)
    assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))


def _w8a8_args(actorder: bool = True):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel",
                            actorder="static" if actorder else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gptq_int8_is_llm_compressors_quantize_weight(dtype):
    """compressed-tensors' channel scales, and llm-compressor's GPTQ on them with INT8 codes: the
    same dequantized weights, bit for bit."""
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from evalsuite.quant.gptq import gptq_codes
    from evalsuite.quant.int8 import INT8_MAX, INT8_MIN, channel_scales

    torch.manual_seed(0)
    rows, cols = 48, 256
    w = (torch.randn(rows, cols) * torch.rand(rows, 1)).to(dtype)
    x = torch.randn(500, cols) * torch.rand(cols) * 2
    hessian = 2 * x.t() @ x / 4
    args = _w8a8_args()
    want_scale, zero = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    scale = channel_scales(w)
    assert scale.dtype == dtype and torch.equal(scale, want_scale)
    want, _losses, fallback = quantize_weight(w.float()[None].clone(), hessian[None].clone(), want_scale[None],
                                              zero[None], None, args, blocksize=128, percdamp=0.01)
    assert not fallback.any()
    codes = gptq_codes(w, hessian, scale, cols, code_range=(INT8_MIN, INT8_MAX))
    assert torch.equal((codes.to(dtype) * scale).float(), want[0].float())
    assert codes.min() < -8 and codes.max() > 7  # the INT8 range, not INT4's


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """llm-compressor's W8A8 INT8 checkpoint of the tiny Llama (float32) as its W8A8 example makes
    one, SmoothQuantModifier(smoothing_strength=0.8) then GPTQModifier(scheme W8A8), in two steps
    as its default pipeline runs them (each modifier over the whole model): the smoothed model,
    and the checkpoint GPTQ makes of it. With the recipe's overrides for the same calibration
    sequences."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    root = tmp_path_factory.mktemp("int8")
    spec, sequences = calibration_sequences(
        tiny_dir, root, "Activations with outliers are hard to round to eight bits; smoothing moves part of "
        "their range into the weights that read them, which round easily. ")
    smoothing = SmoothQuantModifier(smoothing_strength=0.8)
    smoothed = llm_compressor_oneshot(tiny_dir, tiny_dir, sequences, smoothing, root / "smoothed")
    (smoothed / "recipe.yaml").unlink()  # a plain model now: oneshot would take up the recipe saved with it
    for f in tiny_dir.glob("tokenizer*"):
        shutil.copy(f, smoothed)
    gptq = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])  # as its W8A8 INT8 example
    theirs = llm_compressor_oneshot(smoothed, tiny_dir, sequences, gptq, root / "theirs")
    return smoothed, theirs, {"calibration": spec}, root / "cache"


def test_smoothquant_is_llm_compressors(tiny_dir, checkpoints, monkeypatch):
    """The recipe's smoothed norms are llm-compressor's: exactly where the inputs are the embeddings
    (layer 0, before q/k/v), within a few float32 ulps after them (the engine's float32 layers and
    transformers' differ in last bits, and so do the ranges that the scales come from)."""
    from safetensors.torch import load_file

    smoothed, _, overrides, cache = checkpoints
    monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
    ours = load_model_and_recipe(str(tiny_dir), "int8-w8a8", "float32", overrides=overrides | {"gptq": False})[0]
    plain = load_file(tiny_dir / "model.safetensors")
    want = load_file(smoothed / "model.safetensors")
    for i, layer in enumerate(ours.model.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{norm}.weight"
            got = getattr(layer, norm).weight
            assert not torch.allclose(want[key], plain[key], rtol=1e-2)  # SmoothQuant moved it
            if (i, norm) == (0, "input_layernorm"):
                assert torch.equal(got, want[key])
            else:
                assert ((got - want[key]).abs() / want[key].abs()).max() < 1e-6, key


def test_gptq_w8a8_computes_llm_compressors_checkpoint(checkpoints, monkeypatch):
    """On the smoothed model, the recipe's GPTQ and llm-compressor's give the same INT8 codes and
    scales for all 21 projections of 3 layers, each calibrated on the layers before it quantized;
    the engine loads that checkpoint as published and computes the recipe's logits exactly (also
    where a tensor made without the model's device would land on "meta")."""
    from evalsuite.quant.int8 import Int8W8A8Linear

    smoothed, theirs, overrides, cache = checkpoints
    monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
    ours, record = load_model_and_recipe(str(smoothed), "int8-w8a8", "float32",
                                         overrides=overrides | {"smoothquant": False})
    published, published_record = on_meta_default(lambda: load_model_and_recipe(str(theirs), "int8-w8a8", "float32"))
    assert published.model.config.published_recipe == "int8-w8a8"
    assert "published" in published_record and "published" not in record
    mine = {n: m for n, m in ours.model.named_modules() if isinstance(m, Int8W8A8Linear)}
    ref = {n: m for n, m in published.model.named_modules() if isinstance(m, Int8W8A8Linear)}
    assert set(mine) == set(ref) and len(ref) == 3 * 7
    for name, m in ref.items():
        assert torch.equal(mine[name].codes, m.codes), name
        assert torch.equal(mine[name].scale, m.scale), name
    plain = {n: m.weight for n, m in load_model_and_recipe(str(smoothed), "bf16", "float32")[0].model.named_modules()
             if n in ref}
    rounded = sum(int((torch.round(w / m.scale[:, None]).clamp(-128, 127) != m.codes).sum())
                  for (n, m), w in zip(ref.items(), plain.values()))
    assert rounded > 1000  # GPTQ moved codes from plain rounding
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(on_meta_default(lambda: published.model(tokens)), ours.model(tokens))


def test_a_cached_result_gives_the_same_model(tiny_dir, checkpoints, monkeypatch):
    """A second load reads the calibration cache (norms included) and computes the same logits."""
    _, _, overrides, cache = checkpoints
    monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
    first = load_model_and_recipe(str(tiny_dir), "int8-w8a8", "float32", overrides=overrides)[0]
    monkeypatch.setattr("evalsuite.quant.int8.calibrated", lambda *a: pytest.fail("calibrated again"))
    second = load_model_and_recipe(str(tiny_dir), "int8-w8a8", "float32", overrides=overrides)[0]
    tokens = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(first.model(tokens), second.model(tokens))


def test_a_published_w8a8_checkpoint_refuses_other_recipes_before_it_loads(checkpoints, monkeypatch):
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'int4-gptq': the checkpoint is published in compressed-tensors' "
                                         r"W8A8 INT8 form.*--recipe int8-w8a8"):
        check_model_args(str(checkpoints[1]), "int4-gptq")


@pytest.mark.parametrize("change, message", [
    ({"group_0.weights.strategy": "tensor"}, "weights strategy 'tensor'"),
    ({"group_0.input_activations.dynamic": False}, "input_activations dynamic False"),
    ({"group_0.input_activations.symmetric": False}, "input_activations symmetric False"),
])
def test_other_int8_schemes_are_refused_naming_what_differs(checkpoints, change, message):
    from evalsuite.engine.config import ModelConfig, UnsupportedModelError

    hf = changed_config_groups(checkpoints[1], change)
    with pytest.raises(UnsupportedModelError, match=r"a compressed-tensors checkpoint with .*" + message
                       + r".*W8A8 INT8 \(format int-quantized"):
        ModelConfig.from_hf(hf)


def test_smoothquant_needs_a_norm_before_the_projections(tmp_path, monkeypatch):
    """OLMo's layer has no norm before q/k/v or gate/up: refused before the model loads, naming the
    setting that fits."""
    from .conftest import tiny_olmo

    tiny_olmo("olmo3", vocab=400).save_pretrained(tmp_path / "olmo")
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"'int8-w8a8': SmoothQuant divides the norm.*olmo3.*valid: "
                                         r"--recipe-config smoothquant=false"):
        check_model_args(str(tmp_path / "olmo"), "int8-w8a8", None)


def test_the_export_is_llm_compressors_checkpoint(checkpoints, tmp_path, monkeypatch):
    """``quantize --format hf`` of the recipe (on the smoothed model) writes llm-compressor's
    checkpoint: every tensor and the quantization config."""
    from safetensors.torch import load_file

    from evalsuite.cli import main

    smoothed, theirs, overrides, cache = checkpoints
    monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
    assert main(["quantize", "--model", str(smoothed), "--recipe", "int8-w8a8", "--dtype", "float32",
                 "--recipe-config", "smoothquant=false", f"calibration={json.dumps(overrides['calibration'])}",
                 "--format", "hf", "--output", str(tmp_path / "ours")]) == 0
    config, want = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (tmp_path / "ours",
                                                                                               theirs))
    want.pop("version")  # compressed-tensors' own version number
    assert config == want
    mine, ref = load_file(tmp_path / "ours" / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(mine) == set(ref) and sum(t.dtype == torch.int8 for t in ref.values()) == 3 * 7
    for key, t in ref.items():
        assert (mine[key].dtype, mine[key].shape) == (t.dtype, t.shape), key
        assert torch.equal(mine[key], t), key
