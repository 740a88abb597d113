"""BF16 parity with transformers on the embedded SmolLM2 (CPU): the engine's logits against
transformers' own model, both in BF16, over the first paragraph of each article of the
perplexity corpus (35 paragraphs, each cut at ``--max-tokens``).

    python bench/bf16_parity.py [--docs 35] [--max-tokens 256]

Printed for the engine as it is and, beside it in the same run, with its RMSNorm computed as
``F.rms_norm(x, shape, weight)`` (the weight multiplied before the one rounding to BF16; the
engine's form until transformers' two roundings were adopted):
  * the relative logits error ||engine - transformers|| / ||transformers||, every position and
    the whole vocabulary;
  * the share of positions whose top token agrees;
  * the mean |difference| of the log-probability of the text's next token.
The yardstick, in the same run: transformers against itself with every linear's input channels
permuted (the same sums in another order, as another correct BF16 kernel would add them).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalsuite.engine import model as engine_model  # noqa: E402
from evalsuite.engine.load import load  # noqa: E402
from evalsuite.runners.perplexity import load_documents  # noqa: E402
from evalsuite.taskdef import load_task  # noqa: E402


def one_rounding(self, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def permuted(hf: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``hf`` whose linears add their products in another order: weight columns and
    inputs permuted alike (lm_head shares the embedding and stays as it is)."""
    other = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(0)
    for name, mod in other.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            perm = torch.randperm(mod.in_features, generator=g)
            mod.weight.data = mod.weight.data[:, perm].contiguous()
            mod.register_forward_pre_hook(lambda _m, args, perm=perm: (args[0][..., perm],))
    return other


def figures(logits: list[torch.Tensor], want: list[torch.Tensor], tokens: list[torch.Tensor]) -> str:
    rel = statistics.median(((a - b).norm() / b.norm()).item() for a, b in zip(logits, want))
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(logits, want))
    total = sum(b.shape[0] for b in want)
    dlp = []
    for a, b, t in zip(logits, want, tokens):
        nxt = t[1:, None]
        dlp += (a[:-1].log_softmax(-1).gather(1, nxt) - b[:-1].log_softmax(-1).gather(1, nxt)).abs().flatten().tolist()
    return (f"relative logits error (median over paragraphs) {rel:.2e}; top token agrees at {agree / total:.2%} of "
            f"{total} positions; mean |delta log p(next token)| {statistics.mean(dlp):.2e}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=35)
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    lm = load("smollm2-135m", "bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=torch.bfloat16).eval()
    docs, _, _ = load_documents(load_task("perplexity"))
    firsts = {}
    for d in docs:
        firsts.setdefault(d.article, d)
    tokens = [torch.tensor(lm.tokenizer.encode(d.text)[:args.max_tokens]) for d in list(firsts.values())[:args.docs]]
    with torch.no_grad():
        want = [hf(t[None]).logits[0].float() for t in tokens]
        hf_other = permuted(hf)
        floor = [hf_other(t[None]).logits[0].float() for t in tokens]
        ours = [lm.model(t[None])[0].float() for t in tokens]
        adopted = engine_model.RMSNorm.forward
        engine_model.RMSNorm.forward = one_rounding
        try:
            before = [lm.model(t[None])[0].float() for t in tokens]
        finally:
            engine_model.RMSNorm.forward = adopted
    print(f"SmolLM2-135M, BF16, {len(tokens)} paragraphs, {sum(len(t) for t in tokens)} tokens; engine against "
          "transformers")
    print(f"engine, RMSNorm rounded as transformers: {figures(ours, want, tokens)}")
    print(f"engine, RMSNorm as F.rms_norm with the weight: {figures(before, want, tokens)}")
    print(f"yardstick, transformers with its linears' input channels permuted: {figures(floor, want, tokens)}")


if __name__ == "__main__":
    main()
