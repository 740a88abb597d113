"""generate() against transformers' generate, batch invariance and sampling rules."""

from __future__ import annotations

import contextlib

import pytest
import torch

from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams, generate
from evalsuite.textgen import generate_text

PROMPTS = [[5, 17, 33, 2, 90, 11], [7, 8], [100, 200, 300, 41, 42, 43, 44, 45, 46, 47, 48, 49]]


@contextlib.contextmanager
def swapped_down_proj(model):
    """The first layer's down_proj replaced by a new module with the same weights: the same
    numbers, other modules and storage (what a recipe applied to the model changes)."""
    layer = model.model.layers[0].mlp
    original = layer.down_proj
    layer.down_proj = torch.nn.Linear(original.in_features, original.out_features, bias=False,
                                      dtype=original.weight.dtype)
    try:
        layer.down_proj.weight.data.copy_(original.weight)
        yield
    finally:
        layer.down_proj = original


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(tiny, hf_tiny):
    gens = generate(tiny.model, PROMPTS, SamplingParams(max_new_tokens=20))
    for p, g in zip(PROMPTS, gens):
        assert g.tokens == _hf_greedy(hf_tiny, p, 20)
        assert g.finish_reason == "length"


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "mistral-window", "gemma2", "gemma3", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "gpt_oss", "granite", "smollm3", "olmo2", "olmo3"])
def test_other_architectures_greedy_and_static_decode_match_transformers(arch, tmp_path):
    """Qwen3's q/k head norms, Phi-3.5's LongRoPE (scaled cos/sin) on part of each head, and a
    sliding window that prompts and answers outgrow (transformers' generate keeps a sliding cache of
    its own), on every path that writes or reads the KV cache: prefill, decode, the static
    (graph-capturable) decode, several sequences at once."""
    import transformers

    from evalsuite.engine.load import load_folder

    torch.manual_seed(5)
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=256)
        hf = transformers.Qwen3ForCausalLM(cfg).eval()
    elif arch == "gemma3":  # windows of 5 on three layers, with their own RoPE base
        from .conftest import tiny_gemma3

        hf = tiny_gemma3(window=5, vocab=320)
    elif arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        from .conftest import tiny_moe

        hf = tiny_moe(arch, window=5 if arch == "mixtral" else None, vocab=320)
    elif arch == "gemma2":
        from .conftest import tiny_gemma2

        hf = tiny_gemma2(window=5, vocab=320)
    elif arch == "gpt_oss":
        from .conftest import tiny_gpt_oss

        hf = tiny_gpt_oss(window=5, vocab=320)
    elif arch == "granite":
        from .conftest import tiny_granite

        hf = tiny_granite(vocab=320)
    elif arch == "smollm3":
        from .conftest import tiny_smollm3

        hf = tiny_smollm3(window=5, vocab=320)
    elif arch.startswith("olmo"):
        from .conftest import tiny_olmo

        hf = tiny_olmo(arch, window=5, vocab=320)
    elif arch == "mistral-window":
        cfg = transformers.MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         sliding_window=5)
        hf = transformers.MistralForCausalLM(cfg).eval()
    else:
        cfg = transformers.Phi3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      partial_rotary_factor=0.5, max_position_embeddings=1024,
                                      original_max_position_embeddings=256,
                                      rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                                    "long_factor": [5.0, 6.0, 7.0, 8.0]})
        hf = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough for confident greedy choices; norms that matter
        for name, w in hf.named_parameters() if not arch.startswith(("gemma", "mixtral", "qwen2_moe", "qwen3_moe",
                                                                     "gpt_oss", "granite", "smollm3", "olmo")) else ():
            w.normal_(1, 0.5) if name.endswith(("q_norm.weight", "k_norm.weight")) else \
                w.normal_(0, 0.15) if w.dim() == 2 else None
    hf.save_pretrained(tmp_path)
    model = load_folder(tmp_path, torch.float32)
    want = [_hf_greedy(hf, p, 12) for p in PROMPTS]
    for static in (False, True):
        got = generate(model, PROMPTS, SamplingParams(max_new_tokens=12), max_batch_size=2, static=static)
        assert [g.tokens for g in got] == want


