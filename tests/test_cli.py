from __future__ import annotations

import json

import pytest

from evalsuite.cli import main

from .conftest import tiny_hf_config


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
    (["run", "mmlu", "--recipe", "fp9"],
     "unknown recipe 'fp9'; valid: bf16, fp8-block, fp8-dynamic, fp8-modelopt, fp8-official"),
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
    assert main(["models"]) == 0 and "smollm2-135m (default)" in (out := capsys.readouterr().out)
    assert "of the model types llama, mistral, qwen2, qwen3, phi3" in out
    assert main(["tasks"]) == 0 and "letter, cloze, generative" in capsys.readouterr().out
    assert main(["recipes"]) == 0 and "bf16" in capsys.readouterr().out


def test_recipe_listing_prints_usable_settings(capsys):
    """Each recipe's printed defaults, passed back as --recipe-config, give its default config."""
    import dataclasses

    from evalsuite.cli import parse_recipe_config
    from evalsuite.quant.api import get_recipe

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    seen = set()
    for name_line, settings in zip(lines, lines[1:]):
        if not settings.startswith("  --recipe-config defaults: "):
            continue
        recipe = get_recipe(name_line.split(":")[0])
        parsed = parse_recipe_config(settings.split("defaults: ")[1].split(" "))
        assert dataclasses.replace(recipe.config, **parsed) == recipe.config
        seen.add(recipe.name)
    assert {"fp8-modelopt", "int4-awq"} <= seen
    assert "fused_scales=true" in "\n".join(lines) and "resmooth=true" in "\n".join(lines)


