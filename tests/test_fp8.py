"""FP8 E4M3 numerics and the fp8-official recipe, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evalsuite.engine.load import load_folder
from evalsuite.quant.api import apply_recipe, get_recipe
from evalsuite.quant.fp8 import (MIN_SCALE, FP8OfficialConfig, FP8RowwiseLinear, per_channel_scale,
                                 per_token_scale, round_e4m3)

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
    model = load_folder(tiny_dir, torch.float32)
    before = {n: m for n, m in model.named_modules()}
    tokens = torch.randint(0, 400, (1, 30))
    ref = model(tokens)
    record = apply_recipe(model, "fp8-official")
    assert record["config"] == {"activation_scale_ub": 1200.0, "skip_first_and_last_layers": True}
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
    with pytest.raises(KeyError, match="valid: bf16, fp8-official"):
        get_recipe("fp8")
