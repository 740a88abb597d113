"""INT4 block quantization and AWQ (awq_lite), against hand-computed values and plain rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.configs import INT4_KERNEL_MODES
from evalsuite.quant.int4 import (
    Int4WeightOnlyLinear,
    int4_block_dequantize,
    int4_block_quantize,
    int4_fake_quantize,
    int4_kernel_available,
)
from evalsuite.quant.int4_awq import _AlphaSearch, alphas, awq_scale, weight_channel_mean


def test_int4_block_hand_computed():
    # block absmax 14 -> scale 2; 7/2 = 3.5 ties to even 4; -3.5/2 = -1.75 -> -2; 0.4/2 -> 0
    codes, scale = int4_block_quantize(torch.tensor([[7.0, -3.5, 0.4, 14.0]]), block_size=4)
    assert codes.tolist() == [[4, -2, 0, 7]] and scale.tolist() == [[2.0]]
    assert int4_block_dequantize(codes, scale, 4, 4).tolist() == [[8.0, -4.0, 0.0, 14.0]]


def test_int4_padding_when_in_features_is_not_a_block_multiple():
    w = torch.tensor([[1.0, 2.0, 3.0, 7.0, -0.7, 0.35]])  # 6 inputs, blocks of 4 -> padded to 8
    codes, scale = int4_block_quantize(w, block_size=4)
    assert codes.shape == (1, 8) and codes[0, 6:].tolist() == [0, 0]
    assert scale[0].tolist() == pytest.approx([1.0, 0.1])  # 7/7 and 0.7/7: the padding changes no absmax
    # 0.35 / 0.1 = 3.5 -> 4 (ties to even): 0.4
    assert int4_fake_quantize(w, 4)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 7.0, -0.7, 0.4])
    assert codes.min() >= -8 and codes.max() <= 7


def test_awq_scale_formula_hand_computed():
    # x̄ = [1, 4], w̄ = [1, 0.25], α = 0.5: s = [1, 2 / 0.5] = [1, 4], / sqrt(4 * 1) -> [0.5, 2]
    s = awq_scale(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 0.25]), 0.5)
    assert s.tolist() == pytest.approx([0.5, 2.0])
    assert awq_scale(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), 1.0).tolist() == pytest.approx([1e-2, 1e2])
    assert alphas(10) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_weight_channel_mean_hand_computed():
    # rows normalised by block absmax: [0.5, 1], [1, 0.25] -> column means [0.75, 0.625]
    assert weight_channel_mean(torch.tensor([[1.0, -2.0], [4.0, 1.0]]), 2).tolist() == pytest.approx([0.75, 0.625])


def test_awq_beats_plain_rounding_on_outlier_channels():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    x = torch.randn(512, 256)
    x[:, [3, 100, 200]] *= 40.0  # activation outlier channels, as in real LLMs
    x_mean = x.abs().mean(dim=0)
    search = _AlphaSearch(lin, x_mean, block_size=128, grid=alphas(10), keep=True)
    unkept = _AlphaSearch(lin, x_mean, block_size=128, grid=alphas(10), keep=False)  # a model too big to keep them
    with torch.no_grad():
        ref = search(x)
        assert torch.equal(unkept(x), ref)
        rtn = (nn.functional.linear(x, int4_fake_quantize(lin.weight, 128)) - ref).pow(2).sum().item()
    assert min(search.errors) < 0.8 * rtn
    assert unkept.qweights is None and unkept.errors == search.errors  # the same candidates, made per batch
    best = min(range(11), key=lambda i: search.errors[i])
    assert alphas(10)[best] > 0  # the activation term matters here


def test_int4_linear_applies_awq_prescale(tiny_dir):
    """The recipe's smoothing of a projection by hand: W / p = [7, -7, 0.4, 7] -> block scale 1 ->
    codes [7, -7, 0, 7]; y = (x · p) · codes."""
    from evalsuite.quant.int4_awq import smoothed

    model = load(str(tiny_dir), "float32").model
    lin = nn.Linear(4, 1, bias=False).requires_grad_(False)
    lin.weight.copy_(torch.tensor([[7.0, -3.5, 0.4, 14.0]]))
    model.model.layers[0].self_attn.o_proj = lin  # o_proj: no group, no norm to fold into
    p = torch.tensor([1.0, 0.5, 1.0, 2.0])
    weights, scales = smoothed(model, {"model.layers.0.self_attn.o_proj": p}, resmooth=False)
    name = "model.layers.0.self_attn.o_proj"
    q = Int4WeightOnlyLinear.from_linear(lin, block_size=4, weight=weights[name], pre_quant_scale=scales[name])
    assert q.codes.tolist() == [[7, -7, 0, 7]]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert q(x).item() == pytest.approx(1 * 7 + 1 * -7 + 3 * 0 + 8 * 7)


def _rtn_reference(w: np.ndarray, block: int) -> np.ndarray:
    """The documented rule, written out with numpy in float32, block by block: scale = block
    absmax / 7, codes = round half to even of w / scale, clamped to [-8, 7]; zero padding."""
    rows, cols = w.shape
    padded = np.zeros((rows, -(-cols // block) * block), dtype=np.float32)
    padded[:, :cols] = w
    out = np.zeros_like(padded)
    for r in range(rows):
        for b in range(0, padded.shape[1], block):
            blk = padded[r, b:b + block]
            scale = np.float32(np.abs(blk).max()) / np.float32(7)
            if scale == 0:
                continue
            codes = np.clip(np.round(blk / scale), -8, 7)  # np.round: half to even
            out[r, b:b + block] = codes * scale
    return out[:, :cols]


def test_int4_rtn_recipe_weights_are_the_documented_rounding(tiny_dir):
    lm = load(str(tiny_dir), "float32")
    originals = {n: m.weight.detach().numpy().copy() for n, m in lm.model.named_modules() if n.endswith("_proj")}
    record = apply_recipe(lm, "int4-rtn", {"block_size": 32})
    assert record["config"]["awq"] is False
    mods = {n: m for n, m in lm.model.named_modules() if n.endswith("_proj")}
    assert len(mods) == 21 and all(isinstance(m, Int4WeightOnlyLinear) and m.pre_quant_scale is None
                                   for m in mods.values())
    assert type(lm.model.lm_head) is nn.Linear
    for name, w in originals.items():
        np.testing.assert_array_equal(mods[name].weight.numpy(), _rtn_reference(w, 32), err_msg=name)


def _with_outlier_channels(tiny_dir, tmp_path):
    """The tiny model with three hidden channels scaled up 100x in every RMSNorm weight: the inputs
    of q/k/v and gate/up get the activation outliers real LLMs have (the case AWQ is for)."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "outliers"
    shutil.copytree(tiny_dir, d)
    state = load_file(str(d / "model.safetensors"))
    for k, v in state.items():
        if k.endswith("layernorm.weight"):
            v[[3, 17, 40]] *= 100.0
    save_file(state, str(d / "model.safetensors"))
    return d


