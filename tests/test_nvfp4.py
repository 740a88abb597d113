"""NVFP4: E2M1 rounding and block scales against hand-computed values, the linear against a
scalar reference written from the format's definition, and the recipe on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.checkpoint import load_quantized, quantized_modules, save_quantized
from evalsuite.quant.nvfp4 import NVFP4Linear, block_values, e2m1_codes, e2m1_values, quantize_blocks, round_e2m1

from .conftest import fused_and_separate


def test_e2m1_rounds_to_nearest_ties_to_even():
    # midpoints go to the value whose mantissa bit is 0 (0, 1, 2, 4 and 6 even; 0.5, 1.5, 3 odd)
    x = torch.tensor([0.0, 0.25, 0.26, 0.74, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 4.9, 5.0, 5.1, 7.0, 1e9,
                      -0.75, -5.0, -0.1])
    want = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -4.0, -0.0]
    got = round_e2m1(x)
    assert got.tolist() == want and torch.signbit(got[-1])
    assert e2m1_codes(got).tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 6, 7, 7, 7, 10, 14, 8]  # bit 3: the sign
    assert torch.equal(e2m1_values(e2m1_codes(got)), got)


def test_block_scales_and_values_by_hand():
    """Tensor scale 1 (amax 6 * 448). Block 1: absmax 12, scale 12 / 6 = 2 (an E4M3 number);
    12, -3, 1 and 0.1 become 6, -1.5, 0.5 and 0 in FP4. Block 2: absmax 10, 10 / 6 = 1.667,
    E4M3's nearest 1.625 (1.101b: three mantissa bits); 10 / 1.625 = 6.15 -> 6, 5 / 1.625 = 3.08
    -> 3, 2 / 1.625 = 1.23 -> 1, -1 / 1.625 = -0.615 -> -0.5. An all-zero block: scale 0, zeros."""
    x = torch.zeros(3, 16)
    x[0, :4] = torch.tensor([12.0, -3.0, 1.0, 0.1])
    x[1, :4] = torch.tensor([10.0, 5.0, 2.0, -1.0])
    fp4, scale = quantize_blocks(x.reshape(1, 48), 1.0)
    assert scale.tolist() == [[2.0, 1.625, 0.0]]
    values = block_values(fp4, scale).reshape(3, 16)
    assert values[0, :4].tolist() == [12.0, -3.0, 1.0, 0.0]
    assert values[1, :4].tolist() == [6 * 1.625, 3 * 1.625, 1.625, -0.5 * 1.625]
    assert not values[2].any() and not values[:, 4:].any()
    # a tensor scale other than 1: the block scale is absmax / (6 s), saturating at E4M3's 448
    _, scale = quantize_blocks(torch.full((1, 16), 3.0), 3.0 / (6 * 448))
    assert scale.tolist() == [[448.0]]


def _reference_nvfp4(x: list[float], tensor_scale: float) -> list[float]:
    """One row through NVFP4, element by element, from the format's definition."""
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

    def nearest_e4m3(v: float) -> float:  # E4M3: 3 mantissa bits, exponents -6..8, subnormals 2^-9 apart
        if v == 0:
            return 0.0
        e = max(math.floor(math.log2(v)), -6)
        step = 2.0 ** (e - 3)
        q = round(v / step) * step  # Python's round: ties to even
        return min(q, 448.0)

    def nearest_e2m1(v: float) -> float:
        best = min(e2m1, key=lambda c: (abs(abs(v) - c), e2m1.index(c) % 2))  # ties: the even code
        return math.copysign(best, v)

    out = []
    for b in range(0, len(x), 16):
        block = x[b:b + 16]
        scale = nearest_e4m3(min(max(abs(v) for v in block) / (6 * tensor_scale), 448.0))
        step = scale * tensor_scale
        out += [nearest_e2m1(v / step) * step if step else 0.0 for v in block]
    return out


def test_linear_computes_the_product_of_both_quantized_operands():
    torch.manual_seed(0)
    w, x = torch.randn(5, 48), torch.randn(3, 48) * 4
    w_amax, x_amax = float(w.abs().max()), 20.0  # x's calibrated amax above its values here
    q = NVFP4Linear.from_linear(_linear(w), w_amax, x_amax)
    wq = torch.tensor([_reference_nvfp4(row, w_amax / 2688) for row in w.tolist()], dtype=torch.float64)
    xq = torch.tensor([_reference_nvfp4(row, x_amax / 2688) for row in x.tolist()], dtype=torch.float64)
    want = xq @ wq.T
    got = q(x).double()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (got - x.double() @ w.double().T).abs().max() > 1e-2  # quantized: not the exact product
    assert len(set(q.block_scale.float().flatten().tolist())) > 3


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin.requires_grad_(False)


