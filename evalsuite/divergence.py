"""Judge-free divergence of a recipe from its baseline on generated text: the baseline's MT-Bench
answers, teacher-forced through both models, compared token by token.

For every answer token: KL(p_baseline || p_recipe) of the two next-token distributions (float32
log-softmax over the full vocabulary) and whether the greedy choice differs. Deterministic, no
judge, and it shows a recipe's drift on generative text where a weak judge cannot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .engine.model import CausalLM, Step
from .textgen import encode_prompt


@torch.inference_mode()
def _answer_logprobs(model: CausalLM, tokens: list[int], start: int) -> torch.Tensor:
    """log p(next token) at positions start-1 .. len-2 (the rows predicting tokens[start:])."""
    dev = model.device
    hidden = model.hidden(torch.tensor(tokens, device=dev).view(1, -1), Step.for_prefill([len(tokens)], device=dev))[0]
    return torch.log_softmax(model.logits(hidden[start - 1:len(tokens) - 1], float32=True), dim=-1)


def teacher_forced_divergence(base: CausalLM, cand: CausalLM, tokenizer,
                              conversations: list[tuple[list[dict[str, str]], str]],
                              template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``conversations``: (messages up to the user turn, the baseline's answer text), rendered
    with the chat template's ``template_kwargs``."""
    total_kl, changed, tokens, per = 0.0, 0, 0, []
    for messages, answer in conversations:
        prompt = encode_prompt(tokenizer, messages, template_kwargs)
        ans = tokenizer.encode(answer, add_special_tokens=False)
        if not ans:
            continue
        seq = prompt + ans
        base.check_length(len(seq))
        lp_b = _answer_logprobs(base, seq, len(prompt))
        lp_c = _answer_logprobs(cand, seq, len(prompt))
        lp_c = lp_c.to(lp_b.device)
        kl = (lp_b.exp() * (lp_b - lp_c)).sum(-1)
        flips = int((lp_b.argmax(-1) != lp_c.argmax(-1)).sum())
        total_kl += float(kl.sum())
        changed += flips
        tokens += len(ans)
        per.append(float(kl.mean()))
    return {"tokens": tokens, "answers": len(per), "mean_kl": total_kl / tokens if tokens else float("nan"),
            "greedy_changed": changed / tokens if tokens else float("nan"),
            "max_answer_mean_kl": max(per) if per else float("nan")}


def divergence_for_run(backend, job, baseline_dir: str | Path) -> dict[str, Any] | None:
    """The divergence of ``backend``'s model (in this process) from the model and recipe of the
    baseline run, on the baseline run's answers to ``job``'s questions. None for an endpoint."""
    from .backends.engine import EngineBackend
    from .models import load_model_and_recipe
    from .runners.mtbench import conversation, read_answers

    if not isinstance(backend, EngineBackend):
        return None  # an endpoint returns no full distributions
    run = json.loads((Path(baseline_dir) / "run.json").read_text())
    answers = read_answers(baseline_dir)
    model, recipe = run["model"], run["recipe"]
    base_lm, _ = load_model_and_recipe(model["source"], recipe["name"], model.get("dtype", "bfloat16"),
                                       _overrides(recipe), str(backend.lm.model.device))
    convs = []
    for q in job.questions:
        turns = answers.get(q["question_id"], {})
        for t in (1, 2):
            if t in turns and (t == 1 or 1 in turns):
                convs.append((conversation(q, [turns.get(1, "")], t), turns[t]))
    # the prompts as the baseline's answers were written to them: with its chat template switches
    out = teacher_forced_divergence(base_lm.model, backend.lm.model, backend.tokenizer, convs,
                                    run.get("chat_template_kwargs"))
    return {**out, "baseline_run": str(baseline_dir), "baseline_recipe": recipe["name"]}


def _overrides(recipe: dict[str, Any]) -> dict[str, Any] | None:
    import dataclasses

    from .quant.api import get_recipe

    default = dataclasses.asdict(get_recipe(recipe["name"]).config)
    changed = {k: v for k, v in (recipe.get("config") or {}).items() if default.get(k) != v}
    return changed or None
