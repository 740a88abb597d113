"""Model configuration: one validated dataclass, named presets, and the mapping from HF config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "granite",
                           "smollm3", "olmo2", "olmo3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
# Gemma 2's and 3's layer: RMSNorm scaling by 1 + weight (in float32, then rounded), GeGLU (tanh
# GELU), embeddings times sqrt(hidden_size), and norms after attention and after the MLP as well as
# before them; Gemma 2 caps attention scores and logits (tanh), Gemma 3 normalises q and k per head
GEMMA_ARCHITECTURES = ("gemma2", "gemma3_text")
# OLMo 2's and 3's layer: no norm before attention or the MLP, an RMSNorm on each one's output
# before the residual add (its weight applied in float32); q and k each normalised over all their
# heads at once, before RoPE. OLMo 3 slides over 3 layers in 4, those with RoPE unscaled.
OLMO_ARCHITECTURES = ("olmo2", "olmo3")
# A mixture of experts' routers (layer-relative names): the few-output projections that weigh the
# experts. No recipe quantizes them, as Model Optimizer's, AutoAWQ's and the deployed engines' leave them.
MOE_ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")
# Model Optimizer's checkpoint forms (its quant_algo) that load as published, and the recipe of each
MODELOPT_RECIPES = {"FP8": "fp8-modelopt", "NVFP4": "nvfp4", "W4A16_AWQ": "int4-awq"}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (HF rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LinearRope:
    """Positions divided by ``factor`` (HF rope_type "linear"; Gemma 3's full-attention layers)."""

    factor: float


@dataclass(frozen=True)
class LongRope:
    """Phi-3's LongRoPE (HF rope_type "longrope", formerly "su"): per-frequency factors, and cos/sin
    scaled by ``attention_factor``. A forward whose sequence reaches past
    ``original_max_position_embeddings`` rotates every position it computes with the long factors,
    one within it with the short ones (transformers decides per forward call, by its largest
    position; ``CausalLM.rope`` per sequence). A long prompt is rotated long throughout; a
    generation that grows past the original context is computed again with the long factors at
    that step (``DecodeBatch._rotate_long``), as transformers' ``generate`` drops its cache there."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class YarnRope:
    """YaRN (HF rope_type "yarn": Qwen2.5/3's long-context setting, gpt-oss): each frequency
    between its original (extrapolated) and its value divided by ``factor`` (interpolated), by a
    linear ramp over the dimensions whose wavelength fits between ``beta_fast`` and ``beta_slow``
    rotations in ``original_max_position_embeddings`` positions (the range rounded outwards with
    ``truncate``); cos and sin times ``attention_factor``. The same at every length."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    attention_factor: float
    truncate: bool


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | LinearRope | LongRope | YarnRope | None = None
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor dimensions of each head
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # configs with attention_bias: o_proj's too (gpt-oss)
    mlp_bias: bool = False  # Llama's and Granite's mlp_bias: gate, up and down with biases
    # Granite: embeddings times embedding_multiplier, each sublayer's output times
    # residual_multiplier before the residual add, logits divided by logits_scaling (None: 1)
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k, before RoPE (OLMo: over all heads)
    # Mistral, Phi-3, Qwen2/3 with use_sliding_window: a query attends to the last sliding_window
    # positions (itself included), on the layers sliding_layers marks (None: every layer)
    sliding_window: int | None = None
    # SmolLM3: the layers rope_layers marks False attend without positions (NoPE); None: all rotate
    rope_layers: tuple[bool, ...] | None = None
    sliding_layers: tuple[bool, ...] | None = None
    # Gemma 3, OLMo 3: the sliding layers' RoPE base (unscaled; rope_theta and rope_scaling are the
    # full layers'); Gemma 2 and 3: queries scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5)
    local_rope_theta: float | None = None
    attention_scale: float | None = None
    # Gemma 2: attention scores and final logits become cap * tanh(x / cap)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): on the layers moe_layers marks (None:
    # every layer), a router picks experts_per_token of num_experts SwiGLU experts of
    # moe_intermediate_size per token, weighted by their softmax probabilities (renormalised over
    # the chosen with norm_topk_prob); Qwen2-MoE adds a shared expert of
    # shared_expert_intermediate_size that every token goes through, weighted by a sigmoid gate
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] | None = None
    shared_expert_intermediate_size: int = 0
    # gpt-oss: a learned logit per query head that joins each softmax over the keys and takes its
    # share of the probability without a value ("attention sinks"); its experts' SwiGLU clamped at
    # swiglu_limit, gate * sigmoid(swiglu_alpha * gate) * (up + 1) (see gpt_oss below)
    attention_sinks: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    # a fine-grained FP8 checkpoint as DeepSeek-V3 and Qwen3 publish them (quant_method fp8,
    # weight_block_size [n, n], dynamic activations): the tile n its linears' E4M3 weights are
    # scaled in; they load as published (recipe fp8-block), a linear without scales stays as stored
    fp8_block: int | None = None
    # an AutoAWQ checkpoint in its GEMM form (quant_method awq, version gemm, 4 bits, zero point):
    # the group size of its INT4 weights, which load as published (recipe int4-awq-asym); a linear
    # without qweight stays as stored
    awq_group: int | None = None
    # a checkpoint in Meta's FP8 form (quant_method fbgemm_fp8, Llama 3.1's *-FP8: E4M3 weights with a
    # float32 scale per output row, inputs quantized per token at run time with scales bounded by
    # activation_scale_ub), which loads as published (recipe fp8-official): that bound
    fbgemm_fp8_ub: float | None = None
    # a checkpoint in llm-compressor's FP8_DYNAMIC form (quant_method compressed-tensors, format
    # float-quantized; Red Hat's *-FP8-dynamic: E4M3 weights with a scale per output channel, inputs
    # quantized per token at run time, unbounded), which loads as published (recipe fp8-dynamic)
    compressed_fp8: bool = False
    # a checkpoint in llm-compressor's W4A16 form (quant_method compressed-tensors, format
    # pack-quantized; Red Hat's *-quantized.w4a16: symmetric INT4 weights in groups, inputs
    # unquantized), which loads as published (recipe int4-gptq): its group size
    compressed_int4: int | None = None
    # a checkpoint in llm-compressor's W8A8 INT8 form (quant_method compressed-tensors, format
    # int-quantized; Red Hat's *-quantized.w8a8: symmetric INT8 weights per output channel, inputs
    # quantized per token at run time), which loads as published (recipe int8-w8a8)
    compressed_int8: bool = False
    # a Model Optimizer checkpoint (quant_method modelopt, in config.json or hf_quant_config.json),
    # which loads as published: its quant_algo (MODELOPT_RECIPES: FP8 -> fp8-modelopt, NVFP4 ->
    # nvfp4, W4A16_AWQ -> int4-awq), W4A16_AWQ's group size, and whether its KV cache is FP8 (K and
    # V scales beside k_proj and v_proj)
    modelopt: str | None = None
    modelopt_group: int | None = None
    modelopt_fp8_kv: bool = False
    architecture: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} with head_dim {self.head_dim}: "
                             "valid: a factor in (0, 1] that leaves an even number of rotated dimensions")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} of {self.num_experts} experts; valid: 1 to "
                             f"{self.num_experts}")
        if self.moe_layers is not None and len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers marks {len(self.moe_layers)} layers; the model has {self.num_layers}")
        if self.rope_layers is not None and len(self.rope_layers) != self.num_layers:
            raise ValueError(f"rope_layers marks {len(self.rope_layers)} layers; the model has {self.num_layers}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers marks {len(self.sliding_layers)} layers; the model has {self.num_layers}")
        if isinstance(self.rope_scaling, LongRope):
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, name)) != self.rotary_dim // 2:
                    raise ValueError(f"longrope {name} holds {len(getattr(self.rope_scaling, name))} factors; "
                                     f"the rotated dimensions need {self.rotary_dim // 2}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unknown architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates (transformers' int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer``, or None where it attends to every position."""
        if not self.sliding_window or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` rotates q and k (False: SmolLM3's NoPE layers)."""
        return self.rope_layers is None or self.rope_layers[layer]

    @property
    def published_recipe(self) -> str | None:
        """The recipe a published low-bit checkpoint of this config runs as (it loads as published
        and calibrates nothing), or None for unquantized weights."""
        if self.fp8_block is not None:
            return "fp8-block"
        if self.awq_group is not None:
            return "int4-awq-asym"
        if self.fbgemm_fp8_ub is not None:
            return "fp8-official"
        if self.compressed_fp8:
            return "fp8-dynamic"
        if self.compressed_int4 is not None:
            return "int4-gptq"
        if self.compressed_int8:
            return "int8-w8a8"
        return MODELOPT_RECIPES.get(self.modelopt)

    def layer_moe(self, layer: int) -> bool:
        """Whether decoder layer ``layer``'s MLP is a mixture of experts."""
        return self.num_experts > 0 and (self.moe_layers is None or self.moe_layers[layer])

    @property
    def gpt_oss(self) -> bool:
        """gpt-oss's layer: attention sinks, biases on every projection (router and experts too),
        the router's softmax over the top-k logits only, experts' clamped SwiGLU, and RMSNorm's
        weight applied in float32."""
        return self.architecture == "gpt_oss"

    @property
    def olmo(self) -> bool:
        """OLMo's layer (``OLMO_ARCHITECTURES``): norms after attention and the MLP only, q and k
        normalised over all heads."""
        return self.architecture in OLMO_ARCHITECTURES

    @property
    def gemma(self) -> bool:
        """Gemma's layer (``GEMMA_ARCHITECTURES``) rather than Llama's."""
        return self.architecture in GEMMA_ARCHITECTURES

    def local_rope(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` rotates with the sliding layers' own RoPE (Gemma 3, OLMo 3)."""
        return self.local_rope_theta is not None and self.layer_window(layer) is not None

    def long_rope(self, length: int) -> bool:
        """Whether a forward over a sequence of ``length`` positions rotates it with LongRoPE's
        long factors (False for every other RoPE)."""
        return isinstance(self.rope_scaling, LongRope) and length > self.rope_scaling.original_max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_projections(self, layer: int = 0) -> tuple[tuple[str, int, int], ...]:
        """(name, out_features, in_features) of decoder layer ``layer``'s projections, in the names
        of the model's modules (a mixture of experts: its routers ``MOE_ROUTERS`` and each expert's).
        The one place the architecture's shapes are spelled out: parameter counts and the
        planner's byte counts derive from it."""
        h, i = self.hidden_size, self.intermediate_size
        attention = (("self_attn.q_proj", self.q_size, h), ("self_attn.k_proj", self.kv_size, h),
                     ("self_attn.v_proj", self.kv_size, h), ("self_attn.o_proj", h, self.q_size))
        if not self.layer_moe(layer):
            return attention + (("mlp.gate_proj", i, h), ("mlp.up_proj", i, h), ("mlp.down_proj", h, i))
        m = self.moe_intermediate_size
        experts = tuple((f"mlp.experts.{e}.{name}", out, inp) for e in range(self.num_experts)
                        for name, out, inp in (("gate_proj", m, h), ("up_proj", m, h), ("down_proj", h, m)))
        shared, n = (), self.shared_expert_intermediate_size
        if n:
            shared = (("mlp.shared_expert_gate", 1, h), ("mlp.shared_expert.gate_proj", n, h),
                      ("mlp.shared_expert.up_proj", n, h), ("mlp.shared_expert.down_proj", h, n))
        return attention + (("mlp.gate", self.num_experts, h),) + experts + shared

    def layer_biases(self, layer: int = 0) -> int:
        """How many bias values (and gpt-oss's sinks) decoder layer ``layer`` holds."""
        n = (self.q_size + 2 * self.kv_size if self.qkv_bias else 0) + (self.hidden_size if self.o_bias else 0)
        n += self.num_heads if self.attention_sinks else 0
        if self.gpt_oss and self.layer_moe(layer):  # the router's and every expert's projections
            n += sum(out for name, out, _ in self.layer_projections(layer) if name.startswith("mlp."))
        elif self.mlp_bias and not self.layer_moe(layer):
            n += 2 * self.intermediate_size + self.hidden_size
        return n

    def num_parameters(self, include_embeddings: bool = True) -> int:
        qk_norms = (self.q_size + self.kv_size if self.olmo else 2 * self.head_dim) if self.qk_norm else 0
        norms = (4 if self.gemma else 2) * self.hidden_size
        body = sum(sum(out * inp for _, out, inp in self.layer_projections(layer)) + self.layer_biases(layer)
                   + qk_norms + norms for layer in range(self.num_layers)) + self.hidden_size
        if not include_embeddings:
            return body
        emb = self.vocab_size * self.hidden_size
        return body + emb * (1 if self.tie_word_embeddings else 2)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # added after runs were recorded: absent at its neutral value, so that the identities of
        # those runs (the model's config is part of them) and their resumption stay as they were
        for key, neutral in (("partial_rotary_factor", 1.0), ("sliding_layers", None), ("local_rope_theta", None),
                             ("attention_scale", None), ("attn_logit_softcapping", None),
                             ("final_logit_softcapping", None), ("num_experts", 0), ("experts_per_token", 0),
                             ("moe_intermediate_size", 0), ("norm_topk_prob", True), ("moe_layers", None),
                             ("shared_expert_intermediate_size", 0), ("o_bias", False), ("attention_sinks", False),
                             ("swiglu_limit", None), ("swiglu_alpha", None), ("mlp_bias", False),
                             ("embedding_multiplier", None), ("residual_multiplier", None), ("logits_scaling", None),
                             ("rope_layers", None), ("fp8_block", None), ("awq_group", None),
                             ("fbgemm_fp8_ub", None), ("compressed_fp8", False), ("compressed_int4", None),
                             ("compressed_int8", False),
                             ("modelopt", None),
                             ("modelopt_group", None), ("modelopt_fp8_kv", False)):
            if d[key] == neutral:
                del d[key]
        return d

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a HF ``config.json`` dictionary (transformers 4.x or 5.x layout)."""
        text = _text_model(hf)
        if text is not None:
            return cls.from_hf(text)
        model_type = hf.get("model_type")
        _check_architecture(hf)
        published = _published_quantization(hf)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise UnsupportedModelError(f"config.json lacks {', '.join(missing)}, which a {model_type} model needs")
        gemma = model_type in GEMMA_ARCHITECTURES
        _check_activation(hf, gemma)
        if gemma and hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError("config.json: use_bidirectional_attention true; the engine's "
                                        "attention is causal (valid: false)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        max_len = hf.get("max_position_embeddings", 2048)
        rope = _rope(hf, max_len)
        window, layers = _sliding_window(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=max_len,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            **rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),  # transformers' defaults
            qkv_bias=model_type == "qwen2" or bool(hf.get("qkv_bias", True) if model_type == "qwen2_moe"
                                                   else hf.get("attention_bias", model_type == "gpt_oss")),
            o_bias=model_type not in ("qwen2", "qwen2_moe") and bool(hf.get("attention_bias", model_type == "gpt_oss")),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", *OLMO_ARCHITECTURES),
            sliding_window=window,
            sliding_layers=layers,
            attention_scale=(float(hf["query_pre_attn_scalar"]) ** -0.5
                             if gemma and hf.get("query_pre_attn_scalar", head_dim) != head_dim else
                             float(hf.get("attention_multiplier", 1.0)) if model_type == "granite" else None),
            mlp_bias=model_type in ("llama", "granite", "smollm3") and bool(hf.get("mlp_bias", False)),
            rope_layers=_rope_layers(hf) if model_type == "smollm3" else None,
            **({key: _float_or_none(hf.get(key)) for key in ("embedding_multiplier", "residual_multiplier",
                                                            "logits_scaling")} if model_type == "granite" else {}),
            attn_logit_softcapping=_float_or_none(hf.get("attn_logit_softcapping")) if gemma else None,
            final_logit_softcapping=_float_or_none(hf.get("final_logit_softcapping")) if gemma else None,
            **_experts(hf),
            **published,
            architecture=model_type,
        )

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown model config {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # Every unit test's fixture: a few layers, GQA, Llama 3 RoPE scaling, tied embeddings.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
                        rope_scaling=RopeScaling(4.0, 1.0, 4.0, 64), tie_word_embeddings=True),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                                rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                                rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                 num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                                 rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-405b": ModelConfig(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_layers=126,
                                  num_heads=128, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                                  rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
}


def _text_model(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The config of the text model to build instead of ``hf`` itself, as transformers resolves it:
    Gemma 3's and Mistral 3's vision-language configs hold one, and Gemma 2's published configs
    predate the per-layer fields; None for every other config."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
        # Gemma 3 with vision (4B and up): its text model, whose published config names only
        # what differs from transformers' defaults (filled in here as transformers does)
        from transformers import Gemma3TextConfig

        return {**Gemma3TextConfig(**hf["text_config"]).to_dict(), "model_type": "gemma3_text"}
    if model_type == "mistral3" and isinstance(hf.get("text_config"), dict):
        # Mistral Small 3.1 and later (vision-language): its text model (a Mistral), resolved as
        # transformers resolves it, tied or not as the whole model's config says
        from transformers import Mistral3Config

        full = Mistral3Config(**{k: v for k, v in hf.items() if k != "model_type"})
        text = full.text_config.to_dict()
        if text.get("model_type") not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"config.json: mistral3's text model {text.get('model_type')!r}; "
                                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return {**text, "tie_word_embeddings": full.tie_word_embeddings}
    if model_type == "gemma2" and "layer_types" not in hf:
        # published before transformers named each layer's kind: its defaults fill them in
        # (every other layer slides, scores and logits capped at 50 and 30)
        from transformers import Gemma2Config

        return {**Gemma2Config(**hf).to_dict(), "model_type": "gemma2"}
    return None


def _check_architecture(hf: dict[str, Any]) -> None:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = hf.get("architectures")
        raise UnsupportedModelError(
            f"unknown architecture: model_type={model_type!r} (architectures={archs}); "
            f"supported model types: {', '.join(SUPPORTED_ARCHITECTURES)} (and the text models of gemma3 and "
            "mistral3); "
            "a model the engine does not run can be evaluated where a server runs it (--base-url)")


def _published_quantization(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of a published quantized checkpoint's ``quantization_config`` (all
    unset for an unquantized one); a quantization the engine cannot read is an error."""
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method")
    fp8_block = _fp8_block(quant) if method == "fp8" else None
    awq_group = _awq_gemm(quant) if method == "awq" else None
    fbgemm_fp8_ub = _fbgemm_fp8(quant) if method == "fbgemm_fp8" else None
    compressed_form, compressed_int4 = _compressed_tensors(quant) if method == "compressed-tensors" else \
        (None, None)
    compressed_fp8, compressed_int8 = compressed_form == "float-quantized", compressed_form == "int-quantized"
    modelopt, modelopt_group, modelopt_fp8_kv = _modelopt(quant) if method == "modelopt" else (None, None, False)
    published = fp8_block is not None or awq_group is not None or fbgemm_fp8_ub is not None or \
        compressed_fp8 or compressed_int4 is not None or compressed_int8 or modelopt is not None
    if quant and not published and not (hf.get("model_type") == "gpt_oss" and method == "mxfp4"):
        # its low-bit tensors and their scales would be read as plain weights
        raise UnsupportedModelError(
            f"config.json: a checkpoint quantized with quant_method {method!r}; the engine reads unquantized "
            "weights, gpt-oss's MXFP4 experts, fine-grained FP8, AutoAWQ's GEMM form, Meta's FP8 "
            "(fbgemm_fp8), llm-compressor's FP8_DYNAMIC and W4A16 (compressed-tensors) and Model Optimizer's "
            "FP8, NVFP4 and INT4 AWQ, and quantizes with --recipe: load the unquantized "
            "model, or evaluate this checkpoint where a server runs it (--base-url)")
    return dict(fp8_block=fp8_block, awq_group=awq_group, fbgemm_fp8_ub=fbgemm_fp8_ub, compressed_fp8=compressed_fp8,
                compressed_int4=compressed_int4, compressed_int8=compressed_int8, modelopt=modelopt,
                modelopt_group=modelopt_group, modelopt_fp8_kv=modelopt_fp8_kv)


def _check_activation(hf: dict[str, Any], gemma: bool) -> None:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    valid_act = ("gelu_pytorch_tanh", "gelu_tanh") if gemma else ("silu", "swish")
    if act not in valid_act:
        mlp = "GeGLU" if gemma else "SwiGLU"
        raise UnsupportedModelError(f"config.json: hidden activation {act!r}; the engine's {hf.get('model_type')} "
                                    f"MLP is {mlp} (valid: {valid_act[0]!r})")


def _rope(hf: dict[str, Any], max_len: int) -> dict[str, Any]:
    """The ModelConfig fields of RoPE: its base, the rotated fraction of each head, the scaling
    (llama3, linear, LongRoPE, YaRN) and, for Gemma 3 and OLMo 3, the sliding layers' own base."""
    model_type = hf.get("model_type")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    local_theta = None
    if model_type in ("gemma3_text", "olmo3"):
        # per layer type (transformers 5), or the full layers' base and scaling with the
        # sliding layers' base beside them (4.x; OLMo 3's one base for both, scaled on the full
        # layers only)
        default_theta = 1000000.0 if model_type == "gemma3_text" else 500000.0
        local_default = hf.get("rope_local_base_freq", 10000.0) if model_type == "gemma3_text" else \
            hf.get("rope_theta", default_theta)
        local = rope.get("sliding_attention") or {"rope_theta": local_default}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"config.json: sliding layers' RoPE type {local['rope_type']!r}; "
                                        "supported: 'default'")
        local_theta = float(local["rope_theta"])
        rope = dict(rope.get("full_attention") or {"rope_theta": hf.get("rope_theta", default_theta)})
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    src = {**legacy, **rope}
    scaling: RopeScaling | LinearRope | LongRope | YarnRope | None = None
    if rope_type in ("longrope", "su"):
        original = int(src.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                       or max_len)
        # transformers' defaults: the factor from the two lengths, then sqrt(1 + ln f / ln original)
        factor = src.get("factor") or max_len / original
        attention = src.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = LongRope(tuple(map(float, src["short_factor"])), tuple(map(float, src["long_factor"])),
                           float(attention), original)
    elif rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(src["factor"]),
            low_freq_factor=float(src["low_freq_factor"]),
            high_freq_factor=float(src["high_freq_factor"]),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
        )
    elif rope_type == "linear":
        scaling = LinearRope(float(src["factor"]))
    elif rope_type == "yarn":
        scaling = _yarn(src, hf, max_len)
    elif rope_type != "default":
        raise UnsupportedModelError(
            f"unsupported RoPE type {rope_type!r}; supported: 'default', 'linear', 'llama3', 'longrope', 'yarn'")
    return dict(rope_theta=float(theta), rope_scaling=scaling, partial_rotary_factor=partial,
                local_rope_theta=local_theta)


