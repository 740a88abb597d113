"""score() against log-probabilities computed from transformers' logits."""

from __future__ import annotations

import pytest
import torch

from evalsuite.engine.score import MIN_SHARED_PREFIX, ScoreRequest, score


def _reference(hf, ctx, cont):
    tokens = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(hf(tokens).logits[0].float(), dim=-1)
    rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    token_lp = [lp[r, t].item() for r, t in zip(rows, cont)]
    greedy = all(lp[r].argmax().item() == t for r, t in zip(rows, cont))
    return sum(token_lp), greedy


def _requests(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        ctx = torch.randint(1, 400, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
        cont = torch.randint(1, 400, (1 + i % 4,), generator=g).tolist()
        reqs.append(ScoreRequest(tuple(ctx), tuple(cont)))
    # shared contexts with single-token continuations, as in MMLU's letter formulation
    for t in (5, 6, 7, 8):
        reqs.append(ScoreRequest(reqs[0].context, (t,)))
    # and multi-token continuations of one context, as in the cloze formulation
    for cont in ((5, 6), (7, 8, 9), (7, 8, 10, 11)):
        reqs.append(ScoreRequest(reqs[1].context, cont))
    return reqs


def test_scores_match_transformers(tiny, hf_tiny):
    reqs = _requests()
    results = score(tiny.model, reqs, max_batch_tokens=128, max_batch_size=4)
    for r, res in zip(reqs, results):
        ref_lp, ref_greedy = _reference(hf_tiny, list(r.context), list(r.continuation))
        assert res.logprob == pytest.approx(ref_lp, abs=1e-4)
        assert res.is_greedy == ref_greedy
        assert len(res.token_logprobs) == len(r.continuation)


def test_log_probabilities_in_row_chunks_match_transformers(tiny, hf_tiny, monkeypatch):
    """lm_head and log-softmax run on a few rows at a time (a perplexity batch's full-vocabulary
    float32 log-probabilities would hold gigabytes): chunk boundaries inside a request's rows
    change nothing."""
    from evalsuite.engine import score as score_mod

    monkeypatch.setattr(score_mod, "LOGIT_ROWS", 7)
    reqs = _requests(seed=5)
    reqs.append(ScoreRequest(tuple(range(1, 30)), tuple(range(30, 60))))  # folded: 30 rows in 5 chunks
    for r, res in zip(reqs, score(tiny.model, reqs, max_batch_tokens=128, max_batch_size=4)):
        ref_lp, ref_greedy = _reference(hf_tiny, list(r.context), list(r.continuation))
        assert res.logprob == pytest.approx(ref_lp, abs=1e-4)
        assert res.is_greedy == ref_greedy and len(res.token_logprobs) == len(r.continuation)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "mixtral"])
def test_scores_with_a_sliding_window_match_transformers(arch, tmp_path):
    """Every scoring path under a window the contexts outgrow: contexts prefilled alone, with their
    continuation, and shared contexts extended by several continuations (the extension reads
    the cached context through the window). Gemma 3's windowed layers rotate with a RoPE base of
    their own, and one layer in four sees every position."""
    import transformers

    from evalsuite.engine.load import load_folder

    from .conftest import tiny_gemma2, tiny_gemma3, tiny_moe

    torch.manual_seed(4)
    if arch.startswith("gemma"):
        hf = (tiny_gemma2 if arch == "gemma2" else tiny_gemma3)(window=10)
    elif arch == "mixtral":  # each token's experts, with the window
        hf = tiny_moe("mixtral", window=10)
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=10)).eval()
        with torch.no_grad():
            for w in hf.parameters():
                w.normal_(0, 0.2) if w.dim() == 2 else None
    hf.save_pretrained(tmp_path)
    model = load_folder(tmp_path, torch.float32)
    reqs = _requests(seed=3)
    for r, res in zip(reqs, score(model, reqs, max_batch_tokens=128, max_batch_size=4)):
        ref_lp, ref_greedy = _reference(hf, list(r.context), list(r.continuation))
        assert res.logprob == pytest.approx(ref_lp, abs=1e-4)
        assert res.is_greedy == ref_greedy


def test_greedy_continuation_is_reported_greedy(tiny, hf_tiny):
    ctx = [5, 17, 33, 2, 90]
    with torch.no_grad():
        nxt = hf_tiny(torch.tensor([ctx])).logits[0, -1].argmax().item()
    (res,) = score(tiny.model, [ScoreRequest(tuple(ctx), (nxt,))])
    assert res.is_greedy


