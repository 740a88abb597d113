"""`evalsuite bench`: output-token throughput per recipe, in the method of NVIDIA's Llama 3.1 405B
note (tasks/references/llama-3.1-405b-h200.yaml):

  output tokens/s = total generated tokens / total latency, time to first token included,

on a grid of input/output lengths, at batch 1 (minimum latency) and at the best of a sweep of
batch sizes (maximum throughput). Prompts are seeded random tokens of exactly ISL tokens, and
every sequence generates exactly OSL tokens (end-of-sequence ignored), so every recipe does the
same work. Per row also: time to first token and inter-token latency percentiles (p50, p90, p99),
the weights' resident bytes, the KV cache's bytes, the process's peak memory during the row, the
device and the kernel path (a real low-bit kernel or a simulation: on a CPU, simulated FP8 is
slower than BF16, which says nothing about the deployed speed).

Through an endpoint (``--base-url``) the same grid runs as concurrent streaming requests
(``ignore_eos``, as vLLM's and the suite's servers accept), timing what a client sees. The
output tokens are the server's own count (``usage.completion_tokens``, asked for with
``stream_options.include_usage`` as vLLM's benchmark does): a server that ends a sequence before
OSL tokens is credited with the tokens it made, and a warning says so.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = ((128, 32), (512, 32))
NOTE_LENGTHS = ((2048, 128), (32768, 2048), (120000, 2048))
DEFAULT_BATCHES = (1, 8, 32)


@dataclass
class BenchRow:
    recipe: str
    isl: int
    osl: int
    batch: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    peak_memory_bytes: int | None = None
    device: str = ""
    kernel_path: str = ""


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def best(self, recipe: str, isl: int, osl: int) -> BenchRow | None:
        """The maximum-throughput row (best over the batch sweep)."""
        rows = [r for r in self.rows if (r.recipe, r.isl, r.osl) == (recipe, isl, osl)]
        return max(rows, key=lambda r: r.tokens_per_s) if rows else None

    def batch1(self, recipe: str, isl: int, osl: int) -> BenchRow | None:
        return next((r for r in self.rows if (r.recipe, r.isl, r.osl, r.batch) == (recipe, isl, osl, 1)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> BenchResult:
        return cls([BenchRow(**r) for r in blob["rows"]], blob.get("meta", {}))

    @classmethod
    def read(cls, folder: str | Path) -> BenchResult:
        path = Path(folder) / "bench.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder}: not a bench folder (no readable bench.json: {e})") from None


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98]}


def kernel_path(recipe: dict[str, Any], model) -> str:
    """What computes the recipe's products in ``model`` on its device, in words: where the recipe
    asks for a kernel, whether its quantized modules run it (each falls back to the simulation
    where its device has no such kernel)."""
    from .engine.linear import cpu_has_native_bf16

    name, cfg = recipe.get("name", "bf16"), recipe.get("config") or {}
    dense = "BF16 GEMM" if model.device.type != "cpu" or cpu_has_native_bf16() else \
        "float32 GEMM rounded to BF16 (no BF16 instructions)"
    if name == "nvfp4":  # no FP4 GEMM before Blackwell, none in torch's CPU build
        return "NVFP4 simulated: E2M1 values times their E4M3 block scales in a float32 GEMM, times the tensor " \
               "scales, rounded to the activation dtype"
    if name == "fp8-block":  # torch's block-scaled FP8 GEMM is not wired: simulated on every device
        return "FP8 block-scaled simulated: E4M3 values times their input-group and weight-tile scales in a " \
               "float32 GEMM, rounded to the activation dtype"
    if name == "int8-w8a8":
        uses = [m.uses_int_mm for m in model.modules() if hasattr(m, "uses_int_mm")]
        exact = "INT8 codes in float32 GEMMs (exact int32 sums: whole rows, or slices of 1,024 inputs)"
        path = "INT8 torch._int_mm (int32 sums)" if all(uses) else exact
        if any(uses) and not all(uses):
            path += f"; torch._int_mm in {sum(uses)} of {len(uses)} projections"
        return path + ", inputs quantized per token at run time"
    if not name.startswith(("fp8", "int4")):
        return dense
    fp8 = name.startswith("fp8")
    simulated = f"FP8 simulated: E4M3 values dequantized, {dense}" if fp8 else \
        f"INT4 simulated: dequantized weights, {dense}"
    if cfg.get("kernel", "off") == "off":
        return simulated
    switches = [m.use_kernel for m in model.modules() if hasattr(m, "kernel_asked") and m.kernel_asked]
    if not any(switches):
        return f"{simulated} (the {'FP8' if fp8 else 'INT4'} kernel asked for does not run on {model.device})"
    path = "FP8 torch._scaled_mm" if fp8 else "INT4 packed kernel (_weight_int4pack_mm)" + (
        " for <= 4 rows, dequantized GEMM above" if cfg["kernel"] == "auto" else "")
    if not all(switches):
        path += f" in {sum(switches)} of {len(switches)} projections, simulated in the others"
    return path


def _random_prompts(vocab: int, n: int, isl: int, osl: int, seed: int) -> list[list[int]]:
    """Random prompts of their own for every (isl, osl, batch) row: with one seed for all, a
    row's first prompts would be the previous row's, and a server with prefix caching (vLLM's is
    on by default; evalsuite serve's too) would serve them from its cache."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + isl) * 1_009 + osl) * 1_013 + n)
    return torch.randint(10, vocab - 10, (n, isl), generator=g).tolist()


def _reset_peak_memory(device: str) -> None:
    """Start a row's peak memory from the present: CUDA's allocator statistics; on Linux the
    process's resident high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM), so that
    a row does not report what earlier work in the same process held (a study runs every step in
    one process). Elsewhere the CPU peak stays the process's own since it started."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark


def engine_row(lm, recipe: dict[str, Any], isl: int, osl: int, batch: int, *, seed: int = 0,
               max_prefill_tokens: int = 4096) -> BenchRow:
    """``batch`` sequences of ``isl`` random tokens, each generating exactly ``osl`` tokens."""
    from .engine.generate import DecodeBatch, Generation, SamplingParams

    model = lm.model
    device = str(model.device)
    model.check_length(isl + osl)
    prompts = _random_prompts(model.config.vocab_size, batch, isl, osl, seed)
    params = SamplingParams(max_new_tokens=osl)  # greedy; no stop tokens: exactly osl tokens each
    _reset_peak_memory(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    gens = [Generation(p, params) for p in prompts]
    decode = DecodeBatch(model, batch, isl + osl, prefix_cache=False)  # every prompt prefilled whole
    kv_bytes = sum(t.numel() * t.element_size() for t in (decode.cache.k, decode.cache.v))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    ttft, steps = [], []
    waiting = list(gens)
    while waiting:  # prefill in chunks of at most max_prefill_tokens prompt tokens
        take = max(1, max_prefill_tokens // isl)
        chunk, waiting = waiting[:take], waiting[take:]
        decode.add(chunk)
        sync()
        ttft += [time.perf_counter() - t0] * len(chunk)
    while any(g.finish_reason is None for g in gens):
        s = time.perf_counter()
        decode.step()
        sync()
        steps.append(time.perf_counter() - s)
    seconds = time.perf_counter() - t0
    tokens = sum(len(g.tokens) for g in gens)
    return BenchRow(recipe["name"], isl, osl, batch, tokens, seconds, tokens / seconds,
                    {k: v * 1e3 for k, v in percentiles(ttft).items()},
                    {k: v * 1e3 for k, v in percentiles(steps).items()},
                    weight_bytes=model.resident_bytes(), kv_cache_bytes=kv_bytes,
                    peak_memory_bytes=_peak_memory(device), device=_device_name(device),
                    kernel_path=kernel_path(recipe, model))


def endpoint_row(base_url: str, model: str, isl: int, osl: int, batch: int, *, vocab: int = 32000,
                 seed: int = 0, api_key: str = "EMPTY", timeout: float = 600.0, label: str = "endpoint") -> BenchRow:
    """``batch`` concurrent streaming completions of ``isl`` token ids, ``osl`` tokens each; the
    row is labelled ``label`` (what the endpoint serves, as its runs are labelled)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
    prompts = _random_prompts(vocab, batch, isl, osl, seed)

    def one(prompt: list[int]) -> tuple[float, list[float], int | None]:
        t0 = time.perf_counter()
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=osl, temperature=0.0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        stamps, made = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text is not None:
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                made = chunk.usage.completion_tokens
        return stamps[0] - t0 if stamps else float("nan"), [b - a for a, b in zip(stamps, stamps[1:])], made

    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - t0
    tokens = _endpoint_tokens([r[2] for r in results], osl, base_url)
    return BenchRow(label, isl, osl, batch, tokens, seconds, tokens / seconds,
                    {k: v * 1e3 for k, v in percentiles([r[0] for r in results]).items()},
                    {k: v * 1e3 for k, v in percentiles([x for r in results for x in r[1]]).items()},
                    device=f"endpoint {base_url}", kernel_path="as served")


def _endpoint_tokens(made: list[int | None], osl: int, base_url: str) -> int:
    """Output tokens of a row's requests: the server's counts; ``osl`` each where it gave none (a
    streamed chunk may hold several tokens, so the chunks are no count)."""
    if any(m is None for m in made):
        log.warning("%s did not report usage for %d of %d streamed requests; counting %d tokens for each of those",
                    base_url, sum(m is None for m in made), len(made), osl)
    short = [m for m in made if m is not None and m < osl]
    if short:
        log.warning("%s ended %d of %d requests before %d tokens (fewest: %d; is ignore_eos honoured?): tokens/s "
                    "counts the tokens it made", base_url, len(short), len(made), osl, min(short))
    return sum(osl if m is None else m for m in made)


def device_info(device: str) -> dict[str, Any]:
    """What a run record states about the device: its name and, on a GPU, compute capability, the
    CUDA version torch was built with, the NVIDIA driver's version and whether the GPU has FP8
    tensor cores (sm_89 and later); and where scoring runs its GEMMs in fixed row blocks for batch
    invariance (``engine.linear.invariant_row_blocks``), their sizes."""
    from .engine.linear import invariant_row_blocks

    info: dict[str, Any] = {"device_name": _device_name(device), "torch": torch.__version__}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    nvidia_driver=nvidia_driver_version(), fp8_tensor_cores=(props.major, props.minor) >= (8, 9))
    if any(blocks := invariant_row_blocks(device)):
        info["scoring_gemm_row_blocks"] = {"projections": blocks[0], "lm_head": blocks[1]}
    return info


