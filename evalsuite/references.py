"""Published reference results (tasks/references/*.yaml) as comparison sides, and the check of a
note's throughput speedups against its own tables.

A side is named ``ref:<file stem>`` (every entry) or ``ref:<file stem>:<recipe>`` (one entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .compare import Metric, Side, Tolerance
from .taskdef import TASKS_DIR

REFERENCES_DIR = TASKS_DIR / "references"


@dataclass(frozen=True)
class Reference:
    name: str
    path: Path
    raw: dict[str, Any]

    @property
    def baseline(self) -> str:
        return self.raw["baseline"]

    def tolerances(self) -> dict[str, Tolerance]:
        return {k: Tolerance.parse(v, f"{self.path}: tolerances.{k}") for k, v in (self.raw.get("tolerances") or {}).items()}

    def sides(self) -> list[Side]:
        kinds = {k: v["kind"] for k, v in self.raw["metrics"].items()}
        out = []
        for e in self.raw["entries"]:
            metrics = {k: Metric(k, kinds[k], float(v)) for k, v in e["accuracy"].items()}
            info = {"model": self.raw["model"], "quant_algo": e.get("quant_algo"),
                    "kv_cache_quant_algo": e.get("kv_cache_quant_algo"), "hardware": e.get("hardware"),
                    "throughput": e.get("throughput"), "device": "{gpus}x {gpu}".format(**e["hardware"]),
                    "kernel_path": "deployed (TensorRT-LLM)", "reference": self.raw["source"].strip(),
                    "description": e.get("label", e["recipe"])}
            out.append(Side(f"{e['recipe']} (published)", e["recipe"], f"ref:{self.name}:{e['recipe']}", metrics, info))
        return out


def available() -> list[str]:
    return sorted(p.stem for p in REFERENCES_DIR.glob("*.yaml"))


def load_reference(name: str) -> Reference:
    path = REFERENCES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown reference {name!r}; valid: {', '.join(available())}")
    raw = yaml.safe_load(path.read_text())
    for key in ("source", "model", "baseline", "metrics", "entries"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    return Reference(name, path, raw)


def reference_sides(spec: str) -> list[Side]:
    """``ref:<name>`` or ``ref:<name>:<recipe>``."""
    _, _, rest = spec.partition(":")
    name, _, recipe = rest.partition(":")
    sides = load_reference(name).sides()
    if recipe:
        sides = [s for s in sides if s.recipe == recipe]
        if not sides:
            raise KeyError(f"reference {name!r} has no entry for recipe {recipe!r}")
    return sides


def speedup_check(ref: Reference) -> list[dict[str, Any]]:
    """Recompute the published speedups from the throughput tables. The tables are rounded to
    0.1 token/s, so a recomputed speedup is an interval; a published speedup (rounded to 0.01)
    is consistent when its own rounding interval overlaps it."""
    spec = ref.raw.get("published_speedups")
    if not spec:
        return []
    entries = {e["recipe"]: e for e in ref.raw["entries"]}
    base, cand = entries[ref.baseline]["throughput"], entries[spec["candidate"]]["throughput"]
    rows = []
    for mode in ("max_throughput", "batch1"):
        for (isl, osl), b, c, published in zip(base["isl_osl"], base[mode], cand[mode], spec[mode]):
            lo, hi = (c - 0.05) / (b + 0.05), (c + 0.05) / (b - 0.05)
            rows.append({"mode": mode, "isl": isl, "osl": osl, "baseline": b, "candidate": c,
                         "speedup": c / b, "speedup_range": (lo, hi), "published": published,
                         "consistent": lo <= published + 0.005 and published - 0.005 <= hi})
    return rows


def format_speedups(ref: Reference) -> str:
    rows = speedup_check(ref)
    if not rows:
        return ""
    entries = {e["recipe"]: e for e in ref.raw["entries"]}
    cand = ref.raw["published_speedups"]["candidate"]
    lines = [f"Throughput, output tokens/s ({entries[ref.baseline]['hardware']['gpus']}x "
             f"{entries[ref.baseline]['hardware']['gpu']}), {cand} over {ref.baseline}:",
             f"  {'mode':<15} {'ISL/OSL':>14} {ref.baseline:>14} {cand:>14} {'speedup':>8} {'published':>9}  check"]
    for r in rows:
        lines.append(f"  {r['mode']:<15} {str(r['isl']) + '/' + str(r['osl']):>14} {r['baseline']:>14.1f} "
                     f"{r['candidate']:>14.1f} {r['speedup']:>7.3f}x {r['published']:>8.2f}x  "
                     + ("matches" if r["consistent"] else "MISMATCH")
                     + f" (table rounding allows {r['speedup_range'][0]:.3f}-{r['speedup_range'][1]:.3f})")
    return "\n".join(lines)