def _sliding_window(hf: dict[str, Any]) -> tuple[int | None, tuple[bool, ...] | None]:
    """The sliding window and which layers it applies to (None: every layer, or no window)."""
    model_type = hf.get("model_type")
    # Qwen2/3 configs carry a window they switch off (use_sliding_window false) or apply from
    # layer max_window_layers on; Mistral's, Mixtral's, Phi-3's and Gemma's apply whenever set
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type in (
        "mistral", "mixtral", "phi3", "gpt_oss", "olmo3", *GEMMA_ARCHITECTURES)) else None
    n = hf["num_hidden_layers"]
    layers = None
    if window and hf.get("layer_types"):
        layers = tuple(t == "sliding_attention" for t in hf["layer_types"])
    elif window and model_type in ("gemma3_text", "olmo3"):  # every pattern-th layer sees all (Gemma 3 4.x)
        pattern = hf.get("sliding_window_pattern", 6) if model_type == "gemma3_text" else 4
        layers = tuple((i + 1) % pattern != 0 for i in range(n))
    elif window and model_type in ("qwen2", "qwen3", "qwen3_moe"):
        first = hf.get("max_window_layers", n)
        layers = tuple(i >= first for i in range(n))
    elif window and model_type == "smollm3":  # transformers' rule: the NoPE layers slide
        rotating = _rope_layers(hf)
        layers = tuple(rotating is not None and not r for r in (rotating or [True] * n))
    elif window and model_type == "qwen2_moe":  # transformers' rule: every other layer below max_window_layers
        last = hf.get("max_window_layers", 28)
        layers = tuple((i + 1) % 2 == 1 and i < last for i in range(n))
    return window, layers


