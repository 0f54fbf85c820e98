"""The model runner: the weights laid out for decoding, the KV cache, and the two forwards a cycle runs.

    state (KV cache) + one token per slot  --tick-->  next state + one token per slot

`prefill` and `tick` are small top-level functions (so `tick` can be compiled); `ModelRunner`
owns the cache and the decode plan and turns the scheduler's sequences into their inputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .kernels import decode_linear, make_attend, make_block
from .kv_cache import KVCache, chunk_mask
from .scheduler import Chunk
from .sequence import Event, Sequence


class Probe:
    """Tracing hook interface: the engine calls these only when a probe is attached."""

    def begin(self, kind: str, slots: list[int]) -> None: ...
    def mark(self, stage: str) -> None: ...
    def residual(self, layer: int, x: torch.Tensor) -> None: ...
    def end(self, events: list[Event], logits: torch.Tensor, logprobs: torch.Tensor) -> None: ...


Linear = Callable[..., torch.Tensor]
"""f(x, *, gelu=False, out=None, accumulate=False): a decode linear from kernels.make_linear."""


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """One block for `tick`: LayerNorms as F.layer_norm's (weight, bias, eps), linears as kernels.make_linear's,
    and `block`, the whole block as one kernel call (kernels.make_block), None where it cannot run;
    `n_head`, its attention's head count (fewer than the config's where heads were pruned)."""

    ln_1: tuple[torch.Tensor, torch.Tensor | None, float]
    c_attn: Linear
    attn_proj: Linear
    ln_2: tuple[torch.Tensor, torch.Tensor | None, float]
    c_fc: Linear
    mlp_proj: Linear
    block: Callable | None = None
    n_head: int = 0


class DecodePlan:
    """The model's weights laid out for `tick`: plain fields, packed linears, no module lookups.

    Each nn.Linear becomes a function f(x, *, gelu=False, out=None, accumulate=False): by default
    its weight is packed once into the panel layout of kernels.py, whose compiled GEMV streams it
    at memory speed with bias, GELU and the residual add fused; `packed=False` keeps plain torch
    ops (what torch.compile traces). A tick on a 12-layer model makes ~200 calls, so resolving
    `block.attn.c_attn` (~2 us per nn.Module attribute here) once at construction matters. The
    packed copies are taken now: an engine serves frozen weights.
    """

    def __init__(self, model, *, packed: bool = True):
        tr, cfg = model.transformer, model.config
        act = cfg.gelu_approximate

        def lin(m):
            return decode_linear(m, packed=packed, approximate=act)

        self.head_size, self.shape = cfg.head_size, (cfg.n_embd,)
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.layers = []
        for b in tr.h:
            fs = [lin(b.attn.c_attn), lin(b.attn.c_proj), lin(b.mlp.c_fc), lin(b.mlp.c_proj)]
            self.layers.append(LayerPlan((b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), fs[0], fs[1],
                                         (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps), fs[2], fs[3],
                                         make_block(b, *fs, approximate=act), b.attn.n_head))
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        self.head = lin(model.lm_head)


def tick(plan: DecodePlan, cache: KVCache, tokens, pos, slots, L: int, mask, probe: Probe | None = None, attend=None,
         rows=None):
    """One decode cycle, one row per ticking sequence: tokens (n,), positions (n,) -> next-token logits (n, V),
    or only those of `rows` (an index tensor; the probe sees those rows too).

    Writes each row's key/value at its own position in its slot, then attends over its history:
    with `attend` (qkv, kc, vc, pos) -> y, which knows the rows' slots (ModelRunner binds them),
    each row over exactly its own positions; otherwise by index writes and SDPA over the first L
    positions (mask: (n, 1, 1, L), or None when every row may see all L). `slots`, the rows' cache
    slots, is a slice when they are consecutive (the cache is read through a view), else an (n,)
    index tensor (read by a gather). With `attend`, each block whose `layer.block` kernel exists
    runs as that one call instead (it takes the rows' slots itself).
    """
    n, hs, shape = tokens.size(0), plan.head_size, plan.shape
    x = F.embedding(tokens, plan.wte) + F.embedding(pos, plan.wpe)  # (n, C)
    by_view = isinstance(slots, slice)
    index = torch.arange(n, device=x.device) if by_view and attend is None else slots  # rows' slots for writes
    slot_map = None  # the block kernel's row -> slot map (int64); None when row b is slot b
    if not by_view:
        slot_map = slots
    elif slots.start:
        slot_map = torch.arange(slots.start, slots.start + n)
    if probe is not None:
        probe.mark("embed")
    for i, layer in enumerate(plan.layers):
        kc, vc = cache.k[i], cache.v[i]
        if layer.block is not None and attend is not None:
            layer.block(x, kc, vc, pos, slot_map)  # the whole block in one kernel call, x updated in place
        else:
            qkv = layer.c_attn(F.layer_norm(x, shape, *layer.ln_1))  # (n, 3C)
            if attend is not None:
                y = attend(qkv, kc, vc, pos)  # (n, C)
            else:
                q, k, v = qkv.view(n, 3, layer.n_head, hs).unbind(1)  # 3 x (n, nh, hs)
                if by_view:
                    kc, vc = kc[slots], vc[slots]  # (n, nh, max_len, hs) views
                kc[index, :, pos] = k
                vc[index, :, pos] = v
                kc, vc = (kc[:, :, :L], vc[:, :, :L]) if by_view else (kc[slots, :, :L], vc[slots, :, :L])  # (n, nh, L, hs)
                y = F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask)  # (n, nh, 1, hs)
            layer.attn_proj(y.view(n, -1), out=x, accumulate=True)  # x += c_proj(y), fused
            layer.mlp_proj(layer.c_fc(F.layer_norm(x, shape, *layer.ln_2), gelu=True), out=x, accumulate=True)  # x += mlp(ln_2(x))
        if probe is not None:
            probe.residual(i, x if rows is None else x[rows])
            probe.mark(f"block{i}")
    if rows is not None:
        x = x[rows]
    logits = plan.head(F.layer_norm(x, shape, *plan.ln_f))  # (n, V)
    if probe is not None:
        probe.mark("head")
    return logits


def prefill(model, cache: KVCache, chunks: list[tuple[int, int, int]], ids: torch.Tensor, last: torch.Tensor,
            probe: Probe | None = None):
    """One forward over prompt chunks packed into one row: chunk (slot, start, end) feeds positions
    start..end of its slot; ids (N,) are the chunks' tokens in order. Writes their keys and values
    and returns the logits of the rows `last` (m,) (the final token of each prompt that ends here): (m, V).

    Each chunk attends to its own slot's history only (kv_cache.chunk_mask), so packing prompts
    together gives each the logits it would get alone."""
    pos = torch.cat([torch.arange(start, end, device=ids.device) for _, start, end in chunks])  # (N,)
    views = cache.chunk_views(chunks)
    mask = chunk_mask(chunks, ids.device)  # (N, S)
    x = model.embed(ids[None], pos)  # (1, N, C)
    if probe is not None:
        probe.mark("embed")
    for i, block in enumerate(model.transformer.h):
        x = block(x, views[i], mask)
        if probe is not None:
            probe.residual(i, x[0, last])
            probe.mark(f"block{i}")
    logits = model.head(x[0, last])  # (m, V)
    if probe is not None:
        probe.mark("head")
    return logits


KERNEL_PREFILL_ROWS = 16
"""A prompt chunk's tokens up to which it prefills through the decode kernels, each token a row at its
own position, rather than through a torch forward: so few rows are memory-bound, and the kernels
stream the packed weights at decode speed (GPT-2 124M shape, 1 thread: a 2-token prompt in ~17 ms
instead of 51 ms through torch's matrix products); more rows are compute-bound, where torch's GEMM
wins. Decided per chunk, so a prompt's numerics do not depend on what else shares its cycle."""


class ModelRunner:
    """The cache and the decode plan of one engine; runs the forwards a cycle's Schedule asks for."""

    def __init__(self, model, *, slots: int, max_len: int, compile: bool = False):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.max_len, self.device = model, max_len, p.device
        heads = [b.attn.n_head for b in model.transformer.h]  # per layer: pruned heads differ
        self.cache = KVCache(cfg.n_layer, slots, heads, max_len, cfg.head_size, dtype=p.dtype, device=p.device)
        self.plan = DecodePlan(model, packed=not compile)
        self.attend = None if compile else make_attend(self.cache.k[0])
        self.compiled = compile
        # dynamic shapes: one graph serves any number of rows and any attended length (torch
        # specialises sizes 0 and 1, so a lone row and the first position get graphs of their own)
        self._tick = torch.compile(tick, dynamic=True) if compile else tick

    def run(self, prefill: list[Chunk], decode: list[Sequence], probe: Probe | None) -> torch.Tensor:
        """One cycle's forwards: -> the logits of the prompts that end this cycle (chunk order), then of
        the ticking sequences (m + len(decode), V).

        A chunk of at most KERNEL_PREFILL_ROWS tokens runs through the decode kernels, each token a row
        at its own position; longer ones through a torch forward. Without a probe, the ticking
        sequences join the short chunks' rows in one pass over the weights, so a cycle that admits a
        short prompt costs about what a plain tick does (with a probe, the tracer's two passes stay)."""
        kernel = self.attend is not None
        if not prefill:  # a plain tick: its logits as they come
            return self._rows([], decode, probe) if kernel else self.tick(decode, probe)
        join = kernel and probe is None and bool(decode)
        short = [kernel and c.end - c.start <= KERNEL_PREFILL_ROWS for c in prefill]
        long = [c for c, k in zip(prefill, short) if not k]
        rows_of = [c for c, k in zip(prefill, short) if k]
        out_long = iter(self.prefill(long, probe) if long else [])
        out_rows = iter(self._rows(rows_of, decode if join else [], probe) if rows_of or join else [])
        logits = [next(out_rows) if k else next(out_long) for c, k in zip(prefill, short) if c.last]
        if decode:
            logits += list(out_rows) if join else list(self.tick(decode, probe))
        if not logits:  # the cycle only advanced a long prompt's prefill
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return torch.stack(logits)

    def prefill(self, chunks: list[Chunk], probe: Probe | None) -> torch.Tensor:
        """Prefill the chunks in one torch forward; -> logits (m, V) for those that end their prompt, in order."""
        ids = torch.tensor([t for c in chunks for t in c.seq.prompt_ids[c.start : c.end]], device=self.device)
        ends = list(itertools.accumulate(c.end - c.start for c in chunks))
        last = torch.tensor([e - 1 for c, e in zip(chunks, ends) if c.last], device=self.device, dtype=torch.long)
        logits = prefill(self.model, self.cache, [(c.seq.slot, c.start, c.end) for c in chunks], ids, last, probe)
        for c in chunks:
            c.seq.prefilled = self.cache.lengths[c.seq.slot] = c.end
        return logits

    def _rows(self, chunks: list[Chunk], seqs: list[Sequence], probe: Probe | None) -> torch.Tensor:
        """Prompt chunks and ticking sequences as rows of one pass through the decode kernels: each
        prompt token a row at its position (rows of one slot attend causally), then each sequence's
        last token; -> logits of the chunks that end their prompt, then of the sequences."""
        dev = self.device
        tokens = [t for c in chunks for t in c.seq.prompt_ids[c.start : c.end]] + [s.output_ids[-1] for s in seqs]
        pos = [p for c in chunks for p in range(c.start, c.end)] + [s.position for s in seqs]
        slots = [c.seq.slot for c in chunks for _ in range(c.start, c.end)] + [s.slot for s in seqs]
        ends = list(itertools.accumulate(c.end - c.start for c in chunks))
        n = ends[-1] if ends else 0
        rows = [e - 1 for c, e in zip(chunks, ends) if c.last] + list(range(n, n + len(seqs)))
        logits = tick(self.plan, self.cache, torch.tensor(tokens, device=dev), torch.tensor(pos, device=dev),
                      _slot_index(slots, dev), max(pos) + 1, None, probe, _attend_rows(self.attend, slots),
                      rows=torch.tensor(rows, device=dev, dtype=torch.long) if chunks else None)  # ticks alone: every row
        for c in chunks:
            c.seq.prefilled = self.cache.lengths[c.seq.slot] = c.end
        for s in seqs:
            self.cache.lengths[s.slot] = s.position + 1
        return logits

    def tick(self, seqs: list[Sequence], probe: Probe | None) -> torch.Tensor:
        """Feed each sequence (slot order) its last token; -> logits (len(seqs), V).

        Only these rows are computed, compiled or not. The compiled tick always takes the slots as
        an index tensor and a mask (a slice or no mask would be a graph of its own), so the
        number of rows and the attended length vary inside one dynamic-shape graph. With the decode
        kernels, the rows run as `_rows` runs them."""
        if self.attend is not None:
            return self._rows([], seqs, probe)
        dev = self.device
        tokens = [s.output_ids[-1] for s in seqs]
        pos = [s.position for s in seqs]
        slots = [s.slot for s in seqs]
        n_rows, L = len(seqs), max(pos) + 1
        slots_t = torch.tensor(slots, device=dev) if self.compiled else _slot_index(slots, dev)
        pos_t = torch.tensor(pos, device=dev)
        mask = None
        if n_rows > 1 or self.compiled:
            mask = (torch.arange(L, device=dev)[None, :] <= pos_t[:, None]).view(n_rows, 1, 1, L)
        logits = self._tick(self.plan, self.cache, torch.tensor(tokens, device=dev), pos_t, slots_t, L, mask, probe)
        for s in seqs:
            self.cache.lengths[s.slot] = s.position + 1
        return logits

    def memory(self) -> dict[str, int]:
        """Bytes decoding holds: the model's weights, the packed copies of its linears, the KV cache."""
        linears = [f for layer in self.plan.layers for f in (layer.c_attn, layer.attn_proj, layer.c_fc, layer.mlp_proj)]
        parts = [t for f in linears + [self.plan.head] if f.packed is not None
                 for t in (f.packed if isinstance(f.packed, tuple) else (f.packed,)) if t is not None]
        packed = sum(t.nbytes for t in {id(t): t for t in parts}.values())  # quantized: (panels, scales)
        weights = sum(p.nbytes for p in self.model.parameters())  # the tied head counted once
        return {"weights": weights, "packed copies": packed, "kv cache": self.cache.nbytes}

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Ascending slots -> maximal runs of consecutive slots: (first row, end row, first slot)."""
    runs = []
    for r, s in enumerate(slots):
        if runs and s == runs[-1][2] + r - runs[-1][0]:
            runs[-1] = (runs[-1][0], r + 1, runs[-1][2])
        else:
            runs.append((r, r + 1, s))
    return runs


def _slot_index(slots: list[int], device):
    """Index of the rows' slots into the cache's first dimension: a slice (a view) when consecutive."""
    runs = _runs(slots)
    if len(runs) == 1:
        return slice(runs[0][2], runs[0][2] + len(slots))
    return torch.tensor(slots, device=device)


def _attend_rows(attend, slots: list[int]):
    """The compiled attention for rows in (ascending) `slots`: the kernel takes rows as slots
    0..n-1 of the caches it is given, so each run of consecutive slots is one call on a view."""
    runs = _runs(slots)
    if len(runs) == 1:
        s0 = runs[0][2]
        return attend if s0 == 0 else lambda qkv, kc, vc, pos: attend(qkv, kc[s0:], vc[s0:], pos)
    return lambda qkv, kc, vc, pos: torch.cat([attend(qkv[a:b], kc[s:], vc[s:], pos[a:b]) for a, b, s in runs])

