"""int4-awq-asym (AutoAWQ's form): zero-point INT4, duo scaling, folding, clip search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from evalsuite.engine.load import load
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.int4 import (
    Int4WeightOnlyLinear,
    int4_asym_quantize,
    int4_block_dequantize,
    int4_fake_quantize,
    int4_kernel_available,
)
from evalsuite.quant.int4_awq_asym import (
    Int4AutoAWQConfig,
    duo_scale,
    fold_scales,
    group_weight_mean,
    layer_batches,
    search_clip,
    search_layer,
    search_scale,
)


def test_asym_int4_hand_computed():
    # min -1, max 2: scale 3/15 = 0.2, zero -round(-5) = 5; 0.5/0.2 = 2.5 ties to even 2 -> q 7
    codes, scale, zero = int4_asym_quantize(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), 4)
    assert (codes + 8).tolist() == [[0, 5, 7, 15]]
    assert scale[0].tolist() == pytest.approx([0.2]) and zero.tolist() == [[5]]
    assert int4_block_dequantize(codes, scale, 4, 4, zero)[0].tolist() == pytest.approx([-1.0, 0.0, 0.4, 2.0])


def test_asym_int4_padding_and_zero_clamp():
    # 6 inputs in blocks of 4: the second block holds [0.3, 0.9] and two padding slots that must
    # not count as zeros. min 0.3 > 0: scale 0.6/15 = 0.04, zero -round(7.5) = -8 clamps to 0, so
    # 0.3 -> round(7.5) = 8 -> 0.32 and 0.9 -> 22.5 -> 22 clamps to 15 -> 0.6 (AutoAWQ's formula).
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 0.3, 0.9]])
    codes, scale, zero = int4_asym_quantize(w, 4)
    assert codes.shape == (1, 8) and scale[0].tolist() == pytest.approx([0.2, 0.04]) and zero.tolist() == [[5, 0]]
    assert int4_fake_quantize(w, 4, asymmetric=True)[0].tolist() == pytest.approx([-1.0, 0.0, 0.4, 2.0, 0.32, 0.6])
    full = int4_block_dequantize(codes, scale, 8, 4, zero)
    assert full[0, 6:].tolist() == [0.0, 0.0]  # padding dequantizes to zero
    assert codes.min() >= -8 and codes.max() <= 7


def test_duo_scale_and_weight_mean_hand_computed():
    # x̄ = [1, 4], w̄ = [1, 0.25], r = 0.5: s = [1 / 1.0001, 2 / 0.5001] = [0.99990001, 3.99920016],
    # divided by sqrt(0.99990001 * 3.99920016) = 1.99970004
    s = duo_scale(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 0.25]), 0.5)
    assert s.tolist() == pytest.approx([0.50002500, 1.99990001], rel=1e-6)
    # r = 0 and x̄ irrelevant: s = 1 / (w̄ + 1e-4), normalised
    s0 = duo_scale(torch.tensor([5.0, 7.0]), torch.tensor([1.0, 0.25]), 0.0)
    raw = [1 / 1.0001, 1 / 0.2501]
    assert s0.tolist() == pytest.approx([r / math.sqrt(raw[0] * raw[1]) for r in raw], rel=1e-6)
    # rows normalised by block absmax (+1e-6): [0.5, 1], [1, 0.25] -> column means [0.75, 0.625]
    assert group_weight_mean(torch.tensor([[1.0, -2.0], [4.0, 1.0]]), 2).tolist() == pytest.approx([0.75, 0.625])


def test_scale_search_beats_plain_rounding_on_outlier_channels():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    x = torch.randn(512, 256)
    x[:, [3, 100, 200]] *= 40.0
    with torch.no_grad():
        ref = lin(x)
        rtn = (nn.functional.linear(x, int4_fake_quantize(lin.weight, 128, asymmetric=True)) - ref).pow(2).mean()
        w0 = lin.weight.clone()
        s = search_scale([lin], [x], lambda b: lin(x), [ref], 128, 20)
        assert torch.equal(lin.weight, w0)  # the search leaves the weights as found
        awq = (nn.functional.linear(x / s, int4_fake_quantize(lin.weight * s, 128, asymmetric=True)) - ref).pow(2).mean()
    assert awq < 0.8 * rtn


def test_clip_search_clips_a_weight_that_meets_no_input():
    # channel 0 holds a large weight but its input is always zero: clipping it gives the other
    # weights finer steps at no cost, so every row clips; each row's pick is the grid point that a
    # direct row-by-row evaluation finds best.
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    w[:, 0] = 10.0
    x = torch.randn(64, 8)
    x[:, 0] = 0.0
    best = search_clip(w, x, block_size=8, grid=20, max_shrink=0.5, tokens=512)
    assert best.shape == (4, 1) and (best < 10.0).all()
    for r in range(4):
        errs = []
        for i in range(10):
            c = 10.0 * (1 - i / 20)
            q = int4_fake_quantize(w[r:r + 1].clamp(-c, c), 8, asymmetric=True)
            errs.append(float(((x @ q.t()) - (x @ w[r:r + 1].t())).pow(2).mean()))
        assert best[r, 0].item() == pytest.approx(10.0 * (1 - errs.index(min(errs)) / 20))
    # with a large input on channel 0, clipping its weight costs more than it saves: no clip
    x[:, 0] = 5.0
    assert search_clip(w, x, 8, 20, 0.5, 512)[:, 0].tolist() == pytest.approx([10.0] * 4)


def _calib_batches(lm, calib_file):
    ids = lm.tokenizer.encode(calib_file.read_text())
    return layer_batches(lm.model, [ids[i:i + 32] for i in range(0, 128, 32)])


def test_folding_preserves_the_function_and_clip_skips_q_k(tiny_dir, calib_file):
    """With the found scales folded in (norms divided, projections multiplied) and nothing
    quantized, the model computes what it did before."""
    lm = load(str(tiny_dir), "float32")
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    ref = lm.model(tokens)
    batches = _calib_batches(lm, calib_file)
    config = Int4AutoAWQConfig(block_size=32)
    with torch.no_grad():
        for layer in lm.model.model.layers:
            found = search_layer(layer, batches, config)
            # tiny model: 4 heads, 2 KV heads -> v and o differ in shape, no v->o scale
            assert set(k for k in found if k.endswith(".scale")) == {"qkv.scale", "mlp.scale", "down.scale"}
            assert set(k for k in found if k.endswith(".clip")) == {
                f"{n}.clip" for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                      "mlp.down_proj")}
            assert not all(torch.allclose(found[k], torch.ones_like(found[k])) for k in found if k.endswith("scale"))
            batches = [(layer(x, c, s, st), c, s, st) for x, c, s, st in batches]
            for name, w in fold_scales(layer, found).items():
                layer.get_submodule(name).weight.copy_(w)
    assert torch.allclose(lm.model(tokens), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen1.5", "granite"])
def test_folding_into_a_linear_divides_its_bias_too(arch, calib_file, tmp_path):
    """Qwen1.5's attention (model type qwen2): as many KV heads as query heads, so o's scale folds
    into v_proj, whose rows carry a bias; Granite with mlp_bias: down's scale folds into up_proj,
    biased too (and its sublayer outputs scaled by the residual multiplier). Each bias divided by
    s with the weight's rows, the folded model computes what transformers' does with the
    original weights."""
    import transformers

    from .conftest import make_tokenizer, tiny_granite

    torch.manual_seed(13)
    if arch == "granite":
        hf = tiny_granite(vocab=400)
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256)).eval()
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.normal_(0, 0.5) if name.endswith("bias") else None
    hf.save_pretrained(tmp_path / "q")
    make_tokenizer().save_pretrained(tmp_path / "q")
    lm = load(str(tmp_path / "q"), "float32")
    batches = _calib_batches(lm, calib_file)
    with torch.no_grad():
        for layer in lm.model.model.layers:
            found = search_layer(layer, batches, Int4AutoAWQConfig(block_size=32, clip=False))
            group = "down.scale" if arch == "granite" else "o.scale"
            assert group in found and not torch.allclose(found[group], torch.ones_like(found[group]))
            batches = [(layer(x, c, s, st), c, s, st) for x, c, s, st in batches]
            for name, w in fold_scales(layer, found).items():
                layer.get_submodule(name).weight.copy_(w)
        tokens = torch.randint(0, 400, (2, 30))
        assert (lm.model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_autoawq_recipe(tiny_dir, calib_file):
    lm = load(str(tiny_dir), "float32")
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    ref = lm.model(tokens)
    norms = [layer.input_layernorm.weight.clone() for layer in lm.model.model.layers]
    over = {"calibration": {"source": str(calib_file), "num_samples": 4, "seq_len": 32}, "block_size": 32}
    record = apply_recipe(lm, "int4-awq-asym", over)
    assert record["config"]["n_grid"] == 20 and record["config"]["block_size"] == 32
    mods = {n: m for n, m in lm.model.named_modules() if n.endswith("_proj")}
    assert len(mods) == 21 and all(isinstance(m, Int4WeightOnlyLinear) for m in mods.values())
    assert all(m.zero_point is not None and m.pre_quant_scale is None for m in mods.values())  # scales are folded
    assert type(lm.model.lm_head) is nn.Linear
    assert not torch.equal(lm.model.model.layers[0].input_layernorm.weight, norms[0])
    out = lm.model(tokens)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    # closer to the unquantized model than plain asymmetric rounding of every projection
    plain = load(str(tiny_dir), "float32")
    with torch.no_grad():
        for n, m in plain.model.named_modules():
            if n.endswith("_proj"):
                m.weight.copy_(int4_fake_quantize(m.weight, 32, asymmetric=True))
    assert (out - ref).norm() < (plain.model(tokens) - ref).norm()


def hand_int4_layer(out: int, inp: int, block: int, asymmetric: bool, seed: int = 0):
    """Codes, scales and zero points chosen by hand (random, but every weight (q - z)·s with a
    power-of-two s is exact in BF16), the module built from them, and the exact float64 weight."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-inp // block)
    q = torch.randint(0, 16, (out, blocks * block), generator=g)
    scale = 2.0 ** torch.randint(-9, -5, (out, blocks), generator=g).float()
    zero = torch.randint(0, 16, (out, blocks), generator=g) if asymmetric else torch.full((out, blocks), 8)
    z_cols = zero.repeat_interleave(block, dim=1)
    q[:, inp:] = z_cols[:, inp:]  # padding holds the zero point: it dequantizes to 0
    w = ((q - z_cols).double() * scale.double().repeat_interleave(block, dim=1))[:, :inp]
    module = lambda use_kernel, rows=4: Int4WeightOnlyLinear(  # noqa: E731
        (q - 8).to(torch.int8), scale, inp, block, None, None, torch.bfloat16, use_kernel,
        zero.to(torch.uint8) if asymmetric else None, kernel_max_rows=rows)
    return module, w


