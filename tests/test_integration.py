"""Integration tests on the real embedded SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)."""

from __future__ import annotations

import pytest
import torch

from evalsuite.engine.load import gguf_to_folder, load
from evalsuite.engine.load import MODELS
from evalsuite.runners.mmlu import MMLUConfig, NEAR_TIE, encode_pair, run_mmlu

pytestmark = pytest.mark.slow


def test_smollm2_config_and_parity_with_transformers():
    from transformers import AutoModelForCausalLM

    lm = load("smollm2-135m", "float32")
    cfg = lm.model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    folder, _ = gguf_to_folder(MODELS["smollm2-135m"].locate(), MODELS["smollm2-135m"].sha256)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.tensor([lm.tokenizer.encode("The following are multiple choice questions (with answers) "
                                               "about anatomy.\n\nWhich bone is longest?\nA. Femur\nAnswer:")])
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (lm.model(tokens) - ref).abs().max().item() <= 1e-4


def test_letter_continuation_is_one_spaced_token(smollm2):
    ctx, cont = encode_pair(smollm2.tokenizer, "Question?\nAnswer:", " A")
    assert len(cont) == 1 and smollm2.tokenizer.convert_ids_to_tokens(cont) == ["ĠA"]


def test_mmlu_predictions_do_not_depend_on_batch_size(smollm2, tmp_path):
    """lm-eval issues #1645/#3055: predictions must not change with batch size."""
    runs = {}
    for bs in (1, 32):
        cfg = MMLUConfig(formulations=("letter",), per_subject=2, batch_size=bs)
        runs[bs] = run_mmlu(smollm2, cfg, tmp_path / f"bs{bs}", progress=False)
    recs = {bs: {r["id"]: r for r in r_.run_dir.joinpath("samples.jsonl").read_text().splitlines()
                 for r in [__import__("json").loads(r)]} for bs, r_ in runs.items()}
    decided = [i for i, r in recs[1].items() if r["margin"] > NEAR_TIE]
    assert len(decided) >= 100
    assert all(recs[1][i]["prediction"] == recs[32][i]["prediction"] for i in decided)
    near = runs[1].metrics["letter"]["near_ties"]
    assert near == len(recs[1]) - len(decided)  # the run reports how many fall inside the margin
