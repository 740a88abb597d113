"""Task definitions as data: YAML files under tasks/, loaded into strict dataclasses.

Every task file names its ``runner`` (runners/); the runner parses the rest. Unknown keys, missing
keys and values outside their allowed set are errors that name the file, the key and what would
be valid. The multiple-choice schema (MMLU) lives here; other runners build theirs from
``fields_of`` and ``one_of``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .assets import Asset

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
CATEGORIES = ("stem", "humanities", "social_sciences", "other")


class TaskDefinitionError(ValueError):
    pass


@dataclass(frozen=True)
class Formulation:
    name: str
    method: str  # loglikelihood | generate
    description: str
    question: str
    strip_question: bool
    choices: str  # letters | answers
    target_delimiter: str
    fewshot_delimiter: str
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        one_of(f"formulations.{self.name}.method", self.method, ("loglikelihood", "generate"))
        one_of(f"formulations.{self.name}.choices", self.choices, ("letters", "answers"))
        if self.method == "generate" and self.max_new_tokens <= 0:
            raise TaskDefinitionError(f"formulations.{self.name}.max_new_tokens must be > 0 for method generate")


@dataclass(frozen=True)
class MultipleChoiceTask:
    runner: str
    name: str
    data: Asset
    fewshot_pool: int
    formulations: dict[str, Formulation]
    categories: dict[str, str]

    def config_hash(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def describe(self) -> str:
        return f"formulations {', '.join(self.formulations)}; {len(self.categories)} subjects"

    def formulation(self, name: str) -> Formulation:
        try:
            return self.formulations[name]
        except KeyError:
            raise KeyError(f"unknown formulation {name!r} for task {self.name}; "
                           f"valid: {', '.join(self.formulations)}") from None


def one_of(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise TaskDefinitionError(f"{key} = {value!r}; valid: {', '.join(valid)}")


def fields_of(cls, raw: dict[str, Any], where: str, **fixed) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TaskDefinitionError(f"{where} must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(fixed)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise TaskDefinitionError(f"{where}: unknown keys {unknown}; valid keys: {sorted(names)}")
    missing = sorted(required - set(raw))
    if missing:
        raise TaskDefinitionError(f"{where}: missing keys {missing}")
    return {**raw, **fixed}


def parse_multiple_choice_task(raw: dict[str, Any], where: str = "task") -> MultipleChoiceTask:
    top = fields_of(MultipleChoiceTask, raw, where)
    formulations = {
        name: Formulation(**fields_of(Formulation, spec, f"{where}: formulations.{name}", name=name))
        for name, spec in top["formulations"].items()
    }
    for subject, cat in top["categories"].items():
        one_of(f"{where}: categories.{subject}", cat, CATEGORIES)
    return MultipleChoiceTask(
        runner=top["runner"],
        name=top["name"],
        data=Asset(**fields_of(Asset, top["data"], f"{where}: data")),
        fewshot_pool=int(top["fewshot_pool"]),
        formulations=formulations,
        categories=dict(top["categories"]),
    )


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def read_task_file(name: str) -> tuple[dict[str, Any], str]:
    """The raw contents of tasks/<name>.yaml and the path to name in errors."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown task {name!r}; valid: {', '.join(available_tasks())}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or "runner" not in raw:
        raise TaskDefinitionError(f"{path}: a task file is a mapping with a 'runner' key")
    return raw, str(path)


def load_task(name: str) -> Any:
    """tasks/<name>.yaml parsed by its runner's schema."""
    from .runners import get_runner

    raw, where = read_task_file(name)
    return get_runner(raw["runner"]).parse_task(raw, where)