@pytest.mark.parametrize("extra,msg", [
    (["--num-fewshot", "9"], "num_fewshot=9; valid: 0..5"),
    (["--formulation", "xyz"], "unknown formulation 'xyz'"),
    (["--per-subject", "-1"], "per_subject=-1"),
    (["--subjects", "astrology"], "unknown subjects ['astrology']"),
    (["--recipe", "fp9"], "unknown recipe 'fp9'"),
    (["--recipe-config", "novalue"], "--recipe-config takes KEY=VALUE"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
])
def test_bad_arguments_fail_before_any_model_loads(extra, msg, tiny_dir, tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("evalsuite.engine.load.load", no_load)
    monkeypatch.setattr("evalsuite.quant.checkpoint.load_quantized", no_load)
    argv = ["run", "mmlu", "--model", str(tiny_dir), "--output", str(tmp_path / "x"), "--no-progress"] + extra
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


# Commands check their arguments before importing torch (or scipy, matplotlib, the HTTP stack):
# a bad one is reported at once, not after seconds of imports. (argv, exit code, message)
BAD_ARGUMENTS = [
    (["run", "mmlu", "--recipe", "fp9"], 2, "unknown recipe 'fp9'"),
    # a list option given twice adds to the first list rather than replacing it, so nothing is dropped unseen
    (["run", "mmlu", "--formulation", "bogus", "--formulation", "letter"], 2, "unknown formulation 'bogus'"),
    (["run", "mmlu", "--recipe", "fp8-modelopt", "--recipe-config", "bogus_key=1", "--recipe-config", "kernel=off"],
     2, "recipe 'fp8-modelopt' has no settings ['bogus_key']"),
    (["run", "mmlu", "--recipe", "int4-awq", "--recipe-config", "block_size=64", "--recipe-config", "block_size=32"],
     2, "--recipe-config block_size is given twice (block_size=64 and block_size=32); valid: each setting once"),
    (["plan", "--gpu", "h300", "--gpu", "h200"], 2, "unknown GPU 'h300'"),
    # a folder to write into that is a file (or lies under one) is refused before any work
    (["run", "mmlu", "--output", "a-file"], 2, "'a-file' (--output) is not a folder; valid: a folder"),
    (["run", "perplexity", "--output", "a-file/run"], 2, "'a-file/run' (--output) is not a folder (a-file is a file)"),
    (["run", "--harness", "lm-eval", "--task", "evalsuite_mmlu", "--output", "a-file"], 2,
     "'a-file' (--output) is not a folder"),
    (["bench", "--output", "a-file"], 2, "'a-file' (--output) is not a folder"),
    (["serve", "--served-model-name", " "], 2, "--served-model-name ' ': valid: a non-empty id"),
    (["report", "r", "x", "y", "--root", "a-file"], 2, "'a-file/r' (--root a-file, report r) is not a folder"),
    (["study", "--root", "a-file"], 2, "'a-file/study' (--root a-file, --name study) is not a folder (a-file is"),
    (["bench", "--batches", "0", "--batches", "8"], 2, "--batches [0, 8]: batch sizes must be >= 1"),
    (["run", "mmlu", "--recipe", "int4-awq", "--recipe-config", "resmooth=maybe"], 2, "valid: true or false"),
    (["run", "mmlu", "--recipe", "fp8-modelopt", "--recipe-config", "kv_scale_mode=x"], 2, "valid: simulate, deploy"),
    (["run", "mmlu", "--model", "nope"], 2, "unknown model 'nope'"),
    (["run", "mmlu", "--model", "missing.gguf"], 2, "GGUF file 'missing.gguf' does not exist"),
    (["run", "mmlu", "--dtype", "int3"], 2, "unknown dtype 'int3'"),
    (["run", "mmlu", "--device", "gpu"], 2, "--device 'gpu' is not a device; valid: cpu, cuda, cuda:N"),
    (["run", "mmlu", "--batch-size", "0"], 2, "--batch-size 0"),
    (["run", "mmlu", "--formulation", "mc"], 2, "unknown formulation 'mc'"),
    (["run", "mmlu", "--formulation", "cloze", "letter", "cloze"], 2, "formulation 'cloze' given more than once"),
    (["run", "mmlu", "--subjects", "anatomy", "anatomy"], 2, "subject 'anatomy' given more than once"),
    (["run", "perplexity", "--per-article", "0"], 2, "--per-article 0"),
    (["run", "mt-bench", "--questions", "0"], 2, "--questions 0"),
    (["run", "mt-bench", "--questions", "81"], 2, "--questions 81: the selection holds 80 questions"),
    (["run", "mt-bench", "--categories", "math", "--questions", "11"], 2, "holds 10 questions; valid: 1..10"),
    (["run", "mt-bench", "--categories", "math", "math"], 2, "--categories ['math']: given more than once"),
    (["run", "mt-bench", "--judge-concurrency", "0"], 2, "--judge-concurrency 0: valid: an integer >= 1"),
    (["run", "perplexity", "--articles", "Rhine", "Rhine"], 2, "--articles ['Rhine']: given more than once"),
    (["run", "mmlu", "--base-url", "http://127.0.0.1:9/v1", "--recipe", "int4-awq"], 2, "an endpoint serves"),
    (["run", "--harness", "lm-eval", "--task", "mmlu", "--recipe", "fp9"], 2, "unknown recipe 'fp9'"),
    (["lm-eval", "--model", "evalsuite", "--model_args", "model=smollm2-135m,recipe=fp9", "--tasks", "x"], 2,
     "unknown recipe 'fp9'"),
    (["lm-eval", "--model=evalsuite", "--model_args=recipe=int4-awq,alpha=1", "--tasks", "x"], 2,
     "recipe 'int4-awq' has no settings ['alpha']"),
    (["lm-eval", "--model", "evalsuite", "--device", "tpu", "--tasks", "x"], 2, "--device 'tpu' is not a device"),
    (["serve", "--recipe", "fp9"], 2, "unknown recipe 'fp9'"),
    (["serve", "--port", "-1"], 2, "--port -1"),
    (["serve", "--port", "70000"], 2, "--port 70000: valid: 0-65535"),
    (["serve", "--host", "no-such-host.invalid"], 2, "--host 'no-such-host.invalid' does not resolve"),
    (["runs", "--since", "yesterday"], 2, "--since 'yesterday': valid: a date as YYYY-MM-DD"),
    (["quantize", "--dtype", "int3", "--output", "x"], 2, "unknown dtype 'int3'"),
    (["bench", "--recipes", "fp9"], 2, "unknown recipe 'fp9'"),
    (["bench", "--lengths", "12"], 2, "--lengths '12'"),
    (["bench", "--device", "tpu"], 2, "--device 'tpu' is not a device"),
    (["bench", "--base-url", "127.0.0.1:8000/v1"], 2, "base URL '127.0.0.1:8000/v1'; valid: an http(s) URL"),
    (["run", "mmlu", "--base-url", "localhost:8000"], 2, "base URL 'localhost:8000'; valid: an http(s) URL"),
    (["study", "--recipes", "fp9"], 2, "unknown recipe 'fp9'"),
    (["study", "--device", "gpu"], 2, "--device 'gpu' is not a device"),
    (["study", "--per-subject", "0"], 2, "--per-subject 0: valid: an integer >= 1"),
    (["study", "--mt-bench", "0"], 2, "--mt-bench 0: valid: an integer >= 1"),
    (["study", "--mt-bench-tokens", "-5"], 2, "--mt-bench-tokens -5: valid: an integer >= 1"),
    (["study", "--name", "../elsewhere"], 2, "--name '../elsewhere': valid: a folder name"),
    (["study", "--recipes", "bf16", "int4-awq"], 2, "by default; include it, or name the baseline with --baseline"),
    (["study", "--recipes", "bf16", "int4-awq", "--baseline", "int4-rtn"], 2,
     "--baseline int4-rtn: not among --recipes ['bf16', 'int4-awq']; valid: one of them"),
    (["report", "../r", "no-such-run", "other"], 2, "report name '../r': valid: a folder name"),
    (["quantize", "--output", "a-file"], 2, "--output a-file: a file is there"),
    (["quantize", "--recipe", "int4-rtn", "--format", "hf", "--output", "x"], 2,
     "--format hf: recipe 'int4-rtn' has no HF export here; valid: fp8-block, fp8-dynamic, fp8-modelopt, fp8-official, "
     "int4-awq, int4-awq-asym, int4-gptq, int8-w8a8, nvfp4"),
    (["quantize", "--output", "a-folder"], 2, "--output a-folder: the folder holds files that are no quantized"),
    (["runs", "--index", "no-such-dir/index.sqlite"], 2, "--index no-such-dir/index.sqlite: no run index there"),
    (["compare", "no-such-run", "other"], 3, "'no-such-run' is neither a run folder"),
    (["report", "r", "no-such-run", "other"], 2, "'no-such-run' is neither a run folder"),
    (["gate", "no-such-gate.yaml"], 3, "gate file no-such-gate.yaml does not exist"),
    (["gate", "no-such-gate.yaml", "--device", "gpu"], 3, "--device 'gpu' is not a device"),
    (["plan", "--recipe", "fp9"], 2, "unknown recipe 'fp9' for planning"),
    # a model folder without a tokenizer: refused by what needs text, before it loads
    (["quantize", "--model", "no-tokenizer", "--recipe", "int4-awq", "--output", "q"], 2,
     "recipe 'int4-awq' calibrates on text, and no-tokenizer holds no tokenizer (none of tokenizer.json, "
     "tokenizer.model, tokenizer_config.json); valid: a model folder with its tokenizer's files, or a recipe that "
     "does not calibrate: bf16, fp8-block, fp8-dynamic, fp8-official, int4-rtn"),
    (["run", "perplexity", "--model", "no-tokenizer"], 2, "no-tokenizer holds no tokenizer (none of tokenizer.json"),
    (["run", "--harness", "lm-eval", "--task", "mmlu", "--model", "no-tokenizer"], 2,
     "no-tokenizer holds no tokenizer (none of tokenizer.json"),
    (["lm-eval", "--model", "evalsuite", "--model_args", "model=no-tokenizer", "--tasks", "x"], 2,
     "no-tokenizer holds no tokenizer"),
    (["serve", "--model", "no-tokenizer"], 2, "no-tokenizer holds no tokenizer"),
    # a study checks every recipe against the model before its first run
    (["study", "--model", "no-tokenizer", "--recipes", "fp8-official", "bf16"], 2, "no-tokenizer holds no tokenizer"),
    (["study", "--model", "olmo", "--recipes", "fp8-official", "int4-awq-asym"], 2,
     "recipe 'int4-awq-asym': AutoAWQ folds its q/k/v and gate/up scales into the norm before them"),
]


def test_bad_arguments_fail_before_torch_is_imported(tmp_path):
    """Every case in one fresh interpreter: each exits with its code and message, and at the end
    none of the slow imports has happened."""
    import subprocess
    import sys

    script = """
import contextlib, io, json, sys
from evalsuite.cli import main
out = []
for argv, code, msg in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    out.append([argv, rc, err.getvalue()])
heavy = [m for m in ("torch", "transformers", "scipy", "matplotlib", "uvicorn", "lm_eval") if m in sys.modules]
print(json.dumps({"results": out, "imported": heavy}))
"""
    (tmp_path / "a-file").write_text("not a checkpoint\n")  # what quantize --output must not overwrite
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "no-tokenizer").mkdir()  # a model folder as transformers' save_pretrained writes one
    (tmp_path / "no-tokenizer" / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    from transformers import Olmo2Config

    (tmp_path / "olmo").mkdir()
    (tmp_path / "olmo" / "config.json").write_text(json.dumps(Olmo2Config(num_hidden_layers=2).to_dict()))
    (tmp_path / "olmo" / "tokenizer_config.json").write_text("{}")  # a tokenizer there: only the recipe misfits
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(BAD_ARGUMENTS)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert len(got["results"]) == len(BAD_ARGUMENTS)
    for (argv, code, msg), (_, rc, err) in zip(BAD_ARGUMENTS, got["results"]):
        assert (rc, msg in err) == (code, True), (argv, rc, err)
    assert got["imported"] == []


def test_unknown_option_of_a_task_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "mmlu", "--judge-model", "x"])
    assert e.value.code == 2 and "unrecognized arguments: --judge-model" in capsys.readouterr().err


