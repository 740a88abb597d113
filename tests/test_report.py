"""The throughput benchmark's method on the engine and through the server, and a report rendered
from real runs of the default model: plots that are not empty and are the ones the HTML shows,
CSVs that read back equal to the tables."""

from __future__ import annotations

import base64
import json
import os
import re

import pandas as pd
import pytest
import torch

from evalsuite import cli
from evalsuite.bench import BenchResult, endpoint_row, engine_row, format_tables, percentiles
from evalsuite.server.serve import BackgroundServer, served_model

from .conftest import app_on_localhost


def test_percentiles_match_numpy():
    import numpy as np

    xs = [float(x) for x in np.random.default_rng(0).exponential(1.0, 500)]
    got = percentiles(xs)
    assert [got["p50"], got["p90"], got["p99"]] == pytest.approx(np.percentile(xs, [50, 90, 99]))


def test_engine_row_counts_every_token_and_includes_time_to_first_token(tiny):
    row = engine_row(tiny, {"name": "bf16"}, isl=12, osl=5, batch=3)
    assert (row.output_tokens, row.batch) == (15, 3)
    assert row.tokens_per_s == pytest.approx(15 / row.seconds)
    assert 0 < row.ttft_ms["p50"] <= row.seconds * 1e3
    assert row.itl_ms["p50"] > 0 and row.kv_cache_bytes > 0 and row.weight_bytes == tiny.model.resident_bytes()
    assert row.kernel_path and row.device.startswith("cpu")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resettable peak memory is Linux's")