def test_batch_equals_single_and_in_flight_joining(tiny):
    params = SamplingParams(max_new_tokens=15)
    alone = [generate(tiny.model, [p], params)[0].tokens for p in PROMPTS]
    together = [g.tokens for g in generate(tiny.model, PROMPTS, params)]
    # max_batch_size=2: the third prompt joins the running batch when a slot frees up
    staggered = [g.tokens for g in generate(tiny.model, PROMPTS, [SamplingParams(max_new_tokens=n) for n in (4, 15, 15)],
                                            max_batch_size=2)]
    assert together == alone
    assert staggered[1:] == alone[1:] and staggered[0] == alone[0][:4]


def test_static_decode_gives_the_same_tokens(tiny, hf_tiny):
    """The decode path a CUDA graph captures (shapes fixed per batch-size bucket, padded rows in
    free slots, attention masked over the whole cache), run eagerly here: the same tokens as
    transformers, with sequences leaving and joining the batch between buckets."""
    prompts = PROMPTS + [[9, 10, 11, 12, 13], [60, 61]]
    lengths = [4, 15, 9, 15, 6]
    want = [_hf_greedy(hf_tiny, p, n) for p, n in zip(prompts, lengths)]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    for size in (3, 5):  # buckets 1, 2, 4 (capped at 3 slots) and 1, 2, 4, 8 (capped at 5)
        got = generate(tiny.model, prompts, params, max_batch_size=size, static=True)
        assert [g.tokens for g in got] == want
    tiny.model.__dict__.pop("_kept_decode", None)  # the steps the calls above left for a batch of this shape
    batch = DecodeBatch(tiny.model, 5, 64, static=True)
    batch.add([Generation(p, SamplingParams(max_new_tokens=3)) for p in prompts[:3]])
    batch.step()
    assert sorted(batch._steps) == [(4, batch.cache.max_len)]  # three rows in the bucket of four; one span


