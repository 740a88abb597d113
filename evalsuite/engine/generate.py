"""Batched generation around a decode step that sequences can join and leave.

``DecodeBatch`` owns a KV cache with one slot per running sequence. ``add`` prefills new
sequences (packed, one forward) into free slots and samples their first token, reusing the K/V of
earlier sequences that began the same way (``engine.prefix``); ``step``
advances every running sequence by one token; ``remove`` frees a slot by moving the last running
sequence into it, so the running batch always occupies slots 0..n-1 and attention reads one
contiguous block of the cache. ``generate`` drives it for a closed list of prompts; a server can
drive the same object with requests arriving over time.

Sampling is per sequence: greedy when temperature is 0, otherwise temperature and top-p with a
generator seeded per sequence, so a seeded request samples the same tokens alone or in a batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import KVCache
from .config import LongRope
from .linear import decode_kernels
from .model import CausalLM, Step
from .prefix import Block, PrefixStore, shares_a_block, store_for
from .requests import SamplingParams


@dataclass
class Generation:
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token or string), "length"
    rng: torch.Generator | None = None
    cached_tokens: int = 0  # prompt positions whose K/V came from the prefix store, not this prefill

    @property
    def next_position(self) -> int:
        """Position of the token the next decode step feeds: the last sampled one."""
        return len(self.prompt) + len(self.tokens) - 1


def sample(logits: Tensor, gens: Sequence[Generation]) -> list[int]:
    """One token per row of float32 logits [B, vocab]: the argmax where the temperature is 0;
    otherwise a draw from softmax(logits / temperature), cut to the top_p nucleus, by inverse
    transform: the first token whose cumulative probability exceeds u x total, u uniform in
    [0, 1) from the sequence's own generator. Each row's softmax, cumulative sum and draw depend
    on that row alone, so a seeded sequence draws the same tokens alone or in any batch. The
    sampled rows share one softmax and one cumulative sum per step (per-row torch.multinomial
    cost 1.5 ms a row on a 49k vocabulary, a tenth of a batch-80 decode step on a 2-core CPU)."""
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, g in enumerate(gens) if g.params.temperature > 0]
    if not rows:
        return out
    # on the CPU, where the sequences' generators live: the same draw on any device
    temperature = torch.tensor([gens[i].params.temperature for i in rows], dtype=torch.float32, device="cpu")
    probs = torch.softmax(logits[rows].float().cpu() / temperature[:, None], dim=-1)
    for j, i in enumerate(rows):
        top_p = gens[i].params.top_p
        if top_p < 1:
            sorted_p, order = probs[j].sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            sorted_p[sorted_p.cumsum(0) - sorted_p >= top_p] = 0
            probs[j] = torch.zeros_like(probs[j]).scatter_(0, order, sorted_p)
    cdf = probs.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=gens[i].rng, device="cpu") for i in rows])
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
    for i, t in zip(rows, picks.tolist()):
        out[i] = t
    return out


# A static cache's length, and the span a static decode step's attention reads, are multiples of
# this many positions.
STATIC_LEN_BLOCK = 256


class DecodeBatch:
    """``static``: decode steps run with shapes fixed per bucket, over static input buffers: the
    batch size rounded up to a power of two (up to the slots), and the span of cache positions
    attention reads, the longest running sequence rounded up to whole ``STATIC_LEN_BLOCK``s (every
    row masked past its own position). On CUDA each bucket's step is captured once as a CUDA
    graph and replayed, so a step costs one launch instead of one per operator (~28 µs each on an
    H200, hundreds per step), and attention reads a short sequence's span rather than the whole
    cache. Default: on CUDA.

    ``prefix_cache``: prompts once prefilled, and finished sequences, leave their K/V in the
    model's prefix store (as many bytes as this batch's cache, at least), and a prompt that begins
    with stored blocks prefills only the rest (``engine.prefix``)."""

    def __init__(self, model: CausalLM, max_batch_size: int, max_len: int, *, static: bool | None = None,
                 prefix_cache: bool = True):
        self.model = model
        # a mixture of experts routes each step's tokens to experts in shapes known only then:
        # no graph captures it, so its decode runs eagerly on a GPU too
        capturable = model.config.num_experts == 0
        self.static = model.device.type == "cuda" and capturable if static is None else static
        if self.static:  # whole blocks, so that batches of nearby lengths share one capture
            max_len = -(-max_len // STATIC_LEN_BLOCK) * STATIC_LEN_BLOCK
        self.max_len = min(max_len, model.config.max_position_embeddings)
        self.running: list[Generation] = []
        self._key = None
        fingerprint = _weights_fingerprint(model)
        kept = model.__dict__.pop("_kept_decode", None) if self.static else None
        if self.static:
            self._key = (max_batch_size, self.max_len, model.cache_dtype, fingerprint)
        if kept is not None and kept[0] == self._key:  # the graphs of an earlier batch of this shape
            self.cache, self._tokens, self._positions, self._steps = kept[1]
        else:
            self.cache = KVCache(model.config, max_batch_size, self.max_len, model.cache_dtype, model.device)
            # (batch bucket, attention span) -> the step (a graph replay on CUDA)
            self._steps: dict[tuple[int, int], Callable[[], Tensor]] = {}
            if self.static:
                self._tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=model.device)
                self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=model.device)
        self.prefixes: PrefixStore | None = None
        if prefix_cache:
            self.prefixes = store_for(model, (model.cache_dtype, fingerprint), self.cache.nbytes())

    def close(self) -> None:
        """Done with this batch. A static batch's cache and steps (CUDA graphs) stay with the
        model (the last batch's only) for the next batch of the same shape and weights: a
        generate call then captures nothing. The cache's stale K/V are never read: attention
        masks every position past a sequence's own."""
        if self._key is not None and not self.running:
            self.model.__dict__["_kept_decode"] = (self._key, (self.cache, self._tokens, self._positions, self._steps))

    @property
    def free_slots(self) -> int:
        return self.cache.num_slots - len(self.running)

    @torch.inference_mode()
    def add(self, gens: Sequence[Generation]) -> None:
        """Prefill ``gens`` into free slots and sample each one's first token."""
        if len(gens) > self.free_slots:
            raise ValueError(f"{len(gens)} sequences do not fit in {self.free_slots} free slots")
        if not gens:
            return
        for g in gens:
            if not g.prompt:
                raise ValueError("empty prompt: generation needs at least one token")
            if len(g.prompt) >= self.max_len:
                raise ValueError(f"prompt of {len(g.prompt)} tokens leaves no room to generate within "
                                 f"the context of {self.max_len} tokens")
            if g.params.seed is not None:
                g.rng = torch.Generator().manual_seed(g.params.seed)
        if self.prefixes is None:
            self._admit(gens)
            return
        # a prompt that begins like an earlier joining one waits for it: that one's prefill puts
        # the shared blocks in the store, and this one continues them (a few-shot prefix computed once)
        first: list[Generation] = []
        later: list[Generation] = []
        for g in gens:
            (later if any(shares_a_block(f.prompt, g.prompt) for f in first) else first).append(g)
        self._admit(first)
        self._admit(later)

    def _storable(self, length: int) -> bool:
        """Whether K/V computed over ``length`` positions may enter or leave the prefix store: always
        but with LongRoPE past the original context, where a sequence is rotated with the long
        factors throughout (a later prompt that long is rotated from scratch, and a shorter one
        needs the short factors)."""
        return not self.model.config.long_rope(length)

    def _admit(self, gens: list[Generation]) -> None:
        """Prefill ``gens`` (the prefix store's blocks where they begin with some), into the slots
        after the running batch; sample each one's first token."""
        if not gens:
            return
        matches = [self.prefixes.match(g.prompt) if self.prefixes is not None and self._storable(len(g.prompt))
                   else ([], 0) for g in gens]
        fresh = [g for g, (_, n) in zip(gens, matches) if n == 0]
        cont = [(g, blocks, n) for g, (blocks, n) in zip(gens, matches) if n > 0]
        logits = []
        if fresh:  # slots after the running batch, then the continuing ones
            logits.append(self._prefill(fresh, len(self.running)))
        if cont:
            logits.append(self._continue(cont, len(self.running) + len(fresh)))
        for g, _, n in cont:
            g.cached_tokens = n
        gens = fresh + [g for g, _, _ in cont]
        if self.prefixes is not None:
            for i, g in enumerate(gens):
                if self._storable(len(g.prompt)):
                    self.prefixes.save(g.prompt, self.cache, len(self.running) + i)
        self.running.extend(gens)
        for g, t in zip(gens, sample(torch.cat(logits), gens)):
            self._append(g, t)

    def _prefill(self, gens: list[Generation], slot: int) -> Tensor:
        """Whole prompts, packed, into slots ``slot``...: the last position's float32 logits of each."""
        lens = [len(g.prompt) for g in gens]
        dev = self.model.device
        tokens = torch.tensor([t for g in gens for t in g.prompt], device=dev).view(1, -1)
        hidden = self.model.hidden(tokens, Step.for_prefill(lens, self.cache, slot_start=slot, device=dev))[0]
        return self.model.logits(hidden[torch.tensor(lens, device=dev).cumsum(0) - 1]).float()

    def _continue(self, cont: list[tuple[Generation, list[Block], int]], slot: int) -> Tensor:
        """Prompts whose first n positions come from the prefix store: those copied into slots
        ``slot``..., the rest prefilled after them, packed."""
        for i, (_, blocks, _) in enumerate(cont):
            PrefixStore.load(blocks, self.cache, slot + i)
        lens = [len(g.prompt) - n for g, _, n in cont]
        dev = self.model.device
        tokens = torch.tensor([t for g, _, n in cont for t in g.prompt[n:]], device=dev).view(1, -1)
        step = Step.for_extend(lens, self.cache, [slot + i for i in range(len(cont))], [n for _, _, n in cont],
                               writes=True)
        hidden = self.model.hidden(tokens, step)[0]
        return self.model.logits(hidden[torch.tensor(lens, device=dev).cumsum(0) - 1]).float()

    @torch.inference_mode()
    def step(self) -> None:
        """Advance every running, unfinished sequence by one token. A sequence that ended at its
        first token (no token to feed) must be removed before the next step."""
        if not self.running:
            return
        if empty := [i for i, g in enumerate(self.running) if not g.tokens]:
            raise ValueError(f"running sequences {empty} ended at their first token and have no token to feed; "
                             "remove finished sequences before the next step")
        self._rotate_long()
        dev = self.model.device
        tokens = torch.tensor([[g.tokens[-1]] for g in self.running], device=dev)
        positions = torch.tensor([g.next_position for g in self.running], device=dev)
        if self.static:
            logits = self._static_step(tokens, positions)
        else:
            # oneDNN's BF16 GEMV reads weights at ~13 GB/s on AVX512-BF16 CPUs; ATen's own kernel
            # streams them at ~29 GB/s. From 4 rows on, oneDNN's GEMM is as fast or faster.
            with decode_kernels(len(self.running)):
                hidden = self.model.hidden(tokens, Step.for_decode(positions, self.cache))
                logits = self.model.logits(hidden[:, 0]).float()
        for g, t in zip(self.running, sample(logits, self.running)):
            if g.finish_reason is None:
                self._append(g, t)

    def _rotate_long(self) -> None:
        """LongRoPE: a sequence about to reach past the original context has its K/V computed
        again with the long factors, its whole sequence in one prefill, as transformers'
        ``generate`` drops the cache at that step and runs the sequence anew; from then on its
        decode steps rotate long (``CausalLM.rope``)."""
        rope = self.model.config.rope_scaling
        if not isinstance(rope, LongRope):
            return
        dev = self.model.device
        for i, g in enumerate(self.running):
            if g.finish_reason is None and g.next_position == rope.original_max_position_embeddings:
                seq = (g.prompt + g.tokens)[:g.next_position + 1]
                tokens = torch.tensor(seq, device=dev).view(1, -1)
                self.model.hidden(tokens, Step.for_prefill([len(seq)], self.cache, slot_start=i, device=dev))

    def _static_step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        n, slots = tokens.shape[0], self.cache.num_slots
        bucket = min(1 << (n - 1).bit_length(), slots)
        longest = max(g.next_position for g in self.running) + 1
        span = min(-(-longest // STATIC_LEN_BLOCK) * STATIC_LEN_BLOCK, self.cache.max_len)
        # rows past n fill free slots (the running batch holds slots 0..n-1): position 0, token 0
        self._tokens[:n].copy_(tokens)
        self._tokens[n:bucket].zero_()
        self._positions[:n].copy_(positions)
        self._positions[n:bucket].zero_()
        run = self._steps.get((bucket, span))
        if run is None:
            run = self._steps[bucket, span] = self._capture(bucket, span)
        return run()[:n]

    def _capture(self, bucket: int, span: int) -> Callable[[], Tensor]:
        tokens, positions = self._tokens[:bucket], self._positions[:bucket]

        def forward() -> Tensor:
            with decode_kernels(bucket):
                hidden = self.model.hidden(tokens, Step.for_static_decode(positions, self.cache, span))
                return self.model.logits(hidden[:, 0]).float()

        if self.model.device.type != "cuda":
            return forward
        try:
            # warm-up off the default stream (lazy initialisations, compiled kernels, cuBLAS
            # workspaces); it writes the running rows' K/V exactly as the step itself will
            side = torch.cuda.Stream(self.model.device)
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward()
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a private memory pool: buckets replay in any order
                out = forward()
        except Exception as e:  # noqa: BLE001 - an operator that cannot be captured: run eagerly
            warnings.warn(f"decode at batch {bucket} runs without a CUDA graph: {type(e).__name__}: {e}")
            return forward

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay

    def _append(self, g: Generation, token: int) -> None:
        if token in g.params.stop_token_ids:
            g.finish_reason = "stop"
            return
        g.tokens.append(token)
        if len(g.tokens) >= g.params.max_new_tokens or g.next_position >= self.max_len:
            g.finish_reason = "length"

    def remove(self, g: Generation) -> None:
        """Free ``g``'s slot; a finished sequence first leaves the K/V of the tokens it fed (all
        but the last sampled one, which no step has read yet) in the prefix store."""
        i = next(i for i, r in enumerate(self.running) if r is g)
        if self.prefixes is not None and g.finish_reason is not None and self._storable(g.next_position):
            self.prefixes.save((g.prompt + g.tokens)[:g.next_position], self.cache, i)
        last = len(self.running) - 1
        if i != last:
            self.cache.move_slot(last, i, self.running[last].next_position)
            self.running[i] = self.running[last]
        self.running.pop()


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, max_batch_size: int = 64, max_prefill_tokens: int = 4096,
             stop_fn: Callable[[int, list[int]], bool] | None = None,
             progress: Callable[[int], None] | None = None, static: bool | None = None,
             prefix_cache: bool = True) -> list[Generation]:
    """Generate for every prompt (token ids); results in prompt order.

    ``stop_fn(index, tokens)`` may end a sequence early (stop strings live above the engine, where
    the tokenizer is); ``progress`` is called with the number of sequences finished; ``static``
    and ``prefix_cache`` as in ``DecodeBatch``.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    gens = [Generation(list(p), sp) for p, sp in zip(prompts, params)]
    if not gens:
        return []
    for g in gens:
        model.check_length(len(g.prompt))
    max_len = max(len(g.prompt) + g.params.max_new_tokens for g in gens)
    batch = DecodeBatch(model, min(max_batch_size, len(gens)), max_len, static=static, prefix_cache=prefix_cache)
    index = {id(g): i for i, g in enumerate(gens)}
    # longest prompts first (popped from the end): neighbouring rows of the batch then have similar
    # lengths, and decode attention reads each chunk of rows only as far as it needs (Step.for_decode)
    waiting = sorted(gens, key=lambda g: len(g.prompt))
    while waiting or batch.running:
        if waiting and batch.free_slots:
            batch.add(_take_joining(waiting, batch.free_slots, max_prefill_tokens))
        else:
            batch.step()
        for g in list(batch.running):
            if g.finish_reason is None and stop_fn is not None and stop_fn(index[id(g)], g.tokens):
                g.finish_reason = "stop"
            if g.finish_reason is not None:
                batch.remove(g)
                if progress is not None:
                    progress(1)
    batch.close()
    return gens


def _weights_fingerprint(model: CausalLM) -> tuple:
    """What a captured graph depends on besides shapes: the modules and the storage of every
    weight and buffer (a recipe applied to the model, or a weight swapped, changes it)."""
    return (tuple(map(id, model.modules())),
            tuple(t.data_ptr() for t in model.state_dict(keep_vars=True).values()))


def _take_joining(waiting: list[Generation], slots: int, max_tokens: int) -> list[Generation]:
    """Pop the next sequences to prefill together: at most ``slots``, packed tokens within ``max_tokens``."""
    joining = [waiting.pop()]
    tokens = len(joining[0].prompt)
    while waiting and len(joining) < slots and tokens + len(waiting[-1].prompt) <= max_tokens:
        tokens += len(waiting[-1].prompt)
        joining.append(waiting.pop())
    return joining
