"""MMLU 0-shot letter formulation: evalsuite's engine against lm-eval's `hf` backend, same model
(the cached SmolLM2 folder), same prompts (a local lm-eval task over the same questions), BF16.

    python bench/mmlu_speed.py --per-subject 5          # 285 questions
    python bench/mmlu_speed.py --per-subject 0          # all 14,042 (long)

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
from evalsuite.runners.mmlu import MMLUConfig, load_mmlu, render_context, run_mmlu, select
from evalsuite.taskdef import load_task

TASK_YAML = """task: evalsuite_mmlu_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


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
    args = p.parse_args()
    task = load_task("mmlu")
    cfg = MMLUConfig(formulations=("letter",), per_subject=args.per_subject or None)
    data = load_mmlu(task)
    _, questions = select(data, task, cfg)
    form = task.formulation("letter")
    work = Path(tempfile.mkdtemp(prefix="mmlu-bench-"))
    with open(work / "docs.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps({"id": q.id, "context": render_context(form, q, []), "answer": q.target}) + "\n")
    (work / "tasks").mkdir()
    (work / "tasks" / "bench.yaml").write_text(TASK_YAML.format(data=work / "docs.jsonl"))

    lm = load("smollm2-135m", "bfloat16")
    tok = lm.tokenizer
    n_tokens = sum(len(tok.encode(render_context(form, q, []))) for q in questions)
    peak = matmul_peak_tflops()
    flops = 2 * lm.model.config.num_parameters(include_embeddings=False) * n_tokens
    print(f"{len(questions)} questions, {n_tokens} prompt tokens, {flops / 1e12:.1f} TFLOP of matmul work; "
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
    same = sum(ours[i] == theirs[i] for i in ours) / len(ours)
    acc_lm = sum(s["acc"] for s in samples) / len(samples)
    acc_ours = sum(json.loads(line)["correct"] for line in open(work / "engine" / "samples.jsonl")) / len(ours)
    n = len(questions)
    print(f"engine  : {t_engine:7.1f} s  {n / t_engine:6.1f} q/s  acc {acc_ours:.4f} (subject-weighted "
          f"{res.metrics['letter']['acc']['overall']['acc']:.4f})  {t_engine / (flops / 1e12 / peak):.2f}x floor")
    print(f"lm-eval : {t_lm:7.1f} s  {n / t_lm:6.1f} q/s  acc {acc_lm:.4f}")
    print(f"speed-up engine/lm-eval: {t_lm / t_engine:.2f}x   identical predictions: {same:.2%}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