def _experts(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of a mixture of experts (none for a dense model)."""
    model_type = hf.get("model_type")
    if model_type == "gpt_oss":
        return dict(num_experts=hf.get("num_local_experts", 128), moe_intermediate_size=hf["intermediate_size"],
                    experts_per_token=hf.get("num_experts_per_tok") or hf.get("experts_per_token", 4),
                    attention_sinks=True, swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                    swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))
    if model_type == "mixtral":
        return dict(num_experts=hf.get("num_local_experts", 8), experts_per_token=hf.get("num_experts_per_tok", 2),
                    moe_intermediate_size=hf["intermediate_size"])
    if model_type in ("qwen2_moe", "qwen3_moe") and (hf.get("num_experts") or hf.get("num_local_experts")):
        # published configs say num_experts; transformers 5 writes num_local_experts
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
        marks = tuple(i not in dense and (i + 1) % step == 0 for i in range(hf["num_hidden_layers"]))
        moe = dict(num_experts=hf.get("num_experts") or hf["num_local_experts"],
                   experts_per_token=hf.get("num_experts_per_tok", 4 if model_type == "qwen2_moe" else 8),
                   moe_intermediate_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob")),
                   moe_layers=None if all(marks) else marks)
        if model_type == "qwen2_moe":
            moe["shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size", 5632)
        return moe
    return {}


def _rope_layers(hf: dict[str, Any]) -> tuple[bool, ...] | None:
    """SmolLM3's no_rope_layers (1: the layer rotates), or transformers' default: every
    no_rope_layer_interval-th layer (4th) without RoPE; None where every layer rotates."""
    marks = hf.get("no_rope_layers")
    if marks is None:
        interval = hf.get("no_rope_layer_interval", 4)
        marks = [int((i + 1) % interval != 0) for i in range(hf["num_hidden_layers"])]
    layers = tuple(bool(m) for m in marks)
    return None if all(layers) else layers


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _yarn(src: dict[str, Any], hf: dict[str, Any], max_len: int) -> YarnRope:
    """YaRN's parameters with transformers' defaults: the factor from the two lengths, the
    attention factor 0.1 ln(factor) + 1 (or DeepSeek's ratio of two such with mscale and
    mscale_all_dim), betas 32 and 1, the correction range truncated."""
    original = int(src.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                   or max_len)
    factor = float(src.get("factor") or max_len / original)

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = src.get("attention_factor")
    if attention is None:
        m, m_all = src.get("mscale"), src.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return YarnRope(factor, original, float(src.get("beta_fast") or 32), float(src.get("beta_slow") or 1),
                    float(attention), bool(src.get("truncate", True)))


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin (LongRoPE's or YaRN's; 1 otherwise)."""
    return cfg.rope_scaling.attention_factor if isinstance(cfg.rope_scaling, (LongRope, YarnRope)) else 1.0


def _fp8_block(quant: dict[str, Any]) -> int:
    """The tile of a fine-grained FP8 checkpoint (``quant_method: fp8``), which loads as published:
    E4M3 weights in square tiles with float32 scales, inputs quantized per token group at run time.
    Another FP8 form is refused, naming what differs."""
    block = quant.get("weight_block_size")
    valid = {"activation_scheme": ("dynamic",), "fmt": ("e4m3",), "scale_fmt": (None, "float32")}
    differs = {k: quant.get(k, v[0]) for k, v in valid.items() if quant.get(k, v[0]) not in v}
    square = isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int) \
        and block[0] > 0
    if not square or differs:
        raise UnsupportedModelError(
            f"config.json: an FP8 checkpoint with weight_block_size {block!r}"
            + "".join(f", {k} {v!r}" for k, v in differs.items())
            + "; the engine loads fine-grained FP8 as DeepSeek-V3 and Qwen3 publish it (weight_block_size [n, n], "
            "activation_scheme dynamic, fmt e4m3, float32 scales): load the unquantized model and name the recipe, "
            "or evaluate this checkpoint where a server runs it (--base-url)")
    return block[0]


