"""Getting the model to evaluate: a source loaded, a recipe applied, and the record of both.

Every command and benchmark that needs a model in this process comes through here. A source is
a registered name, an HF folder, a .gguf file, a hub id, or a quantized checkpoint written by
``evalsuite quantize`` (which loads as saved: its recipe is already applied).
"""

from __future__ import annotations

from typing import Any

from .engine.load import LoadedModel, load
from .quant.api import apply_recipe, configured_recipe
from .quant.checkpoint import deployed_weight_bytes, is_quantized_checkpoint, load_quantized


def check_recipe_for_source(source: str, recipe: str, overrides: dict[str, Any] | None = None) -> None:
    """The checks that need no model: the recipe exists with valid settings, and a quantized
    checkpoint is not quantized again."""
    configured_recipe(recipe, overrides)
    if is_quantized_checkpoint(source) and recipe != "bf16":
        raise ValueError(f"{source} is already quantized; run it with --recipe bf16 (no further change), "
                         f"not {recipe!r}")


def load_model_and_recipe(source: str, recipe: str = "bf16", dtype: str = "bfloat16",
                          overrides: dict[str, Any] | None = None,
                          device: str | None = "cpu") -> tuple[LoadedModel, dict[str, Any]]:
    """The model and the recipe record every run stores (name, description, config, and the
    weights' bytes as a quantized checkpoint stores them)."""
    check_recipe_for_source(source, recipe, overrides)
    if is_quantized_checkpoint(source):
        lm, record = load_quantized(source, dtype)
    else:
        lm = load(source, dtype, device)
        record = apply_recipe(lm, recipe, overrides)
    return lm, {**record, "deployed_weight_bytes": deployed_weight_bytes(lm.model)}
