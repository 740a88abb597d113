"""A compact decoder for Llama and the families built on its layer (``config.SUPPORTED_ARCHITECTURES``:
Mistral, Qwen, Phi-3, Gemma 2 and 3, Granite, SmolLM3, and the mixtures of experts) in plain PyTorch.

Parameter names match transformers' models, so an HF state dict loads as is (``load`` renames the
few that differ: fused or 3-D expert tensors, Phi-3's fused projections, gpt-oss's router).

Hook points for quantization recipes, none of which needs a change here:
  * every projection is an ``nn.Linear`` submodule (q/k/v/o, gate/up/down, lm_head) and may be
    replaced by any module with the same call signature;
  * ``Attention.k_cache_quant`` / ``v_cache_quant``: applied to K (after RoPE) and V where they are
    written to the KV cache. The attention of the same forward reads these values, so prefill and
    decode see the same K and V a deployed quantized cache holds;
  * ``Attention.q_bmm_quant`` / ``k_bmm_quant`` / ``v_bmm_quant`` / ``softmax_quant``: inputs of the
    two attention products (q·kᵀ and softmax·v). When any is set, attention runs the explicit
    matmul-softmax-matmul path instead of the fused SDPA kernel.

Speed: q/k/v and gate/up run as one fused matmul each while their modules are the original plain
``nn.Linear`` objects whose weights are views into the fused tensor (see ``fuse_projections``). Once
a recipe swaps one of them, the layer falls back to calling the modules one by one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .config import MOE_ROUTERS, LongRope, ModelConfig, rope_attention_factor, rope_inv_freq
from .linear import in_row_blocks, linear, matmul, project


@functools.cache
def _varlen() -> tuple[Callable | None, dict, frozenset]:
    """FlashAttention over packed sequences (torch's CUDA builds) and the keywords this torch needs,
    imported on first use: the module pulls in torch._dynamo, seconds of import time the CPU
    path never needs. torch 2.11 takes fewer KV heads than query heads as is; 2.13 asks for
    enable_gqa. The third item names the keywords this torch's varlen_attn takes."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - older torch
        return None, {}, frozenset()
    params = frozenset(inspect.signature(varlen_attn).parameters)
    return varlen_attn, {"enable_gqa": True} if "enable_gqa" in params else {}, params


def use_varlen(q: Tensor) -> bool:
    """Whether packed prefill attention runs as one varlen FlashAttention call (CUDA, BF16 or
    FP16 only; the CPU and float32 keep the per-sequence loop)."""
    return q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and _varlen()[0] is not None


DECODE_CHUNK_ROWS = 16  # rows per decode attention call (Step.for_decode)
# Explicit attention (Gemma 2, gpt-oss, quantized attention inputs) holds its scores: a prefill
# whose scores would pass this many elements runs in query chunks that stay below it (each
# query's row is computed alone either way): 2^27 float32 scores are 512 MiB, where gpt-oss-20b's
# 64 heads over 8,192 tokens would need 16 GiB at once.
EXPLICIT_SCORES = 1 << 27


@dataclass
class Step:
    """How one forward call relates to positions and the KV cache.

    prefill: tokens [1, T], the sequences of ``seq_lens`` packed end to end (no padding), each
        starting at position 0; sequence i writes cache slot ``slot_start + i``. Matmuls see all
        T rows at once (in blocks of ``row_block`` rows when it is set: ``linear.in_row_blocks``),
        and attention runs per sequence, so a sequence's numbers do not depend on what it is
        batched with (in BF16 one ulp of difference in one attention call grows into
        log-probability changes of 0.1 or more through 30 layers, enough to flip MMLU answers).
    extend (a prefill with ``prefix_slots``): sequence i continues the first ``prefix_lens[i]``
        positions held in cache slot ``prefix_slots[i]``, which it reads and never writes, so several
        sequences can continue one cached context (the four cloze answers of one question); with
        ``extend_writes`` its own K/V go into that slot after the prefix (a generation continuing
        a prefix copied into its slot from the prefix cache, ``engine.prefix``).
    decode: tokens [B, 1] at per-row ``positions`` [B]; cache rows ``slot_start + b``; attention
        reads the first ``kv_len`` cache positions, masked per row by ``positions``, in chunks of
        rows (``chunks``) that each read only as far as their own longest row.
    """

    prefill: bool
    positions: Tensor  # prefill: [T]; decode: [B]
    seq_lens: tuple[int, ...] = ()
    cache: KVCache | None = None
    slot_start: int = 0
    kv_len: int = 0
    prefix_slots: tuple[int, ...] = ()
    prefix_lens: tuple[int, ...] = ()
    extend_writes: bool = False
    # decode: (first row, end row, kv_len, mask), the mask bool [rows, 1, 1, kv_len], True where
    # attention is allowed, or None where every row of the chunk may attend to all kv_len positions
    chunks: tuple[tuple[int, int, int, Tensor | None], ...] = ()
    row_block: int = 0  # rows per projection call (0: all at once); see linear.invariant_row_blocks
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # per-step tensors the layers share

    def packed_index(self) -> tuple[Tensor, int, Tensor, Tensor]:
        """For a prefill: cumulative sequence offsets (int32 [N + 1]), the longest sequence, and
        each token's cache slot and position; made once per step on the positions' device."""
        if "packed" not in self.derived:
            dev = self.positions.device
            lens = torch.tensor(self.seq_lens, device=dev)
            cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
            slots = torch.repeat_interleave(torch.arange(self.slot_start, self.slot_start + len(self.seq_lens),
                                                         device=dev), lens)
            self.derived["packed"] = (cu, max(self.seq_lens), slots, self.positions)
        return self.derived["packed"]

    def cache_rows(self) -> Tensor:
        """For a decode: the cache rows of the batch's rows, made once per step."""
        if "cache_rows" not in self.derived:
            rows = self.positions.shape[0]
            self.derived["cache_rows"] = torch.arange(self.slot_start, self.slot_start + rows,
                                                      device=self.positions.device)
        return self.derived["cache_rows"]

    def additive_mask(self, mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """A decode chunk's boolean ``mask`` (True where attention is allowed) as SDPA's additive
        form in ``dtype``: 0 where allowed, -inf elsewhere, what SDPA makes of a boolean mask on
        every call (convert_boolean_attn_mask), here once per step and mask for all layers. On
        CUDA it is also the form every backend reads alike: cuDNN's own conversion of a boolean
        mask fills a finite -65504 instead."""
        if mask is None:
            return None
        key = ("additive", id(mask), dtype)
        if key not in self.derived:  # the mask stays referenced by the step: its id is not reused
            self.derived[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        return self.derived[key]

    @classmethod
    def for_prefill(cls, seq_lens: list[int] | tuple[int, ...], cache: KVCache | None = None,
                    slot_start: int = 0, device: torch.device | str | None = None, row_block: int = 0) -> "Step":
        """``device``: the model's (default: the cache's, else the CPU)."""
        device = device or (cache.k.device if cache is not None else "cpu")
        positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
        return cls(True, positions, tuple(seq_lens), cache, slot_start, row_block=row_block)

    @classmethod
    def for_extend(cls, seq_lens: list[int] | tuple[int, ...], cache: KVCache, prefix_slots: list[int],
                   prefix_lens: list[int], row_block: int = 0, writes: bool = False) -> "Step":
        positions = torch.cat([torch.arange(p, p + n, device=cache.k.device) for p, n in zip(prefix_lens, seq_lens)])
        return cls(True, positions, tuple(seq_lens), cache, prefix_slots=tuple(prefix_slots),
                   prefix_lens=tuple(prefix_lens), extend_writes=writes, row_block=row_block)

    @property
    def longest(self) -> int:
        """The largest position + 1 of a prefill or extend."""
        if self.prefix_lens:
            return max(p + n for p, n in zip(self.prefix_lens, self.seq_lens))
        return max(self.seq_lens)

    @classmethod
    def for_static_decode(cls, positions: Tensor, cache: KVCache, kv_len: int | None = None) -> "Step":
        """A decode step whose shapes depend on nothing but the batch size and ``kv_len`` (default:
        the whole cache), computed on the device without reading ``positions`` back: attention
        reads the first ``kv_len`` cache positions, masked per row; every position must be below
        ``kv_len``. What a captured CUDA graph replays (``DecodeBatch`` on CUDA)."""
        kv_len = cache.max_len if kv_len is None else kv_len
        mask = (torch.arange(kv_len, device=positions.device) <= positions[:, None])[:, None, None, :]
        chunks = ((0, positions.shape[0], kv_len, mask),)
        return cls(False, positions, (), cache, 0, kv_len, chunks=chunks)

    @classmethod
    def for_decode(cls, positions: Tensor, cache: KVCache, slot_start: int = 0) -> "Step":
        """Attention in chunks of ``DECODE_CHUNK_ROWS`` rows, each reading the cache up to its own
        longest row rather than the batch's: batches admit their prompts longest first
        (``generate``), so neighbouring rows have similar lengths, and MT-Bench's padded attention
        read twice the positions it needed (docs/PERF.md)."""
        pos = positions.tolist()
        chunks = []
        for lo in range(0, len(pos), DECODE_CHUNK_ROWS):
            hi = min(lo + DECODE_CHUNK_ROWS, len(pos))
            kv_len = max(pos[lo:hi]) + 1
            mask = None  # rows at the same position attend to the whole prefix: no mask needed
            if min(pos[lo:hi]) + 1 != kv_len:
                mask = (torch.arange(kv_len, device=positions.device) <= positions[lo:hi, None])[:, None, None, :]
            chunks.append((lo, hi, kv_len, mask))
        kv_len = max(c[2] for c in chunks)
        return cls(False, positions, (), cache, slot_start, kv_len, chunks=tuple(chunks))


class RMSNorm(nn.Module):
    """Llama's RMSNorm (the normalised input rounded to its dtype, then times the weight), with
    ``plus_one`` Gemma's (times 1 + weight in float32, then rounded), with ``float32_weight``
    gpt-oss's (times the weight in float32, then rounded)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, plus_one: bool = False,
                 float32_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype) if plus_one else torch.ones(dim, dtype=dtype),
                                   requires_grad=False)
        self.eps = eps
        self.plus_one, self.float32_weight = plus_one, float32_weight

    def forward(self, x: Tensor) -> Tensor:
        if self.plus_one or self.float32_weight:
            normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
            return (normed * (1.0 + self.weight.float() if self.plus_one else self.weight.float())).to(x.dtype)
        # normalised in float32 and rounded to x's dtype, then times the weight, as transformers and
        # vLLM's kernel compute it (F.rms_norm with the weight would multiply before its one
        # rounding); this form is also the faster of the two on the CPU (bench/micro_kernels.py)
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight

    @torch.no_grad()
    def fold(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace the per-channel factor the output is multiplied by (the weight, or Gemma's
        1 + weight) with ``fn`` of it, computed in float32 (in place): how AWQ's scales are
        folded into the norm before the projections they apply to."""
        factor = fn(self.weight.float() + 1.0 if self.plus_one else self.weight.float())
        self.weight.copy_((factor - 1.0 if self.plus_one else factor).to(self.weight.dtype))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (HF layout): x·cos + (-x2, x1)·sin, with rotate-half's minus sign folded
    into ``sin``, whose first half comes negated (``CausalLM._rope_tables``): (x2, x1)·(-s1, s2)
    is the same product bit for bit (a sign flip is exact), one kernel fewer per call. x [B, L,
    heads, D]; cos/sin broadcast to [B or 1, L, 1, R]: the first R dimensions of each head rotate,
    the rest pass (partial RoPE, R < D)."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Fused:
    """A fused weight (and bias) whose row blocks are the weights of plain ``nn.Linear`` modules."""

    def __init__(self, linears: list[nn.Linear]):
        weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
        offset = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(weight[offset:offset + n], requires_grad=False)
            if has_bias:
                m.bias = nn.Parameter(bias[offset:offset + n], requires_grad=False)
            offset += n
        self.weight, self.bias = weight, bias
        self.views = tuple(m.weight for m in linears)

    def valid_for(self, linears: list[nn.Module]) -> bool:
        """Still plain linears holding the views made here: swapping a module or assigning a new
        weight ends the fusion. Identity checks, which torch.compile guards on without a graph break."""
        return len(linears) == len(self.views) and all(
            type(m) is nn.Linear and m.weight is w for m, w in zip(linears, self.views))

    def __call__(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _fuse(mods: list[nn.Module]):
    """A fused product for projections that read one input: plain linears, or modules whose type
    offers ``fused(mods)`` (quantized ones); None when they cannot be fused. The result answers
    ``valid_for(mods)`` (are these still the model's modules) and is called on the input."""
    if all(type(m) is nn.Linear for m in mods):
        return _Fused(mods)
    fused = getattr(type(mods[0]), "fused", None)
    return fused(mods) if fused is not None else None


class _Fusing(nn.Module):
    """A module whose projections that read one input run as one product (``fuse``, ``_fused``).
    A move or cast (``.to``, ``.cuda``, ``.float``) gives each projection's tensors new memory, no
    longer shared with the fused product's; the fusion is then made again from the moved ones."""

    _fused = None

    def _fused_projections(self) -> list[nn.Module]:
        raise NotImplementedError

    def fuse(self) -> None:
        self._fused = _fuse(self._fused_projections())

    def _apply(self, fn, recurse=True):
        mods = self._fused_projections()
        fused = self._fused is not None and self._fused.valid_for(mods)
        before = [t.data_ptr() for m in mods for t in (*m.parameters(), *m.buffers())]
        super()._apply(fn, recurse)
        if fused and before != [t.data_ptr() for m in mods for t in (*m.parameters(), *m.buffers())]:
            self.fuse()
        return self


class Attention(_Fusing):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, **kw)
        # Qwen3 normalises each head of q and k (its own weight over head_dim) before RoPE; OLMo
        # normalises all of q's heads at once, and all of k's
        self.qk_norm_heads = not cfg.olmo
        q_dim, k_dim = (cfg.head_dim, cfg.head_dim) if self.qk_norm_heads else (cfg.q_size, cfg.kv_size)
        self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, dtype, cfg.gemma, cfg.olmo) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, dtype, cfg.gemma, cfg.olmo) if cfg.qk_norm else None
        # a sliding window: each query attends to its last ``window`` positions (itself included),
        # transformers' q - k < window; the cache keeps every position, the masks do the rest
        self.window = cfg.layer_window(layer_idx)
        self.scale = cfg.attention_scale  # None: head_dim ** -0.5
        self.local_rope = cfg.local_rope(layer_idx)  # rotates with the step's "local_rope" tables
        self.rotates = cfg.layer_rope(layer_idx)  # False: a NoPE layer (SmolLM3), q and k as projected
        self.softcap = cfg.attn_logit_softcapping
        # gpt-oss: per query head, a logit that joins every softmax with no value behind it
        self.sinks = nn.Parameter(torch.zeros(cfg.num_heads, dtype=dtype), requires_grad=False) \
            if cfg.attention_sinks else None
        self.k_cache_quant: nn.Module | None = None
        self.v_cache_quant: nn.Module | None = None
        self.q_bmm_quant: nn.Module | None = None
        self.k_bmm_quant: nn.Module | None = None
        self.v_bmm_quant: nn.Module | None = None
        self.softmax_quant: nn.Module | None = None
        self._fused = None  # see _fuse

    def _fused_projections(self) -> list[nn.Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def _qkv(self, x: Tensor) -> Tensor:
        mods = self._fused_projections()
        if self._fused is not None and self._fused.valid_for(mods):
            return self._fused(x)
        return torch.cat([project(m, x) for m in mods], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: Step) -> Tensor:
        B, L, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = in_row_blocks(self._qkv, x, step.row_block).view(B, L, H + 2 * KV, D)
        qk = qkv[:, :, :H + KV]
        if self.q_norm is not None and self.qk_norm_heads:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        elif self.q_norm is not None:
            q, k = self.q_norm(qk[:, :, :H].flatten(2)), self.k_norm(qk[:, :, H:].flatten(2))
            qk = torch.cat([q, k], dim=2).view(B, L, H + KV, D)
        if self.local_rope:
            cos, sin = step.derived["local_rope"]
        if self.rotates:
            qk = apply_rope(qk, cos, sin)
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV:]
        if self.k_cache_quant is not None:
            k = self.k_cache_quant(k)
        if self.v_cache_quant is not None:
            v = self.v_cache_quant(v)
        if self.q_bmm_quant is not None:  # elementwise: once here rather than per packed sequence
            q = self.q_bmm_quant(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, D]
        if step.prefill:
            out = self._prefill_attention(q, k, v, step)
        else:
            kc, vc = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
            idx = step.cache_rows()
            kc[idx, :, step.positions] = self._to_cache(k[:, :, 0], kc, self.k_cache_quant)
            vc[idx, :, step.positions] = self._to_cache(v[:, :, 0], vc, self.v_cache_quant)
            outs = []
            for lo, hi, kv_len, mask in step.chunks:
                if self.window is not None and kv_len > self.window:
                    mask = self._windowed(step, lo, hi, kv_len, mask)
                rows = slice(step.slot_start + lo, step.slot_start + hi)
                k = self._from_cache(kc[rows, :, :kv_len], self.k_cache_quant, q.dtype)
                v = self._from_cache(vc[rows, :, :kv_len], self.v_cache_quant, q.dtype)
                qc = q[lo:hi]
                if self._explicit:
                    outs.append(self._attend(qc, k, v, False, mask))
                else:
                    outs.append(_decode_attention(qc, k, v, step.additive_mask(mask, q.dtype), self.scale))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return in_row_blocks(self._out, out.transpose(1, 2).reshape(B, L, H * D), step.row_block)

    def _out(self, x: Tensor) -> Tensor:
        return project(self.o_proj, x)

    def _windowed(self, step: Step, lo: int, hi: int, kv_len: int, mask: Tensor | None) -> Tensor:
        """A decode chunk's mask [rows, 1, 1, kv_len] with this layer's window applied; made once
        per step and window, shared by the layers that have it."""
        key = ("window", self.window, lo)
        if key not in step.derived:
            positions = step.positions[lo:hi, None]
            keys = torch.arange(kv_len, device=positions.device)
            allowed = (keys > positions - self.window)[:, None, None, :]
            step.derived[key] = allowed if mask is None else allowed & mask
        return step.derived[key]

    def _window_mask(self, queries: int, keys: int, device: torch.device) -> Tensor:
        """Causal attention within the window for ``queries`` queries at the last positions of
        ``keys`` keys (a prefill, or an extend after keys - queries cached positions): True where
        attention is allowed."""
        q = torch.arange(keys - queries, keys, device=device)[:, None]
        k = torch.arange(keys, device=device)[None, :]
        return (k <= q) & (k > q - self.window)

    def _prefill_attention(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """Causal attention of each packed sequence on its own; K/V written to its cache slot, or,
        when extending, the cached prefix read in front of the sequence's own K/V."""
        if not step.prefix_slots and not self._explicit and use_varlen(q) and (
                self.scale is None or "scale" in _varlen()[2]):
            return self._varlen_prefill(q, k, v, step)
        outs, start = [], 0
        for i, n in enumerate(step.seq_lens):
            qs, ks, vs = q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n]
            if step.prefix_slots:
                slot, p = step.prefix_slots[i], step.prefix_lens[i]
                kc, vc = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
                kp = self._from_cache(kc[slot, :, :p], self.k_cache_quant, ks.dtype)
                vp = self._from_cache(vc[slot, :, :p], self.v_cache_quant, vs.dtype)
                if step.extend_writes:
                    kc[slot, :, p:p + n] = self._to_cache(ks[0], kc, self.k_cache_quant)
                    vc[slot, :, p:p + n] = self._to_cache(vs[0], vc, self.v_cache_quant)
                ks, vs = torch.cat([kp[None], ks], dim=2), torch.cat([vp[None], vs], dim=2)
                if self.window is None:
                    allowed = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)  # query i: keys 0..p+i
                else:
                    allowed = self._window_mask(n, p + n, q.device)
                outs.append(self._attend(qs, ks, vs, False, allowed))
            else:
                if step.cache is not None:
                    kc, vc = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
                    kc[step.slot_start + i, :, :n] = self._to_cache(ks[0], kc, self.k_cache_quant)
                    vc[step.slot_start + i, :, :n] = self._to_cache(vs[0], vc, self.v_cache_quant)
                if self.window is not None and n > self.window:
                    outs.append(self._attend(qs, ks, vs, False, self._window_mask(n, n, q.device)))
                else:
                    outs.append(self._attend(qs, ks, vs, True, None))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _varlen_prefill(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """The packed sequences' causal attention in one FlashAttention call over cumulative
        offsets: each query tile reads keys of its own sequence only, so a sequence's numbers do
        not depend on its neighbours, as with the per-sequence loop; its K/V go to the cache
        with one indexed write."""
        cu, longest, slots, positions = step.packed_index()
        qt, kt, vt = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, heads, D]
        attend, kw, _ = _varlen()
        left = -1 if self.window is None else self.window - 1  # keys q - left .. q
        if self.scale is not None:
            kw = {**kw, "scale": self.scale}
        out = attend(qt, kt, vt, cu, cu, longest, longest, window_size=(left, 0), **kw)
        if step.cache is not None:
            kc, vc = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
            kc[slots, :, positions] = self._to_cache(kt, kc, self.k_cache_quant)
            vc[slots, :, positions] = self._to_cache(vt, vc, self.v_cache_quant)
        return out.transpose(0, 1)[None]

    @staticmethod
    def _to_cache(x: Tensor, cache: Tensor, quant: nn.Module | None) -> Tensor:
        """K or V as the cache stores it: as is, or as E4M3 codes x / scale when the cache is FP8
        (x comes out of the recipe's FP8 quantizer, so the codes are exact)."""
        if cache.dtype != torch.float8_e4m3fn:
            return x
        return (x.float() / quant.scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    @staticmethod
    def _from_cache(x: Tensor, quant: nn.Module | None, dtype: torch.dtype) -> Tensor:
        """What the cache holds, back in the activation dtype: code x scale rounded once, the very
        value the quantizer gave before it was stored."""
        if x.dtype != torch.float8_e4m3fn:
            return x
        return (x.float() * quant.scale).to(dtype)

    @property
    def _explicit(self) -> bool:
        """Whether attention runs as explicit products (HF eager): where a recipe quantizes their
        inputs, scores are capped (Gemma 2) or sinks join the softmax (gpt-oss); else SDPA or
        FlashAttention."""
        return self.softcap is not None or self.sinks is not None or any(
            m is not None for m in (self.q_bmm_quant, self.k_bmm_quant, self.v_bmm_quant, self.softmax_quant))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None) -> Tensor:
        if self._explicit:
            return self._attend_explicit(q, k, v, causal, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                              scale=self.scale)

    def _attend_explicit(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None) -> Tensor:
        """softmax(q·kᵀ/√d)·v with quantizers on both products' inputs (HF eager numerics), the
        scores capped at ``softcap`` where set, each head's sink logit in the softmax where set;
        q arrives quantized by ``q_bmm_quant`` already. A long prefill runs in chunks of queries
        (``EXPLICIT_SCORES``)."""
        if self.k_bmm_quant is not None:
            k = self.k_bmm_quant(k)
        if self.v_bmm_quant is not None:
            v = self.v_bmm_quant(v)
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        rows = max(1, EXPLICIT_SCORES // (B * H * Lk))
        if Lq <= rows or (mask is not None and mask.dim() != 2):  # decode masks: one query per row
            return self._explicit_scores(q, k, v, causal, mask)
        if causal:
            mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        return torch.cat([self._explicit_scores(q[:, :, i:i + rows], k, v, False, mask[i:i + rows])
                          for i in range(0, Lq, rows)], dim=2)

    def _explicit_scores(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None) -> Tensor:
        B, H, Lq, D = q.shape
        KV, Lk = k.shape[1], k.shape[2]
        G = H // KV
        qg = q.reshape(B, KV, G * Lq, D)
        scores = matmul(qg, k.transpose(-1, -2)).view(B, KV, G, Lq, Lk) * (self.scale or D ** -0.5)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal:  # a prefill that starts at position 0
            mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        elif mask is not None:
            mask = mask.view(B, 1, 1, mask.shape[-2], Lk)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks is not None:  # the sink takes its share of each row's probability, then is dropped
            sink = self.sinks.to(scores.dtype).view(1, KV, G, 1, 1).expand(B, KV, G, Lq, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :Lk]
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if self.softmax_quant is not None:
            probs = self.softmax_quant(probs)
        out = matmul(probs.to(v.dtype).view(B, KV, G * Lq, Lk), v)
        return out.view(B, H, Lq, D)


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """One query token per row against the cache, as one SDPA call with no GQA expansion: the
    H / KV query heads that share a KV head are that head's queries, all at the same position, so
    one mask row serves them. q [B, H, 1, D]; k, v [B, KV, Lk, D] (a strided view of the cache,
    read as stored: SDPA accumulates in float32 inside). Converting the cache to float32 for two
    batched matmuls instead cost 57 against 8.5 ms per layer at 80 rows x 600 positions on a
    2-core CPU, and more than the rest of a batch-64 step on an H200 (docs/PERF.md)."""
    B, H, _, D = q.shape
    KV, Lk = k.shape[1], k.shape[2]
    m = None if mask is None else mask.reshape(B, 1, 1, Lk)
    return F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, D), k, v, attn_mask=m,
                                          scale=scale).reshape(B, H, 1, D)


