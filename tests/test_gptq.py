"""int4-gptq against llm-compressor itself (0.14.0.1, pinned in scripts/reference.txt, with the
compressed-tensors it writes its checkpoints with): the library whose GPTQModifier makes Red Hat's
*-quantized.w4a16 checkpoints, run here on the CPU.

Checked: the group scales are compressed-tensors' ``calculate_qparams``, and, given the same weight,
Hessian and scales, the codes are those of llm-compressor's ``quantize_weight`` (bit for bit, BF16
and float32, with and without activation order, a dead input column and an all-zero group
included); llm-compressor's ``oneshot`` with GPTQModifier on the tiny Llama and the recipe on the same
calibration sequences give the same checkpoint, tensor for tensor and config for config (float32:
every code of the three layers, each calibrated on the layers before it quantized); transformers
loads the recipe's export through compressed-tensors and computes the recipe's logits; the engine
loads llm-compressor's checkpoint as published and computes the recipe's logits exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from evalsuite.cli import main
from evalsuite.models import check_model_args, load_model_and_recipe

from .conftest import calibration_sequences, changed_config_groups, llm_compressor_oneshot, on_meta_default

GROUP = 32  # the tiny Llama's 64 and 160 inputs in whole groups


def _w4a16_args(group: int = GROUP, actorder: bool = True):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group,
                            actorder="static" if actorder else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("actorder", [True, False])
def test_gptq_is_llm_compressors_quantize_weight(dtype, actorder):
    """The scales of compressed-tensors' min-max observer, and llm-compressor's GPTQ on them: the
    same dequantized weights, bit for bit."""
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from evalsuite.quant.gptq import _dequantized, gptq_codes, group_scales

    torch.manual_seed(0)
    rows, cols = 48, 256
    w = (torch.randn(rows, cols) * torch.rand(rows, 1)).to(dtype)
    w[3, :GROUP] = 0  # an all-zero group: its scale is the dtype's eps
    x = torch.randn(500, cols) * torch.rand(cols) * 2
    x[:, 7] = 0  # an input column that is always zero: GPTQ zeroes its weights
    hessian = 2 * x.t() @ x / 4
    args = _w4a16_args(actorder=actorder)
    groups = w.view(rows, -1, GROUP)
    want_scale, zero = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args)
    scale = group_scales(w, GROUP)
    assert scale.dtype == dtype and torch.equal(scale, want_scale)
    want, _losses, fallback = quantize_weight(w.float()[None].clone(), hessian[None].clone(), want_scale[None],
                                              zero[None], None, args, blocksize=128, percdamp=0.01)
    assert not fallback.any()
    codes = gptq_codes(w, hessian, scale, GROUP, actorder=actorder, dampening=0.01, gptq_block=128)
    got = _dequantized(codes, scale, GROUP)
    assert torch.equal(got.float(), want[0].float())
    assert (codes[:, 7] == 0).all()
    plain = torch.round(torch.clamp(w.float() / scale.float().repeat_interleave(GROUP, 1), -8, 7))
    assert (codes != plain).float().mean() > 0.2  # GPTQ moved many codes from plain rounding


def _their_checkpoint(tiny_dir, sequences, out):
    """llm-compressor's own W4A16 checkpoint of the tiny Llama: oneshot with GPTQModifier."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=_w4a16_args())
    return llm_compressor_oneshot(tiny_dir, tiny_dir, sequences,
                                  GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]), out)


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """The recipe's export and llm-compressor's checkpoint of the tiny Llama (float32), both
    calibrated on the same sequences, the recipe's overrides, and the calibration cache that holds
    this run's GPTQ result."""
    root = tmp_path_factory.mktemp("gptq")
    spec, sequences = calibration_sequences(
        tiny_dir, root, "Weights are rounded to four bits, one column after another, and each rounding error is "
        "spread over the columns that follow, weighted by what the inputs say matters. ")
    overrides = {"block_size": GROUP, "calibration": spec}
    with pytest.MonkeyPatch.context() as patch:  # computed here, not read from an earlier run's cache
        patch.setenv("EVALSUITE_CACHE", str(root / "cache"))
        assert main(["quantize", "--model", str(tiny_dir), "--recipe", "int4-gptq", "--dtype", "float32",
                     "--recipe-config", f"block_size={GROUP}", f"calibration={json.dumps(spec)}", "--format", "hf",
                     "--output", str(root / "ours")]) == 0
    return root / "ours", _their_checkpoint(tiny_dir, sequences, root / "theirs"), overrides, root / "cache"


def test_the_recipe_writes_llm_compressors_own_checkpoint(checkpoints):
    """Every packed code, scale and shape of the 21 projections, and the quantization config."""
    from safetensors.torch import load_file

    ours, theirs, _, _ = checkpoints
    config, want = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (ours, theirs))
    want.pop("version")  # compressed-tensors' own version number
    assert config == want
    mine, ref = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(mine) == set(ref) and sum(k.endswith(".weight_packed") for k in ref) == 3 * 7
    for key, t in ref.items():
        assert (mine[key].dtype, mine[key].shape) == (t.dtype, t.shape), key
        assert torch.equal(mine[key], t), key


