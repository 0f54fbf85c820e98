"""Pruning: magnitude (unstructured, stored as zeros), MLP neurons and attention heads (structured,
really smaller).

Unstructured: the smallest-magnitude weights of the blocks' linear layers are set to zero, to a
target sparsity per layer or over all of them at once (global). They are stored as zeros in the
dense layout: the kernels stream dense panels, so this buys no speed or memory by itself; it buys
compressibility of the file (zeros gzip well) and survives int8 / int4 exactly (symmetric
quantization maps 0 to 0). The head and the embeddings are left dense.

Structured: each block's MLP loses the same fraction of its hidden neurons, the least important
ones on a calibration split, where a neuron's importance is mean |GELU output| over the calibration
tokens times the L2 norm of its column of c_proj (how much it moves the residual stream). c_fc
loses those rows and c_proj those columns, so every MLP matrix really shrinks and a decode cycle
reads fewer bytes.

Attention heads: a head's importance is the mean L2 norm, over the calibration tokens, of what it
adds to the residual stream (its slice of the attention output through its columns of c_proj).
A fraction of all the model's heads is removed at once, the least important over every layer
(heads of different layers write to the same residual stream, so their scores compare), except
that each layer keeps its own best head; so layers end with different head counts. c_attn loses
the removed heads' q, k and v rows and c_proj their columns (compress.model.HeadPrunedAttention),
and the engine's KV cache holds only the kept heads. An optional short fine-tune (AdamW on the
train split) recovers some quality.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMClockError
from .model import HeadPrunedAttention, blocks_linears

SCOPES = ("layer", "global")
MULTIPLE = 16  # kept MLP widths are a multiple of this (whole kernel panels)


def check_fraction(value: float, what: str) -> float:
    if not 0.0 <= value < 1.0:
        raise LLMClockError(f"{what} must be in [0, 1), got {value}")
    return value


@torch.no_grad()
def magnitude_prune(model, sparsity: float, scope: str = "layer") -> float:
    """Zero the smallest |w| of every block linear (per layer, or one global threshold); returns the
    fraction of block weights that are now zero."""
    check_fraction(sparsity, "sparsity")
    if scope not in SCOPES:
        raise LLMClockError(f"pruning scope must be one of {SCOPES}, got {scope!r}")
    weights = [getattr(p, n).weight for p, n in blocks_linears(model)]
    if sparsity > 0:
        if scope == "global":
            flat = torch.cat([w.abs().flatten() for w in weights])
            k = int(sparsity * flat.numel())
            thresholds = [flat.kthvalue(k).values] * len(weights) if k else [None] * len(weights)
        else:
            thresholds = []
            for w in weights:
                k = int(sparsity * w.numel())
                thresholds.append(w.abs().flatten().kthvalue(k).values if k else None)
        for w, t in zip(weights, thresholds):
            if t is not None:
                w.masked_fill_(w.abs() <= t, 0.0)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def kept_width(hidden: int, fraction: float) -> int:
    """MLP width after pruning `fraction` of `hidden` neurons (rounded to whole panels, at least one)."""
    check_fraction(fraction, "MLP pruning fraction")
    keep = int(round(hidden * (1 - fraction) / MULTIPLE)) * MULTIPLE
    return min(hidden, max(MULTIPLE, keep))


def _calibrate(model, batches, hooks: list[tuple[nn.Module, object]]) -> None:
    """Run the calibration `batches` through `model` with each (module, forward pre-hook) attached."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        for x in batches:
            model(torch.as_tensor(x))
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mlp_importance(model, batches) -> list[torch.Tensor]:
    """Per block, each hidden neuron's importance on `batches` of (B, T) token ids (see module doc)."""
    sums = [None] * len(model.transformer.h)
    count = [0]

    def hook(i):
        def pre(mod, args):
            a = args[0].detach().abs().flatten(0, -2).float()  # (B*T, H)
            sums[i] = a.sum(0) if sums[i] is None else sums[i] + a.sum(0)
            if i == 0:
                count[0] += a.size(0)
        return pre

    _calibrate(model, batches, [(b.mlp.c_proj, hook(i)) for i, b in enumerate(model.transformer.h)])
    return [s / count[0] * b.mlp.c_proj.weight.norm(dim=0) for s, b in zip(sums, model.transformer.h)]


@torch.no_grad()
def prune_mlp(model, fraction: float, importance: list[torch.Tensor]) -> int:
    """Keep each block's most important neurons (in their original order); returns the new width."""
    hidden = model.transformer.h[0].mlp.c_fc.out_features
    keep = kept_width(hidden, fraction)
    for b, score in zip(model.transformer.h, importance):
        idx = score.topk(keep).indices.sort().values
        fc, proj = b.mlp.c_fc, b.mlp.c_proj
        new_fc = nn.Linear(fc.in_features, keep, bias=fc.bias is not None)
        new_proj = nn.Linear(keep, proj.out_features, bias=proj.bias is not None)
        new_fc.weight.copy_(fc.weight[idx])
        new_proj.weight.copy_(proj.weight[:, idx])
        if fc.bias is not None:
            new_fc.bias.copy_(fc.bias[idx])
            new_proj.bias.copy_(proj.bias)
        b.mlp.c_fc, b.mlp.c_proj = new_fc, new_proj
    return keep


