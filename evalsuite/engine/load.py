"""Load a model from a registered name, an HF folder, a GGUF file or a hub id.

GGUF files are dequantized once by transformers and cached as a float32 safetensors folder
(config.json, model.safetensors, tokenizer files), because dequantizing on every load costs
seconds. All sources then load through the same HF-folder path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..assets import cache_dir, file_sha256
from .config import ModelConfig
from .model import CausalLM
from .options import (
    DEFAULT_MODEL,
    MODELS,
    ModelLoadError,
    check_device,
    check_dtype,
    has_tokenizer_files,
    source_kind,
    with_quant_config,
)

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What a record needs to say about the model."""

    name: str
    source: str
    weights_sha256: dict[str, str]
    dtype: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any  # a transformers tokenizer, or None for a folder without one
    info: ModelInfo
    folder: Path | None = None  # the HF folder the weights came from


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else getattr(torch, check_dtype(name))


def tokenizer_for(source: str):
    """The tokenizer of a model source (registered name, HF folder, .gguf file, hub id) without
    loading its weights."""
    folder, _, _ = resolve_source(source)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ModelLoadError(f"{source!r} holds no tokenizer files")
    return tokenizer


def parse_device(device: str | torch.device | None) -> torch.device:
    """``cuda`` when a GPU is available and nothing is asked, else ``cpu``; an unavailable or
    unknown device is an error that says what is valid here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device if isinstance(device, str) else str(device))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); valid: cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def load(source: str = DEFAULT_MODEL, dtype: str | torch.dtype = "bfloat16",
         device: str | torch.device | None = "cpu") -> LoadedModel:
    """Resolve ``source`` (name, folder, .gguf file, hub id) and load model and tokenizer onto
    ``device`` (None: cuda when available, else cpu)."""
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    folder, hashes, name = resolve_source(source)
    model = load_folder(folder, dtype).to(device)
    if hashes is None:
        hashes = {p.name: file_sha256(p) for p in weight_files(folder)}
    tokenizer = load_tokenizer(folder)
    info = ModelInfo(name=name, source=str(source), weights_sha256=hashes, dtype=str(dtype).split(".")[-1],
                     config=model.config.to_dict())
    return LoadedModel(model, tokenizer, info, folder)


def resolve_source(source: str) -> tuple[Path, dict[str, str] | None, str]:
    """(HF folder, weight hashes when already known, name) of a model source: a GGUF is converted
    (once, cached), a hub id downloaded."""
    kind = source_kind(source)
    if kind == "registered":
        folder, hashes = gguf_to_folder(MODELS[source].verified_path(), sha256=MODELS[source].sha256)
        return folder, hashes, source
    if kind == "gguf":
        folder, hashes = gguf_to_folder(Path(source))
        return folder, hashes, Path(source).name
    if kind == "folder":
        return Path(source), None, Path(source).name
    return _download_hub(source), None, source


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder):
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("pytorch_model*.bin"))


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: expected an HF model folder "
                             "(config.json + *.safetensors), a .gguf file or a registered model name")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(with_quant_config(hf, folder))


def _read_state_dict(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        except (SafetensorError, RuntimeError, OSError, EOFError) as e:
            raise ModelLoadError(f"cannot read weights file {f}: {e} (the file is corrupt or truncated)") from None
        # as stored: integer tensors (gpt-oss's MXFP4 codes and exponents, AutoAWQ's packed INT4),
        # E4M3 weights and every scale; from_state_dict decodes or keeps them
        state.update({k: v.to(dtype) if v.is_floating_point() and not _stored_as_is(k, v) else v
                      for k, v in part.items()})
    return state


def _stored_as_is(key: str, tensor: torch.Tensor) -> bool:
    """Low-bit weights and their scales (weight_scale, input_scale, k_scale, weight_scale_inv,
    NVFP4's weight_scale_2, pre_quant_scale, AutoAWQ's scales), which the published forms' modules
    read at their stored precision."""
    return tensor.dtype == torch.float8_e4m3fn or key.endswith(("_scale", "_scale_inv", "_scale_2", ".scales"))


def load_folder(folder: Path, dtype: torch.dtype = torch.bfloat16) -> CausalLM:
    """Build a CausalLM from an HF folder (config.json + safetensors), weights cast to ``dtype``."""
    return from_state_dict(read_config(folder), _read_state_dict(folder, dtype), dtype, folder)


def from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                    folder: Path | str = "state dict") -> CausalLM:
    """A CausalLM on the tensors of an HF-named state dict (taken as they are: same device, and
    shared, not copied). A published low-bit checkpoint's quantized projections become the
    modules of the recipe that computes their form (``quant.published``)."""
    from ..quant.published import take

    state = _split_fused(cfg, _text_model(dict(state), folder))
    state = _gpt_oss_experts(state, dtype) if cfg.gpt_oss else _experts(state)
    published = take(cfg, state, dtype, folder)
    with torch.device("meta"):
        model = CausalLM(cfg, dtype)
    expected = set(model.state_dict()) - {f"{name}.weight" for name in published}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"weights in {folder} lack {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(k for k in set(state) - expected if "rotary_emb" not in k)
    if unexpected:
        log.warning("ignoring %d unexpected tensors in %s, e.g. %s", len(unexpected), folder, unexpected[:3])
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
            raise ModelLoadError(f"tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(model.get_parameter(name).shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    for name, build in published.items():  # the publisher's codes and scales as the recipe's modules
        parent_name, attr = name.rsplit(".", 1)
        try:
            parent = model.get_submodule(parent_name)
            current = getattr(parent, attr)
        except AttributeError:
            raise ModelLoadError(f"{folder} quantizes {name}, which a model of this config.json does not have") \
                from None
        setattr(parent, attr, build(current))
    model.fuse_projections()
    return model.eval()


# where a vision-language checkpoint keeps its text model (Gemma 3 4B and up, as published and as
# transformers 5 names it in memory), and the parts of it that are not the text model
_TEXT_MODEL_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                        ("model.language_model.", "model."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _text_model(state: dict[str, torch.Tensor], folder: Path | str) -> dict[str, torch.Tensor]:
    """The text model's tensors under the engine's names; a vision tower is left out (the engine
    runs text)."""
    vision = [k for k in state if k.startswith(_VISION_PREFIXES)]
    if not vision:
        return state
    log.info("loading the text model of %s: its %d vision tensors are not used", folder, len(vision))
    out = {}
    for key, tensor in state.items():
        if key.startswith(_VISION_PREFIXES):
            continue
        for old, new in _TEXT_MODEL_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = tensor
    return out


# FP4 E2M1 by its 4-bit code: sign bit, 2 exponent bits, 1 mantissa bit (OCP Microscaling)
_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 as gpt-oss's checkpoints store it, decoded exactly (float32): ``blocks`` uint8
    [..., G, 16] hold 32 FP4 codes per block of the last dimension, two per byte (the low nibble
    first); ``scales`` uint8 [..., G] each block's power-of-two exponent, biased by 127. Returns
    [..., G * 32]: with [experts, out, G, 16] blocks, each expert's weight as nn.Linear holds it.
    Every value is an FP4 number times a power of two, so BF16 holds it exactly too."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ModelLoadError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                             f"{scales.dtype}: expected uint8 [..., G, 16] and uint8 [..., G]")
    lut = torch.tensor(_FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = lut[codes].reshape(*blocks.shape[:-1], 32)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1)


def _gpt_oss_experts(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """gpt-oss's tensors under the engine's names: ``mlp.router`` routes (as ``mlp.gate``); each
    layer's experts are 3-D, either as published (MXFP4 ``*_blocks`` and ``*_scales`` [experts,
    out, ...], decoded here) or as transformers holds them unquantized ([experts, in, out]), with
    gate and up interleaved along gate_up's outputs (gate the even ones) and biases beside them."""
    out = {}
    for key, tensor in state.items():
        key = key.replace(".mlp.router.", ".mlp.gate.")
        prefix, name = key.rsplit(".", 1)
        if not prefix.endswith(".mlp.experts") or name.endswith("_scales"):
            out[key] = tensor
            continue
        if name.endswith("_blocks"):
            name = name.removesuffix("_blocks")
            per_expert = mxfp4_dequantize(tensor, state[f"{prefix}.{name}_scales"]).to(dtype)
        elif name.endswith("_bias"):
            per_expert = tensor
        else:
            per_expert = tensor.transpose(1, 2)  # [experts, in, out] -> [experts, out, in]
        kind = "bias" if name.endswith("_bias") else "weight"
        proj = name.removesuffix("_bias")
        for e, t in enumerate(per_expert.unbind(0)):
            if proj == "gate_up_proj":
                out[f"{prefix}.{e}.gate_proj.{kind}"] = t[0::2].contiguous()
                out[f"{prefix}.{e}.up_proj.{kind}"] = t[1::2].contiguous()
            else:
                out[f"{prefix}.{e}.{proj}.{kind}"] = t.contiguous()
    return out


