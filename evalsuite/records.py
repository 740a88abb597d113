"""Per-sample records (JSONL, appended as work finishes) and the run record (JSON).

A run directory holds ``samples.jsonl`` and ``run.json``. Every record is flushed when its batch
finishes, so an interrupted run loses at most the batch in flight; rerunning the same command
reads what is there and computes only what is missing. A record with a ``failed`` field (a
request the backend could not answer, with the reason) is kept as evidence and retried on the
next run; the last record written for a key is the one that counts. A run directory belongs to
one configuration: reusing it for a different one is an error rather than a silent mix.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Hashable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

SAMPLES = "samples.jsonl"
RUN = "run.json"


class RunConflictError(RuntimeError):
    pass


def unfinished_run(what: str, rc: int, folder: Path) -> str:
    """What to tell the user when a run that a gate or a study started returned ``rc`` != 0."""
    if rc == 2:  # refused before it ran: bad arguments, or the folder holds another configuration's run
        refused = f"{what} was refused (evalsuite run exited 2; the reason is above)"
        if not (folder / RUN).is_file():  # nothing there to conflict with: the arguments were refused
            return refused
        return (f"{refused}. If the reason is that {folder} holds a run of another configuration (the recipe's "
                f"settings or the suite changed since it ran), which is never resumed, delete that folder to run "
                f"it anew")
    return f"{what} did not complete (evalsuite run exited {rc}); rerun to resume it"


def package_versions() -> dict[str, str]:
    from . import __version__  # the package's own: known when it runs from a checkout, not installed

    out = {"python": platform.python_version(), "evalsuite": __version__}
    for name in ("torch", "transformers", "tokenizers", "lm_eval", "datasets", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunStore:
    def __init__(self, directory: str | Path, identity: dict[str, Any], config_hash: str,
                 key: Callable[[dict[str, Any]], Hashable] = lambda r: r["id"]):
        self.key = key
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.dir / SAMPLES
        self.run_path = self.dir / RUN
        self.config_hash = config_hash
        previous = self.read_run()
        if previous is not None and previous.get("config_hash") != config_hash:
            raise RunConflictError(
                f"{self.dir} holds a run with a different configuration (config_hash "
                f"{previous.get('config_hash')} != {config_hash}); choose another --output or delete it")
        self.run: dict[str, Any] = previous or {
            "config_hash": config_hash, **identity, "created": _now(), "status": "running", "sessions": []}
        self.run["sessions"].append({"started": _now(), "host": platform.node(), "pid": os.getpid()})
        self.run["status"] = "running"
        self._repair_tail()
        self.write_run()

    def read_run(self) -> dict[str, Any] | None:
        if not self.run_path.is_file():
            return None
        return json.loads(self.run_path.read_text())

    def _repair_tail(self) -> None:
        """Drop a half-written last line left by a crash mid-write."""
        if not self.samples_path.is_file():
            return
        data = self.samples_path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.samples_path, "r+b") as f:
                f.truncate(cut)

    def records(self) -> list[dict[str, Any]]:
        if not self.samples_path.is_file():
            return []
        with open(self.samples_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def latest(self) -> dict[Hashable, dict[str, Any]]:
        """The last record written for each key (a success written after a failure replaces it)."""
        return {self.key(r): r for r in self.records()}

    def done_keys(self) -> set[Hashable]:
        """Keys whose last record is not a failure: what a resumed run skips."""
        return {k for k, r in self.latest().items() if "failed" not in r}

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.samples_path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def write_run(self) -> None:
        tmp = self.run_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.run, indent=2, ensure_ascii=False))
        tmp.replace(self.run_path)

    def finish(self, status: str = "complete", usage: dict[str, int] | None = None, **fields: Any) -> None:
        """Record the final fields; ``status`` is "complete", or "incomplete" when some requests
        failed (a rerun retries them). ``usage``: what an endpoint billed this session
        (``Backend.usage``), kept with the session."""
        self.run.update(fields)
        self.run["status"] = status
        self.run["sessions"][-1]["finished"] = _now()
        if usage is not None:
            self.run["sessions"][-1]["endpoint_usage"] = usage
        self.write_run()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