def test_static_decode_attention_reads_only_the_running_span(tiny, hf_tiny, monkeypatch):
    """Attention spans the longest running sequence in whole blocks (8 positions here), not the
    whole cache: the same tokens as transformers while the span grows, one step per span."""
    import evalsuite.engine.generate as gen_mod

    monkeypatch.setattr(gen_mod, "STATIC_LEN_BLOCK", 8)
    prompts, lengths = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]], [20, 6]
    want = [_hf_greedy(hf_tiny, p, n) for p, n in zip(prompts, lengths)]
    tiny.model.__dict__.pop("_kept_decode", None)
    batch = DecodeBatch(tiny.model, 2, 40, static=True)
    gens = [Generation(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    batch.add(gens)
    while any(g.finish_reason is None for g in gens):
        batch.step()
        for g in [g for g in batch.running if g.finish_reason is not None]:
            batch.remove(g)
    assert [g.tokens for g in gens] == want
    # two rows up to position 15 (spans 16), then the short prompt alone up to position 21 (span 24)
    assert sorted(batch._steps) == [(1, 16), (1, 24), (2, 16)] and batch.cache.max_len == 40
    tiny.model.__dict__.pop("_kept_decode", None)


def test_static_decode_keeps_its_graphs_for_the_next_call_of_the_same_shape(tiny, hf_tiny):
    """A generate call leaves its static cache and steps (CUDA graphs on a GPU) with the model:
    the next call of the same shape and weights reuses them, reads none of the stale K/V the
    earlier sequences left, and a changed weight means a fresh capture."""
    params = SamplingParams(max_new_tokens=8)
    first = generate(tiny.model, [[5, 6, 7, 8, 9, 10]], params, max_batch_size=1, static=True)
    kept = tiny.model.__dict__["_kept_decode"][1]
    second = generate(tiny.model, [[3, 4]], params, max_batch_size=1, static=True)  # shorter than the stale one
    assert tiny.model.__dict__["_kept_decode"][1][0] is kept[0]  # the same cache tensors, steps reused
    assert [g.tokens for g in first] == [_hf_greedy(hf_tiny, [5, 6, 7, 8, 9, 10], 8)]
    assert [g.tokens for g in second] == [_hf_greedy(hf_tiny, [3, 4], 8)]
    try:
        with swapped_down_proj(tiny.model):
            generate(tiny.model, [[3, 4]], params, max_batch_size=1, static=True)
            assert tiny.model.__dict__["_kept_decode"][1][0] is not kept[0]  # a swapped module: captured anew
    finally:
        tiny.model.__dict__.pop("_kept_decode", None)


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = generate(tiny.model, PROMPTS, params)
    b = [generate(tiny.model, [p], params)[0] for p in PROMPTS]
    assert [g.tokens for g in a] == [g.tokens for g in b]
    other = generate(tiny.model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8))
    assert [g.tokens for g in other] != [g.tokens for g in a]


def test_sampled_tokens_follow_the_tempered_distribution():
    """20,000 seeded draws from one row against softmax(logits / T), and from the top_p nucleus
    renormalised, by scipy's chi-square test; greedy rows in the same batch take the argmax."""
    from scipy.stats import chisquare

    from evalsuite.engine.generate import Generation, sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for temperature, top_p in ((0.7, 1.0), (1.5, 1.0), (1.0, 0.8)):
        want = torch.softmax(logits.double() / temperature, dim=0)
        order = want.argsort(descending=True)
        keep = torch.zeros_like(want, dtype=torch.bool)
        keep[order[(want[order].cumsum(0) - want[order]) < top_p]] = True  # the nucleus, by hand
        want = torch.where(keep, want, 0.0) / want[keep].sum()
        gen = Generation([0], SamplingParams(temperature=temperature, top_p=top_p))
        gen.rng = torch.Generator().manual_seed(0)
        greedy = Generation([0], SamplingParams())
        counts = torch.zeros(len(logits))
        for _ in range(20_000):
            drawn, argmax = sample(torch.stack([logits, -logits]), [gen, greedy])
            counts[drawn] += 1
            assert argmax == len(logits) - 1
        assert counts[~keep].sum() == 0  # nothing outside the nucleus
        assert chisquare(counts[keep].numpy(), (want[keep] * 20_000).numpy()).pvalue > 1e-3


def test_tiny_top_p_is_greedy(tiny):
    greedy = generate(tiny.model, PROMPTS, SamplingParams(max_new_tokens=10))
    nucleus = generate(tiny.model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.8, top_p=1e-6, seed=1))
    assert [g.tokens for g in nucleus] == [g.tokens for g in greedy]


def test_stop_token_ends_sequence(tiny):
    free = generate(tiny.model, [PROMPTS[0]], SamplingParams(max_new_tokens=10))[0].tokens
    stop = free[3]
    cut = free.index(stop)
    g = generate(tiny.model, [PROMPTS[0]], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))[0]
    assert g.tokens == free[:cut] and g.finish_reason == "stop"


