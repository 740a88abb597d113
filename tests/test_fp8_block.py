"""fp8-block: weight tiles against transformers' fine-grained FP8 quantizer (the one that writes
``quant_method: fp8`` checkpoints), input groups against hand-computed values, the product against
the kernel's per-group sum written out in float64, and the recipe on the tiny model."""

from __future__ import annotations

import re
import types

import pytest
import torch

from evalsuite.engine.load import load
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.checkpoint import load_quantized, quantized_modules, save_quantized
from evalsuite.quant.fp8_block import FP8BlockLinear, FusedFP8Block, quantize_input, quantize_weight, weight_values

from .conftest import fused_and_separate


def _weight_with_every_kind_of_tile() -> torch.Tensor:
    """[384, 256]: tiles of very different ranges, one all zero, values that land between E4M3 codes."""
    torch.manual_seed(0)
    w = torch.randn(384, 256)
    w[:128, :128] *= 1e-3
    w[128:256, 128:] *= 50
    w[256:, :128] = 0
    return w.to(torch.bfloat16)


def test_weight_tiles_are_transformers_fine_grained_fp8_quantizer_s():
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    w = _weight_with_every_kind_of_tile()
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=types.SimpleNamespace(
        weight_block_size=[128, 128], scale_fmt=None)))
    ref = quantizer.convert({"layer.weight": w})
    codes, scale = quantize_weight(w, 128)
    assert ref["layer.weight"].dtype == codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.view(torch.uint8), ref["layer.weight"].view(torch.uint8))  # every code, bit for bit
    assert torch.equal(scale, ref["layer.weight_scale_inv"])
    assert scale[2, 0] == 1.0 and scale.shape == (3, 2)  # the all-zero tile
    assert len(set(scale.flatten().tolist())) == 6


def test_dequantized_weight_is_transformers_own():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = _weight_with_every_kind_of_tile()
    codes, scale = quantize_weight(w, 128)
    assert torch.equal(weight_values(codes, scale, 128), _dequantize_fp8_weight(codes, scale, [128, 128],
                                                                                torch.float32))


def test_partial_tiles_take_the_scale_of_what_they_hold():
    """150 x 200 in tiles of 128: the edge tiles' scales come from their own values."""
    torch.manual_seed(1)
    w = torch.randn(150, 200)
    w[128:, 128:] *= 0.01  # the corner tile: small values, its own small scale
    codes, scale = quantize_weight(w, 128)
    assert codes.shape == (150, 200) and scale.shape == (2, 2)
    for (r, c), (rows, cols) in {(0, 0): (slice(0, 128), slice(0, 128)), (1, 1): (slice(128, 150), slice(128, 200)),
                                 (0, 1): (slice(0, 128), slice(128, 200))}.items():
        amax = w[rows, cols].abs().max()
        assert scale[r, c] == 1.0 / (448.0 / amax)
    back = weight_values(codes, scale, 128)
    # within half an E4M3 step of each value: 2^-4 relative, or 2^-10 x the tile's scale among subnormals
    subnormal_step = weight_values(torch.ones_like(codes), scale, 128) * 2 ** -10
    assert ((back - w).abs() <= torch.maximum(w.abs() * 2 ** -4, subnormal_step) * (1 + 1e-6)).all()


def test_input_groups_by_hand():
    """Groups of 4 along the input: absmax / 448 per group, x / scale rounded to E4M3 (3 mantissa
    bits: spacing 0.25 between 2 and 4), an all-zero group zero, the partial last group on its own."""
    x = torch.tensor([[448.0, 1.0, -3.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, -0.35]])
    got = quantize_input(x, 4)
    # group 1: scale 1 -> 448, 1, -3.25, 0; group 2: zero; group 3 (0.7, -0.35): scale 0.7 / 448,
    # -0.35 / scale = -224 exactly
    want = torch.tensor([[448.0, 1.0, -3.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, -0.35]])
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    y = torch.tensor([[1.0, 0.01, 0.003, 100.0]])  # scale 100 / 448
    got = quantize_input(y, 4)[0]
    s = 100.0 / 448.0
    assert got[3] == pytest.approx(100.0, rel=1e-6)
    assert got[0] == pytest.approx(4.5 * s, rel=1e-6)  # 4.48 -> 4.5 (spacing 0.5 in [4, 8))
    assert got[1] == pytest.approx(11 * 2 ** -8 * s, rel=1e-6)  # 0.0448 -> 11 x 2^-8 (spacing 2^-8 in [2^-5, 2^-4))
    assert got[2] == pytest.approx(7 * 2 ** -9 * s, rel=1e-6)  # 0.01344 -> 7 x 2^-9: a subnormal