class MLP(_Fusing):
    """down(act(gate(x)) · up(x)): SwiGLU, Gemma's GeGLU, or gpt-oss's experts' (biases, gate and
    up clamped at ``limit``, gate · sigmoid(alpha · gate) · (up + 1))."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, intermediate_size: int | None = None):
        super().__init__()
        inner = intermediate_size or cfg.intermediate_size
        bias = cfg.gpt_oss or cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, inner, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(cfg.hidden_size, inner, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(inner, cfg.hidden_size, bias=bias, dtype=dtype)
        self._fused = None  # see _fuse
        self.act = functools.partial(F.gelu, approximate="tanh") if cfg.gemma else F.silu
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha

    def _fused_projections(self) -> list[nn.Module]:
        return [self.gate_proj, self.up_proj]

    def forward(self, x: Tensor) -> Tensor:
        if self._fused is not None and self._fused.valid_for(self._fused_projections()):
            gate, up = self._fused(x).chunk(2, dim=-1)
        else:
            gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        if self.limit is not None:  # gpt-oss
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            return project(self.down_proj, (up + 1) * (gate * torch.sigmoid(gate * self.alpha)))
        return project(self.down_proj, self.act(gate) * up)


class SparseMoE(nn.Module):
    """A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss): the router ``gate`` scores
    every expert per token; the token goes through its ``experts_per_token`` most probable experts
    (softmax in float32, renormalised over the chosen with ``norm_topk_prob``, then rounded to the
    activation dtype; gpt-oss: the softmax of the top-k logits, in their dtype), and their
    outputs, each times its weight, are summed in expert order (transformers' order). Qwen2-MoE
    adds a ``shared_expert`` every token goes through, times sigmoid(``shared_expert_gate``),
    added last. A token's result depends on its own routing only: the same alone or in any batch."""

    ROUTERS = tuple(name.removeprefix("mlp.") for name in MOE_ROUTERS)  # never quantized

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.gpt_oss, dtype=dtype)
        self.experts = nn.ModuleList(MLP(cfg, dtype, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.softmax_of_top_k = cfg.gpt_oss  # the softmax over the k largest logits, in their dtype
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, dtype, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype)

    @property
    def mlps(self) -> list[MLP]:
        """Every expert's MLP, the shared expert's last (what a recipe quantizes as dense MLPs)."""
        return [*self.experts, *([self.shared_expert] if self.shared_expert is not None else [])]

    def fuse(self) -> None:
        for mlp in self.mlps:
            mlp.fuse()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = project(self.gate, flat)
        if self.softmax_of_top_k:
            top, chosen = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        else:
            weights, chosen = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            weights = weights.to(logits.dtype)
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, (self.experts[e](flat[token]) * weights[token, slot, None]).to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(project(self.shared_expert_gate, flat)) * self.shared_expert(flat)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.gemma, cfg.gpt_oss or cfg.olmo)
        self.input_layernorm = None if cfg.olmo else norm()  # OLMo: attention reads the residual stream
        self.self_attn = Attention(cfg, layer_idx, dtype)
        # Llama's norm before the MLP; in Gemma's and OLMo's layer, the one after attention (before
        # the residual add), with post_feedforward_layernorm after the MLP and (Gemma)
        # pre_feedforward_layernorm before it
        self.post_attention_layernorm = norm()
        self.attention_post_norm = cfg.gemma or cfg.olmo
        self.mlp = SparseMoE(cfg, dtype) if cfg.layer_moe(layer_idx) else MLP(cfg, dtype)
        self.pre_feedforward_layernorm = norm() if cfg.gemma else None
        self.post_feedforward_layernorm = norm() if cfg.gemma or cfg.olmo else None
        self.residual_multiplier = cfg.residual_multiplier  # Granite: each sublayer's output times it

    @property
    def mlp_norm_name(self) -> str:
        """The attribute holding the norm whose output the MLP reads."""
        return "pre_feedforward_layernorm" if self.attention_post_norm else "post_attention_layernorm"

    @property
    def mlp_norm(self) -> RMSNorm | None:
        """The norm whose output the MLP reads (where AWQ folds the gate/up scale); None in OLMo's
        layer, whose MLP reads the residual stream."""
        return getattr(self, self.mlp_norm_name)

    def attention_input(self, x: Tensor) -> Tensor:
        return x if self.input_layernorm is None else self.input_layernorm(x)

    def mlp_input(self, x: Tensor) -> Tensor:
        norm = self.mlp_norm
        return x if norm is None else norm(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: Step) -> Tensor:
        x = self.attention_residual(x, self.self_attn(self.attention_input(x), cos, sin, step))
        return in_row_blocks(self._feed_forward, x, step.row_block)

    def attention_residual(self, x: Tensor, attention: Tensor) -> Tensor:
        """The residual stream after attention's output is added (normalised first in Gemma's and
        OLMo's layer)."""
        if self.attention_post_norm:
            attention = self.post_attention_layernorm(attention)
        if self.residual_multiplier is not None:
            attention = attention * self.residual_multiplier
        return x + attention

    def _feed_forward(self, x: Tensor) -> Tensor:
        """The row-wise rest of the layer: normalisation, MLP and residual."""
        out = self.mlp(self.mlp_input(x))
        if self.post_feedforward_layernorm is not None:
            out = self.post_feedforward_layernorm(out)
        if self.residual_multiplier is not None:
            out = out * self.residual_multiplier
        return x + out


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.gemma, cfg.gpt_oss or cfg.olmo)