def test_awq_output_error_is_below_plain_rounding_on_outlier_inputs(tiny_dir, calib_file, tmp_path):
    folder = _with_outlier_channels(tiny_dir, tmp_path)
    over = {"calibration": {"source": str(calib_file), "num_samples": 4, "seq_len": 32}, "block_size": 32}
    ref = load(str(folder), "float32")
    tokens = torch.tensor([ref.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    want = ref.model(tokens)
    errors = {}
    for recipe in ("int4-awq", "int4-rtn"):
        lm = load(str(folder), "float32")
        apply_recipe(lm, recipe, over)
        errors[recipe] = float((lm.model(tokens) - want).pow(2).mean())
    assert errors["int4-awq"] < 0.8 * errors["int4-rtn"], errors


def test_awq_search_is_cached(tiny_dir, calib_file, monkeypatch):
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}, "block_size": 32}
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", over)
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("searched again")))
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", over)


def test_int4_kernel_paths_and_awq_prescale():
    """Which path runs for how many rows (auto: the kernel up to 4 rows; always: every call), and
    the AWQ pre-scale on the kernel path; the products themselves are checked against hand-built
    weights in test_int4_awq_asym."""
    if not int4_kernel_available(torch.bfloat16):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    from .test_int4_awq_asym import assert_within_bf16_rounding, hand_int4_layer

    module, w = hand_int4_layer(64, 256, 128, asymmetric=False)
    auto = module(True)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    auto(x[:4])
    assert auto.last_path == "kernel"
    auto(x)
    assert auto.last_path == "simulated"
    always = module(True, rows=INT4_KERNEL_MODES["always"])
    assert_within_bf16_rounding(always(x), x, w)
    assert always.last_path == "kernel"
    # AWQ: the input is multiplied by the pre-quant scale before the product (powers of two: exact)
    p = 2.0 ** torch.randint(-1, 2, (256,), generator=torch.Generator().manual_seed(3)).float()
    always.pre_quant_scale = p.bfloat16()
    assert_within_bf16_rounding(always(x[:2]), (x[:2].double() * p.double()).bfloat16(), w)


