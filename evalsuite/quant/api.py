"""Recipe registry: a name maps to a description and a validated config; the code that applies a
config is registered per config type (``@handler``), as torchao registers its quantize handlers.

The registry and the configs import no torch, so commands look a recipe up and validate its
settings before anything slow runs; the handlers' modules are imported when a recipe is applied.
``apply_recipe(model, name)`` changes the model in place (module swaps through the engine's hook
points) and returns the record every run stores: name, description and the full config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configs import (
    FP8BlockConfig,
    FP8DynamicConfig,
    FP8ModelOptConfig,
    FP8OfficialConfig,
    Int4AutoAWQConfig,
    Int4AWQConfig,
    Int4GPTQConfig,
    Int8W8A8Config,
    NVFP4Config,
    Unquantized,
)

if TYPE_CHECKING:
    from ..engine.config import ModelConfig
    from ..engine.load import LoadedModel


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    config: Any  # a frozen dataclass, validated in its __post_init__; its type selects the handler

    def record(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.config)
        # settings added after runs were recorded: absent at their neutral value, so that those runs'
        # identities (the record is part of them) and their resumption stay as they were
        for key, neutral in getattr(self.config, "ADDED_SETTINGS", {}).items():
            if config[key] == neutral:
                del config[key]
        return {"name": self.name, "description": self.description, "config": config}


RECIPES: dict[str, Recipe] = {}
# The function that applies a config, by config type: ``handler(ConfigType)`` registers it.
HANDLERS: dict[type, Callable[[LoadedModel, Any], None]] = {}
# What a recipe sets up for the device its model is on, beyond its modules (fp8-modelopt: the KV
# cache stored as E4M3 codes on CUDA), by config type (``@placement``). It runs from the recorded
# settings, when the recipe is applied and again when its saved checkpoint loads: a checkpoint
# holds the modules and the record, not choices that depend on where it runs.
PLACEMENTS: dict[type, Callable[[LoadedModel, dict[str, Any]], None]] = {}
# Quantized module types by class name: what a saved checkpoint names and loading rebuilds. Each
# recipe module registers the module classes it creates (``@register_module``); a class offers
# ``export() -> (tensors, attrs)`` and ``from_export(tensors, attrs, dtype)``.
MODULE_TYPES: dict[str, type] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def _per_config_type(table: dict[type, Callable], what: str) -> Callable[[type], Callable]:
    """A decorator factory: ``@decorator(ConfigType)`` puts the function in ``table`` for that type."""
    def for_type(config_type: type) -> Callable[[Callable], Callable]:
        def decorate(fn: Callable) -> Callable:
            if config_type in table:
                raise ValueError(f"a {what} for {config_type.__name__} is registered twice")
            table[config_type] = fn
            return fn
        return decorate
    return for_type


handler = _per_config_type(HANDLERS, "handler")  # @handler(ConfigType): fn(lm, config) applies it
placement = _per_config_type(PLACEMENTS, "placement")  # @placement(ConfigType): fn(lm, recorded config)


def place(lm: LoadedModel, record: dict[str, Any]) -> None:
    """Run the placement of the recipe ``record`` names (if it has one) on ``lm``."""
    _load_handlers()
    recipe = RECIPES.get(record.get("name"))
    fn = PLACEMENTS.get(type(recipe.config)) if recipe is not None else None
    if fn is not None:
        fn(lm, record["config"])


def register_module(cls: type) -> type:
    if cls.__name__ in MODULE_TYPES:
        raise ValueError(f"quantized module type {cls.__name__!r} is registered twice")
    MODULE_TYPES[cls.__name__] = cls
    return cls


def module_types() -> dict[str, type]:
    _load_handlers()
    return dict(MODULE_TYPES)


# recipes whose quantized model ``quantize --format hf`` writes as their published checkpoints are
# written (checkpoint.save_hf), for the engines that serve those
HF_EXPORTS = ("fp8-block", "fp8-dynamic", "fp8-modelopt", "fp8-official", "int4-awq", "int4-awq-asym", "int4-gptq",
              "int8-w8a8", "nvfp4")


def check_hf_export(recipe: str) -> None:
    if recipe not in HF_EXPORTS:
        raise ValueError(f"--format hf: recipe {recipe!r} has no HF export here; valid: {', '.join(HF_EXPORTS)} "
                         "(or --format evalsuite, the engine's own checkpoint)")


def hf_export_misfit(recipe: str, settings: dict[str, Any], cfg: ModelConfig | None) -> str | None:
    """Why the model has no HF export of ``recipe`` with these settings (the recipe config's
    fields), or None. Model Optimizer's FP8 form has no scale for FP8 attention inputs; its NVFP4
    form gives q/k/v and gate/up one weight and one input scale, and its W4A16_AWQ form is the
    resmoothed model, packs output rows in pairs and holds whole groups along every input;
    AutoAWQ's GEMM form holds whole groups along every input and packs outputs in eights;
    compressed-tensors' pack-quantized form holds whole groups along every input."""
    from ..engine.config import MOE_ROUTERS  # no torch

    if recipe == "fp8-modelopt" and settings["quantize_attention"]:
        return ("Model Optimizer's FP8 checkpoint form has no scale for attention's FP8 query inputs, so it cannot "
                "hold quantize_attention=true; valid: --recipe-config quantize_attention=false")
    if recipe == "nvfp4" and not settings["fused_scales"]:
        return ("Model Optimizer's NVFP4 checkpoint form gives q/k/v and gate/up one weight and one input scale each, "
                "so it cannot hold fused_scales=false; valid: --recipe-config fused_scales=true")
    if recipe == "int4-awq" and not settings["resmooth"]:
        return ("Model Optimizer's W4A16_AWQ checkpoint form holds the model as its export resmooths it (q/k/v's and "
                "gate/up's scales folded into the norm), so it cannot hold resmooth=false; valid: --recipe-config "
                "resmooth=true")
    if recipe not in ("int4-awq", "int4-awq-asym", "int4-gptq") or cfg is None:  # the shapes: where config.json says
        return None
    form, rows = {"int4-awq-asym": ("AutoAWQ's GEMM form", 8), "int4-awq": ("Model Optimizer's W4A16_AWQ form", 2),
                  "int4-gptq": ("compressed-tensors' pack-quantized form", 1)}[recipe]
    block_size = settings["block_size"]
    shapes = {(name, out, inp) for i in range(cfg.num_layers) for name, out, inp in cfg.layer_projections(i)
              if name not in MOE_ROUTERS}
    odd_in = sorted({f"{name} ({inp} inputs)" for name, _out, inp in shapes if inp % block_size})
    odd_out = sorted({f"{name} ({out} outputs)" for name, out, _inp in shapes if out % rows})
    if odd_out:
        return f"{form} packs outputs in {'eights' if rows == 8 else 'pairs'}, and {', '.join(odd_out[:3])} are not"
    if odd_in:
        common = math.gcd(*(inp for _name, _out, inp in shapes))
        valid = [g for g in (256, 128, 64, 32, 16) if common % g == 0]
        return (f"{form} holds whole groups of block_size={block_size} along every input, and "
                f"{', '.join(odd_in[:3])} are not; valid: "
                + (", ".join(f"--recipe-config block_size={g}" for g in valid) if valid else "no block size here"))
    return None


