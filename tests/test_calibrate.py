"""Calibration corpus and its cache: the default source (text the model writes), a text file,
and when the cached statistics are reused or computed again."""

from __future__ import annotations

import pytest

from evalsuite.engine.generate import SamplingParams
from evalsuite.engine.load import load
from evalsuite.quant import calibrate as calib
from evalsuite.quant.api import apply_recipe
from evalsuite.quant.calibrate import TOPICS, CalibrationSpec
from evalsuite.textgen import generate_text


def test_default_corpus_is_seeded_text_the_model_writes(tiny, monkeypatch):
    spec = CalibrationSpec(num_samples=3, seq_len=12)
    seqs = calib.corpus(tiny, spec)
    assert len(seqs) == 3 and all(1 <= len(s) <= 12 for s in seqs)
    assert calib._sampled_corpus(tiny, spec) == seqs  # seeded: the same corpus every time
    monkeypatch.setattr(calib, "_sampled_corpus", lambda *a: pytest.fail("the cached corpus was sampled again"))
    assert calib.corpus(tiny, spec) == seqs  # and cached: every recipe that calibrates shares it
    monkeypatch.undo()
    # the text is a continuation of the generic prompts, sampled (not greedy): re-encoding what the
    # model writes for "Write a few paragraphs about <topic>." at temperature 0.8 / top-p 0.95
    asks = [f"Write a few paragraphs about {TOPICS[i]}." for i in range(3)]
    texts = generate_text(tiny.model, tiny.tokenizer, asks, SamplingParams(12, 0.8, 0.95, spec.seed))
    assert seqs == [tiny.tokenizer.encode(t.text)[:12] or [0] for t in texts]
    greedy = generate_text(tiny.model, tiny.tokenizer, asks, SamplingParams(12))
    assert [t.text for t in texts] != [t.text for t in greedy]
    assert calib.corpus(tiny, CalibrationSpec(num_samples=3, seq_len=12, seed=1)) != seqs


def test_calibration_prompts_share_nothing_with_mmlu():
    from evalsuite.runners.mmlu import load_mmlu
    from evalsuite.taskdef import load_task

    questions = " ".join(q.question.lower() for q in load_mmlu(load_task("mmlu")).questions)
    assert not [t for t in TOPICS if f"write a few paragraphs about {t}" in questions]


def test_bad_calibration_specs(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="num_samples >= 1 and seq_len >= 8, got 0, 256"):
        CalibrationSpec(num_samples=0)
    with pytest.raises(ValueError, match="'/no/such.txt' is neither 'sampled' nor an existing text file"):
        CalibrationSpec(source="/no/such.txt")
    # a calibration text that is not UTF-8 (here Latin-1: "Caf" then 0xe9) is named before a model loads
    latin1 = tmp_path / "calib.txt"
    latin1.write_bytes("Caf\u00e9 au lait.".encode("latin-1"))
    from evalsuite import cli

    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["run", "mmlu", "--recipe", "int4-awq", "--recipe-config", f'calibration={{"source": "{latin1}"}}']
    assert cli.main(argv) == 2
    assert f"calibration source '{latin1}' is not UTF-8 text (byte 0xe9 at offset 3)" in capsys.readouterr().err


def test_cache_hits_and_misses(tiny_dir, calib_file, tmp_path, monkeypatch):
    """Hit: same weights, corpus and settings. Miss: another spec, another file content, other
    weights, another recipe setting that enters the search."""
    calls = []
    real = calib.corpus
    monkeypatch.setattr(calib, "corpus", lambda lm, spec: calls.append(spec) or real(lm, spec))
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    apply_recipe(load(str(tiny_dir), "float32"), "fp8-modelopt", over)
    apply_recipe(load(str(tiny_dir), "float32"), "fp8-modelopt", {**over, "kv_scale_mode": "deploy"})
    assert len(calls) == 1  # the KV scale mode is applied after the statistics: same cache entry
    apply_recipe(load(str(tiny_dir), "float32"), "fp8-modelopt",
                 {"calibration": {**over["calibration"], "num_samples": 3}})
    assert len(calls) == 2
    calib_file.write_text("Another text entirely, about rivers and mountains. " * 40)
    apply_recipe(load(str(tiny_dir), "float32"), "fp8-modelopt", over)
    assert len(calls) == 3  # the file's content is part of the key, not only its name
    apply_recipe(load(str(tiny_dir), "bfloat16"), "fp8-modelopt", over)
    assert len(calls) == 4  # other weights (dtype) -> other statistics
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", {**over, "block_size": 32})
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", {**over, "block_size": 64})
    assert len(calls) == 6  # the AWQ search depends on the block size
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq", {**over, "block_size": 64, "kernel": "off"})
    assert len(calls) == 6  # the kernel choice does not


def test_a_corrupt_cache_entry_is_computed_again(tiny_dir, calib_file, monkeypatch):
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}}
    apply_recipe(load(str(tiny_dir), "float32"), "fp8-modelopt", over)
    for f in (calib.cache_dir() / "calibration").glob("amax-*.json"):
        f.write_text("{truncated")
    calls = []
    real = calib.corpus
    monkeypatch.setattr(calib, "corpus", lambda lm, spec: calls.append(spec) or real(lm, spec))
    apply_recipe(load(str(tiny_dir), "float32"), "fp8-modelopt", over)
    assert len(calls) == 1


def test_a_truncated_tensor_cache_entry_is_computed_again(tiny_dir, calib_file, monkeypatch):
    over = {"calibration": {"source": str(calib_file), "num_samples": 2, "seq_len": 16}, "block_size": 32}
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq-asym", over)
    for f in (calib.cache_dir() / "calibration").glob("autoawq-*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    calls = []
    real = calib.corpus
    monkeypatch.setattr(calib, "corpus", lambda lm, spec: calls.append(spec) or real(lm, spec))
    apply_recipe(load(str(tiny_dir), "float32"), "int4-awq-asym", over)
    assert len(calls) == 1