def test_unscaled_int4_projections_fuse_and_match_unfused(tiny_dir, calib_file):
    """int4-rtn has no AWQ pre-scale: q/k/v and gate/up run as one product each, on the kernel
    too, and give what the separate projections give."""
    from evalsuite.quant.int4 import FusedInt4

    if not int4_kernel_available(torch.bfloat16):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    lm = load(str(tiny_dir), "bfloat16")
    apply_recipe(lm, "int4-rtn", {"block_size": 32, "kernel": "always"})
    layer = lm.model.model.layers[1]
    assert isinstance(layer.self_attn._fused, FusedInt4) and isinstance(layer.mlp._fused, FusedInt4)
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox.")[:12]])
    fused = lm.model(tokens).float()
    assert layer.self_attn.q_proj.last_path == "kernel"
    for layer in lm.model.model.layers:
        layer.self_attn._fused = layer.mlp._fused = None
    separate = lm.model(tokens).float()
    assert (fused - separate).norm() / separate.norm() < 1e-2
    over = {"block_size": 32, "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    per_projection = load(str(tiny_dir), "bfloat16")
    apply_recipe(per_projection, "int4-awq", {**over, "resmooth": False})
    per_projection.model(tokens)
    assert per_projection.model.model.layers[0].self_attn._fused is None  # per-projection pre-scales: no fusion
    resmoothed = load(str(tiny_dir), "bfloat16")
    apply_recipe(resmoothed, "int4-awq", over)
    resmoothed.model(tokens)
    attn = resmoothed.model.model.layers[0].self_attn
    assert isinstance(attn._fused, FusedInt4) and attn.q_proj.pre_quant_scale is None
    assert attn.o_proj.pre_quant_scale is not None  # o_proj keeps its own pre-scale


def test_resmooth_folds_one_scale_per_group_into_the_norm(tiny_dir):
    """Model Optimizer's export: q/k/v (and gate/up) end with weights W / p̄ and their norm with
    weight γ·p̄, p̄ the mean of the projections' pre-quant scales p (written out here as that
    closed form); o_proj and down_proj keep W / p and their p. Unquantized, with each of those
    multiplying its input by its p, the model computes what it did."""
    from evalsuite.quant.int4_awq import smoothed

    lm = load(str(tiny_dir), "float32")
    model = lm.model
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox.")[:12]])
    want = model(tokens)
    g = torch.Generator().manual_seed(5)
    mods = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    pre = {n: torch.exp(torch.randn(m.weight.shape[1], generator=g) * 0.5) for n, m in mods.items()}
    norms = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("layernorm")}
    weights, scales = smoothed(model, pre, resmooth=True)
    assert sorted(scales) == sorted(n for n in mods if n.endswith(("o_proj", "down_proj")))
    for layer in range(len(model.model.layers)):
        for norm, names in ((f"model.layers.{layer}.input_layernorm", ["self_attn.q_proj", "self_attn.k_proj",
                                                                       "self_attn.v_proj"]),
                            (f"model.layers.{layer}.post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])):
            names = [f"model.layers.{layer}.{n}" for n in names]
            p_mean = sum(pre[n].double() for n in names) / len(names)
            torch.testing.assert_close(model.get_submodule(norm).weight.double(), norms[norm].double() * p_mean,
                                       rtol=1e-6, atol=0)
            for n in names:
                torch.testing.assert_close(weights[n].double(), mods[n].weight.double() / p_mean, rtol=1e-5, atol=1e-7)
    for n in scales:
        assert torch.equal(scales[n], pre[n])
        torch.testing.assert_close(weights[n], mods[n].weight / pre[n][None, :], rtol=1e-6, atol=0)
    with torch.no_grad():
        for n, w in weights.items():
            if n not in scales:  # o_proj and down_proj: W / p would need its input multiplied by p
                mods[n].weight.copy_(w)
    torch.testing.assert_close(model(tokens), want, rtol=1e-4, atol=1e-4)


def test_int4_awq_records_keep_their_identity_without_an_fp8_kv_cache():
    """fp8_kv_cache came after int4-awq runs were recorded: at its default the record is the one
    those runs hold (so they resume), and only a run that asks for it records it."""
    from evalsuite.quant.api import configured_recipe

    before = ["block_size", "awq", "alpha_steps", "calibration", "kernel", "resmooth"]
    assert list(configured_recipe("int4-awq").record()["config"]) == before
    assert configured_recipe("int4-awq", {"fp8_kv_cache": True}).record()["config"]["fp8_kv_cache"] is True
