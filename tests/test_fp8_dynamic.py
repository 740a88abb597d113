"""fp8-dynamic against compressed-tensors itself (0.20.0, pinned in scripts/reference.txt): the
library that writes llm-compressor's FP8_DYNAMIC checkpoints (Red Hat's *-FP8-dynamic models) and
that vLLM and transformers read them with.

Checked: the weight codes and scales of every projection are those compressed-tensors computes
(its ``calculate_qparams`` on the per-channel min and max, as llm-compressor's weight observer
calls it, then its ``quantize``), byte for byte in BF16 and float32; ``quantize --format hf`` writes,
tensor for tensor and config for config, what compressed-tensors' own compressor writes for the
same model; transformers, with compressed-tensors, loads that export and computes the recipe's
product in every projection, in float32 (its forward quantizes each token's input as the recipe
does); the engine loads compressed-tensors' own checkpoint as published and computes the recipe's
logits exactly. In BF16 compressed-tensors' forward takes each token's scale in BF16; the recipe
takes it in float32 as vLLM's kernel does, so BF16 products are not compared with its forward.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from evalsuite.cli import main
from evalsuite.models import check_model_args, load_model_and_recipe

from .conftest import fused_and_separate, needs_cpu_rowwise_scaled_mm, on_meta_default


def _fp8_dynamic_args():
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])


def _their_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' E4M3 codes and [out, 1] scales of a weight, as llm-compressor computes
    them for FP8_DYNAMIC: the per-channel min and max through calculate_qparams, then quantize."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _fp8_dynamic_args().weights
    scale, zero = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    return quantize(w, scale, zero, args, dtype=torch.float8_e4m3fn), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_codes_and_scales_are_compressed_tensors(dtype):
    from evalsuite.quant.fp8 import channel_weight

    torch.manual_seed(0)
    w = (torch.randn(48, 96) * torch.rand(48, 1) * 3).to(dtype)
    w[5] = 0  # a zero row: compressed-tensors gives it its dtype's eps as scale
    w[7, 3] = 1e-30 if dtype == torch.float32 else 0  # a tiny value beside the row's largest
    codes, scale = channel_weight(w)
    want_codes, want_scale = _their_weight(w)
    assert scale.dtype == dtype and torch.equal(scale, want_scale)
    assert codes.dtype == torch.float8_e4m3fn and torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    # the division rounds to the weight's dtype before the E4M3 cast: in BF16 that double rounding
    # moves some codes from a direct float32 rounding
    direct = (w.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert dtype == torch.float32 or not torch.equal(direct.view(torch.uint8), codes.view(torch.uint8))


def _their_export(plain_dir, out, dtype):
    """compressed-tensors' own FP8_DYNAMIC checkpoint of the model in ``plain_dir``: its
    quantization config applied to transformers' model, each weight's scale from calculate_qparams,
    then its float-quantized compressor, as llm-compressor's oneshot saves it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(plain_dir), dtype=dtype).eval()
    apply_quantization_config(hf, QuantizationConfig(config_groups={"group_0": _fp8_dynamic_args()},
                                                     ignore=["lm_head"]), show_progress=False)
    for m in hf.modules():
        if getattr(m, "quantization_scheme", None) is not None:
            w = m.weight.detach()
            m.weight_scale.data.copy_(calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True),
                                                        m.quantization_scheme.weights)[0])
    compressor = ModelCompressor.from_pretrained_model(hf, quantization_format="float-quantized")
    compressor.compress_model(hf)
    hf.save_pretrained(str(out))
    compressor.update_config(str(out))
    return out


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    """The engine's and compressed-tensors' FP8_DYNAMIC checkpoints of the tiny Llama, in float32."""
    root = tmp_path_factory.mktemp("fp8-dynamic")
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8-dynamic", "--dtype", "float32", "--format",
                 "hf", "--output", str(root / "ours")]) == 0
    return root / "ours", _their_export(tiny_dir, root / "theirs", torch.float32)


