"""The model runner: the weights laid out for decoding, the KV cache, and the two forwards a cycle runs.

    state (KV cache) + one token per slot  --tick-->  next state + one token per slot

`prefill` and `tick` are small top-level functions (so `tick` can be compiled); `ModelRunner`
owns the cache and the decode plan and turns the scheduler's sequences into their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .kernels import make_attend, make_linear
from .kv_cache import KVCache
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
    """One block for `tick`: LayerNorms as F.layer_norm's (weight, bias, eps), linears as kernels.make_linear's."""

    ln_1: tuple[torch.Tensor, torch.Tensor | None, float]
    c_attn: Linear
    attn_proj: Linear
    ln_2: tuple[torch.Tensor, torch.Tensor | None, float]
    c_fc: Linear
    mlp_proj: Linear


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
        lin = {m: make_linear(m.weight, m.bias, packed=packed, approximate=cfg.gelu_approximate)
               for m in model.modules() if isinstance(m, torch.nn.Linear)}
        self.n_head, self.shape = cfg.n_head, (cfg.n_embd,)
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.layers = [
            LayerPlan((b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), lin[b.attn.c_attn], lin[b.attn.c_proj],
                      (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps), lin[b.mlp.c_fc], lin[b.mlp.c_proj])
            for b in tr.h
        ]
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        self.head = lin[model.lm_head]


def tick(plan: DecodePlan, cache: KVCache, tokens, pos, L: int, mask, probe: Probe | None = None, attend=None):
    """One decode cycle for slots 0..n-1: tokens (n,), positions (n,) -> next-token logits (n, V).

    Writes each slot's key/value at its own position, then attends over its history: with the
    compiled `attend` (kernels.make_attend) each row over exactly its own positions; otherwise
    by index writes and SDPA over the first L positions (mask: (n, 1, 1, L), or None when every
    row may see all L).
    """
    n, nh, shape = tokens.size(0), plan.n_head, plan.shape
    C = shape[0]
    x = F.embedding(tokens, plan.wte) + F.embedding(pos, plan.wpe)  # (n, C)
    rows = torch.arange(n, device=x.device) if attend is None else None  # slot index of each row, for cache writes
    if probe is not None:
        probe.mark("embed")
    for i, layer in enumerate(plan.layers):
        qkv = layer.c_attn(F.layer_norm(x, shape, *layer.ln_1))  # (n, 3C)
        kc, vc = cache.k[i], cache.v[i]
        if attend is not None:
            y = attend(qkv, kc, vc, pos)  # (n, C)
        else:
            q, k, v = qkv.view(n, 3, nh, C // nh).unbind(1)  # 3 x (n, nh, hs)
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            y = F.scaled_dot_product_attention(q.unsqueeze(2), kc[:n, :, :L], vc[:n, :, :L], attn_mask=mask)  # (n, nh, 1, hs)
        layer.attn_proj(y.view(n, C), out=x, accumulate=True)  # x += c_proj(y), fused
        layer.mlp_proj(layer.c_fc(F.layer_norm(x, shape, *layer.ln_2), gelu=True), out=x, accumulate=True)  # x += mlp(ln_2(x))
        if probe is not None:
            probe.residual(i, x)
            probe.mark(f"block{i}")
    logits = plan.head(F.layer_norm(x, shape, *plan.ln_f))  # (n, V)
    if probe is not None:
        probe.mark("head")
    return logits


def prefill(model, cache: KVCache, slot: int, ids: torch.Tensor, probe: Probe | None = None):
    """Run a prompt (1, T) through the model in one forward, filling `slot`; -> last logits (1, V)."""
    T = ids.size(1)
    views = cache.prefill_views(slot, 0, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()  # (T, T) causal
    x = model.embed(ids, torch.arange(T, device=ids.device))
    if probe is not None:
        probe.mark("embed")
    for i, block in enumerate(model.transformer.h):
        x = block(x, views[i], mask)
        if probe is not None:
            probe.residual(i, x[:, -1])
            probe.mark(f"block{i}")
    logits = model.head(x[:, -1])  # (1, V)
    if probe is not None:
        probe.mark("head")
    return logits


class ModelRunner:
    """The cache and the decode plan of one engine; runs the forwards the scheduler asks for."""

    def __init__(self, model, *, slots: int, max_len: int, compile: bool = False):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.max_len, self.device = model, max_len, p.device
        self.cache = KVCache(cfg.n_layer, slots, cfg.n_head, max_len, cfg.head_size, dtype=p.dtype, device=p.device)
        self.plan = DecodePlan(model, packed=not compile)
        self.attend = None if compile else make_attend(self.cache.k[0])
        self.compiled = compile
        self._tick = torch.compile(tick, dynamic=False) if compile else tick

    def prefill(self, seqs: list[Sequence], probe: Probe | None) -> torch.Tensor:
        """Fill each sequence's slot with its prompt; -> the next-token logits (len(seqs), V)."""
        logits = torch.cat([
            prefill(self.model, self.cache, s.slot, torch.tensor([s.prompt_ids], device=self.device), probe)
            for s in seqs
        ])
        for s in seqs:
            self.cache.lengths[s.slot] = len(s.prompt_ids)
        return logits

    def tick(self, seqs: list[Sequence], probe: Probe | None) -> torch.Tensor:
        """Feed each running sequence its last token (seqs in slot order); -> logits (len(seqs), V)."""
        n = seqs[-1].slot + 1
        tokens = [0] * n
        pos = [0] * n
        for s in seqs:
            tokens[s.slot], pos[s.slot] = s.output_ids[-1], s.position
        if self.compiled:
            L, n_rows = self.max_len, self.cache.slots  # fixed shapes: one compiled graph
            tokens += [0] * (n_rows - n)
            pos += [0] * (n_rows - n)
        else:
            L, n_rows = max(pos) + 1, n
        pos_t = torch.tensor(pos, device=self.device)
        mask = None
        if self.attend is None and (n_rows > 1 or self.compiled):
            mask = (torch.arange(L, device=self.device)[None, :] <= pos_t[:, None]).view(n_rows, 1, 1, L)
        logits = self._tick(self.plan, self.cache, torch.tensor(tokens, device=self.device), pos_t, L, mask, probe,
                            self.attend)
        for s in seqs:
            self.cache.lengths[s.slot] = s.position + 1
        return logits[[s.slot for s in seqs]] if n_rows != len(seqs) else logits

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