def test_task_help_lists_its_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "mmlu", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--num-fewshot" in out and "--batch-size" in out


def test_changing_batch_size_resumes_the_same_run(tiny_dir, tmp_path, capsys, monkeypatch):
    """Batch size and batch tokens are execution settings: the same command with another batch
    size finds the same default run folder and scores nothing again."""
    from evalsuite.backends.engine import EngineBackend

    monkeypatch.chdir(tmp_path)
    base = ["run", "mmlu", "--model", str(tiny_dir), "--dtype", "float32", "--per-subject", "1",
            "--subjects", "anatomy", "marketing", "--formulation", "letter", "--no-progress"]
    assert main(base + ["--batch-size", "32"]) == 0
    runs = list((tmp_path / "reports" / "runs").iterdir())
    assert len(runs) == 1
    calls = []
    monkeypatch.setattr(EngineBackend, "loglikelihood", lambda self, reqs, **kw: calls.append(reqs))
    assert main(base + ["--batch-size", "8", "--max-batch-tokens", "512"]) == 0
    assert calls == [] and list((tmp_path / "reports" / "runs").iterdir()) == runs
    # a change that does change scores is another run
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(base + ["--num-fewshot", "1"]) == 0
    assert len(list((tmp_path / "reports" / "runs").iterdir())) == 2


