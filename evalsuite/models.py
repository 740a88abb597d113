"""Getting the model to evaluate: a source loaded, a recipe applied, and the record of both.

Every command and benchmark that needs a model in this process comes through here. A source is
a registered name, an HF folder, a .gguf file, a hub id, or a quantized checkpoint written by
``evalsuite quantize`` (which loads as saved: its recipe is already applied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.options import (
    TOKENIZER_FILES,
    ModelLoadError,
    check_device,
    check_dtype,
    has_tokenizer_files,
    source_kind,
    with_quant_config,
)
from .quant.api import all_recipes, check_recipe_fits, configured_recipe, is_quantized_checkpoint
from .quant.configs import calibrates

if TYPE_CHECKING:
    from .engine.config import ModelConfig
    from .engine.load import LoadedModel


def check_model_args(source: str, recipe: str = "bf16", overrides: dict[str, Any] | None = None,
                     dtype: str = "bfloat16", device: str | None = None, needs_tokenizer: bool = False) -> None:
    """Every check that needs neither torch nor a model, for a command to make first: the source
    names something loadable, the recipe exists with valid settings, a quantized checkpoint is not
    quantized again, dtype and device are spelled right, a folder holds the tokenizer that the
    command (``needs_tokenizer``: it reads or writes text) or the recipe's calibration needs.
    (Whether a CUDA device exists here is checked when torch is imported, still before the model
    loads.)"""
    kind = source_kind(source)
    config = configured_recipe(recipe, overrides).config
    cfg = folder_config(source) if kind == "folder" and (Path(source) / "config.json").is_file() else None
    if cfg is not None:
        check_recipe_fits(recipe, config, cfg)
    if kind == "folder" and not has_tokenizer_files(source):
        published = cfg is not None and cfg.published_recipe is not None  # runs as published: no calibration
        _check_tokenizer_needs(source, recipe, calibrates(config) and not published, needs_tokenizer)
    if is_quantized_checkpoint(source) and recipe != "bf16":
        raise ValueError(f"{source} is already quantized; run it with --recipe bf16 (no further change), "
                         f"not {recipe!r}")
    check_dtype(dtype)
    check_device(device)


def _check_tokenizer_needs(folder: str, recipe: str, calibrating: bool, needs_tokenizer: bool) -> None:
    """A folder without a tokenizer serves only commands and recipes that read no text."""
    files = ", ".join(TOKENIZER_FILES)
    if needs_tokenizer:
        raise ValueError(f"{folder} holds no tokenizer (none of {files}), and this command reads and writes "
                         "text; valid: a model folder with its tokenizer's files")
    if calibrating:
        plain = [name for name, r in all_recipes().items() if not calibrates(r.config)]
        raise ValueError(f"recipe {recipe!r} calibrates on text, and {folder} holds no tokenizer (none of {files}); "
                         f"valid: a model folder with its tokenizer's files, or a recipe that does not calibrate: "
                         f"{', '.join(plain)}")


def folder_config(folder: str) -> ModelConfig | None:
    """The ModelConfig of ``folder``'s config.json, or None where the engine cannot read it (that
    is reported when the model loads)."""
    from .engine.config import ModelConfig, UnsupportedModelError

    try:
        return ModelConfig.from_hf(with_quant_config(json.loads((Path(folder) / "config.json").read_text()),
                                                     Path(folder)))
    except (ValueError, KeyError, TypeError, UnsupportedModelError, ModelLoadError):
        return None


def check_device_here(device: str | None) -> None:
    """That a named device exists on this machine (torch, imported here): what a command asks before
    its first run or task, once the checks without torch have passed. None: the default device."""
    if device is not None:
        from .engine.load import parse_device

        parse_device(device)


def load_model_and_recipe(source: str, recipe: str = "bf16", dtype: str = "bfloat16",
                          overrides: dict[str, Any] | None = None,
                          device: str | None = "cpu") -> tuple[LoadedModel, dict[str, Any]]:
    """The model and the recipe record every run stores (name, description, config, and the
    weights' bytes as a quantized checkpoint stores them)."""
    from .engine.load import load, parse_device  # torch: imported once the arguments are checked
    from .quant.api import apply_recipe
    from .quant.checkpoint import deployed_weight_bytes, load_quantized

    check_model_args(source, recipe, overrides, dtype, device)
    parse_device(device)
    if is_quantized_checkpoint(source):
        lm, record = load_quantized(source, dtype, device)
    else:
        lm = load(source, dtype, device)
        record = apply_recipe(lm, recipe, overrides)
    return lm, {**record, "deployed_weight_bytes": deployed_weight_bytes(lm.model)}
