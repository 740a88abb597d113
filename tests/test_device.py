"""Device handling, checked on the CPU: every tensor the engine makes follows the model's device.

With the default device set to "meta", any tensor created without an explicit device lands on
meta, and the first operation that mixes it with the CPU model fails; so scoring, generation,
calibration and the server's prompt scoring running to the same results under it shows that
each of their tensors is made on the model's device. Also: --device is validated before any
model loads, and bench/gpu_check.py runs on the CPU as a smoke test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evalsuite.engine.generate import SamplingParams, generate
from evalsuite.engine.score import ScoreRequest, score

from . import conftest
from .conftest import needs_cpu_rowwise_scaled_mm, on_meta_default

REQUESTS = [ScoreRequest((1, 2, 3, 4), (5, 6)), ScoreRequest((1, 2, 3, 4), (7,)), ScoreRequest((9, 8), (7, 6, 5)),
            ScoreRequest((3,), (4, 5, 6, 7))]


def test_scoring_and_generation_make_every_tensor_on_the_models_device(tiny):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=5, temperature=0.9, seed=3)]
    want_scores = score(tiny.model, REQUESTS)
    want_tokens = [g.tokens for g in generate(tiny.model, prompts, params)]
    got_scores = on_meta_default(lambda: score(tiny.model, REQUESTS))
    got_tokens = on_meta_default(lambda: [g.tokens for g in generate(tiny.model, prompts, params)])
    assert got_scores == want_scores and got_tokens == want_tokens
    # the static decode path (what a CUDA graph captures) too
    static = on_meta_default(lambda: [g.tokens for g in generate(tiny.model, prompts, params, static=True)])
    assert static == want_tokens
    # tokens on another device are refused with the reason, not silently moved
    with pytest.raises(ValueError, match=r"must be on the model's device \(cpu\)"):
        on_meta_default(lambda: tiny.model(torch.tensor([[1, 2, 3]])))


def test_server_scoring_and_calibration_follow_the_device(tiny):
    from evalsuite.quant.calibrate import collect_amax
    from evalsuite.server.scheduler import prompt_logprobs

    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 8]]
    want = prompt_logprobs(tiny.model, seqs, [2, 2, 2])
    got = on_meta_default(lambda: prompt_logprobs(tiny.model, seqs, [2, 2, 2]))
    assert [g.token_logprobs for g in got] == [w.token_logprobs for w in want]
    assert on_meta_default(lambda: collect_amax(tiny.model, seqs)) == collect_amax(tiny.model, seqs)


FAMILIES = {  # each family's own code: its RoPE tables, embedding scale, windows, sinks, experts
    "gemma3": lambda: conftest.tiny_gemma3(), "olmo3": lambda: conftest.tiny_olmo("olmo3"),
    "gpt_oss": lambda: conftest.tiny_gpt_oss(), "qwen3_moe": lambda: conftest.tiny_moe("qwen3_moe"),
    "smollm3": lambda: conftest.tiny_smollm3(window=8), "granite": lambda: conftest.tiny_granite(),
    "mixtral": lambda: conftest.tiny_moe("mixtral", window=8), "qwen2_moe": lambda: conftest.tiny_moe("qwen2_moe"),
}


@pytest.mark.parametrize("family, recipe", [
    ("gemma3", "int4-awq-asym"), ("olmo3", "int4-awq"), ("gpt_oss", "fp8-modelopt"), ("qwen3_moe", "int4-awq-asym"),
    ("smollm3", "nvfp4"), ("granite", "fp8-official"), ("phi3-longrope", "int4-awq"), ("mixtral", "fp8-block"),
    ("qwen2_moe", "fp8-dynamic"), ("qwen3_moe", "int4-gptq"), ("gemma3", "int8-w8a8"), ("qwen2_moe", "int8-w8a8"),
])
def test_each_family_and_recipe_make_their_tensors_on_the_models_device(family, recipe, longrope, calib_file,
                                                                         tmp_path, monkeypatch):
    """A fresh model's whole life under the "meta" default device: the recipe's calibration
    (the model's first forwards: tables made on first use are made then), scoring, and dynamic
    and static decode give what the same steps give on the CPU without it, calibrated anew."""
    from evalsuite.engine.load import load
    from evalsuite.quant.api import apply_recipe, get_recipe
    from evalsuite.quant.configs import calibrates

    path = tmp_path / family
    if family == "phi3-longrope":
        shutil.copytree(longrope.path, path)
    else:
        torch.manual_seed(0)
        FAMILIES[family]().save_pretrained(path)
    conftest.make_tokenizer().save_pretrained(path)  # calibration reads its text through it
    over = {"calibration": {"source": str(calib_file)}} if calibrates(get_recipe(recipe).config) else None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.9, seed=3)]

    def life(cache: str):
        monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / cache))  # no statistics shared between the two
        lm = load(str(path), "float32")
        apply_recipe(lm, recipe, over)
        return (score(lm.model, REQUESTS), [g.tokens for g in generate(lm.model, prompts, params)],
                [g.tokens for g in generate(lm.model, prompts, params, static=True)])

    on_meta = on_meta_default(lambda: life("meta"))
    assert on_meta == life("plain")


def _fused_tensors(model) -> list[torch.Tensor]:
    """Every tensor the fused q/k/v and gate/up products hold (their own, and their inner modules')."""
    found = []
    for m in model.modules():
        fused = getattr(m, "_fused", None)
        for v in (vars(fused).values() if fused is not None else ()):
            items = v if isinstance(v, tuple) else (v,)
            found += [t for t in items if isinstance(t, torch.Tensor)]
            found += [t for t in items if isinstance(t, torch.nn.Module) for t in (*t.parameters(), *t.buffers())]
    return found


@pytest.mark.parametrize("recipe", ["bf16", "fp8-dynamic"])
def test_fused_products_follow_a_move_of_the_model(tiny_dir, recipe):
    """load() builds the model on the CPU, fused, then moves it to the device: the fused products
    must move with it (on a GPU, every calibrating recipe's first forward met a fused q/k/v
    weight left on the CPU)."""
    from evalsuite.engine.load import load
    from evalsuite.quant.api import apply_recipe

    lm = load(str(tiny_dir), "float32", "cpu")
    apply_recipe(lm, recipe)
    fused = _fused_tensors(lm.model)
    assert fused and all(t.device.type == "cpu" for t in fused)
    lm.model.to("meta")
    assert all(t.device.type == "meta" for t in _fused_tensors(lm.model))


@pytest.mark.parametrize("device, message", [
    ("cuda", "no CUDA device is available here") if not torch.cuda.is_available() else ("cuda:99", "only"),
    ("tpu", "valid: cpu, cuda, cuda:N"),
])
def test_bad_device_fails_before_any_model_loads(device, message, capsys, monkeypatch):
    from evalsuite import cli

    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["run", "mmlu", "--device", device, "--per-subject", "1"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("recipe, config, path", [
    ("int4-rtn", {"kernel": "auto"}, "INT4 packed kernel (_weight_int4pack_mm) for <= 4 rows, dequantized GEMM above"),
    pytest.param("fp8-official", {"kernel": "scaled_mm"}, "FP8 torch._scaled_mm", marks=needs_cpu_rowwise_scaled_mm),
    ("fp8-official", {}, "FP8 simulated: E4M3 values dequantized, "),
    pytest.param("fp8-dynamic", {"kernel": "scaled_mm"}, "FP8 torch._scaled_mm", marks=needs_cpu_rowwise_scaled_mm),
    ("int8-w8a8", {"kernel": "int_mm", "smoothquant": False, "gptq": False}, "INT8 torch._int_mm (int32 sums), inputs"),
    ("int8-w8a8", {"smoothquant": False, "gptq": False}, "INT8 codes in float32 GEMMs (exact int32 sums"),
])
def test_run_record_states_the_device_and_kernel_path(tiny_dir, recipe, config, path):
    from evalsuite.backends.engine import EngineBackend
    from evalsuite.engine.load import load
    from evalsuite.quant.api import apply_recipe

    lm = load(str(tiny_dir), "bfloat16")
    record = apply_recipe(lm, recipe, config)
    d = EngineBackend(lm, record).describe()
    assert d["device"] == "cpu" and d["device_name"].startswith("cpu")
    assert d["kernel_path"].startswith(path)


def test_run_record_reads_the_nvidia_driver_version(tmp_path):
    """The driver's own report, in both its forms (proprietary and open kernel modules; the open
    one as reported in nix-community/nixGL issue #186, where a parser expecting "Module  X" broke)."""
    from evalsuite.bench import nvidia_driver_version

    lines = {"closed": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                       "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n",
             "open": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  565.57.01  Release Build  "
                     "(dvs-builder@U16-A24-9-2)  Thu Oct 10 12:15:00 UTC 2024\n"}
    for name, text in lines.items():
        (tmp_path / name).write_text(text)
    assert nvidia_driver_version(str(tmp_path / "closed")) == "535.104.05"
    assert nvidia_driver_version(str(tmp_path / "open")) == "565.57.01"
    assert nvidia_driver_version(str(tmp_path / "absent")) is None


def test_gpu_check_runs_on_the_cpu_as_a_smoke_test():
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shapes", "smollm2-135m", "--quick"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for figure in ("floors: copy bandwidth", "parity float32", "parity bfloat16", "scoring 16 prompts",
                   "decode batch 1 (eager):", "decode batch 4 (eager):", "recipe fp8-modelopt:",
                   "recipe fp8-official:", "recipe int4-awq:", "fp8-modelopt / fp8-official",
                   "family qwen3:", "family qwen3-yarn:", "family qwen3_moe:", "family qwen2_moe:", "family gpt_oss:",
                   "family granite:", "family smollm3:", "family olmo2:", "family olmo3:", "family mistral-window:",
                   "family phi3-longrope:", "family gemma2:", "family gemma3:"):
        assert figure in text, text
    assert "FAILED" not in text, text
    assert "batch invariance: prompt 0 scored alone" in text and "(identical;" in text, text
    assert "against the same steps run eagerly: " in text, text  # the figure that matters is a GPU's
    for b in (1, 4):  # where a call's time goes, by DecodeBatch method (no graphs to capture on the CPU)
        assert f"decode batch {b}: 1 call(s) more" in text and "steps captured 0 []" in text, text
    assert text.count("prompt 0 alone and among 16: identical") == 3, text  # each recipe's, real kernels
    for recipe in ("fp8-modelopt", "fp8-official", "int4-awq"):  # where each recipe's time goes
        line = next(x for x in text.splitlines() if x.startswith(f"  recipe {recipe} phases (s): "))
        labels = [part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
        assert [label for label, _ in labels] == [
            "sim: copy", "apply (calibration included unless cached)", "parity forward", "real: copy", "apply",
            "parity forward", "projection parity", "scoring", "decode"], line
        assert all(float(seconds) >= 0 for _, seconds in labels), line
    f32 = float(text.split("parity float32: logits max |engine - transformers| = ")[1].split()[0])
    assert f32 <= 1e-3


def test_packed_prefill_through_varlen_attention(tiny, monkeypatch):
    """The CUDA prefill path (one varlen FlashAttention call over the packed batch, K/V written to
    the cache with one indexed write), run here with a reference varlen attention written from
    its documented contract: scores and generations are the per-sequence loop's."""
    import torch.nn.functional as F

    from evalsuite.engine import model as engine_model

    calls = []

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, **kw):
        assert window_size == (-1, 0) and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        bounds = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:])) and bounds[-1] == q.shape[0]
        calls.append(len(bounds) - 1)
        outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                               enable_gqa=True)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:])]
        return torch.cat(outs)

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=6)
    want_scores = score(tiny.model, REQUESTS)
    want_tokens = [g.tokens for g in generate(tiny.model, prompts, params)]
    monkeypatch.setattr(engine_model, "_varlen", lambda: (reference_varlen, {}, frozenset()))
    monkeypatch.setattr(engine_model, "use_varlen", lambda q: True)
    assert score(tiny.model, REQUESTS) == want_scores
    assert set(calls) == {4}  # every layer: the four contexts (each short one with its continuation) in one call
    calls.clear()
    assert [g.tokens for g in generate(tiny.model, prompts, params)] == want_tokens
    assert max(calls) == 3  # the three prompts' prefill was one call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_masked_grouped_attention(dtype):
    """Decode attention (the query heads of a KV head as that head's queries, one SDPA call over
    the cache as stored) against the definition in float64: each query head attends to its KV
    head's keys up to its row's position, masked rows and an unmasked step included."""
    from evalsuite.engine.model import _decode_attention

    torch.manual_seed(0)
    B, H, KV, L, D = 3, 8, 2, 11, 16
    q, k, v = (torch.randn(B, H, 1, D).to(dtype), torch.randn(B, KV, L, D).to(dtype),
               torch.randn(B, KV, L, D).to(dtype))
    positions = torch.tensor([10, 4, 0])
    mask = (torch.arange(L) <= positions[:, None])[:, None, None, :]

    def definition(mask):
        kk, vv = (t.double().repeat_interleave(H // KV, dim=1) for t in (k, v))  # [B, H, L, D]
        scores = q.double() @ kk.transpose(-1, -2) / D ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ vv

    tol = 1e-5 if dtype == torch.float32 else 2e-2  # BF16: the output's own rounding
    for m in (mask, None):
        got = _decode_attention(q, k, v, m)
        assert got.dtype == dtype and got.shape == (B, H, 1, D)
        assert torch.allclose(got.double(), definition(m), atol=tol, rtol=tol)
    # the row at position 0 sees only its first key: its output is that key's value, per KV head
    got = _decode_attention(q, k, v, mask)
    assert torch.equal(got[2, :, 0], v[2].repeat_interleave(H // KV, dim=0)[:, 0])


class _GemmRows:
    """The row count of every GEMM that reaches torch's dispatcher inside the ``with`` block: the
    input's rows for linear (which inference mode dispatches whole), mm, addmm (its second
    argument), torch._scaled_mm and the packed INT4 products. Attention's batched products (bmm,
    SDPA) are per sequence and not counted."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten, rows = torch.ops.aten, []
        ops = {aten.linear: 0, aten.mm: 0, aten.addmm: 1, aten._scaled_mm: 0, aten._weight_int4pack_mm: 0,
               aten._weight_int4pack_mm_for_cpu: 0}

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket in ops:
                    a = args[ops[func.overloadpacket]]
                    rows.append(a.numel() // a.shape[-1])
                return func(*args, **(kwargs or {}))

        self.rows, self.mode = rows, Spy()

    def __enter__(self):
        self.mode.__enter__()
        return self.rows

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("recipe, config", [
    (None, None),
    ("fp8-modelopt", {"kernel": "scaled_mm"}),  # per-tensor scales: torch's CPU _scaled_mm takes them in 2.11 too
    pytest.param("fp8-official", {"kernel": "scaled_mm"}, marks=needs_cpu_rowwise_scaled_mm),
    ("int4-awq", {"kernel": "auto"}),
])
def test_scoring_runs_every_gemm_on_fixed_row_blocks_where_the_device_asks(tiny_dir, monkeypatch, recipe, config):
    """A GPU's GEMM library picks its kernel by row count, so batch invariance there rests on every
    projection of a scoring forward (prefill, extension, float32 lm_head) running at one row count
    whatever the batch. The CPU needs no blocks; given some here (as a GPU gets them), every GEMM of
    one request alone and of a batch of 27 runs at exactly those row counts, the scores stay
    the unblocked ones, and the server's prompt scoring does the same."""
    from evalsuite.engine import linear
    from evalsuite.engine.load import load
    from evalsuite.quant.api import apply_recipe
    from evalsuite.server.scheduler import prompt_logprobs

    from .test_score import _requests

    lm = load(str(tiny_dir), "float32" if recipe is None else "bfloat16")
    if recipe is not None:
        apply_recipe(lm, recipe, config)
    reqs = _requests(seed=3, n=20)  # 27 requests, ~600 context tokens, cloze-like extensions among them
    prompts = [list(r.context + r.continuation) for r in reqs[:6]]
    with _GemmRows() as unblocked:
        want = score(lm.model, reqs, max_batch_size=64, max_batch_tokens=100_000)
    want_served = prompt_logprobs(lm.model, prompts, [0] * 6)
    assert max(unblocked) > 500  # the spy sees the whole batch's ~560 packed rows in one call
    blocks = (256, 8)  # not in linear.TRANSPOSED_ROWS, where the CPU's float32 route turns the product around
    monkeypatch.setitem(linear.INVARIANT_ROW_BLOCKS, "cpu", blocks)
    with _GemmRows() as alone_rows:
        alone = score(lm.model, reqs[:1])
    with _GemmRows() as batch_rows:
        batched = score(lm.model, reqs, max_batch_size=64, max_batch_tokens=100_000)
    with _GemmRows() as server_rows:
        served = prompt_logprobs(lm.model, prompts, [0] * 6)
    assert set(alone_rows) <= set(blocks) and set(batch_rows) <= set(blocks) and set(server_rows) <= set(blocks)
    assert batch_rows.count(256) > 2 * alone_rows.count(256)  # the batch ran in several blocks
    assert alone[0].logprob == pytest.approx(want[0].logprob, abs=1e-5)
    assert [r.logprob for r in batched] == pytest.approx([r.logprob for r in want], abs=1e-4, rel=0)
    for got, w in zip(served, want_served):
        assert got.token_logprobs[1:] == pytest.approx(w.token_logprobs[1:], abs=1e-4, rel=0)


def test_run_record_states_the_scoring_row_blocks(monkeypatch):
    from evalsuite.bench import device_info
    from evalsuite.engine import linear

    assert "scoring_gemm_row_blocks" not in device_info("cpu")  # the CPU's linear is batch-invariant as is
    monkeypatch.setitem(linear.INVARIANT_ROW_BLOCKS, "cpu", (2048, 256))
    assert device_info("cpu")["scoring_gemm_row_blocks"] == {"projections": 2048, "lm_head": 256}