def recover(model, tokens: np.ndarray, *, steps: int, batch_size: int, block_size: int, lr: float = 1e-4,
            seed: int = 0, progress=None) -> list[float]:
    """A short fine-tune (AdamW, constant lr) after pruning; returns the losses. Zeros made by
    magnitude pruning stay zero (their gradients are masked)."""
    from ..data import get_batch

    params = [p for p in model.parameters() if p.requires_grad]
    masks = {p: (p != 0) for p, _ in ((getattr(q, n).weight, None) for q, n in blocks_linears(model))}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        x, y = get_batch(tokens, batch_size, block_size, seed=seed, step=step, split="train")
        logits, _ = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in masks.items():
            if p.grad is not None and not m.all():
                p.grad.mul_(m)
        opt.step()
        for p, m in masks.items():
            if not m.all():
                p.data.mul_(m)  # AdamW's update can move a masked weight through its moments
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, loss.item())
    model.eval()
    return losses


def kept_heads(n_layer: int, n_head: int, fraction: float) -> int:
    """How many of the model's n_layer * n_head heads stay after pruning `fraction` of them (rounded);
    an error when that would leave some layer none (each layer keeps at least one)."""
    check_fraction(fraction, "head pruning fraction")
    total = n_layer * n_head
    keep = int(round(total * (1 - fraction)))
    if keep < n_layer:
        raise LLMClockError(f"pruning {fraction} of the {total} attention heads would keep {keep}, fewer than one "
                            f"per layer ({n_layer} layers): it would remove all heads of a layer")
    return keep


@torch.no_grad()
def head_importance(model, batches) -> list[torch.Tensor]:
    """Per block, each head's importance on `batches` of (B, T) token ids: the mean over tokens of
    the L2 norm of its contribution to the residual stream, c_proj[:, head] @ y[head]."""
    sums = [None] * len(model.transformer.h)
    count = [0]

    def hook(i, attn):
        def pre(mod, args):
            nh = attn.n_head
            y = args[0].detach().float().flatten(0, -2)  # (N, nh * hs)
            w = mod.weight.detach().float()  # (C, nh * hs)
            hs = y.size(1) // nh
            per_head = torch.stack([(y[:, h * hs:(h + 1) * hs] @ w[:, h * hs:(h + 1) * hs].T).norm(dim=1)
                                    for h in range(nh)], dim=1)  # (N, nh)
            sums[i] = per_head.sum(0) if sums[i] is None else sums[i] + per_head.sum(0)
            if i == 0:
                count[0] += y.size(0)
        return pre

    _calibrate(model, batches, [(b.attn.c_proj, hook(i, b.attn)) for i, b in enumerate(model.transformer.h)])
    return [s / count[0] for s in sums]


def choose_heads(importance: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """The heads to keep per layer (sorted indices): every layer's best one, then the most important
    of the rest over all layers, `keep` in all."""
    chosen = [{int(s.argmax())} for s in importance]
    rest = sorted(((float(s[h]), i, h) for i, s in enumerate(importance) for h in range(s.numel())
                   if h not in chosen[i]), key=lambda t: (-t[0], t[1], t[2]))
    for _, i, h in rest[: keep - len(importance)]:
        chosen[i].add(h)
    return [torch.tensor(sorted(c)) for c in chosen]


@torch.no_grad()
def prune_heads(model, fraction: float, importance: list[torch.Tensor]) -> list[int]:
    """Remove `fraction` of all attention heads, the least important (see module doc), from every
    block's c_attn (rows of q, k, v) and c_proj (columns); returns the head counts per layer."""
    cfg = model.config
    blocks = model.transformer.h
    n_head = blocks[0].attn.n_head
    keep = choose_heads(importance, kept_heads(len(blocks), n_head, fraction))
    C, hs = cfg.n_embd, cfg.head_size
    for b, idx in zip(blocks, keep):
        a = b.attn
        cols = (idx[:, None] * hs + torch.arange(hs)).flatten()  # the kept heads' channels in q (or k, v)
        width = a.c_attn.out_features // 3
        rows = torch.cat([cols, cols + width, cols + 2 * width])
        new = HeadPrunedAttention(C, len(idx), hs, bias=a.c_attn.bias is not None, dropout=cfg.dropout)
        new.to(a.c_attn.weight.device)
        new.c_attn.weight.copy_(a.c_attn.weight[rows])
        new.c_proj.weight.copy_(a.c_proj.weight[:, cols])
        if a.c_attn.bias is not None:
            new.c_attn.bias.copy_(a.c_attn.bias[rows])
            new.c_proj.bias.copy_(a.c_proj.bias)
        new.train(a.training)
        b.attn = new
    return [len(i) for i in keep]