def test_batch_composition_does_not_change_scores(tiny):
    """Padded batches of any size give the single-request results."""
    reqs = _requests(seed=1)
    alone = [score(tiny.model, [r])[0].logprob for r in reqs]
    batched = [r.logprob for r in score(tiny.model, reqs, max_batch_size=64, max_batch_tokens=10_000)]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_shared_context_runs_once(tiny, monkeypatch):
    calls = []
    real = tiny.model.hidden
    monkeypatch.setattr(tiny.model, "hidden", lambda tokens, step: calls.append(tokens.shape) or real(tokens, step))
    ctx = (3, 4, 5, 6)
    score(tiny.model, [ScoreRequest(ctx, (t,)) for t in (10, 11, 12, 13)])
    assert calls == [torch.Size([1, 4])]


def test_shared_context_with_long_continuations_runs_once(tiny, monkeypatch):
    calls = []
    real = tiny.model.hidden
    monkeypatch.setattr(tiny.model, "hidden", lambda tokens, step: calls.append(tokens.shape) or real(tokens, step))
    ctx = tuple(range(3, 3 + MIN_SHARED_PREFIX))
    score(tiny.model, [ScoreRequest(ctx, c) for c in ((10,), (11, 12), (13, 14, 15))])
    assert calls == [torch.Size([1, 8]), torch.Size([1, 3])]  # the context once, then 1 + 2 extension tokens
    # a shorter context is not worth sharing: each pair runs whole (but its last token), in one
    # packed prefill, as an endpoint runs prompts that share fewer than MIN_SHARED_PREFIX tokens
    calls.clear()
    score(tiny.model, [ScoreRequest(ctx[:-1], c) for c in ((10,), (11, 12), (13, 14, 15))])
    assert calls == [torch.Size([1, 7 + 8 + 9])]


@pytest.mark.parametrize("ctx,cont,msg", [((), (1,), "context is empty"), ((1,), (), "continuation is empty")])
def test_empty_request_rejected(ctx, cont, msg):
    with pytest.raises(ValueError, match=msg):
        ScoreRequest(ctx, cont)


def test_too_long_request_rejected_before_work(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        score(tiny.model, [ScoreRequest(tuple([1] * 600), (2,))])


def test_bf16_scores_are_bitwise_batch_invariant(tiny_dir):
    """In BF16 a sequence's hidden states are bitwise identical alone and in any batch; only the
    float32 lm_head/log-softmax may differ in the last float32 ulp. One BF16 ulp anywhere upstream
    would move these log-probabilities by ~1e-2, so 1e-5 separates the two cleanly."""
    from evalsuite.engine.load import load_folder

    model = load_folder(tiny_dir, torch.bfloat16)
    reqs = _requests(seed=2, n=20)
    alone = [score(model, [r])[0] for r in reqs]
    for size in (3, 32):
        batched = score(model, reqs, max_batch_size=size, max_batch_tokens=100_000)
        assert [r.logprob for r in batched] == pytest.approx([r.logprob for r in alone], abs=1e-5, rel=0)


def test_scores_past_longropes_original_context_match_transformers(longrope):
    """LongRoPE rotates a forward that reaches past the original context (40 positions here) with
    its long factors, every position of it. Requests below, across and past it: contexts alone,
    contexts shared by continuations that stay on their side, and by continuations that cross
    (those must run whole: the context alone is rotated short)."""
    from .conftest import LONGROPE_ORIGINAL as N

    g = torch.Generator().manual_seed(7)

    def tokens(n):
        return tuple(torch.randint(1, 400, (n,), generator=g).tolist())

    below, across, past = tokens(N - 6), tokens(N - 3), tokens(N + 9)
    reqs = [ScoreRequest(below, tokens(3)), ScoreRequest(below, tokens(4)),  # shared, both within
            ScoreRequest(across, tokens(2)), ScoreRequest(across, tokens(1)),  # one crosses, one stays
            ScoreRequest(across, tokens(12)), ScoreRequest(past, tokens(5)), ScoreRequest(past, tokens(1)),
            ScoreRequest(tokens(N + 30), tokens(20)), ScoreRequest(tokens(20), tokens(N))]
    got = score(longrope.model, reqs, max_batch_tokens=128, max_batch_size=4)
    for r, res in zip(reqs, got):
        ref_lp, ref_greedy = _reference(longrope.hf, list(r.context), list(r.continuation))
        assert res.logprob == pytest.approx(ref_lp, abs=1e-4), (len(r.context), len(r.continuation))
        assert res.is_greedy == ref_greedy
    # and the same numbers one request at a time
    alone = [score(longrope.model, [r])[0].logprob for r in reqs]
    assert alone == pytest.approx([res.logprob for res in got], abs=1e-5)