def test_transformers_runs_the_export_with_the_recipes_logits(tiny_dir, checkpoints, monkeypatch):
    """transformers, decompressing the export through compressed-tensors, computes the recipe's
    model (float32, the recipe on its dequantized weights)."""
    from transformers import AutoModelForCausalLM

    ours, _, overrides, cache = checkpoints
    monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    recipe, _ = load_model_and_recipe(str(tiny_dir), "int4-gptq", "float32", overrides=overrides | {"kernel": "off"})
    hf = AutoModelForCausalLM.from_pretrained(str(ours), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        got, want, unquantized = recipe.model(tokens), hf(tokens).logits, plain(tokens).logits
    err = (got - want).abs().max()
    assert err <= 1e-4 * want.abs().max(), err
    assert (unquantized - want).abs().max() > 100 * err  # INT4 moved them


def test_llm_compressors_checkpoint_runs_as_published(tiny_dir, checkpoints, monkeypatch):
    """Loaded with int4-gptq, llm-compressor's checkpoint is the recipe's model: its codes and
    scales, nothing calibrated or quantized again, logits identical (also where a tensor made
    without the model's device would land on "meta")."""
    _, theirs, overrides, cache = checkpoints
    monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    recipe, _ = load_model_and_recipe(str(tiny_dir), "int4-gptq", "float32", overrides=overrides)
    published, record = on_meta_default(lambda: load_model_and_recipe(
        str(theirs), "int4-gptq", "float32", overrides={"block_size": GROUP}))
    assert published.model.config.published_recipe == "int4-gptq" and "published" in record
    with torch.no_grad():
        assert torch.equal(on_meta_default(lambda: published.model(tokens)), recipe.model(tokens))


def test_a_published_w4a16_checkpoint_refuses_other_recipes_and_groups_before_it_loads(checkpoints, monkeypatch):
    theirs = checkpoints[1]
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'int4-awq': the checkpoint is published in compressed-tensors' W4A16 "
                                         r"form .*groups of 32.*--recipe int4-gptq --recipe-config block_size=32"):
        check_model_args(str(theirs), "int4-awq")
    with pytest.raises(ValueError, match=r"block_size=128, and the checkpoint's groups are of 32; "
                                         r"valid: block_size=32"):
        check_model_args(str(theirs), "int4-gptq")


@pytest.mark.parametrize("change, message", [
    ({"group_0.weights.actorder": "group"}, "weights actorder 'group'"),
    ({"group_0.weights.symmetric": False}, "weights symmetric False"),
    ({"group_0.weights.num_bits": 8}, "weights num_bits 8"),
    ({"group_0.weights.strategy": "channel"}, "weights strategy 'channel'"),
    ({"group_0.input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}},
     "input_activations quantized"),
])
def test_other_int4_schemes_are_refused_naming_what_differs(checkpoints, change, message):
    from evalsuite.engine.config import ModelConfig, UnsupportedModelError

    hf = changed_config_groups(checkpoints[1], change)
    with pytest.raises(UnsupportedModelError, match=r"a compressed-tensors checkpoint with .*" + message.replace(
            "(", r"\(").replace(")", r"\)") + r".*W4A16 \(format pack-quantized"):
        ModelConfig.from_hf(hf)


def test_the_export_needs_whole_groups(tiny_dir, tmp_path, monkeypatch, capsys):
    """compressed-tensors' form holds whole groups along every input: the tiny Llama's 64 and 160
    inputs are refused with groups of 128, naming the sizes that fit, before anything loads."""
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "int4-gptq", "--format", "hf", "--output",
                 str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "pack-quantized form holds whole groups of block_size=128 along every input, and mlp.down_proj (160 " \
        "inputs)" in err
    assert "valid: --recipe-config block_size=32, --recipe-config block_size=16" in err
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_that_leaves_other_projections_unquantized_is_refused_naming_them(checkpoints, tmp_path):
    """A checkpoint whose ignore list keeps more than lm_head out of INT4 is not the recipe's model:
    its INT4 projections are compared with the recipe's when it loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evalsuite.quant.published import unpack_int32

    folder = shutil.copytree(checkpoints[1], tmp_path / "theirs")
    state = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    codes = unpack_int32(state.pop(f"{name}.weight_packed"), 64).float()
    state[f"{name}.weight"] = codes * state.pop(f"{name}.weight_scale").repeat_interleave(GROUP, dim=1)
    del state[f"{name}.weight_shape"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"recipe 'int4-gptq': the checkpoint holds 20 INT4 projections.*"
                                         rf"{name} unquantized"):
        load_model_and_recipe(str(folder), "int4-gptq", "float32", overrides={"block_size": GROUP})
