"""What every runner offers the command line: its task schema, its options, a prepared job
(validated, data loaded, no model yet), the run itself, and a summary to print.

The order is the point: ``prepare`` runs before any model loads, so a bad option or an empty data
file fails in a second, not after a model load and calibration.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..backends.base import Backend


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)


class Job(ABC):
    """A validated task configuration with its data, ready to run on any backend."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that changes a score (JSON-ready); execution settings stay out."""

    @abstractmethod
    def slug(self) -> str:
        """A short readable tag for the default run folder name (e.g. ``0shot-n20``)."""


class Runner(ABC):
    name: ClassVar[str]  # the ``runner`` key of a tasks/*.yaml file

    @abstractmethod
    def parse_task(self, raw: dict[str, Any], where: str) -> Any:
        """The task file's contents as a validated dataclass (unknown keys are errors)."""

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The task's own command-line options."""

    @abstractmethod
    def prepare(self, task: Any, args: argparse.Namespace) -> Job:
        """Validate the options against the task and load its data; no model is touched."""

    @abstractmethod
    def run(self, job: Job, backend: Backend, out_dir: Path, *, progress: bool = True) -> RunResult:
        """Run (or resume) the job and write its records to ``out_dir``."""

    @abstractmethod
    def summary(self, result: RunResult) -> str:
        """What the command line prints when the run is done."""


def backend_identity(backend: Backend) -> dict[str, Any]:
    """The part of a run's identity that names what was evaluated (model, recipe, backend kind)."""
    ident = backend.identity()
    return {"model": ident.get("model"), "recipe": ident.get("recipe"), "backend_kind": ident.get("kind"),
            **({"chat_template_kwargs": ident["chat_template_kwargs"]} if ident.get("chat_template_kwargs") else {})}


def identity_hash(identity: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The hash of what changes a run's scores: ``identity``'s ``keys``, and the chat template's
    switches where a run sets them (absent otherwise, so that the hashes of runs without them
    stay as they were)."""
    import hashlib
    import json

    keys = keys + (("chat_template_kwargs",) if identity.get("chat_template_kwargs") else ())
    blob = json.dumps({k: identity[k] for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def progress_bar(enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=0, disable=not enabled, unit=unit, dynamic_ncols=True)
