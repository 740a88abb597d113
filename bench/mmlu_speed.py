"""MMLU 0-shot: evalsuite's engine against lm-eval's `hf` backend, same model (the cached SmolLM2
folder), same prompts (a local lm-eval task over the same questions), BF16.

    python bench/mmlu_speed.py --per-subject 5                      # letter, 285 questions
    python bench/mmlu_speed.py --per-subject 5 --formulation cloze  # lm-eval mmlu_continuation
    python bench/mmlu_speed.py --per-subject 0                      # letter, all 14,042 (long)

Prints questions/s of both, their ratio, both accuracies, the share of identical predictions,
and the compute floor from a BF16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from evalsuite.engine.load import MODELS, gguf_to_folder, load
from evalsuite.runners.mmlu import MMLUConfig, choice_texts, encode_choices, load_mmlu, render_context, run_mmlu, select
from evalsuite.taskdef import load_task

TASK_YAML = """task: evalsuite_mmlu_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: {choices}
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
CHOICES = {"letter": '["A", "B", "C", "D"]', "cloze": '"{{choices}}"'}


def matmul_peak_tflops() -> float:
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / sorted(times)[2] / 1e12


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-subject", type=int, default=5)
    p.add_argument("--lm-eval-batch", type=int, default=16)
    p.add_argument("--formulation", choices=sorted(CHOICES), default="letter")
    args = p.parse_args()
    task = load_task("mmlu")
    name = args.formulation
    cfg = MMLUConfig(formulations=(name,), per_subject=args.per_subject or None)
    data = load_mmlu(task)
    _, questions = select(data, task, cfg)
    form = task.formulation(name)
    work = Path(tempfile.mkdtemp(prefix="mmlu-bench-"))
    with open(work / "docs.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps({"id": q.id, "context": render_context(form, q, []), "answer": q.target,
                                "choices": list(q.choices)}) + "\n")
    (work / "tasks").mkdir()
    (work / "tasks" / "bench.yaml").write_text(TASK_YAML.format(data=work / "docs.jsonl", choices=CHOICES[name]))

    lm = load("smollm2-135m", "bfloat16")
    tok = lm.tokenizer
    n_tokens = 0  # tokens the model must run: the unique inputs context + continuation[:-1]
    for q in questions:
        pairs = encode_choices(tok, render_context(form, q, []), [" " + c for c in choice_texts(form, q)])
        n_tokens += sum(len(x) for x in {tuple(ctx + cont[:-1]) for ctx, cont in pairs})
    peak = matmul_peak_tflops()
    flops = 2 * lm.model.config.num_parameters(include_embeddings=False) * n_tokens
    print(f"{name}: {len(questions)} questions, {n_tokens} tokens to run, {flops / 1e12:.1f} TFLOP of matmul work; "
          f"bf16 matmul peak {peak:.2f} TFLOP/s -> floor {flops / 1e12 / peak:.1f} s", flush=True)

    t = time.perf_counter()
    res = run_mmlu(lm, cfg, work / "engine", progress=False)
    t_engine = time.perf_counter() - t
    ours = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in open(work / "engine" / "samples.jsonl")}

    import lm_eval
    from lm_eval.tasks import TaskManager

    folder, _ = gguf_to_folder(MODELS["smollm2-135m"].locate(), MODELS["smollm2-135m"].sha256)
    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=bfloat16,device=cpu",
                                  tasks=["evalsuite_mmlu_bench"], batch_size=args.lm_eval_batch,
                                  task_manager=TaskManager(include_path=str(work / "tasks")), log_samples=True)
    t_lm = time.perf_counter() - t
    samples = out["samples"]["evalsuite_mmlu_bench"]
    theirs = {s["doc"]["id"]: max(range(4), key=lambda i: s["filtered_resps"][i][0]) for s in samples}
    records = [json.loads(line) for line in open(work / "engine" / "samples.jsonl")]
    same = sum(ours[i] == theirs[i] for i in ours) / len(ours)
    n = len(questions)
    print(f"engine  : {t_engine:7.1f} s  {n / t_engine:6.1f} q/s  acc {sum(r['correct'] for r in records) / n:.4f}  "
          f"acc_norm {sum(r['correct_norm'] for r in records) / n:.4f}  {t_engine / (flops / 1e12 / peak):.2f}x floor"
          f"  (subject-weighted acc {res.metrics[name]['acc']['overall']['acc']:.4f})")
    print(f"lm-eval : {t_lm:7.1f} s  {n / t_lm:6.1f} q/s  acc {sum(s['acc'] for s in samples) / n:.4f}  "
          f"acc_norm {sum(s['acc_norm'] for s in samples) / n:.4f}")
    print(f"speed-up engine/lm-eval: {t_lm / t_engine:.2f}x   identical predictions: {same:.2%}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