class CausalLM(nn.Module):
    """The whole model. ``hidden`` runs the decoder; ``logits`` applies lm_head to chosen rows."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.model = Decoder(cfg, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)
        # what the KV cache stores: the activation dtype, or E4M3 codes where a recipe quantizes
        # the cache to FP8 and deploys it so (fp8-modelopt with real kernels: half the memory)
        self.cache_dtype = dtype
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def fuse_projections(self) -> None:
        """Re-fuse q/k/v and gate/up where all are plain linears (after loading or replacing weights)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def _rope_variants(self) -> list[tuple[Tensor, float]]:
        """The inverse frequencies the tables hold and the factor on their cos and sin, in
        row-block order: the model's RoPE, then LongRoPE's long factors, then the sliding layers'
        own unscaled RoPE (Gemma 3, OLMo 3), where configured."""
        cfg = self.config
        factor = rope_attention_factor(cfg)  # LongRoPE's or YaRN's
        variants = [(rope_inv_freq(cfg), factor)]
        if isinstance(cfg.rope_scaling, LongRope):
            variants.append((rope_inv_freq(cfg, long=True), factor))
        if cfg.local_rope_theta is not None:
            variants.append((rope_inv_freq(cfg, local=True), 1.0))
        return variants

    def _rope_tables(self, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin for positions 0 .. n-1 (n >= ``length``) of each of ``_rope_variants``, one
        block of n rows after the other; sin's first half negated (``apply_rope``). On a GPU they
        cover the whole context from the first call: captured decode graphs read them by address,
        so they are never reallocated there."""
        if length > self._rope_len or self._cos.device != self.device:
            limit = self.config.max_position_embeddings
            n = limit if self.device.type == "cuda" else max(length, min(2 * self._rope_len, limit), 256)
            # computed on the CPU (as transformers does it in float32), then moved: the same tables on any device
            # transformers computes cos/sin in float32 (times LongRoPE's or YaRN's attention factor),
            # then casts to the activation dtype
            cos, sin = [], []
            for inv_freq, factor in self._rope_variants():  # times 1.0 where there is no factor: exact
                freqs = torch.outer(torch.arange(n, dtype=torch.float32, device="cpu"), inv_freq.to("cpu"))
                emb = torch.cat((freqs, freqs), dim=-1)
                cos.append(emb.cos() * factor)
                # rotate-half's minus sign on the first half (apply_rope); negation is exact
                sin.append(torch.cat((-freqs.sin(), freqs.sin()), dim=-1) * factor)
            cos, sin = torch.cat(cos), torch.cat(sin)
            self._cos = cos.to(self.dtype).to(self.device)
            self._sin = sin.to(self.dtype).to(self.device)
            self._rope_len = n
        return self._cos, self._sin

    def check_length(self, length: int) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"sequence of {length} tokens exceeds the model's context of {limit} tokens")

    def rope(self, step: Step) -> tuple[Tensor, Tensor]:
        """cos and sin at the step's positions, shaped to broadcast over its q/k [B, L, heads, D].

        With LongRoPE a sequence that reaches past the original context in this step (a prefill
        by its whole length, a decode row by its own position) is rotated with the long factors:
        transformers' rule for one sequence, decided per sequence so that neighbours do not
        change it.

        Gemma 3's sliding layers rotate with a base of their own: their cos and sin go to
        ``step.derived["local_rope"]``, where those layers read them."""
        self.check_length(step.longest if step.prefill else step.kv_len)
        cos, sin = self._rope_tables(step.longest if step.prefill else step.kv_len)
        shape = (slice(None), None) if step.prefill else (slice(None), None, None)
        if self.config.local_rope_theta is not None:  # the last block of rows
            local = step.positions + (cos.shape[0] - self._rope_len)
            step.derived["local_rope"] = (cos[local][shape], sin[local][shape])
        index = step.positions
        if isinstance(self.config.rope_scaling, LongRope):
            original = self.config.rope_scaling.original_max_position_embeddings
            if step.prefill:  # each sequence by the length it reaches in this step
                starts = step.prefix_lens or (0,) * len(step.seq_lens)
                ends = torch.tensor([p + n for p, n in zip(starts, step.seq_lens)], device=index.device)
                reach = torch.repeat_interleave(ends, torch.tensor(step.seq_lens, device=index.device))
            else:
                reach = step.positions + 1
            index = index + self._rope_len * (reach > original)
        return cos[index][shape], sin[index][shape]

    def embed(self, tokens: Tensor) -> Tensor:
        """The first layer's input: the tokens' embeddings (times sqrt(hidden_size), rounded to the
        activation dtype, in Gemma; times embedding_multiplier in Granite)."""
        x = self.model.embed_tokens(tokens)
        if self.config.gemma:  # a Python number (exact in the dtype): no tensor made in a captured graph
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=self.dtype, device="cpu").item()
        if self.config.embedding_multiplier is not None:
            x = x * self.config.embedding_multiplier
        return x

    def hidden(self, tokens: Tensor, step: Step) -> Tensor:
        """Final-normalised hidden states: [1, T, hidden] for a packed prefill, [B, 1, hidden] in decode."""
        if step.prefill and tokens.shape != (1, sum(step.seq_lens)):
            raise ValueError(f"prefill takes tokens [1, {sum(step.seq_lens)}] packed from seq_lens, "
                             f"got {tuple(tokens.shape)}")
        if tokens.device != self.device or step.positions.device != self.device:
            raise ValueError(f"tokens ({tokens.device}) and positions ({step.positions.device}) must be on the "
                             f"model's device ({self.device})")
        cos, sin = self.rope(step)
        x = self.embed(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, step)
        return self.model.norm(x)

    def logits(self, hidden: Tensor, float32: bool = False, row_block: int = 0) -> Tensor:
        """lm_head on ``hidden``, in blocks of ``row_block`` rows when set (``linear.in_row_blocks``).
        With ``float32`` the product is computed and returned in float32: BF16 logits of magnitude
        16-32 are rounded to multiples of 0.125, coarse enough to flip close MMLU answers between
        batch sizes, so scoring asks for float32 on the few rows it needs. Gemma 2's logits are
        capped: cap * tanh(logits / cap); Granite's divided by logits_scaling."""
        if float32 and self.dtype != torch.float32:
            if type(self.lm_head) is nn.Linear:
                weight = self.lm_head.weight
                if hidden.device.type != "cpu":  # converted once, not per block (the CPU keeps a float32 copy)
                    weight = weight.float()
                out = in_row_blocks(lambda h: linear(h.float(), weight), hidden, row_block)
            else:
                out = in_row_blocks(lambda h: self.lm_head(h).float(), hidden, row_block)
        else:
            out = in_row_blocks(lambda h: project(self.lm_head, h), hidden, row_block)
        if self.config.logits_scaling is not None:  # Granite
            out = out / self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        return out if cap is None else torch.tanh(out / cap) * cap

    def forward(self, tokens: Tensor) -> Tensor:
        """Full logits [B, L, vocab] for a batch of equal-length token rows, no cache."""
        B, L = tokens.shape
        hidden = self.hidden(tokens.reshape(1, B * L), Step.for_prefill([L] * B, device=tokens.device))
        return self.logits(hidden).view(B, L, -1)

    def resident_bytes(self) -> int:
        """Memory held by parameters and buffers, each tensor once: for a simulated recipe this
        includes its simulation copies (``quant.checkpoint.deployed_weight_bytes`` counts what a
        checkpoint stores)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