QUANT_FILE = "quantization.json"  # marks a folder as a checkpoint that ``checkpoint.save_quantized`` wrote


def is_quantized_checkpoint(source: str | Path) -> bool:
    return (Path(source) / QUANT_FILE).is_file()


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}") from None


def all_recipes() -> dict[str, Recipe]:
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


def check_recipe_fits(name: str, config: Any, cfg: ModelConfig) -> None:
    """Refuse a recipe this model's shapes or structure rule out, naming why and the recipes that fit."""
    reason = _misfit(config, cfg)
    if reason:
        fits = ", ".join(n for n, r in sorted(RECIPES.items()) if _misfit(r.config, cfg) is None)
        raise ValueError(f"recipe {name!r}: {reason}" + (f"; valid for this model: {fits}" if fits else ""))


def _misfit(config: Any, cfg: ModelConfig) -> str | None:
    """Why a recipe cannot run on this model, or None.
    nvfp4's blocks of 16 need projections whose inputs they tile.
    The AWQ recipes' scales fold into the norm before each MLP. int4-awq's resmoothing needs one MLP
    there: a mixture's experts all read that one norm. int4-awq-asym searches one scale for all the
    experts' gate and up, as AutoAWQ does for Mixtral and Qwen3-MoE; for a mixture with a shared
    expert (Qwen2-MoE) AutoAWQ searches a second scale for the shared expert and folds both into that
    norm, so the deployed shared expert reads its input divided by the routed experts' scale: a
    checkpoint this engine does not reproduce. gpt-oss's experts clamp gate and up and add 1 to up,
    so no scale folds from up into down; AutoAWQ has no form for it. AutoAWQ folds every q/k/v and
    gate/up scale into the norm before them, which OLMo's layer does not have.
    A published low-bit checkpoint runs as published, with the recipe of its form and its block:
    fine-grained FP8 as fp8-block, AutoAWQ's GEMM form as int4-awq-asym, Meta's FP8 (fbgemm_fp8) as
    fp8-official with the checkpoint's activation_scale_ub, llm-compressor's FP8_DYNAMIC as
    fp8-dynamic, its W4A16 as int4-gptq, its W8A8 INT8 as int8-w8a8, Model Optimizer's forms as
    its recipes here with the settings that form holds (``_modelopt_misfit``)."""
    if cfg.modelopt is not None:
        return _modelopt_misfit(config, cfg)
    if cfg.fbgemm_fp8_ub is not None:
        wanted = f"--recipe fp8-official --recipe-config activation_scale_ub={cfg.fbgemm_fp8_ub:g}"
        if not isinstance(config, FP8OfficialConfig):
            return (f"the checkpoint is published in Meta's FP8 (fbgemm_fp8: E4M3 weights with a scale per output row, "
                    f"inputs per token), which runs as published ({wanted}); load the unquantized model for other "
                    "recipes")
        if config.activation_scale_ub != cfg.fbgemm_fp8_ub:
            return (f"activation_scale_ub={config.activation_scale_ub:g}, and the checkpoint's input scales are "
                    f"bounded by {cfg.fbgemm_fp8_ub:g}; valid: activation_scale_ub={cfg.fbgemm_fp8_ub:g}")
        return None
    if cfg.compressed_fp8:
        if not isinstance(config, FP8DynamicConfig):
            return ("the checkpoint is published in compressed-tensors' FP8_DYNAMIC form (llm-compressor: E4M3 weights "
                    "with a scale per output channel, inputs per token), which runs as published (--recipe "
                    "fp8-dynamic); load the unquantized model for other recipes")
        return None
    if cfg.compressed_int8:
        if not isinstance(config, Int8W8A8Config):
            return ("the checkpoint is published in compressed-tensors' W8A8 INT8 form (llm-compressor: INT8 weights "
                    "with a scale per output channel, inputs per token), which runs as published (--recipe int8-w8a8); "
                    "load the unquantized model for other recipes")
        return None
    if cfg.compressed_int4 is not None:
        if not isinstance(config, Int4GPTQConfig):
            return (f"the checkpoint is published in compressed-tensors' W4A16 form (llm-compressor: symmetric INT4 "
                    f"weights in groups of {cfg.compressed_int4}), which runs as published (--recipe int4-gptq "
                    f"--recipe-config block_size={cfg.compressed_int4}); load the unquantized model for other recipes")
        if config.block_size != cfg.compressed_int4:
            return (f"block_size={config.block_size}, and the checkpoint's groups are of {cfg.compressed_int4}; valid: "
                    f"block_size={cfg.compressed_int4}")
        return None
    if cfg.awq_group is not None:
        if not isinstance(config, Int4AutoAWQConfig):
            return (f"the checkpoint is published in AutoAWQ's INT4 GEMM form (groups of {cfg.awq_group}), which runs "
                    f"as published (--recipe int4-awq-asym --recipe-config block_size={cfg.awq_group}); load the "
                    "unquantized model for other recipes")
        if config.block_size != cfg.awq_group:
            return (f"block_size={config.block_size}, and the checkpoint's groups are of {cfg.awq_group}; valid: "
                    f"block_size={cfg.awq_group}")
        return None
    if cfg.fp8_block is not None:
        if not isinstance(config, FP8BlockConfig):
            return (f"the checkpoint is published in fine-grained FP8 (E4M3 weights in {cfg.fp8_block} x "
                    f"{cfg.fp8_block} tiles), which runs as published; load the unquantized model for other recipes")
        if config.block_size != cfg.fp8_block:
            return (f"block_size={config.block_size}, and the checkpoint's tiles are {cfg.fp8_block} x "
                    f"{cfg.fp8_block}; valid: block_size={cfg.fp8_block}")
        return None
    if isinstance(config, NVFP4Config):
        odd = sorted({f"{name} ({inp} inputs)" for i in range(cfg.num_layers)
                      for name, _out, inp in cfg.layer_projections(i) if inp % 16})
        if odd:
            return f"FP4 blocks of 16 along the input do not tile {', '.join(odd[:3])}"
    if cfg.olmo and isinstance(config, Int8W8A8Config) and config.smoothquant:
        return (f"SmoothQuant divides the norm before q/k/v and gate/up by its scales, and {cfg.architecture}'s layer "
                f"has none there; valid: --recipe-config smoothquant=false")
    if cfg.olmo and isinstance(config, Int4AutoAWQConfig):
        return (f"AutoAWQ folds its q/k/v and gate/up scales into the norm before them, and {cfg.architecture}'s "
                f"layer has none there")
    if not any(cfg.layer_moe(i) for i in range(cfg.num_layers)):
        return None
    if cfg.gpt_oss and isinstance(config, Int4AutoAWQConfig):
        return ("gpt-oss's experts clamp gate and up and add 1 to up, so a scale cannot fold from up into down, and "
                "AutoAWQ has no form for them")
    if isinstance(config, Int4AWQConfig) and config.awq:
        return (f"its scales fold into the norm before each layer's MLP, which a mixture of experts shares between "
                f"its experts ({cfg.architecture})")
    if cfg.shared_expert_intermediate_size and isinstance(config, Int4AutoAWQConfig):
        return (f"AutoAWQ folds both the shared expert's and the routed experts' scales into the one norm before "
                f"the MLP ({cfg.architecture}), a checkpoint the engine does not reproduce")
    return None