@pytest.mark.parametrize("setting,msg", [
    ("kernel=cuda", "kernel='cuda'; valid: off, scaled_mm"),
    ("activation_scale_ub=-1", "activation_scale_ub must be > 0, got -1"),
    ("scale_ub=3", "recipe 'fp8-official' has no settings ['scale_ub']; valid: activation_scale_ub"),
])
def test_bad_recipe_config_values(setting, msg, tiny_dir, tmp_path, capsys):
    argv = ["run", "mmlu", "--model", str(tiny_dir), "--recipe", "fp8-official", "--recipe-config", setting,
            "--output", str(tmp_path / "x"), "--no-progress", "--per-subject", "1", "--subjects", "anatomy"]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("setting,msg", [
    ("resmooth=maybe", "recipe 'int4-awq': resmooth='maybe'; valid: true or false"),
    ("kernel=cuda", "kernel='cuda'; valid: off, auto, always"),
    ("blocksize=64", "recipe 'int4-awq' has no settings ['blocksize']"),
])
@pytest.mark.parametrize("command", ["run", "quantize"])
def test_bad_recipe_settings_fail_before_a_model_loads(setting, msg, command, tiny_dir, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    argv = (["run", "mmlu", "--per-subject", "1"] if command == "run" else ["quantize"]) + [
        "--model", str(tiny_dir), "--recipe", "int4-awq", "--recipe-config", setting, "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bad_calibration_override(tiny_dir, tmp_path, capsys):
    argv = ["run", "mmlu", "--model", str(tiny_dir), "--recipe", "int4-awq", "--output", str(tmp_path / "x"),
            "--recipe-config", 'calibration={"num_samples": 0}', "--per-subject", "1", "--subjects", "anatomy"]
    assert main(argv) == 2
    assert "calibration needs num_samples >= 1" in capsys.readouterr().err


def test_recipe_spec_of_the_benchmark_scripts():
    from evalsuite.cli import parse_recipe_spec

    assert parse_recipe_spec("bf16") == ("bf16", None)
    assert parse_recipe_spec("int4-awq:resmooth=false,kernel=off") == ("int4-awq", {"resmooth": False, "kernel": "off"})


@pytest.mark.parametrize("argv, rc", [(["run", "--help"], 0), (["run", "-h"], 0), (["run"], 2)])
def test_run_without_a_task_lists_the_tasks(argv, rc, capsys):
    assert main(argv) == rc
    out = capsys.readouterr().out
    assert "usage: evalsuite run TASK [options]; tasks: mmlu, mt-bench, perplexity" in out


def test_the_package_version_is_known_without_its_installed_metadata(monkeypatch):
    """Run from a checkout (``python -m evalsuite``, not installed: so it ran on a GPU machine),
    run records and exported checkpoints still state the version (an export failed there when it
    asked the installed metadata): it is the package's own, which pyproject.toml reads too."""
    import importlib.metadata as md

    import evalsuite
    from evalsuite.records import package_versions

    installed = md.version("evalsuite")
    real = md.version

    def version(name):
        if name == "evalsuite":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    assert package_versions()["evalsuite"] == evalsuite.__version__ == installed