def test_linear_is_the_kernels_per_group_sum():
    """y = sum over groups g of (E4M3 x_g . E4M3 w_g) x scale_x[g] x scale_w[tile, g], in float64
    here, from the codes and scales the quantizers give."""
    torch.manual_seed(2)
    w, x = torch.randn(200, 300), torch.randn(5, 300) * torch.logspace(-2, 2, 300)
    q = FP8BlockLinear.from_linear(_linear(w), 128)
    codes, scale = q.qweight.double(), q.weight_scale_inv.double()
    want = torch.zeros(5, 200, dtype=torch.float64)
    for g in range(3):
        cols = slice(128 * g, min(128 * (g + 1), 300))
        xs = x[:, cols].abs().amax(dim=1, keepdim=True) / 448.0
        xq = (x[:, cols] / xs).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        part = xq @ codes[:, cols].T
        w_scale = scale[:, g].repeat_interleave(128)[:200]
        want += part * xs.double() * w_scale[None, :]
    got = q(x).double()
    magnitude = x.double().abs() @ w.double().abs().T  # the float32 sums' rounding is relative to this
    assert ((got - want).abs() <= 1e-6 * magnitude).all()
    assert (got - x.double() @ w.double().T).abs().max() > 1e-2  # quantized: not the exact product


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin.requires_grad_(False)


def test_recipe_quantizes_every_projection_fuses_and_round_trips(tiny_dir, tmp_path):
    lm = load(str(tiny_dir), "float32")
    tokens = torch.tensor([lm.tokenizer.encode("The lazy dog jumps over the quick brown fox. " * 3)[:30]])
    before = lm.model(tokens)
    record = apply_recipe(lm, "fp8-block")
    names = quantized_modules(lm.model)
    assert len(names) == 7 * len(lm.model.model.layers) and "lm_head" not in names
    assert set(names.values()) == {"FP8BlockLinear"}
    attn, mlp = lm.model.model.layers[0].self_attn, lm.model.model.layers[0].mlp
    assert attn.k_cache_quant is None and attn.q_bmm_quant is None  # attention and cache as they were
    assert isinstance(attn._fused, FusedFP8Block) and isinstance(mlp._fused, FusedFP8Block)
    after = lm.model(tokens)
    assert 1e-4 < (after - before).norm() / before.norm() < 0.5
    x = torch.randn(1, 7, lm.model.config.hidden_size)
    one = attn._fused(x)  # the input's groups do not depend on the projection: the same sums, in another order
    apart = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    assert (one - apart).abs().max() <= 1e-5 * apart.abs().max()
    fused, separate = fused_and_separate(lm.model, tokens)  # through the layers, an ulp may flip a later rounding
    assert (fused - separate).norm() / separate.norm() < 1e-3
    out = save_quantized(lm, record, tmp_path / "q")
    back, back_record = load_quantized(out, "float32")
    assert back_record["name"] == "fp8-block" and torch.equal(back.model(tokens), after)


def test_a_mixture_keeps_its_routers(qwen3_moe_dir):
    lm = load(str(qwen3_moe_dir), "float32")
    apply_recipe(lm, "fp8-block")
    names = quantized_modules(lm.model)
    assert "model.layers.0.mlp.experts.3.down_proj" in names and "model.layers.0.mlp.gate" not in names
    tokens = torch.tensor([[5, 9, 2, 7, 1, 8]])
    assert torch.isfinite(lm.model(tokens)).all()


def test_bad_block_size_is_refused_before_a_model_loads():
    from evalsuite.quant.api import configured_recipe

    with pytest.raises(ValueError, match="block_size=0; valid: an integer >= 1"):
        configured_recipe("fp8-block", {"block_size": 0})