def _awq_gemm(quant: dict[str, Any]) -> int:
    """The group size of an AutoAWQ checkpoint in its GEMM form (``quant_method: awq``), which
    loads as published: zero-point INT4 codes packed eight to an int32, FP16 scales per group.
    Another AWQ form (GEMV, Marlin, other bit widths, no zero point) is refused, naming what differs."""
    group = quant.get("group_size", quant.get("q_group_size"))
    valid = {"bits": (4,), "zero_point": (True,), "version": ("gemm",)}
    found = {"bits": quant.get("bits", quant.get("w_bit")), "zero_point": quant.get("zero_point"),
             "version": str(quant.get("version", "gemm")).lower()}
    differs = {k: v for k, v in found.items() if v not in valid[k]}
    if differs or not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise UnsupportedModelError(
            f"config.json: an AWQ checkpoint with group_size {group!r}"
            + "".join(f", {k} {v!r}" for k, v in differs.items())
            + "; the engine loads AutoAWQ's GEMM form (bits 4, zero_point true, version gemm, a group_size "
            ">= 1): load the unquantized model and name the recipe, or evaluate this checkpoint where a server "
            "runs it (--base-url)")
    return group


def _fbgemm_fp8(quant: dict[str, Any]) -> float:
    """The input scales' bound of a checkpoint in Meta's FP8 form (``quant_method: fbgemm_fp8``;
    transformers' FbgemmFp8Config, whose default is 1200), which loads as published."""
    ub = quant.get("activation_scale_ub", 1200.0)
    if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not ub > 0:
        raise UnsupportedModelError(f"config.json: an fbgemm_fp8 checkpoint with activation_scale_ub {ub!r}; valid: "
                                    "a number > 0 (Meta's checkpoints hold 1200.0)")
    return float(ub)