def test_quantize_format_hf_writes_compressed_tensors_own_checkpoint(exports):
    from safetensors.torch import load_file

    ours, theirs = exports
    config, want = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (ours, theirs))
    want.pop("version")  # compressed-tensors' own version number
    assert config == want
    mine, ref = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(mine) == set(ref) and sum(k.endswith(".weight_scale") for k in ref) == 3 * 7
    for key, t in ref.items():
        assert (mine[key].dtype, mine[key].shape) == (t.dtype, t.shape), key
        assert torch.equal(mine[key].view(torch.uint8), t.view(torch.uint8)), key


def test_transformers_runs_the_export_with_the_recipes_products(tiny_dir, exports):
    """transformers with compressed-tensors, on the engine's export: in a forward over real tokens,
    each of its 21 projections gives, on the input it sees, the recipe's product (each token's input
    quantized dynamically, times the decompressed weights) to float32 rounding. Whole-model logits
    are not compared: a last-bit difference in one product can move the next layer's input across an
    E4M3 rounding boundary, and on this model one such flip moves logits by 0.13."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model_and_recipe(str(tiny_dir), "fp8-dynamic", "float32")
    hf = AutoModelForCausalLM.from_pretrained(str(exports[0])).eval()
    seen = {}

    def keep(name):
        def hook(_module, args, out):
            seen[name] = (args[0], out)
        return hook

    for name, m in hf.named_modules():
        if getattr(m, "quantization_scheme", None) is not None:
            m.register_forward_hook(keep(name))
    with torch.no_grad():
        hf(tokens)
        assert len(seen) == 3 * 7
        for name, (x, want) in seen.items():
            got = ours.model.get_submodule(name)(x)
            weights_only = x @ hf.get_submodule(name).weight.float().t()
            err = (got - want).abs().max()
            assert err <= 1e-6 * want.abs().max(), (name, err)
            assert (weights_only - want).abs().max() > 1000 * err, name  # its inputs were quantized


def test_a_published_fp8_dynamic_checkpoint_runs_as_published(tiny_dir, exports):
    """Loaded with fp8-dynamic, compressed-tensors' checkpoint (and the engine's, the same bytes) is
    the recipe's model: its codes and scales, nothing quantized again, logits identical."""
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, _ = load_model_and_recipe(str(tiny_dir), "fp8-dynamic", "float32")
    published, record = on_meta_default(lambda: load_model_and_recipe(str(exports[1]), "fp8-dynamic", "float32"))
    assert published.model.config.published_recipe == "fp8-dynamic" and "published" in record
    with torch.no_grad():
        assert torch.equal(on_meta_default(lambda: published.model(tokens)), ours.model(tokens))


def test_a_bf16_published_checkpoint_holds_the_recipes_bf16_weights(tiny_dir, tmp_path):
    from evalsuite.quant.fp8 import FP8RowwiseLinear

    theirs = _their_export(tiny_dir, tmp_path / "theirs", torch.bfloat16)
    ours, _ = load_model_and_recipe(str(tiny_dir), "fp8-dynamic", "bfloat16")
    published, _ = load_model_and_recipe(str(theirs), "fp8-dynamic", "bfloat16")
    held = {n: m for n, m in published.model.named_modules() if isinstance(m, FP8RowwiseLinear)}
    mine = {n: m for n, m in ours.model.named_modules() if isinstance(m, FP8RowwiseLinear)}
    assert set(held) == set(mine) and len(mine) == 3 * 7
    for name, m in mine.items():
        assert torch.equal(held[name].qweight.view(torch.uint8), m.qweight.view(torch.uint8)), name
        assert torch.equal(held[name].weight_scale, m.weight_scale), name
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(published.model(tokens), ours.model(tokens))


def test_a_published_fp8_dynamic_checkpoint_refuses_other_recipes_before_it_loads(exports, monkeypatch):
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'fp8-official': the checkpoint is published in compressed-tensors' "
                                         r"FP8_DYNAMIC .*runs as published \(--recipe fp8-dynamic\)"):
        check_model_args(str(exports[1]), "fp8-official")


