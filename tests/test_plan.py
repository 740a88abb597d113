"""Capacity planner: parameter counts against the published ones, and the seed's claims."""

from __future__ import annotations

import pytest

from evalsuite.cli import main
from evalsuite.engine.config import ModelConfig
from evalsuite.plan import kv_bytes_per_token, plan, weight_bytes


@pytest.mark.parametrize("name,params", [
    # parameter counts published with the checkpoints (safetensors metadata / model cards)
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
    ("llama-3.1-405b", 405_853_388_800), ("smollm2-135m", 134_515_008)])
def test_parameter_counts(name, params):
    assert ModelConfig.from_name(name).num_parameters() == params


def test_int4_awq_fits_405b_on_two_h200():
    p = plan("llama-3.1-405b", "int4-awq", "h200", context=8192, batch=1)
    assert p.gpus == 2
    assert plan("llama-3.1-405b", "int4-awq", "h100").gpus == 4


def test_405b_bf16_and_fp8_footprints():
    assert plan("llama-3.1-405b", "bf16", "h200").gpus == 8
    assert plan("llama-3.1-405b", "bf16", "h100").gpus == 16
    assert plan("llama-3.1-405b", "fp8-modelopt", "h100").gpus == 8  # FP8 405B on one 8xH100 node
    assert plan("llama-3.1-8b", "bf16", "h100").gpus == 1


def test_bytes_by_hand():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    assert weight_bytes(cfg, "bf16") == 2 * 8_030_261_248
    # K and V, 32 layers, 8 KV heads of 128: 2 * 32 * 8 * 128 * 2 bytes = 131,072 per token in BF16
    assert kv_bytes_per_token(cfg, "bf16") == 131_072
    assert kv_bytes_per_token(cfg, "fp8-modelopt") == 65_536
    # FP8 modelopt: the 7.50 B linear weights in one byte, 0.53 B embedding + lm_head + norms in two
    linear = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    assert weight_bytes(cfg, "fp8-modelopt") == linear + 2 * (8_030_261_248 - linear)
    # AutoAWQ layout: half a byte per weight; per 128 weights an FP16 scale and a 4-bit zero point
    assert weight_bytes(cfg, "int4-awq-asym") == linear // 2 + (linear // 128) * 2.5 + 2 * (8_030_261_248 - linear)
    assert plan("llama-3.1-405b", "int4-awq-asym", "h200").gpus == 2


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