# llm-compressor's FP8_DYNAMIC and W4A16 schemes as compressed-tensors writes them: the settings
# that differ from these are named when a checkpoint is refused
COMPRESSED_FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                          "group_size": None}
COMPRESSED_FP8_INPUTS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                         "group_size": None}
COMPRESSED_INT4_WEIGHTS = {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True, "dynamic": False}
COMPRESSED_INT8_WEIGHTS = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False,
                           "group_size": None}
COMPRESSED_INT8_INPUTS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True,
                          "group_size": None}
COMPRESSED_FORMS = {"float-quantized": (COMPRESSED_FP8_WEIGHTS, COMPRESSED_FP8_INPUTS),
                    "pack-quantized": (COMPRESSED_INT4_WEIGHTS, None),
                    "int-quantized": (COMPRESSED_INT8_WEIGHTS, COMPRESSED_INT8_INPUTS)}


def _compressed_tensors(quant: dict[str, Any]) -> tuple[str, int | None]:
    """A compressed-tensors checkpoint (``quant_method: compressed-tensors``) loads as published in
    llm-compressor's FP8_DYNAMIC form (format float-quantized: weights E4M3 per output channel,
    inputs E4M3 per token, dynamic), its W4A16 form (format pack-quantized: weights symmetric INT4
    in groups, inputs unquantized, no g_idx) or its W8A8 INT8 form (format int-quantized: weights
    symmetric INT8 per output channel, inputs INT8 per token, dynamic), with one config group
    targeting Linear and no KV cache scheme. Returns (the format, W4A16's group size). Another
    scheme (asymmetric or activation-ordered INT4, static or per-tensor FP8 or INT8, an FP8 KV
    cache, several groups) is refused, naming what differs."""
    groups = quant.get("config_groups") or {}
    form = quant.get("format")
    differs = []
    if form not in COMPRESSED_FORMS:
        differs.append(f"format {form!r}")
    if quant.get("kv_cache_scheme") is not None:
        differs.append(f"kv_cache_scheme {quant.get('kv_cache_scheme')!r}")
    if len(groups) != 1:
        differs.append(f"{len(groups)} config groups")
    group_size = None
    for group in list(groups.values())[:1]:
        group = group if isinstance(group, dict) else {}
        if group.get("targets") != ["Linear"]:
            differs.append(f"targets {group.get('targets')!r}")
        if group.get("format", form) != form:
            differs.append(f"group format {group.get('format')!r}")
        if group.get("output_activations") is not None:
            differs.append("output_activations quantized")
        weights, inputs = COMPRESSED_FORMS.get(form, COMPRESSED_FORMS["float-quantized"])
        for part, want in (("weights", weights), ("input_activations", inputs)):
            args = group.get(part)
            if want is None:
                if args is not None:
                    differs.append(f"{part} quantized")
                continue
            if not isinstance(args, dict):
                differs.append(f"{part} {args!r}")
                continue
            differs += [f"{part} {k} {args.get(k, v)!r}" for k, v in want.items() if args.get(k, v) != v]
            if args.get("block_structure") is not None:
                differs.append(f"{part} block_structure {args['block_structure']!r}")
            if part == "weights" and form == "pack-quantized":
                group_size = args.get("group_size")
                if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
                    differs.append(f"weights group_size {group_size!r}")
                if args.get("actorder") not in (None, "static", "weight"):  # "group": columns permuted by g_idx
                    differs.append(f"weights actorder {args.get('actorder')!r}")
    if differs:
        raise UnsupportedModelError(
            f"config.json: a compressed-tensors checkpoint with {', '.join(differs)}; the engine loads "
            "llm-compressor's FP8_DYNAMIC (format float-quantized: weights 8-bit float per channel, static; "
            "input_activations 8-bit float per token, dynamic) with --recipe fp8-dynamic and its W4A16 (format "
            "pack-quantized: weights 4-bit int, symmetric, per group, static, actorder static, weight or none; "
            "input_activations not quantized) with --recipe int4-gptq and its W8A8 INT8 (format int-quantized: "
            "weights 8-bit int, symmetric, per channel, static; input_activations 8-bit int, symmetric, per token, "
            "dynamic) with --recipe int8-w8a8, each with one config group targeting Linear "
            "and no KV cache scheme: load the unquantized model and name the recipe, or evaluate this checkpoint "
            "where a server runs it (--base-url)")
    return form, group_size