def _modelopt_misfit(config: Any, cfg: ModelConfig) -> str | None:
    """Why a recipe with these settings does not run a checkpoint published in Model Optimizer's
    form ``cfg.modelopt``, or None: the form's recipe, with the settings the checkpoint holds.
    FP8's export has no scale for FP8 attention inputs; NVFP4's unifies q/k/v's and gate/up's
    scales (``fused_scales``); W4A16_AWQ's is int4-awq's resmoothed form in its group size; a KV
    cache is FP8 as the checkpoint says."""
    kv_word = "an FP8 KV cache" if cfg.modelopt_fp8_kv else "no FP8 KV cache"
    if cfg.modelopt == "FP8":
        wanted, types = "--recipe fp8-modelopt --recipe-config quantize_attention=false", FP8ModelOptConfig
        settings = {"quantize_attention": False}
    elif cfg.modelopt == "NVFP4":
        wanted, types = f"--recipe nvfp4 --recipe-config fp8_kv_cache={str(cfg.modelopt_fp8_kv).lower()}", NVFP4Config
        settings = {"fused_scales": True, "fp8_kv_cache": cfg.modelopt_fp8_kv}
    else:
        wanted = (f"--recipe int4-awq --recipe-config block_size={cfg.modelopt_group} "
                  f"fp8_kv_cache={str(cfg.modelopt_fp8_kv).lower()}")
        types = Int4AWQConfig
        settings = {"awq": True, "resmooth": True, "block_size": cfg.modelopt_group,
                    "fp8_kv_cache": cfg.modelopt_fp8_kv}
    form = f"Model Optimizer's {cfg.modelopt}" + (f" in groups of {cfg.modelopt_group}" if cfg.modelopt_group else "")
    if not isinstance(config, types) or (types is Int4AWQConfig and not config.awq):
        return (f"the checkpoint is published in {form} with {kv_word}, which runs as published ({wanted}); load the "
                "unquantized model for other recipes")
    differs = {k: getattr(config, k) for k, v in settings.items() if getattr(config, k) != v}
    if differs:
        return (", ".join(f"{k}={json.dumps(v)}" for k, v in differs.items())
                + f", and the checkpoint holds {form} with {kv_word}"
                + (" (no scale for attention's FP8 query inputs)" if "quantize_attention" in differs else "")
                + ("" if "fused_scales" not in differs else " (one weight and one input scale per q/k/v and gate/up)")
                + "; valid: " + " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items() if k in differs))
    return None


def apply_recipe(lm: LoadedModel, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply a recipe to ``lm.model`` in place; return the record that goes into every run.

    ``overrides`` replace fields of the recipe's config (``configured_recipe``)."""
    recipe = configured_recipe(name, overrides)
    cfg = lm.model.config
    check_recipe_fits(name, recipe.config, cfg)
    _load_handlers()
    try:
        apply = HANDLERS[type(recipe.config)]
    except KeyError:
        raise KeyError(f"recipe {name!r}: no handler is registered for {type(recipe.config).__name__}") from None
    apply(lm, recipe.config)
    lm.model.fuse_projections()  # the recipe's modules may fuse (q/k/v, gate/up) where they can
    record = recipe.record()
    if cfg.published_recipe is not None:  # the calibration settings in the record went unused
        record["published"] = (f"the checkpoint's own codes and scales, in {cfg.published_recipe}'s published form: "
                               "nothing was calibrated or quantized")
    place(lm, record)
    return record


@handler(Unquantized)
def _unquantized(lm: LoadedModel, config: Unquantized) -> None:
    pass


def _load_handlers() -> None:
    """Import the built-in recipe modules (they import torch, and register their handlers and
    module types on import)."""
    from . import fp8, fp8_block, gptq, int4_awq, int4_awq_asym, int8, nvfp4  # noqa: F401


register(Recipe("bf16", "unquantized reference in the engine dtype (bfloat16 by default)", Unquantized()))
register(Recipe(
    "fp8-official",
    "Meta Llama 3.1 FP8 (fbgemm_fp8): FFN weights row-wise E4M3, activations per token dynamic "
    "(scale bound 1200), not in the first and last layers; attention, embeddings, lm_head, KV cache BF16",
    FP8OfficialConfig()))
register(Recipe(
    "fp8-dynamic",
    "llm-compressor FP8_DYNAMIC (compressed-tensors, Red Hat's *-FP8-dynamic checkpoints): all linears but "
    "lm_head with E4M3 weights and a static scale per output channel, inputs quantized per token at run time "
    "(dynamic, unbounded, no calibration); KV cache and attention in the activation dtype",
    FP8DynamicConfig()))
register(Recipe(
    "fp8-modelopt",
    "NVIDIA Model Optimizer FP8: all linears but lm_head with static per-tensor E4M3 weight and input "
    "scales (max calibration), FP8 KV cache (static per-tensor K and V scales), static FP8 attention inputs; "
    "q/k/v and gate/up with one scale per group as TensorRT-LLM and vLLM load them fused",
    FP8ModelOptConfig()))
register(Recipe(
    "fp8-block",
    "fine-grained FP8 as DeepSeek-V3's and Qwen3's FP8 checkpoints carry it: all linears but lm_head with E4M3 "
    "weights in 128x128 tiles (a float32 scale each), inputs quantized per token in groups of 128 at run time "
    "(dynamic, no calibration); KV cache and attention in the activation dtype; simulated",
    FP8BlockConfig()))
register(Recipe(
    "nvfp4",
    "NVIDIA Model Optimizer NVFP4 (Blackwell): all linears but lm_head with FP4 E2M1 weights and inputs in "
    "blocks of 16 with E4M3 block scales and a float32 scale per tensor (inputs: static tensor scale from max "
    "calibration, dynamic block scales), FP8 KV cache; simulated (no FP4 tensor cores before sm_100)",
    NVFP4Config()))
register(Recipe("int4-awq", "NVIDIA Model Optimizer INT4 AWQ (awq_lite): weight-only symmetric INT4, blocks of "
                "128 along the input, activation-aware per-channel scales searched over α, q/k/v and gate/up "
                "resmoothed to one scale folded into the norm as exported for deployment; lm_head BF16",
                Int4AWQConfig()))
register(Recipe("int4-rtn", "plain INT4 rounding (the int4-awq quantizer without AWQ scales), for comparison",
                Int4AWQConfig(awq=False)))
register(Recipe("int4-awq-asym", "AutoAWQ INT4 (GEMM): zero-point INT4 [0, 15], groups of 128, 20-point scale "
                "search scored on each block's output, clip search (not q, k), scales folded into the "
                "preceding norm or linear; lm_head BF16", Int4AutoAWQConfig()))
register(Recipe("int4-gptq", "llm-compressor GPTQ, W4A16 (compressed-tensors pack-quantized, Red Hat's "
                "*-quantized.w4a16 checkpoints): weight-only symmetric INT4 [-8, 7], groups of 128 with min-max "
                "scales, columns rounded in order of activation with the error spread by the inverse Hessian, layer "
                "by layer on the quantized layers' outputs; lm_head BF16", Int4GPTQConfig()))
register(Recipe("int8-w8a8", "llm-compressor W8A8 INT8 (compressed-tensors int-quantized, Red Hat's "
                "*-quantized.w8a8 checkpoints): SmoothQuant (alpha 0.8) into the norms before q/k/v and gate/up, "
                "then all linears but lm_head with INT8 weights per output channel rounded by GPTQ, inputs INT8 per "
                "token at run time as vLLM's kernels quantize them; int32 sums; KV cache BF16", Int8W8A8Config()))