def _fp8_checkpoints(root):
    """A tiny Llama whose projections 128 tiles (hidden 128, four heads of 32, MLP 256) saved
    twice: unquantized, and as a fine-grained FP8 checkpoint is published, every projection's
    E4M3 weight and ``weight_scale_inv`` written by transformers' quantizer."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    from .conftest import make_tokenizer, tiny_hf_config

    torch.manual_seed(3)
    hf = LlamaForCausalLM(tiny_hf_config(hidden_size=128, intermediate_size=256, num_key_value_heads=4,
                                         num_hidden_layers=2)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else None
    plain, fp8 = root / "plain", root / "fp8"
    hf.save_pretrained(plain)
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=types.SimpleNamespace(
        weight_block_size=[128, 128], scale_fmt=None)))
    state = {}
    for key, tensor in hf.state_dict().items():
        projection = key.endswith("_proj.weight")
        state.update(quantizer.convert({key: tensor}) if projection else {key: tensor.contiguous()})
    fp8.mkdir()
    save_file(state, str(fp8 / "model.safetensors"))
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    for folder in (plain, fp8):
        make_tokenizer().save_pretrained(folder)
    return hf, plain, fp8


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    return _fp8_checkpoints(tmp_path_factory.mktemp("fp8-published"))


def test_a_published_fine_grained_fp8_checkpoint_runs_as_published(fp8_checkpoints, monkeypatch):
    """Loaded with fp8-block, the published codes and scales are the model's (nothing quantized
    again): the same logits as the recipe applied to the unquantized model, since the recipe's
    quantizer is transformers'; and with the inputs left unquantized, transformers' own model on
    that checkpoint (it dequantizes the weights on a CPU)."""
    import transformers

    from evalsuite.models import load_model_and_recipe
    from evalsuite.quant import fp8_block

    _hf, plain, fp8 = fp8_checkpoints
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(4))
    published, record = load_model_and_recipe(str(fp8), "fp8-block", "float32")
    assert record["name"] == "fp8-block" and published.model.config.fp8_block == 128
    mods = quantized_modules(published.model)
    assert len(mods) == 14 and set(mods.values()) == {"FP8BlockLinear"}
    ours, _ = load_model_and_recipe(str(plain), "fp8-block", "float32")
    assert torch.equal(published.model(tokens), ours.model(tokens))

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(fp8), dtype=torch.float32).eval()
    assert ref.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # dequantized on the CPU
    with torch.no_grad():
        want = ref(tokens).logits
    monkeypatch.setattr(fp8_block, "quantize_input", lambda x, block: x.float())
    assert (published.model(tokens) - want).abs().max() <= 1e-4


def test_a_published_fp8_checkpoint_refuses_other_recipes_before_it_loads(fp8_checkpoints, monkeypatch):
    from evalsuite.models import check_model_args

    _hf, _plain, fp8 = fp8_checkpoints
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'bf16': the checkpoint is published in fine-grained FP8 .*128 x "
                                         r"128 tiles.*; valid for this model: fp8-block$"):
        check_model_args(str(fp8), "bf16")
    with pytest.raises(ValueError, match=r"block_size=64, and the checkpoint's tiles are 128 x 128; valid: "
                                         r"block_size=128"):
        check_model_args(str(fp8), "fp8-block", {"block_size": 64})


@pytest.mark.parametrize("change, message", [
    ({"activation_scheme": "static"}, "activation_scheme 'static'"),
    ({"weight_block_size": [128, 64]}, "weight_block_size [128, 64]"),
    ({"scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
])
def test_other_fp8_checkpoints_are_refused_naming_what_differs(change, message):
    from evalsuite.engine.config import ModelConfig, UnsupportedModelError

    from .conftest import tiny_hf_config

    hf = tiny_hf_config().to_dict()
    hf["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128], **change}
    refusal = rf"FP8 checkpoint with .*{re.escape(message)}.*weight_block_size \[n, n\]"
    with pytest.raises(UnsupportedModelError, match=refusal):
        ModelConfig.from_hf(hf)


def test_quantize_format_hf_writes_the_published_form(fp8_checkpoints, tmp_path):
    """``quantize --format hf`` on the unquantized model writes what transformers' quantizer wrote
    for the published checkpoint, tensor for tensor, with its quantization_config."""
    import json

    from safetensors.torch import load_file

    from evalsuite.cli import main

    _hf, plain, fp8 = fp8_checkpoints
    out = tmp_path / "hf"
    argv = ["quantize", "--model", str(plain), "--recipe", "fp8-block", "--dtype", "float32", "--format", "hf",
            "--output", str(out)]
    assert main(argv) == 0
    got, want = load_file(str(out / "model.safetensors")), load_file(str(fp8 / "model.safetensors"))
    assert set(got) == set(want) and any(t.dtype == torch.float8_e4m3fn for t in want.values())
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]


def test_quantize_format_hf_of_a_mixture_loads_back_as_published(qwen3_moe_dir, tmp_path):
    """transformers saves Qwen3-MoE's experts one by one, as its checkpoints hold them: the export
    keeps those names, its routers unquantized, and loads back as published to the same logits."""
    from evalsuite.cli import main
    from evalsuite.models import load_model_and_recipe

    out = tmp_path / "hf"
    with pytest.warns(UserWarning, match=r"this model's q 64, k 32, gate 48 are not, so vLLM will refuse"):
        assert main(["quantize", "--model", str(qwen3_moe_dir), "--recipe", "fp8-block", "--dtype", "float32",
                     "--format", "hf", "--output", str(out)]) == 0
    tokens = torch.tensor([[5, 9, 2, 7, 1, 8, 3]])
    ours, _ = load_model_and_recipe(str(qwen3_moe_dir), "fp8-block", "float32")
    published, _ = load_model_and_recipe(str(out), "fp8-block", "float32")
    names = quantized_modules(published.model)
    assert "model.layers.0.mlp.experts.3.up_proj" in names and "model.layers.0.mlp.gate" not in names
    assert torch.equal(published.model(tokens), ours.model(tokens))


def test_quantize_format_hf_refuses_a_family_whose_checkpoint_names_differ(longrope, tmp_path, capsys):
    """Phi-3's checkpoints fuse q/k/v and gate/up, which the engine splits: no export under its names."""
    from evalsuite.cli import main

    argv = ["quantize", "--model", str(longrope.path), "--recipe", "fp8-block", "--format", "hf", "--output",
            str(tmp_path / "hf")]
    assert main(argv) == 2
    assert "under other names than its checkpoint (e.g. ['model.layers.0.mlp.gate_proj.weight'" in \
        capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
