"""Integration tests on the real embedded SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)."""

from __future__ import annotations

import json

import pytest
import torch

from evalsuite.backends.engine import EngineBackend
from evalsuite.engine.load import MODELS, gguf_to_folder, load
from evalsuite.runners.mmlu import MMLUConfig, encode_pair, run_mmlu

pytestmark = pytest.mark.slow

# every third subject: long and short prompts, several categories, at batch 1 in a few minutes
SUBJECTS = tuple(sorted(__import__("evalsuite.taskdef", fromlist=["load_task"]).load_task("mmlu").categories)[::6])


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


def test_mmlu_scores_do_not_depend_on_batch_size(smollm2, tmp_path):
    """lm-eval issues #1645/#3055: scores must not change with batch size. The engine's BF16
    hidden states are batch-invariant; only the float32 lm_head and log-softmax may differ in
    their last bits, so every choice's log-likelihood agrees within 1e-4 (one BF16 ulp anywhere
    upstream would move it by ~1e-2), and so do the predictions."""
    recs = {}
    for bs in (1, 32):
        out = tmp_path / f"bs{bs}"
        run_mmlu(EngineBackend(smollm2, max_batch_size=bs),
                 MMLUConfig(formulations=("letter", "cloze"), per_subject=1, subjects=SUBJECTS), out, progress=False)
        recs[bs] = {(r["formulation"], r["id"]): r for r in map(json.loads, open(out / "samples.jsonl"))}
    assert len(recs[1]) == 2 * len(SUBJECTS) and recs[1].keys() == recs[32].keys()
    for key, r in recs[1].items():
        assert r["logprobs"] == pytest.approx(recs[32][key]["logprobs"], abs=1e-4, rel=0)
        assert r["prediction"] == recs[32][key]["prediction"]
