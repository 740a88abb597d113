"""Loads the embedded MMLU test set (the pinned copy evalsuite ships) for lm-eval, one subject at
a time, in the field names of lm-eval's own MMLU tasks (question, subject, choices, answer)."""

from __future__ import annotations


def load_mmlu(subject: str, **_metadata):
    import datasets

    from evalsuite.runners.mmlu import load_mmlu as load_embedded
    from evalsuite.taskdef import load_task

    rows = [{"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.target,
             "id": q.id} for q in load_embedded(load_task("mmlu")).questions if q.subject == subject]
    if not rows:
        raise ValueError(f"no MMLU rows for subject {subject!r}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
