"""Recipe registry: a name maps to a validated config dataclass and the function that applies it.

``apply_recipe(model, name)`` changes the model in place (module swaps through the engine's hook
points) and returns the record every run stores: name, description and the full config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.load import LoadedModel


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    config: Any  # a frozen dataclass, validated in its __post_init__
    apply: Callable[[LoadedModel, Any], None]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "config": dataclasses.asdict(self.config)}


RECIPES: dict[str, Recipe] = {}
# Quantized module types by class name: what a saved checkpoint names and loading rebuilds. Each
# recipe module registers the module classes it creates (``@register_module``); a class offers
# ``export() -> (tensors, attrs)`` and ``from_export(tensors, attrs, dtype)``.
MODULE_TYPES: dict[str, type] = {}


def register_module(cls: type) -> type:
    if cls.__name__ in MODULE_TYPES:
        raise ValueError(f"quantized module type {cls.__name__!r} is registered twice")
    MODULE_TYPES[cls.__name__] = cls
    return cls


def module_types() -> dict[str, type]:
    _load_builtin()
    return dict(MODULE_TYPES)


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    _load_builtin()
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}") from None


def all_recipes() -> dict[str, Recipe]:
    _load_builtin()
    return dict(sorted(RECIPES.items()))


def configured_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe with ``overrides`` replacing fields of its config, validated like the defaults
    (and a switch only as true or false): needs no model, so commands check it before loading one."""
    recipe = get_recipe(name)
    if not overrides:
        return recipe
    fields = {f.name: f for f in dataclasses.fields(recipe.config)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"recipe {name!r} has no settings {unknown}; valid: {', '.join(fields) or 'none'}")
    for key, value in overrides.items():
        if isinstance(getattr(recipe.config, key), bool) and not isinstance(value, bool):
            raise ValueError(f"recipe {name!r}: {key}={value!r}; valid: true or false")
    return dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, **overrides))


def apply_recipe(lm: LoadedModel, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply a recipe to ``lm.model`` in place; return the record that goes into every run.

    ``overrides`` replace fields of the recipe's config (``configured_recipe``)."""
    recipe = configured_recipe(name, overrides)
    recipe.apply(lm, recipe.config)
    lm.model.fuse_projections()  # the recipe's modules may fuse (q/k/v, gate/up) where they can
    return recipe.record()


@dataclass(frozen=True)
class Unquantized:
    """The reference: weights and activations stay in the engine dtype (BF16 by default)."""


def _unquantized(lm: LoadedModel, config: Unquantized) -> None:
    pass


def _load_builtin() -> None:
    """Register the built-in recipes once (their modules import this one)."""
    if "bf16" in RECIPES:
        return
    register(Recipe("bf16", "unquantized reference in the engine dtype (bfloat16 by default)", Unquantized(),
                    _unquantized))
    from . import fp8, int4_awq, int4_awq_asym  # noqa: F401  (they register their recipes)
