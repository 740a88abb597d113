"""Quantized checkpoints: save a quantized model as an HF-style folder, load it back.

The folder holds the source config.json and tokenizer, ``model.safetensors`` with the low-bit
tensors (FP8 weights as float8_e4m3fn, INT4 codes two per byte) and scales next to the BF16
tensors of everything the recipe left alone, and ``quantization.json`` with the recipe record
and, per quantized module, its type and scalar settings. Loading needs no calibration.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..assets import file_sha256
from ..engine.config import (
    COMPRESSED_FP8_INPUTS,
    COMPRESSED_FP8_WEIGHTS,
    COMPRESSED_INT4_WEIGHTS,
    COMPRESSED_INT8_INPUTS,
    COMPRESSED_INT8_WEIGHTS,
)
from ..engine.load import (
    LoadedModel,
    ModelInfo,
    ModelLoadError,
    load_tokenizer,
    parse_device,
    parse_dtype,
    read_config,
    weight_files,
)
from ..engine.model import CausalLM
from .api import QUANT_FILE, check_hf_export, hf_export_misfit, module_types, place


class CheckpointError(ModelLoadError):
    """A folder that claims to be a quantized checkpoint cannot be loaded."""


def _is_quantized(module: nn.Module) -> bool:
    return type(module) in module_types().values()


def save_quantized(lm: LoadedModel, recipe: dict[str, Any], out: Path) -> Path:
    from safetensors.torch import save_file

    if lm.folder is None:
        raise ValueError(f"model {lm.info.name!r} was not loaded from a folder; its config.json is unknown")
    out.mkdir(parents=True, exist_ok=True)
    model = lm.model
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, module in model.named_modules():
        if _is_quantized(module):
            t, attrs = module.export()
            modules[name] = {"type": type(module).__name__, "attrs": attrs}
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
    quantized_prefixes = tuple(f"{n}." for n in modules)
    for key, value in model.state_dict().items():
        if key.startswith(quantized_prefixes):
            continue
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[key] = value.detach().clone().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(lm.folder / "config.json", out / "config.json")
    if (lm.folder / "hf_quant_config.json").is_file():  # a Model Optimizer checkpoint's form, part of its config
        shutil.copy(lm.folder / "hf_quant_config.json", out / "hf_quant_config.json")
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(out))
    (out / QUANT_FILE).write_text(json.dumps({"recipe": recipe, "source": {"name": lm.info.name,
                                              "weights_sha256": lm.info.weights_sha256},
                                              "dtype": lm.info.dtype, "modules": modules}, indent=1))
    # safetensors writes its file readable by the owner only; the folder is meant to be shared and
    # served, so the weights take the mode every other file here got from the umask
    shutil.copymode(out / QUANT_FILE, out / "model.safetensors")
    return out


def save_hf(lm: LoadedModel, recipe: dict[str, Any], out: Path) -> Path:
    """The quantized model in the form its published checkpoints take, which vLLM, SGLang and
    transformers load (the recipes in ``api.HF_EXPORTS``; the forms in ``published``):
    fp8-block: each projection's E4M3 ``weight`` beside its float32 ``weight_scale_inv``;
    fp8-official: Meta's FP8 (fbgemm_fp8), each FFN projection's E4M3 ``weight`` beside its float32
    ``weight_scale`` [out, 1], ``activation_scale_ub`` and ``modules_to_not_convert`` (every other
    linear) in config.json;
    fp8-dynamic: llm-compressor's FP8_DYNAMIC as compressed-tensors writes it (format
    float-quantized), each projection's E4M3 ``weight`` beside its ``weight_scale`` [out, 1] in the
    model's dtype, the linears left unquantized in ``ignore``;
    int4-gptq: llm-compressor's W4A16 as compressed-tensors writes it (format pack-quantized), each
    projection's ``weight_packed`` (eight codes to an int32), ``weight_scale`` per group in the
    model's dtype and ``weight_shape``;
    int8-w8a8: llm-compressor's W8A8 INT8 as compressed-tensors writes it (format int-quantized),
    each projection's int8 ``weight`` beside its ``weight_scale`` [out, 1] in the model's dtype, and
    the norms SmoothQuant divided, as they are;
    int4-awq-asym: AutoAWQ's GEMM form, ``qweight`` and ``qzeros`` packed eight to an int32 and
    FP16 ``scales`` (the recipe's codes, zero points and scales, which are FP16 values);
    fp8-modelopt: Model Optimizer's HF export, each projection's E4M3 ``weight`` with scalar
    ``weight_scale`` and ``input_scale`` (one per q/k/v and gate/up group, the largest, as its
    export writes them), ``k_proj.k_scale`` and ``v_proj.v_scale``, and hf_quant_config.json;
    nvfp4: Model Optimizer's NVFP4, each projection's packed E2M1 ``weight``, E4M3 ``weight_scale``
    per block, float32 ``weight_scale_2`` and ``input_scale``, the K and V scales where the KV cache
    is FP8;
    int4-awq: Model Optimizer's W4A16_AWQ, each projection's INT4 ``weight`` (output rows packed in
    pairs), ``weight_scale`` per block and, where it scales its input, ``pre_quant_scale`` (in the
    model's dtype), the K and V scales where the KV cache is FP8;
    every other tensor under its name in the source checkpoint, and config.json's
    ``quantization_config``. The engine's names must be the source checkpoint's: a checkpoint that
    fuses projections the engine splits (Phi-3's q/k/v) or stacks a mixture's experts is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .fp8 import FP8RowwiseLinear, FP8StaticLinear
    from .fp8_block import FP8BlockLinear
    from .int4 import Int4WeightOnlyLinear
    from .int8 import Int8W8A8Linear
    from .nvfp4 import NVFP4Linear

    check_hf_export(recipe["name"])
    if lm.folder is None:
        raise ValueError(f"model {lm.info.name!r} was not loaded from a folder; its config.json is unknown")
    model, config = lm.model, recipe["config"]
    misfit = hf_export_misfit(recipe["name"], config, model.config)
    if misfit:
        raise ValueError(f"--format hf: {misfit}")
    kinds = (FP8BlockLinear, Int4WeightOnlyLinear, FP8StaticLinear, NVFP4Linear, FP8RowwiseLinear, Int8W8A8Linear)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    source = set()
    for f in weight_files(Path(lm.folder)):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                source.update(st.keys())
        else:
            source.update(torch.load(f, weights_only=True, mmap=True, map_location="cpu"))
    prefixes = tuple(f"{n}." for n in quantized)
    plain = {k: v for k, v in model.state_dict().items()
             if not k.startswith(prefixes) and not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    renamed = sorted(k for k in [*plain, *(f"{n}.weight" for n in quantized)] if k not in source)
    if renamed:
        raise ValueError(f"--format hf: the engine holds {model.config.architecture}'s weights under other names than "
                         f"its checkpoint (e.g. {renamed[:3]}), which an HF export must keep; valid: --format "
                         "evalsuite")
    tensors = {k: v.detach() for k, v in plain.items()} | _published_tensors(model, quantized, recipe["name"])
    quantization, hf_quant = _quantization_config(recipe["name"], config, model, tensors)
    out.mkdir(parents=True, exist_ok=True)
    if hf_quant is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    # copies: q/k/v's and gate/up's fused FP8 weights are views of one tensor, which safetensors refuses
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    hf_config = json.loads((Path(lm.folder) / "config.json").read_text())
    hf_config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    if (Path(lm.folder) / "generation_config.json").is_file():
        shutil.copy(Path(lm.folder) / "generation_config.json", out / "generation_config.json")
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(out))
    shutil.copymode(out / "config.json", out / "model.safetensors")
    return out


def _published_tensors(model: CausalLM, quantized: dict[str, nn.Module], recipe: str) -> dict[str, torch.Tensor]:
    """Each quantized projection's tensors in its recipe's published form."""
    from .calibrate import shared_input_groups
    from .fp8 import FP8RowwiseLinear, FP8StaticLinear
    from .fp8_block import FP8BlockLinear
    from .int8 import Int8W8A8Linear
    from .nvfp4 import NVFP4Linear
    from .published import awq_pack, modelopt_int4_pack, pack_int32

    group_input = {n: max(model.get_submodule(g).input_scale for g in names)  # one input scale per fused group
                   for _norm, names in shared_input_groups(model) for n in names
                   if all(isinstance(model.get_submodule(g), FP8StaticLinear) for g in names)}
    tensors = {}
    for name, m in quantized.items():
        if isinstance(m, FP8BlockLinear):
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = m.qweight, m.weight_scale_inv
        elif isinstance(m, FP8StaticLinear):
            tensors[f"{name}.weight"] = m.qweight
            tensors[f"{name}.weight_scale"] = torch.tensor(m.weight_scale, dtype=torch.float32)
            tensors[f"{name}.input_scale"] = torch.tensor(group_input.get(name, m.input_scale), dtype=torch.float32)
        elif isinstance(m, FP8RowwiseLinear):
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = m.qweight, m.weight_scale[:, None]
        elif isinstance(m, Int8W8A8Linear):  # the scales in the model's dtype, where the recipe's are exact
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = m.codes, m.scale[:, None].to(m.act_dtype)
        elif isinstance(m, NVFP4Linear):
            exported, attrs = m.export()
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = exported["weight_packed"], m.block_scale
            tensors[f"{name}.weight_scale_2"] = torch.tensor(attrs["weight_tensor_scale"], dtype=torch.float32)
            tensors[f"{name}.input_scale"] = torch.tensor(attrs["input_scale"], dtype=torch.float32)
        elif recipe == "int4-gptq":  # compressed-tensors' pack-quantized W4A16, the scales in the model's dtype
            tensors[f"{name}.weight_packed"] = pack_int32(m.codes[:, :m.in_features])
            tensors[f"{name}.weight_scale"] = m.scale.to(m.weight.dtype)
            tensors[f"{name}.weight_shape"] = torch.tensor([m.codes.shape[0], m.in_features], dtype=torch.int64)
        elif m.zero_point is None:  # Model Optimizer's W4A16_AWQ
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = modelopt_int4_pack(m.codes), m.scale
            if m.pre_quant_scale is not None:
                tensors[f"{name}.pre_quant_scale"] = m.pre_quant_scale
        else:  # [in, out] as AutoAWQ lays them out
            tensors[f"{name}.qweight"] = awq_pack((m.codes.to(torch.int16) + 8).t())
            tensors[f"{name}.qzeros"] = awq_pack(m.zero_point.t())
            tensors[f"{name}.scales"] = m.scale.t().to(torch.float16)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
    return tensors


def _quantization_config(recipe: str, config: dict[str, Any], model: CausalLM,
                         tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json's ``quantization_config`` for the recipe's published form, and Model
    Optimizer's hf_quant_config.json (None for the other forms); Model Optimizer's K and V cache
    scales join ``tensors``."""
    if recipe == "fp8-block":
        block = config["block_size"]
        _warn_vllm_tiles(model.config, block)
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block, block]}, None
    if recipe == "fp8-official":  # what transformers' FbgemmFp8Config writes, as Meta's *-FP8 configs hold it
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": config["activation_scale_ub"],
                "modules_to_not_convert": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)}, None
    if recipe == "fp8-dynamic":  # what compressed-tensors' float-quantized compressor writes for FP8_DYNAMIC
        dtype = model.model.embed_tokens.weight.dtype  # its scales are the weights' dtype, where the recipe's are exact
        for key in [k for k in tensors if k.endswith(".weight_scale")]:
            tensors[key] = tensors[key].to(dtype)
        return _compressed_tensors_config(model, "float-quantized", dict(COMPRESSED_FP8_WEIGHTS),
                                          dict(COMPRESSED_FP8_INPUTS)), None
    if recipe == "int4-gptq":  # what compressed-tensors' pack-quantized compressor writes for W4A16
        weights = dict(COMPRESSED_INT4_WEIGHTS) | {"group_size": config["block_size"], "observer": "memoryless_minmax",
                                                   "actorder": "static" if config["actorder"] else None}
        return _compressed_tensors_config(model, "pack-quantized", weights, None), None
    if recipe == "int8-w8a8":  # what compressed-tensors' int-quantized compressor writes for W8A8
        actorder = "static" if config["gptq"] and config["actorder"] else None
        weights = dict(COMPRESSED_INT8_WEIGHTS) | {"observer": "memoryless_minmax", "actorder": actorder}
        return _compressed_tensors_config(model, "int-quantized", weights, dict(COMPRESSED_INT8_INPUTS)), None
    if recipe == "int4-awq-asym":  # what AutoAWQ writes (its Mixtral keeps the routers, "gate", unquantized)
        return {"quant_method": "awq", "zero_point": True, "group_size": config["block_size"], "bits": 4,
                "version": "gemm",
                "modules_to_not_convert": ["gate"] if model.config.architecture == "mixtral" else None}, None
    # what Model Optimizer's export writes
    kv = recipe == "fp8-modelopt" or config.get("fp8_kv_cache", False)
    if kv:
        for i, layer in enumerate(model.model.layers):
            for name in "kv":
                tensors[f"model.layers.{i}.self_attn.{name}_proj.{name}_scale"] = torch.tensor(
                    getattr(layer.self_attn, f"{name}_cache_quant").scale, dtype=torch.float32)
    kept = ["lm_head", "model.embed_tokens"] + sorted(
        n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head")
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    producer = {"name": "evalsuite", "version": __version__}
    algo = {"fp8-modelopt": "FP8", "nvfp4": "NVFP4", "int4-awq": "W4A16_AWQ"}[recipe]
    quantization = {"ignore": kept, "quant_algo": algo} | ({"kv_cache_scheme": fp8} if kv else {}) | \
        {"producer": producer, "quant_method": "modelopt"}
    hf_quant = {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv else None}
    if algo != "W4A16_AWQ":  # config.json's form of W4A16_AWQ has no config groups, and so no group size
        both = fp8 if algo == "FP8" else fp4
        quantization = {"config_groups": {"group_0": {"input_activations": both, "weights": both,
                                                      "targets": ["Linear"]}}} | quantization
    if algo == "NVFP4":
        hf_quant["group_size"] = 16
    if algo == "W4A16_AWQ":
        hf_quant |= {"group_size": config["block_size"], "has_zero_point": False, "pre_quant_scale": True}
    return quantization, {"producer": producer, "quantization": hf_quant | {"exclude_modules": kept}}


def _compressed_tensors_config(model: CausalLM, form: str, weights: dict[str, Any],
                               inputs: dict[str, Any] | None) -> dict[str, Any]:
    """config.json's ``quantization_config`` as compressed-tensors writes it for one config group
    of ``form`` targeting Linear, the linears left unquantized in ``ignore``."""
    group = {"format": form, "input_activations": inputs, "output_activations": None, "targets": ["Linear"],
             "weights": weights}
    return {"config_groups": {"group_0": group}, "format": form, "global_compression_ratio": None,
            "ignore": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear),
            "kv_cache_scheme": None, "moe_sparsity_config": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {}}


def _warn_vllm_tiles(cfg, block: int) -> None:
    """vLLM runs q/k/v and gate/up as one GEMM each and refuses block-scaled weights whose tiles
    would straddle two of them (``validate_fp8_block_shape``: every part but the last a multiple of
    the tile): say so where the export will not load there."""
    gate = cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
    odd = {name: size for name, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("gate", gate)) if size % block}
    if odd:
        sizes = ", ".join(f"{name} {size}" for name, size in odd.items())
        warnings.warn(f"vLLM fuses q/k/v and gate/up and needs q's, k's and gate's output sizes to be multiples of "
                      f"the {block} x {block} tiles; this model's {sizes} are not, so vLLM will refuse the export "
                      "(the engine and transformers load it)", stacklevel=2)


def load_quantized(folder: str | Path, dtype: str | torch.dtype = "bfloat16",
                   device: str | torch.device | None = "cpu") -> tuple[LoadedModel, dict[str, Any]]:
    """A quantized checkpoint as saved by ``save_quantized``: the model, on ``device`` (None: cuda
    when available, else cpu), and its recipe record. The tensors move to the device before the
    quantized modules are built, so a packed kernel layout is made for the device that runs it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, dtype, device = Path(folder), parse_dtype(dtype), parse_device(device)
    meta = _read_meta(folder)
    cfg = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {QUANT_FILE} but no model.safetensors")
    try:
        state = {k: v.to(device) for k, v in load_file(str(weights)).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e} (the file is corrupt or truncated)") from None
    with torch.device("meta"):
        model = CausalLM(cfg, dtype)
    types = module_types()
    for name, spec in meta["modules"].items():
        cls = types.get(spec.get("type"))
        if cls is None:
            raise CheckpointError(f"{folder}: module {name} has unknown quantized type {spec.get('type')!r}; "
                                  f"known: {', '.join(sorted(types))}")
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            getattr(parent, attr)
        except AttributeError:
            raise CheckpointError(f"{folder}: quantized module {name} does not exist in a model of this "
                                  "config.json") from None
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module = cls.from_export(own, spec["attrs"], dtype)
        except KeyError as e:
            raise CheckpointError(f"{folder}: {spec['type']} {name} lacks {e.args[0]!r} in model.safetensors "
                                  f"or {QUANT_FILE}") from None
        setattr(parent, attr, module)
        for k in own:
            del state[f"{prefix}{k}"]
    plain = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(plain, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint lacks {missing[:3]}")
    model.requires_grad_(False)
    model.fuse_projections()
    info = ModelInfo(name=folder.name, source=str(folder),
                     weights_sha256={"model.safetensors": file_sha256(weights)},
                     dtype=str(dtype).split(".")[-1], config=cfg.to_dict())
    lm = LoadedModel(model.eval(), load_tokenizer(folder), info, folder)
    place(lm, meta["recipe"])  # what the recipe chooses for this device (fp8-modelopt: an E4M3 KV cache on CUDA)
    return lm, meta["recipe"]


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / QUANT_FILE
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict) or "recipe" not in meta:
        raise CheckpointError(f"{path} lacks its 'recipe' record or 'modules' table; "
                              "re-create the checkpoint with `evalsuite quantize`")
    return meta


def deployed_weight_bytes(model: CausalLM) -> int:
    """Bytes of the weights as a quantized checkpoint stores them: low-bit tensors and their scales
    for quantized modules, every other parameter at its own width (a tied lm_head counted once)."""
    total, seen = 0, set()
    quantized = {n: m for n, m in model.named_modules() if _is_quantized(m)}
    for m in quantized.values():
        tensors, attrs = m.export()
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        total += 4 * sum(1 for k, v in attrs.items() if k.endswith("scale") and isinstance(v, float))
    prefixes = tuple(f"{n}." for n in quantized)
    for name, p in model.named_parameters():
        if not name.startswith(prefixes) and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def quantized_modules(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if _is_quantized(m)}