def test_engine_row_peak_memory_is_the_rows_own(tiny):
    """A study benchmarks in the process that ran every evaluation before: a row's peak memory
    is what the process held during the row, not its high-water mark since it started."""
    import resource

    big = torch.ones(1_500_000_000 // 4)  # 1.5 GB touched, then freed: the process's peak so far
    del big
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = engine_row(tiny, {"name": "bf16"}, isl=12, osl=5, batch=3)
    assert row.kv_cache_bytes < row.peak_memory_bytes < process_peak - 1_000_000_000


def test_endpoint_row_streams_exactly_the_requested_tokens(tiny):
    """The row's tokens are the server's own counts (usage in the last streamed chunk)."""
    with BackgroundServer(served_model(tiny, {"name": "bf16"}, "tiny", max_len=128)) as srv:
        row = endpoint_row(srv.base_url, "tiny", isl=10, osl=6, batch=2, vocab=tiny.model.config.vocab_size)
        stats = srv.served.scheduler.stats
    assert row.output_tokens == 12 == stats["tokens"] and row.ttft_ms["p50"] > 0 and row.itl_ms["p50"] > 0


def scripted_stream(made: int, usage: bool):
    """A scripted stand-in endpoint (a test tool, not the product) whose streamed completions end
    after ``made`` tokens, whatever max_tokens and ignore_eos ask, and report usage only if
    ``usage``: what a server that does not honour ignore_eos, or an older one, sends."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        def events():
            head = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
            for i in range(made):
                chunk = {**head, "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if usage:
                counts = {"prompt_tokens": 10, "completion_tokens": made, "total_tokens": 10 + made}
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': counts})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app_on_localhost(app)


@pytest.mark.parametrize("usage, want, warning", [(True, 2 * 3, "ended 2 of 2 requests before 8 tokens (fewest: 3"),
                                                  (False, 2 * 8, "did not report usage for 2 of 2")])
def test_endpoint_row_counts_what_the_server_made_and_warns(usage, want, warning, caplog):
    with scripted_stream(made=3, usage=usage) as url:
        row = endpoint_row(url, "m", isl=10, osl=8, batch=2)
    assert row.output_tokens == want and row.tokens_per_s == pytest.approx(want / row.seconds)
    assert warning in caplog.text


def test_bench_of_an_endpoint_that_needs_a_key(tmp_path, tiny, tiny_dir, capsys, monkeypatch):
    """`evalsuite bench --base-url` sends the key named by --api-key-env, never writes it, and a
    wrong key is a one-line error before any timing."""
    secret = "bench-key-7f3a"
    with BackgroundServer(served_model(tiny, {"name": "bf16"}, "tiny", max_len=512), api_key=secret) as srv:
        argv = ["bench", "--base-url", srv.base_url, "--model", str(tiny_dir), "--served-model", "tiny",
                "--api-key-env", "BENCH_TEST_KEY", "--lengths", "8/4", "--batches", "2",
                "--output", str(tmp_path / "b")]
        monkeypatch.setenv("BENCH_TEST_KEY", "wrong")
        assert cli.main(argv) == 2
        assert "HTTP 401" in capsys.readouterr().err and not (tmp_path / "b").exists()
        monkeypatch.setenv("BENCH_TEST_KEY", secret)
        assert cli.main(argv) == 0
        # the same endpoint's accuracy, for the report below
        assert cli.main(["run", "mmlu", "--base-url", srv.base_url, "--model", "tiny", "--tokenizer", str(tiny_dir),
                         "--api-key-env", "BENCH_TEST_KEY", "--formulation", "cloze", "--per-subject", "2",
                         "--subjects", "anatomy", "marketing", "--output", str(tmp_path / "run"),
                         "--no-progress"]) == 0
    rows = BenchResult.read(tmp_path / "b").rows
    assert [(r.isl, r.osl, r.batch, r.output_tokens) for r in rows] == [(8, 4, 1, 4), (8, 4, 2, 8)]
    printed = capsys.readouterr().out
    assert secret not in (tmp_path / "b" / "bench.json").read_text() and secret not in printed
    # rows labelled as the endpoint's runs are (the recipe `evalsuite serve` states); memory unknown: "-"
    assert {r.recipe for r in rows} == {"bf16"}
    row = next(line for line in printed.splitlines() if line.strip().startswith("bf16") and " 8/4 " in line)
    assert row.split()[6:9] == ["-", "-", "-"]
    # so the report puts the run and the bench on one point
    monkeypatch.setenv("EVALSUITE_INDEX", str(tmp_path / "index.sqlite"))
    assert cli.main(["run", "mmlu", "--model", str(tiny_dir), "--recipe", "fp8-official", "--formulation", "cloze",
                     "--per-subject", "2", "--subjects", "anatomy", "marketing", "--output", str(tmp_path / "local"),
                     "--no-progress"]) == 0
    assert cli.main(["report", "r", str(tmp_path / "run"), str(tmp_path / "local"), "--bench", str(tmp_path / "b"),
                     "--root", str(tmp_path / "reports")]) == 0
    acc = pd.read_csv(tmp_path / "reports" / "r" / "accuracy.csv")
    best = max(r.tokens_per_s for r in rows)
    assert list(acc[acc.recipe == "bf16"].throughput_tok_s) == pytest.approx([best, best])  # acc and acc_norm
    assert acc[acc.recipe == "fp8-official"].throughput_tok_s.isna().all()  # not benchmarked
    assert cli.main(["bench", "--base-url", srv.base_url, "--model", "tiny", "--recipes", "int4-awq"]) == 2
    assert "--recipes int4-awq with --base-url" in capsys.readouterr().err


def test_bench_tables_are_laid_out_like_the_notes(tmp_path, tiny_dir, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--model", str(tiny_dir), "--dtype", "float32", "--recipes", "bf16", "fp8-official",
                   "--lengths", "16/4", "24/4", "--batches", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    result = BenchResult.read(out)
    assert {(r.recipe, r.isl, r.batch) for r in result.rows} == {
        (rc_, isl, b) for rc_ in ("bf16", "fp8-official") for isl in (16, 24) for b in (1, 2)}
    assert "Maximum throughput, output tokens/s" in printed and "Batch 1 (minimum latency)" in printed
    a, b = result.best("bf16", 16, 4), result.best("fp8-official", 16, 4)
    assert f"{a.tokens_per_s / b.tokens_per_s:.2f}x" in printed  # the speedup row against fp8-official
    assert "FP8 simulated" in printed
    assert format_tables(result) in printed


def test_bench_rejects_bad_lengths_before_loading(capsys):
    assert cli.main(["bench", "--lengths", "128x32"]) == 2
    assert "--lengths '128x32': give ISL/OSL" in capsys.readouterr().err


@pytest.mark.slow
def test_report_from_real_runs_of_the_default_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVALSUITE_INDEX", str(tmp_path / "index.sqlite"))
    runs = []
    for recipe in ("fp8-official", "int4-rtn"):
        out = tmp_path / recipe
        assert cli.main(["run", "mmlu", "--recipe", recipe, "--formulation", "cloze", "--per-subject", "1",
                         "--output", str(out), "--no-progress"]) == 0
        runs.append(str(out))
    assert cli.main(["bench", "--recipes", "fp8-official", "int4-rtn", "--lengths", "32/4", "--batches", "4",
                     "--output", str(tmp_path / "bench")]) == 0
    assert cli.main(["runs", "--task", "mmlu"]) == 0
    listing = capsys.readouterr().out
    assert "fp8-official" in listing and "int4-rtn" in listing
    assert cli.main(["report", "r", *runs, "--bench", str(tmp_path / "bench"), "--root", str(tmp_path / "reports"),
                     "--tolerance", "mmlu=0.05"]) == 0
    folder = tmp_path / "reports" / "r"
    html = (folder / "report.html").read_text()
    pngs = sorted(folder.glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_vs_throughput.png", "subjects_mmlu.cloze.acc.png"}
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        m = re.search(rf"data-file='{re.escape(png.name)}' src='data:image/png;base64,([^']+)'", html)
        assert m and base64.b64decode(m.group(1)) == data  # the HTML shows exactly this plot
    md = (folder / "report.md").read_text()
    assert "![accuracy vs throughput](accuracy_vs_throughput.png)" in md
    # the published note's figures under their own heading, aligned in a fenced block, never
    # as a paragraph a reader would take for this run's throughput
    published = md.split("## Published reference (its own figures, not measured here)\n\n```text\n")[1]
    assert published.startswith("NVIDIA Technical Blog") and "1.44x" in published.split("```")[0]
    # counts as integers, no "nan" where a figure does not apply
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    flips = pd.read_csv(folder / "verdicts.csv").iloc[0]
    row = next(line for line in md.splitlines() if line.startswith("| int4-rtn ") and "mmlu.cloze.acc " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[9:11] == [str(int(flips.right_to_wrong)), str(int(flips.wrong_to_right))]
    verdicts = pd.read_csv(folder / "verdicts.csv")
    assert set(verdicts.candidate) == {"int4-rtn"} and set(verdicts.metric) == {"mmlu.cloze.acc", "mmlu.cloze.acc_norm"}
    assert verdicts.loc[0, "verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    acc = pd.read_csv(folder / "accuracy.csv")
    run = json.loads((tmp_path / "int4-rtn" / "run.json").read_text())
    row = acc[(acc.recipe == "int4-rtn") & (acc.metric == "mmlu.cloze.acc")].iloc[0]
    assert row.value == pytest.approx(run["metrics"]["cloze"]["acc"]["overall"]["acc"])
    assert row.throughput_tok_s == pytest.approx(BenchResult.read(tmp_path / "bench").best("int4-rtn", 32, 4).tokens_per_s)
    subjects = pd.read_csv(folder / "subjects_mmlu.cloze.acc.csv")
    assert len(subjects) == 57 and set(subjects.candidate) == {"int4-rtn"}
    assert "cpu" in html and "INT4 packed kernel" in html  # device and kernel path stated
