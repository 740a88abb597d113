"""Recipe registry: a recipe name maps to a validated config and a function that applies it.

Only the unquantized reference, ``bf16``, exists so far; quantization recipes register here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.model import CausalLM


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    apply: Callable[[CausalLM], None]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description}


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}") from None


def apply_recipe(model: CausalLM, name: str) -> dict[str, Any]:
    """Apply a recipe in place; return the config that goes into every record."""
    recipe = get_recipe(name)
    recipe.apply(model)
    return recipe.config()


def _unquantized(model: CausalLM) -> None:
    """The reference: weights and activations in the model dtype (BF16 by default)."""


register(Recipe("bf16", "unquantized reference in the engine dtype (bfloat16 by default)", _unquantized))

__all__ = ["Recipe", "RECIPES", "register", "get_recipe", "apply_recipe"]