def assert_within_bf16_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x·wᵀ computed with float32 sums and one BF16 rounding: within one BF16 ulp (2^-8
    relative, doubled for the kernel's rounding of its own partial sums) plus float32 summation
    error, against the float64 product."""
    exact = x.double() @ w.T
    bound = 2.0 ** -7 * exact.abs() + 1e-5 * (x.double().abs() @ w.abs().T)
    assert ((y.double() - exact).abs() <= bound).all(), float(((y.double() - exact).abs() / bound).max())


@pytest.mark.parametrize("asymmetric", [True, False])
def test_int4_kernel_and_simulation_compute_hand_built_weights(asymmetric):
    if not int4_kernel_available(torch.bfloat16):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    module, w = hand_int4_layer(192, 576, 128, asymmetric)  # 576 inputs: blocks of 128, padded
    sim, real = module(False), module(True)
    torch.testing.assert_close(sim.weight.double(), w, rtol=0, atol=0)  # the dequantized weight is exact
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    y_sim, y_real = sim(x), real(x)
    assert real.last_path == "kernel" and sim.last_path == "simulated"
    assert (real.kernel.group, real.kernel.k) == (64, 576)  # blocks of 128 as pairs of 64: no input padding
    assert_within_bf16_rounding(y_sim, x, w)
    assert_within_bf16_rounding(y_real, x, w)


def test_asym_export_round_trip_with_an_odd_zero_point_count():
    torch.manual_seed(0)
    codes, scale, zero = int4_asym_quantize(torch.randn(3, 12), 4)  # 3 rows x 3 blocks = 9 zero points
    m = Int4WeightOnlyLinear(codes, scale, 12, 4, None, None, torch.float32, False, zero)
    tensors, attrs = m.export()
    assert tensors["packed_zero_point"].numel() == 5  # two per byte
    back = Int4WeightOnlyLinear.from_export(tensors, attrs, torch.float32)
    assert torch.equal(back.zero_point, zero) and torch.equal(back.weight, m.weight)
