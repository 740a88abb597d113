"""INT4 block quantization and AWQ (awq_lite), against hand-computed values and plain rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.int4_awq import _AlphaSearch, alphas, awq_scale, weight_channel_mean
from evalsuite.quant.int4 import (INT4_KERNEL_MODES, Int4WeightOnlyLinear, int4_block_dequantize, int4_block_quantize,
                                  int4_fake_quantize, int4_kernel_available)


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
    search = _AlphaSearch(lin, x_mean, block_size=128, grid=alphas(10))
    with torch.no_grad():
        ref = search(x)
        rtn = (nn.functional.linear(x, int4_fake_quantize(lin.weight, 128)) - ref).pow(2).sum().item()
    assert min(search.errors) < 0.8 * rtn
    best = min(range(11), key=lambda i: search.errors[i])
    assert alphas(10)[best] > 0  # the activation term matters here


def test_int4_linear_applies_awq_prescale():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[7.0, -3.5, 0.4, 14.0]]))
    s = torch.tensor([1.0, 2.0, 1.0, 0.5])
    q = Int4WeightOnlyLinear.from_linear(lin, block_size=4, awq_scale=s)
    # W·s = [7, -7, 0.4, 7] -> scale 1 -> codes [7, -7, 0, 7]; y = (x / s) · codes
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert q(x).item() == pytest.approx(1 * 7 + 1 * -7 + 3 * 0 + 8 * 7)


@pytest.mark.parametrize("recipe", ["int4-awq", "int4-rtn"])
def test_int4_recipes(recipe, tiny_dir, calib_file):
    lm = load(str(tiny_dir), "float32")
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    ref = lm.model(tokens)
    over = {"calibration": {"source": str(calib_file), "num_samples": 4, "seq_len": 32}, "block_size": 32}
    record = apply_recipe(lm, recipe, over)
    assert record["config"]["awq"] == (recipe == "int4-awq")
    mods = {n: m for n, m in lm.model.named_modules() if n.endswith("_proj")}
    assert len(mods) == 21 and all(isinstance(m, Int4WeightOnlyLinear) for m in mods.values())
    assert all((m.input_scale is not None) == (recipe == "int4-awq") for m in mods.values())
    assert type(lm.model.lm_head) is nn.Linear
    out = lm.model(tokens)
    assert not torch.equal(out, ref)
    if recipe == "int4-rtn":  # same as putting block-rounded weights into the original linears
        plain = load(str(tiny_dir), "float32")
        with torch.no_grad():
            for n, m in plain.model.named_modules():
                if n.endswith("_proj"):
                    m.weight.copy_(int4_fake_quantize(m.weight, 32))
        assert torch.allclose(out, plain.model(tokens), atol=1e-5)


def test_awq_search_is_cached(tiny_dir, calib_file, monkeypatch):
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}, "block_size": 32}
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", over)
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("searched again")))
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", over)


def test_int4_cpu_kernel_matches_simulation():
    """The packed INT4 kernel against the dequantized reference, in BF16, with padding and AWQ."""
    if not int4_kernel_available(torch.bfloat16):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    torch.manual_seed(0)
    lin = nn.Linear(576, 192, bias=False).to(torch.bfloat16)  # 576 inputs: padded to 640
    s = (torch.rand(576) + 0.5)
    sim = Int4WeightOnlyLinear.from_linear(lin, 128, s, use_kernel=False)
    real = Int4WeightOnlyLinear.from_linear(lin, 128, s, use_kernel=True)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    y_real, y_sim = real(x), sim(x)
    assert real.last_path == "kernel" and sim.last_path == "simulated"
    assert (real.kernel.group, real.kernel.k) == (64, 576)  # blocks of 128 as pairs of 64: no input padding
    rel = (y_real.float() - y_sim.float()).norm() / y_sim.float().norm()
    assert rel < 1e-2
    assert real(torch.randn(64, 576, dtype=torch.bfloat16)).shape == (64, 192) and real.last_path == "simulated"
    always = Int4WeightOnlyLinear.from_linear(lin, 128, s, use_kernel=True, kernel_max_rows=INT4_KERNEL_MODES["always"])
    x = torch.randn(64, 576, dtype=torch.bfloat16)
    y_always = always(x)
    assert always.last_path == "kernel"
    assert (y_always.float() - sim(x).float()).norm() / sim(x).float().norm() < 1e-2


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
    awq = load(str(tiny_dir), "bfloat16")
    apply_recipe(awq, "int4-awq", {"block_size": 32, "calibration": {"source": str(calib_file), "num_samples": 2,
                                                                    "seq_len": 16}})
    assert awq.model.model.layers[0].self_attn._fused is None  # per-projection pre-scales: no fusion
