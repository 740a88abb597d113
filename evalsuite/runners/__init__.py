"""Task runners, looked up by the ``runner`` key of a task file (tasks/*.yaml): a new task is a
new YAML for an existing runner, or a new runner module registered here."""

from __future__ import annotations

from .base import Runner

RUNNERS: dict[str, Runner] = {}


def register(runner_cls: type[Runner]) -> type[Runner]:
    if runner_cls.name in RUNNERS:
        raise ValueError(f"runner {runner_cls.name!r} is registered twice")
    RUNNERS[runner_cls.name] = runner_cls()
    return runner_cls


def get_runner(name: str) -> Runner:
    _load_builtin()
    try:
        return RUNNERS[name]
    except KeyError:
        raise KeyError(f"unknown runner {name!r}; valid: {', '.join(sorted(RUNNERS))}") from None


def _load_builtin() -> None:
    from . import mmlu, mtbench, perplexity  # noqa: F401  (each registers itself)