def _modelopt(quant: dict[str, Any]) -> tuple[str, int | None, bool]:
    """A Model Optimizer checkpoint (``quant_method: modelopt``, as config.json's quantization_config
    or its hf_quant_config.json says) loads as published in the forms of its recipes here: FP8 with
    an FP8 KV cache (``fp8-modelopt``), NVFP4 (``nvfp4``) and W4A16_AWQ without zero points
    (``int4-awq``), the last two with an FP8 KV cache or none. Returns (quant_algo, W4A16_AWQ's
    group size, FP8 KV cache); another algorithm or KV cache is refused."""
    algo = quant.get("quant_algo")
    kv = quant.get("kv_cache_quant_algo")
    scheme = quant.get("kv_cache_scheme")
    if isinstance(scheme, dict) and (scheme.get("type"), scheme.get("num_bits")) == ("float", 8):
        kv = "FP8"
    group = quant.get("group_size")  # W4A16_AWQ's: hf_quant_config.json's (config.json's form has none)
    awq_group = isinstance(group, int) and not isinstance(group, bool) and group > 0
    fits = algo in MODELOPT_RECIPES and kv in ("FP8", None) and (algo != "FP8" or kv == "FP8") and \
        (algo != "W4A16_AWQ" or (awq_group and not quant.get("has_zero_point", False)))
    if not fits:
        raise UnsupportedModelError(
            f"config.json: a Model Optimizer checkpoint with quant_algo {algo!r}, KV cache {kv!r}"
            + (f", group_size {group!r}, has_zero_point {quant.get('has_zero_point', False)!r}"
               if algo == "W4A16_AWQ" else "")
            + "; the engine loads Model Optimizer's FP8 with an FP8 KV cache (--recipe fp8-modelopt), NVFP4 "
            "(--recipe nvfp4) and W4A16_AWQ without zero points, with its group_size (hf_quant_config.json holds it; "
            "--recipe int4-awq), the last two with an FP8 KV "
            "cache or none: load the unquantized model and name the recipe, or evaluate this checkpoint where a "
            "server runs it (--base-url)")
    return algo, group if algo == "W4A16_AWQ" else None, kv == "FP8"