_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Experts under the engine's names (Qwen3-MoE's: ``mlp.gate`` routes, ``mlp.experts.E.*_proj``):
    Mixtral's checkpoints name them ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.E.w1``
    (gate), ``w3`` (up), ``w2`` (down); transformers 5 holds every expert of a layer in one 3-D
    ``mlp.experts.gate_up_proj`` (gate first) and ``mlp.experts.down_proj``."""
    out = {}
    for key, tensor in state.items():
        if ".block_sparse_moe." in key:
            key = key.replace(".block_sparse_moe.", ".mlp.")
            parts = key.split(".")
            if len(parts) > 2 and parts[-2] in _MIXTRAL_NAMES and parts[-4] == "experts":
                parts[-2] = _MIXTRAL_NAMES[parts[-2]]
                key = ".".join(parts)
        if key.endswith(".mlp.experts.gate_up_proj") or key.endswith(".mlp.experts.down_proj"):
            prefix, name = key.rsplit(".", 1)
            for e, weight in enumerate(tensor.unbind(0)):
                if name == "gate_up_proj":
                    gate, up = weight.chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = weight
            continue
        out[key] = tensor
    return out


def _split_fused(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phi-3 stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (gate first);
    the engine's modules are Llama's, so the fused tensors are split into their views."""
    for key in [k for k in state if k.endswith((".qkv_proj.weight", ".gate_up_proj.weight"))]:
        prefix, fused = key.rsplit(".", 2)[0], state.pop(key)
        if key.endswith(".qkv_proj.weight"):
            names, sizes = ("q_proj", "k_proj", "v_proj"), (cfg.q_size, cfg.kv_size, cfg.kv_size)
        else:
            names, sizes = ("gate_proj", "up_proj"), (cfg.intermediate_size, cfg.intermediate_size)
        if fused.shape[0] != sum(sizes):
            raise ModelLoadError(f"tensor {key} has {fused.shape[0]} rows, config.json implies {sum(sizes)}")
        state.update({f"{prefix}.{n}.weight": part for n, part in zip(names, fused.split(sizes))})
    return state


def gguf_to_folder(gguf: Path, sha256: str | None = None) -> tuple[Path, dict[str, str]]:
    """Dequantize a GGUF file once into a cached HF folder; return the folder and source hash."""
    sha256 = sha256 or file_sha256(gguf)
    folder = cache_dir() / "models" / f"gguf-{sha256[:16]}"
    hashes = {gguf.name: sha256}
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder, hashes
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        except Exception as e:  # transformers raises many types for a bad GGUF
            raise ModelLoadError(f"cannot read GGUF file {gguf}: {type(e).__name__}: {e}") from None
        # transformers refuses to save a model it loaded from GGUF, so write the folder directly.
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        (tmp / "evalsuite_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha256}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, hashes


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                             "offline, pass a local folder or .gguf file instead") from None
