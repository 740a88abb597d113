"""The run index: one SQLite file (reports/index.sqlite, or $EVALSUITE_INDEX) with a row per
finished run, so `compare`, `report` and `runs` can pick runs by model, recipe, task and date.

Each run is written in one transaction (a crash mid-write leaves the index as it was), keyed by
its folder (a resumed run updates its row). Several processes may write at once: SQLite's
locking serialises them, and a writer waits up to ``timeout`` seconds for the lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_INDEX = Path("reports") / "index.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_dir TEXT UNIQUE NOT NULL,
    finished TEXT NOT NULL,
    task TEXT, model TEXT, weights_sha256 TEXT, recipe TEXT, recipe_config TEXT,
    task_config_sha256 TEXT, config_hash TEXT, backend TEXT, status TEXT,
    metrics TEXT, timings TEXT, versions TEXT
)
"""


def index_path() -> Path:
    return Path(os.environ.get("EVALSUITE_INDEX") or DEFAULT_INDEX)


@dataclass(frozen=True)
class IndexedRun:
    id: int
    run_dir: str
    finished: str
    task: str
    model: str
    recipe: str
    status: str
    metrics: dict[str, Any]


class RunIndex:
    def __init__(self, path: str | Path | None = None, timeout: float = 30.0):
        self.path = Path(path) if path else index_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout)
        db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        return db

    def record(self, run_dir: str | Path, run: dict[str, Any]) -> int:
        """Insert or update the row of ``run_dir`` from its run record; returns the row id."""
        model = run.get("model") or {}
        recipe = run.get("recipe") or {}
        row = {
            "run_dir": str(Path(run_dir).resolve()), "finished": run.get("sessions", [{}])[-1].get("finished", ""),
            "task": run.get("task"), "model": model.get("name"), "weights_sha256": json.dumps(model.get("weights_sha256"), sort_keys=True),
            "recipe": recipe.get("name"), "recipe_config": json.dumps(recipe.get("config"), sort_keys=True),
            "task_config_sha256": run.get("task_config_sha256"), "config_hash": run.get("config_hash"),
            "backend": json.dumps(run.get("backend"), sort_keys=True), "status": run.get("status"),
            "metrics": json.dumps(run.get("metrics")), "timings": json.dumps(run.get("timings")),
            "versions": json.dumps(run.get("versions")),
        }
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        updates = ", ".join(f"{c}=excluded.{c}" for c in row if c != "run_dir")
        db = self._connect()
        try:
            with db:  # one transaction: all of the row or none of it
                cur = db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks}) "
                                 f"ON CONFLICT(run_dir) DO UPDATE SET {updates} RETURNING id", list(row.values()))
                (rid,) = cur.fetchone()
        finally:
            db.close()
        return int(rid)

    def query(self, *, task: str | None = None, model: str | None = None, recipe: str | None = None,
              since: str | None = None, status: str | None = None) -> list[IndexedRun]:
        where, args = [], []
        for col, value in (("task", task), ("model", model), ("recipe", recipe), ("status", status)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        if since:
            where.append("finished >= ?")
            args.append(since)
        sql = "SELECT id, run_dir, finished, task, model, recipe, status, metrics FROM runs"
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY finished, id"
        db = self._connect()
        try:
            rows = db.execute(sql, args).fetchall()
        finally:
            db.close()
        return [IndexedRun(r[0], r[1], r[2], r[3] or "", r[4] or "", r[5] or "", r[6] or "", json.loads(r[7] or "null") or {})
                for r in rows]

    def remove(self, run_ids: list[int]) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in run_ids])
        finally:
            db.close()

    def get(self, run_id: int) -> IndexedRun:
        db = self._connect()
        try:
            row = db.execute("SELECT id, run_dir, finished, task, model, recipe, status, metrics FROM runs WHERE id = ?",
                             (run_id,)).fetchone()
        finally:
            db.close()
        if row is None:
            raise KeyError(f"no run with id {run_id} in {self.path} (`evalsuite runs` lists them)")
        return IndexedRun(row[0], row[1], row[2], row[3] or "", row[4] or "", row[5] or "", row[6] or "",
                          json.loads(row[7] or "null") or {})


def headline(run: IndexedRun, most: int = 3) -> str:
    """One short metrics summary for listings: MMLU accuracy per formulation, word perplexity,
    the MT-Bench rating, or an lm-eval run's first metric of (at most ``most``) tasks."""
    m = run.metrics
    parts = []
    if run.task == "lm-eval":
        for task, values in m.items():
            first = next(((k, v) for k, v in (values or {}).items() if "," in k and "_stderr" not in k
                          and isinstance(v, (int, float))), None)
            if first:
                parts.append(f"{task} {first[0].removesuffix(',none')} {first[1]:.4f}")
        return ", ".join(parts[:most]) + (f" (+{len(parts) - most} more)" if len(parts) > most else "")
    for form, v in m.items():
        if isinstance(v, dict) and "acc" in v:
            parts.append(f"{form} {v['acc']['overall']['acc']:.4f}")
    if "word_perplexity" in m:
        parts.append(f"word ppl {m['word_perplexity']['value']:.3f}")
    parsed = m.get("parsed")
    if run.task == "mt-bench" and isinstance(parsed, dict):
        parts.append(f"rating {parsed['score']:.2f} ({parsed['n']} judged)" if parsed.get("score") is not None
                     else f"no rating parsed ({parsed.get('unscored', 0)} unscored)")
    return ", ".join(parts)
