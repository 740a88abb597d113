"""What ``load`` accepts (model sources, dtypes, devices), checked without importing torch.

Commands check their arguments with these first, so a bad one is reported in well under a second,
before torch is imported or a model is read. ``load`` itself checks the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..assets import SMOLLM2_GGUF, Asset

# Registered model names. The embedded default is a GGUF shipped in a pinned PyPI package.
MODELS: dict[str, Asset] = {"smollm2-135m": SMOLLM2_GGUF}
DEFAULT_MODEL = "smollm2-135m"

# dtype names, each mapped to torch's name for it
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
               "float16": "float16", "fp16": "float16"}

_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


class ModelLoadError(RuntimeError):
    """A model source is missing, corrupt or unusable."""


def check_dtype(name: str) -> str:
    """torch's name for the dtype ``name`` (bfloat16, float32, float16)."""
    try:
        return DTYPE_NAMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPE_NAMES)}") from None


def check_device(device: str | None) -> None:
    """``device`` is None (the default) or names a CPU or CUDA device; whether that CUDA device
    exists here is ``load.parse_device``'s question, which needs torch."""
    if device is not None and not _DEVICE.fullmatch(str(device)):
        raise ValueError(f"--device {device!r} is not a device; valid: cpu, cuda, cuda:N")


# The engine's numerics, by version: bumped when a change moves its numbers (the same model,
# recipe and task scoring otherwise). Part of every engine run's identity, so that a run folder an
# engine of other numerics wrote is not resumed into a mix of the two. 1: until RMSNorm rounded as
# transformers does (2026-11-29); 2: until static per-tensor scales (fp8-modelopt's, nvfp4's) were
# held in float32, as checkpoints and kernels hold them (2026-11-29); 3: until int4-awq multiplied
# its inputs by the pre-quant scale p in the model's dtype, as Model Optimizer and its deployed
# kernels do, instead of dividing by s = 1/p (2026-11-29); 4: until int4-awq-asym held its block
# scales in FP16, as AutoAWQ's checkpoints and kernels hold them (2026-11-29); 5: until a context
# shorter than MIN_SHARED_PREFIX tokens (every perplexity document's first window has the same
# one-token context) was no longer shared by the scorer but prefilled with its continuation, as an
# endpoint runs the whole prompt (2026-11-30); 6: until the requests sharing a context also
# prefilled the continuation tokens they all share (cloze answers beginning with the same word),
# as an endpoint shares a group's whole common prefix (2026-11-30); 7: since.
NUMERICS_VERSION = 7

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether an HF model folder holds a tokenizer (any of ``TOKENIZER_FILES``)."""
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def source_kind(source: str) -> str:
    """How ``source`` loads: "registered" (a name in MODELS), "gguf" (a .gguf file), "folder" (an
    HF model folder) or "hub" (org/name). Nothing is read or downloaded."""
    path = Path(source)
    if source in MODELS:
        return "registered"
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source!r} does not exist")
        return "gguf"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise ModelLoadError(f"{source!r} is a file but not a .gguf; pass an HF model folder, a .gguf file, "
                             f"or a registered name: {', '.join(MODELS)}")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub"
    raise ModelLoadError(f"unknown model {source!r}: not a registered name ({', '.join(MODELS)}), "
                         f"not an existing folder or .gguf file, not a hub id (org/name)")


def with_quant_config(hf: dict[str, Any], folder: Path) -> dict[str, Any]:
    """config.json's dictionary with Model Optimizer's hf_quant_config.json beside it read in, as
    vLLM reads it: where config.json names no quantization (checkpoints published before
    config.json carried it), it supplies ``quantization_config``; where config.json names Model
    Optimizer's, it supplies what that form leaves out (W4A16_AWQ's group size)."""
    path = folder / "hf_quant_config.json"
    current = hf.get("quantization_config")
    if (current and current.get("quant_method") != "modelopt") or not path.is_file():
        return hf
    try:
        quant = json.loads(path.read_text()).get("quantization") or {}
    except (ValueError, AttributeError) as e:
        raise ModelLoadError(f"{path} is not a JSON object with a 'quantization' entry: {e}") from None
    return {**hf, "quantization_config": {"quant_method": "modelopt", **quant, **(current or {})}}
