"""Where a GPU decode step's time goes: the whole step against its graph replay alone, and the
kernels of one eager step by GPU time. Random Llama-3.1-8B-shaped weights, no files.

    python bench/gpu_profile.py [--shapes llama-3.1-8b] [--batches 1 64] [--compile]

``--compile`` also times the same step compiled by ``torch.compile`` (inductor fuses the small
kernels between the GEMMs) and then captured as a CUDA graph, and prints its largest logits
difference from the eager step: what a compiled decode would buy before the engine adopts it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalsuite.engine.config import ModelConfig  # noqa: E402
from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams  # noqa: E402
from evalsuite.engine.linear import decode_kernels  # noqa: E402
from evalsuite.engine.load import from_state_dict  # noqa: E402
from evalsuite.engine.model import CausalLM, Step  # noqa: E402


def random_model(cfg: ModelConfig, device: torch.device) -> CausalLM:
    with torch.device(device):
        shapes = CausalLM(cfg, torch.bfloat16)
    state = {k: (torch.randn_like(v) * 0.02 if v.dim() == 2 else torch.ones_like(v)) for k, v in shapes.state_dict().items()}
    del shapes
    return from_state_dict(cfg, state, torch.bfloat16)


def compiled_step(model: CausalLM, cache, tokens: torch.Tensor, positions: torch.Tensor, span: int):
    """The static decode step (``DecodeBatch``'s, over its buffers and cache, attention over
    ``span`` positions) compiled by torch.compile with static shapes; on CUDA warmed up and
    captured as a CUDA graph. Returns the step (a replay on CUDA) and the seconds compiling and
    capturing took."""

    def forward() -> torch.Tensor:
        hidden = model.hidden(tokens, Step.for_static_decode(positions, cache, span))
        return model.logits(hidden[:, 0]).float()

    fn = torch.compile(forward, dynamic=False)
    t = time.perf_counter()
    with torch.inference_mode():
        if tokens.device.type != "cuda":
            fn()
            return fn, time.perf_counter() - t
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    torch.cuda.synchronize()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay, time.perf_counter() - t


def attention_backends(model: CausalLM, cache, positions: torch.Tensor, bucket: int, span: int) -> str:
    """One layer's decode attention as the step calls it (``engine.model._decode_attention``: the query
    heads of a KV head as its queries, the additive mask of ``Step.additive_mask``), under each
    SDPA backend that takes it: µs per call, and the largest difference from the math backend
    in float32. Which backend SDPA picks by itself is the first line's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from evalsuite.engine.model import _decode_attention

    cfg = model.config
    step = Step.for_static_decode(positions[:bucket], cache, span)
    mask = step.additive_mask(step.chunks[0][3], torch.bfloat16)
    k, v = cache.k[0, :bucket, :, :span], cache.v[0, :bucket, :, :span]
    q = torch.randn(bucket, cfg.num_heads, 1, cfg.head_dim, device=k.device, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = _decode_attention(q.float(), k.float(), v.float(), mask.float())
        out = [f"decode attention, one layer ({bucket} rows x {span} positions): default "
               f"{1e3 * median_ms(lambda: _decode_attention(q, k, v, mask)):.1f} µs"]
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    got = _decode_attention(q, k, v, mask)
                    t = median_ms(lambda: _decode_attention(q, k, v, mask))
                diff = (got.float() - ref).abs().max().item()
                out.append(f"{backend.name.lower()} {1e3 * t:.1f} µs (max diff {diff:.1e})")
            except RuntimeError as e:  # this backend does not take these inputs here
                out.append(f"{backend.name.lower()} n/a ({str(e).splitlines()[0][:60]})")
    return "; ".join(out)


def median_ms(fn, n: int = 30) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="llama-3.1-8b")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    p.add_argument("--compile", action="store_true", help="also time the step compiled, then captured")
    p.add_argument("--max-len", type=int, default=400,
                   help="the batch's context (its cache is this rounded up to 256; the server's default is 2048)")
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = ModelConfig.from_name(args.shapes)
    model = random_model(cfg, device)
    print(f"{args.shapes}: {model.resident_bytes() / 1e9:.2f} GB of weights on {torch.cuda.get_device_name()}")
    gen = torch.Generator().manual_seed(0)
    for b in args.batches:
        prompts = torch.randint(2, cfg.vocab_size, (b, 100), generator=gen).tolist()
        batch = DecodeBatch(model, b, args.max_len)
        batch.add([Generation(p, SamplingParams(max_new_tokens=250)) for p in prompts])
        batch.step()  # captures the bucket's graph
        (bucket, span), replay = next(iter(batch._steps.items()))
        step_ms = median_ms(batch.step)
        replay_ms = median_ms(replay)
        logits = replay()
        sample_ms = median_ms(lambda: logits.argmax(dim=-1).tolist())
        print(f"batch {b}: whole step {step_ms:.2f} ms, graph replay alone {replay_ms:.2f} ms, "
              f"argmax+tolist {sample_ms:.2f} ms (attention over {span} of {batch.cache.max_len} cache positions)")
        if span < batch.cache.max_len:  # the same step with attention over the whole cache, as before spans
            whole_ms = median_ms(batch._capture(bucket, batch.cache.max_len))
            print(f"batch {b}: replay with attention over the whole cache ({batch.cache.max_len} positions) "
                  f"{whole_ms:.2f} ms against {replay_ms:.2f} ms over the span: {whole_ms / replay_ms:.2f}x")
        print(f"batch {b}: {attention_backends(model, batch.cache, batch._positions, bucket, span)}")
        # one eager step (the captured code, not replayed) under the profiler: GPU time per kernel
        tokens, positions = batch._tokens[:bucket], batch._positions[:bucket]

        def forward():
            with decode_kernels(bucket):
                hidden = model.hidden(tokens, Step.for_static_decode(positions, batch.cache, span))
                return model.logits(hidden[:, 0]).float()

        forward()
        eager_ms = median_ms(forward, 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
        print(f"batch {b}: eager step {eager_ms:.2f} ms; kernels of one eager step by GPU time:")
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=70))
                break
            except (AttributeError, KeyError, RuntimeError):
                continue
        if args.compile:
            try:
                step, seconds = compiled_step(model, batch.cache, tokens, positions, span)
                diff = (step().float() - forward().float()).abs().max().item()
                print(f"batch {b}: compiled + captured step {median_ms(step):.2f} ms against the engine's replay "
                      f"{replay_ms:.2f} ms (compiling and capturing took {seconds:.0f} s); max |logits diff| "
                      f"from the eager step {diff:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on to the next batch size
                print(f"batch {b}: compiled step FAILED: {type(e).__name__}: {e}", flush=True)
        batch = None
        model.__dict__.pop("_kept_decode", None)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
