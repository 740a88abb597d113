from __future__ import annotations

import json

import pytest

from evalsuite.cli import main


def test_run_mmlu_on_folder_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "mmlu", "--model", str(tiny_dir), "--dtype", "float32", "--per-subject", "2",
               "--subjects", "anatomy", "marketing", "--formulation", "letter", "cloze", "--output", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "[letter] acc:" in text and "[cloze] acc_norm:" in text and "near ties" in text
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("argv,msg", [
    (["run", "mmlu", "--recipe", "fp9"], "unknown recipe 'fp9'; valid: bf16, fp8-modelopt, fp8-official"),
    (["run", "nope"], "unknown task 'nope'; valid: mmlu"),
    (["run", "mmlu", "--model", "nope"], "unknown model 'nope'"),
    (["run", "mmlu", "--dtype", "int3"], "unknown dtype 'int3'; valid: bfloat16"),
])
def test_bad_names_list_valid_ones(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bad_formulation_and_fewshot(tiny_dir, tmp_path, capsys):
    base = ["run", "mmlu", "--model", str(tiny_dir), "--output", str(tmp_path / "x")]
    assert main(base + ["--formulation", "mc"]) == 2
    assert "unknown formulation 'mc'" in capsys.readouterr().err
    assert main(base + ["--num-fewshot", "9"]) == 2
    assert "num_fewshot=9; valid: 0..5" in capsys.readouterr().err


def test_listings(capsys):
    assert main(["models"]) == 0 and "smollm2-135m (default)" in capsys.readouterr().out
    assert main(["tasks"]) == 0 and "letter, cloze, generative" in capsys.readouterr().out
    assert main(["recipes"]) == 0 and "bf16" in capsys.readouterr().out