def _yarn_inv_freq(cfg: ModelConfig, s: YarnRope) -> "torch.Tensor":
    """transformers' YaRN frequencies, in its float32 order of operations."""
    import torch

    dim, base = cfg.rotary_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:  # the dimension turning ``rotations`` times in the original context
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # the share of each frequency kept as it was
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    return 1.0 / (s.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def rope_inv_freq(cfg: ModelConfig, long: bool = False, local: bool = False) -> "torch.Tensor":
    """Inverse RoPE frequencies in float32 for the rotated dimensions, with linear, Llama 3 or
    LongRoPE scaling when configured (LongRoPE's long factors with ``long``); with ``local``, the
    sliding layers' own (``local_rope_theta``, unscaled).

    The arithmetic follows transformers' float32 order of operations exactly: positions times
    these frequencies reach ~1e4 radians at long contexts, so a float64 computation would drift
    from the reference by more than the parity tolerance. On the CPU whatever torch's default
    device: the tables are made there and moved to the model's device.
    """
    import torch

    dim = cfg.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if local:
        return 1.0 / (cfg.local_rope_theta ** exponents)
    s = cfg.rope_scaling
    if isinstance(s, LinearRope):
        return 1.0 / (cfg.rope_theta ** exponents) / s.factor
    if isinstance(s, LongRope):
        factors = s.long_factor if long else s.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * cfg.rope_theta ** exponents)
    if isinstance(s, YarnRope):
        return _yarn_inv_freq(cfg, s)
    inv = 1.0 / (cfg.rope_theta ** exponents)
    if s is None:
        return inv
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