def nvidia_driver_version(proc_file: str = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version (e.g. 570.124.06) from what the driver reports on Linux;
    None where there is none to read."""
    try:
        first = Path(proc_file).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 ...", or for the open
    # modules "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build ..."
    found = re.search(r"\s(\d+\.\d+(?:\.\d+)*)\s", first + " ")
    return found.group(1) if found else None


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} (sm_{props.major}{props.minor})"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_bench(recipes: list[str], lengths: list[tuple[int, int]], batches: list[int], *, model: str = "smollm2-135m",
              dtype: str = "bfloat16", device: str | None = "cpu", log=print) -> BenchResult:
    from .models import load_model_and_recipe

    rows = []
    for name in recipes:
        lm, record = load_model_and_recipe(model, name, dtype, None, device)
        engine_row(lm, record, 16, 2, 1)  # warm-up: first-call allocations and kernel selection
        for isl, osl in lengths:
            for b in batches:
                row = engine_row(lm, record, isl, osl, b)
                rows.append(row)
                log(f"bench {name} {isl}/{osl} batch {b}: {row.tokens_per_s:.1f} tok/s, "
                    f"TTFT p50 {row.ttft_ms['p50']:.0f} ms, ITL p50 {row.itl_ms['p50']:.1f} ms")
        del lm
    return BenchResult(rows, {"model": model, "dtype": dtype, "lengths": lengths, "batches": batches,
                              "method": "total generated tokens / total latency, TTFT included",
                              "torch": torch.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _megabytes(n: int | None, width: int, fmt: str) -> str:
    """A size in MB, or "-" where it is unknown (an endpoint's memory is the server's)."""
    return f"{'-':>{width}}" if n is None else f"{n / 1e6:>{width}{fmt}}"


def format_tables(result: BenchResult, baseline: str = "fp8-official") -> str:
    """The note's Tables 1 and 2: recipes by ISL/OSL, with a speedup row against the baseline."""
    recipes = list(dict.fromkeys(r.recipe for r in result.rows))
    lengths = list(dict.fromkeys((r.isl, r.osl) for r in result.rows))
    out = []
    for title, pick in (("Maximum throughput, output tokens/s (best batch size)", result.best),
                        ("Batch 1 (minimum latency), output tokens/s", result.batch1)):
        cols = [f"{i}/{o}" for i, o in lengths]
        out.append(title)
        out.append(f"  {'ISL/OSL':<16}" + "".join(f"{c:>16}" for c in cols))
        for rec in recipes:
            cells = []
            for isl, osl in lengths:
                row = pick(rec, isl, osl)
                cells.append(f"{row.tokens_per_s:.1f}" + (f" (b{row.batch})" if pick == result.best else "")
                             if row else "-")
            out.append(f"  {rec:<16}" + "".join(f"{c:>16}" for c in cells))
        if baseline in recipes:
            for rec in recipes:
                if rec == baseline:
                    continue
                cells = []
                for isl, osl in lengths:
                    a, b = pick(rec, isl, osl), pick(baseline, isl, osl)
                    cells.append(f"{a.tokens_per_s / b.tokens_per_s:.2f}x" if a and b else "-")
                out.append(f"  {rec + ' speedup':<16}"[:18] + "".join(f"{c:>16}" for c in cells)
                           + f"   (vs {baseline})")
        out.append("")
    out.append(f"  {'recipe':<14} {'ISL/OSL':>10} {'batch':>5} {'tok/s':>8} {'TTFT p50/p90/p99 ms':>22} "
               f"{'ITL p50/p90/p99 ms':>20} {'weights MB':>10} {'KV MB':>7} {'peak MB':>8}  kernel path")
    for r in result.rows:
        out.append(f"  {r.recipe:<14} {f'{r.isl}/{r.osl}':>10} {r.batch:>5} {r.tokens_per_s:>8.1f} "
                   f"{'/'.join(f'{r.ttft_ms[k]:.0f}' for k in ('p50', 'p90', 'p99')):>22} "
                   f"{'/'.join(f'{r.itl_ms[k]:.1f}' for k in ('p50', 'p90', 'p99')):>20} "
                   f"{_megabytes(r.weight_bytes, 10, '.1f')} {_megabytes(r.kv_cache_bytes, 7, '.1f')} "
                   f"{_megabytes(r.peak_memory_bytes, 8, '.0f')}  {r.kernel_path}")
    devices = sorted({r.device for r in result.rows})
    out.append(f"\ndevice: {', '.join(devices)}; method: {result.meta.get('method', '')}")
    return "\n".join(out)
