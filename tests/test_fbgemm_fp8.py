"""Meta's FP8 checkpoints (``quant_method: fbgemm_fp8``, the form of Llama 3.1's published *-FP8
models and of the reference case's official FP8 recipe), written by ``quantize --format hf`` and
loaded as published with fp8-official. The form is transformers' own: its FbgemmFp8Linear
modules, made from the written config.json by transformers' replace_with_fbgemm_fp8_linear, are
the modules that hold FP8 weights, with the written tensors' names, shapes and dtypes. Its
kernels (fbgemm-gpu) run on CUDA only, so the numbers are checked against the rule written out
here: each weight row divided by its absmax / 448 and cast to E4M3 by torch.
"""

from __future__ import annotations

import json

import pytest
import torch

from evalsuite.cli import main
from evalsuite.models import check_model_args, load_model_and_recipe

from .conftest import on_meta_default

UB = 1200.0


@pytest.fixture
def exported(tiny_dir, tmp_path):
    out = tmp_path / "fp8-official-hf"
    assert main(["quantize", "--model", str(tiny_dir), "--recipe", "fp8-official", "--dtype", "float32", "--format",
                 "hf", "--output", str(out)]) == 0
    return out


def test_quantize_format_hf_writes_transformers_fbgemm_fp8_form(tiny_dir, exported, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoConfig, FbgemmFp8Config, LlamaForCausalLM
    from transformers.integrations import fbgemm_fp8

    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["activation_scale_ub"]) == ("fbgemm_fp8", UB)
    # transformers' own module replacement on that config (its fbgemm-gpu op is looked up, never run)
    monkeypatch.setattr(fbgemm_fp8, "get_quantize_fp8_per_row", lambda: None)
    with torch.device("meta"):
        hf = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_dir))
    fbgemm_fp8.replace_with_fbgemm_fp8_linear(hf, config["modules_to_not_convert"], FbgemmFp8Config(**config),
                                              pre_quantized=True)
    wanted = {k: v for k, v in hf.state_dict().items() if k.endswith(".weight_scale")
              or (k.endswith(".weight") and v.dtype == torch.float8_e4m3fn)}
    layers = hf.config.num_hidden_layers
    assert len(wanted) == 2 * 3 * (layers - 2)  # weight and scale of gate, up, down in the inner layers
    tensors = load_file(exported / "model.safetensors")
    plain = load_file(tiny_dir / "model.safetensors")
    for key, want in wanted.items():
        assert (tensors[key].shape, tensors[key].dtype) == (want.shape, want.dtype), key
        if key.endswith(".weight"):  # the documented rule, by torch's own E4M3 cast
            w = plain[key].float()
            scale = w.abs().amax(dim=1, keepdim=True) / 448
            torch.testing.assert_close(tensors[f"{key}_scale"], scale, rtol=0, atol=0)
            assert torch.equal(tensors[key].view(torch.uint8), (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))
    others = {k for k, v in tensors.items() if k not in wanted}
    assert all(tensors[k].dtype == torch.float32 for k in others)  # everything else as the source holds it


def test_a_published_fbgemm_fp8_checkpoint_runs_as_published(tiny_dir, exported):
    """Loaded with fp8-official, the checkpoint's codes and row scales are the model's (nothing
    quantized again): the recipe's logits on the unquantized model, on either product path."""
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model_and_recipe(str(tiny_dir), "fp8-official", "float32")
    # loaded and run under the "meta" default device, where a tensor made off the model's device fails
    published, record = on_meta_default(lambda: load_model_and_recipe(str(exported), "fp8-official", "float32"))
    assert published.model.config.fbgemm_fp8_ub == UB and "published" in record
    with torch.no_grad():
        want = ours.model(tokens)
        assert torch.equal(on_meta_default(lambda: published.model(tokens)), want)
        assert (want - load_model_and_recipe(str(tiny_dir), "bf16", "float32")[0].model(tokens)).abs().max() > 1e-2


def test_a_published_fbgemm_fp8_checkpoint_refuses_what_it_does_not_hold(exported, monkeypatch):
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"recipe 'fp8-modelopt': the checkpoint is published in Meta's FP8 .*runs "
                                         r"as published \(--recipe fp8-official --recipe-config "
                                         r"activation_scale_ub=1200\)"):
        check_model_args(str(exported), "fp8-modelopt")
    with pytest.raises(ValueError, match=r"activation_scale_ub=600, and the checkpoint's input scales are bounded by "
                                         r"1200; valid: activation_scale_ub=1200"):
        check_model_args(str(exported), "fp8-official", {"activation_scale_ub": 600.0})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"not the FFN projections of the layers skip_first_and_last_layers=false "
                                         r"quantizes; valid: --recipe-config skip_first_and_last_layers=true"):
        load_model_and_recipe(str(exported), "fp8-official", "float32", {"skip_first_and_last_layers": False})