def test_stop_string_cuts_text(tiny):
    tok = tiny.tokenizer
    free = generate_text(tiny.model, tok, ["The quick brown"], SamplingParams(max_new_tokens=12))[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    out = generate_text(tiny.model, tok, ["The quick brown"], SamplingParams(max_new_tokens=12), stop=[stop])[0]
    assert out.text == free.text[:free.text.find(stop)] and out.finish_reason == "stop"


def test_generation_stops_at_context_end(tiny):
    prompt = [i % 399 + 1 for i in range(508)]
    g = generate(tiny.model, [prompt], SamplingParams(max_new_tokens=50))[0]
    assert g.finish_reason == "length" and len(prompt) + len(g.tokens) == 513  # last token needs no cache slot


@pytest.mark.parametrize("kw,msg", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
                                    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_prompt_too_long(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(tiny.model, [[1] * 600], SamplingParams(max_new_tokens=2))
    batch = DecodeBatch(tiny.model, 1, 64)
    with pytest.raises(ValueError, match="leaves no room"):
        batch.add([Generation([1] * 64, SamplingParams())])


@pytest.mark.parametrize("static", [False, True])
def test_generation_past_longropes_original_context_matches_transformers(longrope, static):
    """transformers' generate rotates a prompt past LongRoPE's original context (40 positions
    here) with the long factors, and when a shorter sequence reaches past it, drops the cache
    and runs the whole sequence again with them. The engine gives the same greedy tokens, with
    the prefix store: a short prompt reuses a short prompt's blocks, a long one reuses nothing."""
    from evalsuite.engine.prefix import clear

    from .conftest import LONGROPE_ORIGINAL as N

    g = torch.Generator().manual_seed(8)

    def tokens(n):
        return torch.randint(1, 400, (n,), generator=g).tolist()

    clear(longrope.model)
    crosses, past, within = tokens(N - 4), tokens(N + 10), tokens(20)
    first = [crosses, past, within]
    params = SamplingParams(max_new_tokens=12)
    got = generate(longrope.model, first, params, max_batch_size=2, static=static)
    assert [x.tokens for x in got] == [_hf_greedy(longrope.hf, p, 12) for p in first]
    second = [crosses + got[0].tokens[:4],  # 32 positions from the store, then past the original context
              within + tokens(10),  # 16 from the store, all within it
              crosses[:32] + tokens(10),  # long: the store's short blocks would be wrong
              past + tokens(3)]  # long: nothing of the long prompt was stored
    again = generate(longrope.model, second, params, max_batch_size=2, static=static)
    assert [x.cached_tokens for x in again] == [32, 16, 0, 0]
    assert [x.tokens for x in again] == [_hf_greedy(longrope.hf, p, 12) for p in second]


def _captured_as_a_graph(monkeypatch) -> list[tuple[int, int]]:
    """Static decode steps traced once at capture (``make_fx``) and replayed: every value the
    step computes in Python is then frozen at its capture-time value, as in a CUDA graph, while
    tensor operations rerun on the same buffers. The keys of the steps captured so far."""
    from torch.fx.experimental.proxy_tensor import make_fx

    captured = []
    capture = DecodeBatch._capture

    def traced(batch, bucket, span):
        graph = make_fx(capture(batch, bucket, span), tracing_mode="real")()
        captured.append((bucket, span))
        return lambda: graph()

    monkeypatch.setattr(DecodeBatch, "_capture", traced)
    return captured


def test_static_decode_replayed_as_captured_gives_the_same_tokens(tiny, hf_tiny, longrope, monkeypatch):
    """What a CUDA graph replays, emulated on the CPU: each step traced at its first use and
    replayed, with sequences joining and leaving between buckets and spans (and LongRoPE's
    sequences crossing its original context, over tables for the whole context, as on CUDA),
    gives transformers' greedy tokens. A step that read a Python value at capture (a position,
    a length) would replay it stale."""
    import evalsuite.engine.generate as gen_mod

    from .conftest import LONGROPE_ORIGINAL as N

    monkeypatch.setattr(gen_mod, "STATIC_LEN_BLOCK", 8)
    captured = _captured_as_a_graph(monkeypatch)
    prompts = PROMPTS + [[9, 10, 11, 12, 13], [60, 61]]
    lengths = [4, 15, 9, 15, 6]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    tiny.model.__dict__.pop("_kept_decode", None)
    got = generate(tiny.model, prompts, params, max_batch_size=3, static=True)
    assert [g.tokens for g in got] == [_hf_greedy(hf_tiny, p, n) for p, n in zip(prompts, lengths)]
    assert len(set(captured)) > 3  # several buckets and spans, each replayed as traced
    tiny.model.__dict__.pop("_kept_decode", None)

    g = torch.Generator().manual_seed(3)
    long_prompts = [torch.randint(1, 400, (n,), generator=g).tolist() for n in (N - 4, N + 10, 20)]
    longrope.model._rope_tables(longrope.model.config.max_position_embeddings)
    got = generate(longrope.model, long_prompts, SamplingParams(max_new_tokens=12), max_batch_size=2,
                   static=True, prefix_cache=False)
    assert [x.tokens for x in got] == [_hf_greedy(longrope.hf, p, 12) for p in long_prompts]
    longrope.model.__dict__.pop("_kept_decode", None)