@pytest.mark.parametrize("change, message", [
    ({"format": "marlin-24"}, "format 'marlin-24'"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                          "symmetric": True}}, "kv_cache_scheme"),
    ({"group_0.weights.strategy": "tensor"}, "weights strategy 'tensor'"),
    ({"group_0.weights.type": "int"}, "weights type 'int'"),
    ({"group_0.input_activations.dynamic": False}, "input_activations dynamic False"),
    ({"group_0.input_activations": None}, "input_activations None"),
    ({"group_0.targets": ["re:.*mlp.*"]}, "targets ['re:.*mlp.*']"),
    ({"group_1": "copy"}, "2 config groups"),
])
def test_other_compressed_tensors_schemes_are_refused_naming_what_differs(exports, change, message):
    import copy
    import re

    from evalsuite.engine.config import ModelConfig, UnsupportedModelError

    hf = json.loads((exports[1] / "config.json").read_text())
    quant = hf["quantization_config"]
    for key, value in change.items():
        if value == "copy":
            quant["config_groups"][key] = copy.deepcopy(quant["config_groups"]["group_0"])
            continue
        *path, last = key.split(".")
        node = quant["config_groups"] if path else quant
        for p in path:
            node = node[p]
        node[last] = value
    with pytest.raises(UnsupportedModelError, match=rf"compressed-tensors checkpoint with .*{re.escape(message)}"):
        ModelConfig.from_hf(hf)


def test_a_checkpoint_that_leaves_other_projections_unquantized_is_refused_naming_them(tiny_dir, tmp_path):
    """A checkpoint whose ignore list keeps more than lm_head out of FP8 is not the recipe's model:
    its FP8 projections are compared with the recipe's when it loads."""
    from compressed_tensors.compressors import ModelCompressor  # noqa: F401 (the library the export needs)

    theirs = _their_export(tiny_dir, tmp_path / "theirs", torch.float32)
    from safetensors.torch import load_file, save_file

    state = load_file(theirs / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    state[f"{name}.weight"] = state[f"{name}.weight"].float() * state.pop(f"{name}.weight_scale").float()
    save_file(state, theirs / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"recipe 'fp8-dynamic': the checkpoint holds 20 FP8 projections.*"
                                         rf"{re.escape(name)} unquantized"):
        load_model_and_recipe(str(theirs), "fp8-dynamic", "float32")


@pytest.mark.parametrize("recipe, kernel", [
    ("fp8-dynamic", "off"), ("fp8-official", "off"),
    pytest.param("fp8-dynamic", "scaled_mm", marks=needs_cpu_rowwise_scaled_mm),
])
def test_row_wise_projections_of_one_input_run_as_one_product(tiny_dir, recipe, kernel):
    """q/k/v and gate/up with per-row scales run as one FP8 product each (the modules' tensors become
    views of it; each token's input quantized once), and compute what the projections compute
    apart: float32 logits equal to float32 rounding, and every token's prediction the same."""
    from evalsuite.engine.load import load
    from evalsuite.quant.api import apply_recipe
    from evalsuite.quant.fp8 import FusedFP8Rows

    lm = load(str(tiny_dir), "float32")
    apply_recipe(lm, recipe, {"kernel": kernel})
    attn, mlp = lm.model.model.layers[1].self_attn, lm.model.model.layers[1].mlp
    assert isinstance(mlp._fused, FusedFP8Rows) and mlp.up_proj.weight_scale.data_ptr() != \
        mlp.gate_proj.weight_scale.data_ptr()
    assert mlp.up_proj.qweight.untyped_storage().data_ptr() == mlp._fused.inner.qweight.untyped_storage().data_ptr()
    assert isinstance(attn._fused, FusedFP8Rows) == (recipe == "fp8-dynamic")  # fp8-official leaves attention BF16
    assert mlp._fused.valid_for([mlp.gate_proj, mlp.up_proj])  # what the layer asks before it runs the fused product
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused, separate = fused_and_separate(lm.model, tokens)
    assert (fused - separate).abs().max() <= 1e-4 * separate.abs().max()
    assert torch.equal(fused.argmax(-1), separate.argmax(-1))