def test_recipe_quantizes_every_projection_shares_fused_scales_and_round_trips(tiny_dir, calib_file, tmp_path,
                                                                              monkeypatch):
    lm = load(str(tiny_dir), "float32")
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    before = lm.model(tokens)
    record = apply_recipe(lm, "nvfp4", {"calibration": {"source": str(calib_file), "num_samples": 2,
                                                        "seq_len": 16}})
    names = quantized_modules(lm.model)
    layer = lm.model.model.layers[0]
    assert {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")} <= set(names)
    assert "lm_head" not in names and layer.self_attn.k_cache_quant is not None
    q, k, v = layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
    assert q.weight_tensor_scale == k.weight_tensor_scale == v.weight_tensor_scale
    assert q.input_scale == k.input_scale == v.input_scale
    assert layer.mlp.gate_proj.weight_tensor_scale == layer.mlp.up_proj.weight_tensor_scale
    assert layer.self_attn.o_proj.weight_tensor_scale != q.weight_tensor_scale
    after = lm.model(tokens)
    assert 0 < (after - before).abs().max() < before.abs().max()
    out = save_quantized(lm, record, tmp_path / "q")
    monkeypatch.setattr(calib, "corpus", lambda *a: (_ for _ in ()).throw(AssertionError("calibrated on load")))
    back, _ = load_quantized(out, "float32")
    assert torch.equal(back.model(tokens), after)


def test_projections_with_shared_scales_run_as_one_product(tiny_dir, calib_file):
    """With fused scales, q/k/v and gate/up quantize their input once and run one product each
    (the modules' weights become views of it), computing what the separate projections compute;
    with per-projection scales they stay apart."""
    from evalsuite.quant.nvfp4 import FusedNVFP4

    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    lm = load(str(tiny_dir), "bfloat16")
    apply_recipe(lm, "nvfp4", over)
    attn, mlp = lm.model.model.layers[1].self_attn, lm.model.model.layers[1].mlp
    assert isinstance(attn._fused, FusedNVFP4) and isinstance(mlp._fused, FusedNVFP4)
    assert attn.v_proj.weight_f32.untyped_storage().data_ptr() == attn._fused.weight_f32.untyped_storage().data_ptr()
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox.")[:12]])
    fused, separate = fused_and_separate(lm.model, tokens)
    assert (fused - separate).norm() / separate.norm() < 1e-3
    apart = load(str(tiny_dir), "bfloat16")
    apply_recipe(apart, "nvfp4", {**over, "fused_scales": False})
    assert apart.model.model.layers[1].self_attn._fused is None
    assert apart.model.model.layers[1].mlp._fused is None


def test_inputs_not_a_multiple_of_the_block_are_refused():
    with pytest.raises(ValueError, match="40 inputs are not a multiple of 16"):
        NVFP4Linear.from_linear(_linear(torch.randn(4, 40)), 1.0, 1.0)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_a_model_whose_projections_blocks_do_not_tile_is_refused_before_it_loads(arch, tiny_dir, tmp_path):
    """The refusal lists the recipes that fit this model: for a mixture of experts, not int4-awq."""
    import json
    import shutil

    from evalsuite.models import check_model_args

    from .conftest import make_tokenizer, tiny_moe

    if arch == "llama":
        shutil.copytree(tiny_dir, tmp_path / "m")
    else:
        tiny_moe("mixtral").save_pretrained(tmp_path / "m")
        make_tokenizer().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 168  # down_proj's inputs: 10.5 blocks
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    fits = "int4-awq-asym, int4-gptq" if arch == "mixtral" else "int4-awq, int4-awq-asym, int4-gptq"
    down = "mlp.experts.0.down_proj" if arch == "mixtral" else "mlp.down_proj"
    with pytest.raises(ValueError, match=rf"do not tile {down} \(168 inputs\).*; valid for this model: bf16, "
                                         rf"fp8-block, fp8-dynamic, fp8-modelopt, fp8-official, {fits}, int4-rtn, "
                                         rf"int8-w8a8$"):
        check_model_args(str(tmp_path / "m"), "nvfp4", None)


def test_an_all_zero_weight_or_input_stays_zero():
    q = NVFP4Linear.from_linear(_linear(torch.zeros(4, 32)), 0.0, 0.0)
    out = q(torch.zeros(2, 32))
    assert not out.isnan().any() and not out.any()
