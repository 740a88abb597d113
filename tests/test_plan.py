"""Capacity planner: parameter counts against the published ones, byte counts against hand counts
and against the bytes a saved checkpoint really holds, and the reference case's claims."""

from __future__ import annotations

import json

import pytest
import torch

from evalsuite.cli import main
from evalsuite.engine.config import ModelConfig
from evalsuite.engine.load import load, read_config
from evalsuite.plan import PLAN_RECIPES, deployed_weight_bytes, kv_bytes_per_token, plan
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.checkpoint import deployed_weight_bytes as checkpoint_bytes
from evalsuite.quant.checkpoint import save_quantized


@pytest.mark.parametrize("name,params", [
    # parameter counts published with the checkpoints (safetensors metadata / model cards)
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
    ("llama-3.1-405b", 405_853_388_800), ("smollm2-135m", 134_515_008)])
def test_parameter_counts(name, params):
    assert ModelConfig.from_name(name).num_parameters() == params


# Llama 3.1 8B by hand: per layer q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up
# 14336x4096, down 4096x14336 = 218,103,808 projection weights; x32 = 6,979,321,856; the rest
# (embeddings, lm_head, norms) = 8,030,261,248 - 6,979,321,856 = 1,050,939,392, in BF16 = 2,101,878,784.
LLAMA_8B_BYTES = {
    "bf16": 2 * 8_030_261_248,
    # 30 inner layers' FFN (176,160,768 weights) in 1 byte + a float32 per output channel
    # (2 x 14336 + 4096 = 32,768 channels): 30 x (176,160,768 + 131,072) = 5,288,755,200; the other
    # 8,030,261,248 - 5,284,823,040 = 2,745,438,208 parameters in BF16 = 5,490,876,416
    "fp8-official": 5_288_755_200 + 5_490_876_416,
    # every projection in 1 byte + 2 float32 scales (7 x 8 = 56 B) + 4 float32 attention scales (16 B)
    "fp8-modelopt": 32 * (218_103_808 + 56 + 16) + 2_101_878_784,
    # per layer: codes 109,051,904 B (half a byte each) + block scales 1,703,936 x 4 B = 6,815,744
    # + BF16 pre-scales of o_proj and down_proj over 4096 + 14336 = 18,432 inputs = 36,864 (q/k/v
    # and gate/up have theirs folded into the norms)
    "int4-awq": 32 * (109_051_904 + 6_815_744 + 36_864) + 2_101_878_784,
    "int4-rtn": 32 * (109_051_904 + 6_815_744) + 2_101_878_784,
    # + a 4-bit zero point per block: 1,703,936 / 2 = 851,968 B per layer
    "int4-awq-asym": 32 * (109_051_904 + 6_815_744 + 851_968) + 2_101_878_784,
}


@pytest.mark.parametrize("recipe", list(LLAMA_8B_BYTES))
def test_bytes_by_hand(recipe):
    assert deployed_weight_bytes(ModelConfig.from_name("llama-3.1-8b"), recipe) == LLAMA_8B_BYTES[recipe]


def test_kv_bytes_by_hand():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    # K and V, 32 layers, 8 KV heads of 128: 2 * 32 * 8 * 128 * 2 bytes = 131,072 per token in BF16
    assert kv_bytes_per_token(cfg, "bf16") == 131_072
    assert kv_bytes_per_token(cfg, "fp8-modelopt") == 65_536


def _file_bytes(folder) -> int:
    """What a saved checkpoint holds: every tensor's bytes in model.safetensors, read back from
    the file, plus a float32 for each scalar scale recorded in quantization.json."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            total += t.numel() * t.element_size()
    meta = json.loads((folder / "quantization.json").read_text())
    scalars = sum(1 for m in meta["modules"].values() for k, v in m["attrs"].items()
                  if k.endswith("scale") and isinstance(v, float))
    return total + 4 * scalars


@pytest.mark.parametrize("recipe", PLAN_RECIPES)
def test_planner_counts_what_a_checkpoint_stores(recipe, tiny_dir, calib_file, tmp_path):
    """The planner's count from the architecture alone equals the bytes of the checkpoint the
    engine writes for the tiny model (BF16, default block size: its 64 and 160 inputs are padded
    to whole blocks of 128), and the engine's own count of the loaded model."""
    lm = load(str(tiny_dir), "bfloat16")
    over = {} if recipe in ("bf16", "fp8-official") else {
        "calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    record = apply_recipe(lm, recipe, over)
    out = save_quantized(lm, record, tmp_path / "q")
    planned = deployed_weight_bytes(read_config(tiny_dir), recipe)
    assert planned == _file_bytes(out) == checkpoint_bytes(lm.model)


def test_int4_awq_fits_405b_on_two_h200():
    p = plan("llama-3.1-405b", "int4-awq", "h200", context=8192, batch=1)
    assert p.gpus == 2
    assert plan("llama-3.1-405b", "int4-awq", "h100").gpus == 4
    assert plan("llama-3.1-405b", "int4-awq-asym", "h200").gpus == 2


def test_405b_bf16_and_fp8_footprints():
    assert plan("llama-3.1-405b", "bf16", "h200").gpus == 8
    assert plan("llama-3.1-405b", "bf16", "h100").gpus == 16
    assert plan("llama-3.1-405b", "fp8-modelopt", "h100").gpus == 8  # FP8 405B on one 8xH100 node
    assert plan("llama-3.1-8b", "bf16", "h100").gpus == 1


def test_bad_plan_inputs():
    with pytest.raises(KeyError, match="valid: h100, h200"):
        plan("llama-3.1-8b", "bf16", "a100")
    with pytest.raises(KeyError, match="valid: bf16, fp8-official"):
        plan("llama-3.1-8b", "int8", "h100")
    with pytest.raises(ValueError, match="exceeds llama-3.1-8b's 131072 positions"):
        plan("llama-3.1-8b", "bf16", "h100", context=200_000)


def test_plan_cli(capsys):
    assert main(["plan", "--recipe", "int4-awq", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-405b / int4-awq on h200" in out and "-> 2 GPU(s)" in out


def test_meta_model_bf16_bytes_are_twice_the_published_parameter_count():
    from evalsuite.engine.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_name("smollm2-135m"))
    assert checkpoint_bytes(model) == 2 * 134_515_008
