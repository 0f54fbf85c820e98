"""Compressed models: swap GPT's modules for quantized / resized ones, and save and load them.

A compressed checkpoint is an ordinary llmclock checkpoint directory whose config.json carries a
`compression` object, e.g. {"scheme": "int4", "group": 64, "embeddings": "fp32", "mlp_hidden": 2304}:

  scheme      fp32 (pruning only), bf16, int8 or int4: every nn.Linear of the blocks and the head
  group       int4's group size along the input dimension
  embeddings  'fp32': the token table is stored apart from the (quantized) head, lookups are exact;
              'tied': the token table is the quantized head, stored once, lookups dequantize rows
  mlp_hidden  every block's MLP width after structured pruning (null: 4 * n_embd)
  heads       each block's attention head count after head pruning, a list of n_layer (null: n_head
              each); the head size stays n_embd / n_head, so c_attn is (3 * heads * hs, n_embd) and
              c_proj (n_embd, heads * hs), and the engine's KV cache holds that many heads per layer
  sparsity    the fraction of block weights set to zero by magnitude pruning (stored as zeros)

model.safetensors holds each quantized layer as `<name>.weight` (bf16, int8, or uint8 with two int4
per byte) and `<name>.weight_scale` (fp32), biases and norms in fp32. model.py is untouched: the
loader builds the plain GPT, resizes pruned MLPs, swaps in HeadPrunedAttention for pruned heads
and QuantLinear / QuantEmbedding modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CONFIG, WEIGHTS, load_weights, read_json, read_tensors, write_checkpoint
from ..config import ModelConfig
from ..errors import LLMClockError
from .quant import SCHEMES, QuantLinear, check_group, dequantize

EMBEDDINGS = ("fp32", "tied")


class QuantEmbedding(nn.Module):
    """Token lookups from a quantized head (tied embeddings): gathers rows and dequantizes only them.

    `weight` (what the engine's decode plan reads) dequantizes the whole table once, on first use.
    """

    def __init__(self, head: QuantLinear):
        super().__init__()
        self._head = [head]  # a list, so the head's buffers are not registered twice
        self._weight: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is None:
            self._weight = self._head[0].dequantized()
        return self._weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self._head[0]
        flat = idx.reshape(-1)
        s = h.weight_scale[flat] if h.weight_scale is not None else None
        return dequantize(h.weight[flat], s, h.scheme).view(*idx.shape, h.in_features)


class HeadPrunedAttention(nn.Module):
    """Causal self-attention over `n_head` heads of `head_size` in an `n_embd`-wide residual stream,
    where n_head * head_size may be less than n_embd (heads removed by structured pruning). The same
    parts and names as model.CausalSelfAttention (c_attn, c_proj, resid_dropout), the same forward."""

    def __init__(self, n_embd: int, n_head: int, head_size: int, *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.n_embd, self.n_head, self.head_size = n_embd, n_head, head_size
        width = n_head * head_size
        self.c_attn = nn.Linear(n_embd, 3 * width, bias=bias)
        self.c_proj = nn.Linear(width, n_embd, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.size()
        nh, hs = self.n_head, self.head_size
        dropout_p = self.attn_dropout if self.training else 0.0
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in self.c_attn(x).split(nh * hs, dim=2))
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k, v = kv.update(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, nh * hs)))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, head_size={self.head_size}"


def head_counts(model) -> list[int]:
    """Each block's attention head count."""
    return [b.attn.n_head for b in model.transformer.h]


def resize_attention(model, heads: list[int]) -> None:
    """Give block i an attention of heads[i] heads (weights uninitialised: a loader or pruner fills them)."""
    cfg = model.config
    for b, nh in zip(model.transformer.h, heads):
        dev = b.attn.c_attn.weight.device
        with torch.device(dev):
            b.attn = HeadPrunedAttention(cfg.n_embd, nh, cfg.head_size, bias=cfg.bias, dropout=cfg.dropout)


def blocks_linears(model) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer in the blocks."""
    out = []
    for b in model.transformer.h:
        out += [(b.attn, "c_attn"), (b.attn, "c_proj"), (b.mlp, "c_fc"), (b.mlp, "c_proj")]
    return out


def resize_mlp(model, hidden: int) -> None:
    """Give every block an MLP of width `hidden` (weights uninitialised: a loader or pruner fills them)."""
    C, bias = model.config.n_embd, model.config.bias
    for b in model.transformer.h:
        dev = b.mlp.c_fc.weight.device
        b.mlp.c_fc = nn.Linear(C, hidden, bias=bias, device=dev)
        b.mlp.c_proj = nn.Linear(hidden, C, bias=bias, device=dev)


def quantize_model(model, scheme: str, group: int = 64, embeddings: str = "fp32"):
    """Swap every block linear and the head for QuantLinear in `scheme` (in place; returns the model)."""
    if scheme not in SCHEMES:
        raise LLMClockError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if embeddings not in EMBEDDINGS:
        raise LLMClockError(f"embeddings must be one of {EMBEDDINGS}, got {embeddings!r}")
    if scheme == "int4":
        for parent, name in blocks_linears(model):
            check_group(getattr(parent, name).in_features, group)
    for parent, name in blocks_linears(model):
        lin = getattr(parent, name)
        setattr(parent, name, QuantLinear.from_linear(lin.weight, lin.bias, scheme, group))
    tr = model.transformer
    model.lm_head = QuantLinear.from_linear(model.lm_head.weight, None, scheme, group)
    if embeddings == "tied":
        tr.wte = QuantEmbedding(model.lm_head)
    else:  # untie: the table stays fp32 for lookups
        tr.wte.weight = nn.Parameter(tr.wte.weight.detach().clone(), requires_grad=False)
    return model


def compression_of(model) -> dict | None:
    return getattr(model, "compression", None)


def state_to_save(model) -> dict[str, torch.Tensor]:
    comp = compression_of(model) or {}
    skip = {"transformer.wte.weight"} if comp.get("embeddings") == "tied" else set()
    if comp.get("scheme", "fp32") == "fp32":
        skip.add("lm_head.weight")  # tied to wte as in a plain checkpoint
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}


def save_compressed(dest: Path, model, tokenizer) -> Path:
    """Write a compressed checkpoint to the new directory `dest` (atomically, with content hashes)."""
    write_checkpoint(dest, model, tokenizer, state=state_to_save(model),
                     config_extra={"compression": compression_of(model)})
    return Path(dest)


def check_compression(comp, source, config: ModelConfig) -> dict:
    if not isinstance(comp, dict):
        raise LLMClockError(f"{source}: 'compression' must be an object")
    scheme = comp.get("scheme")
    if scheme not in ("fp32",) + SCHEMES:
        raise LLMClockError(f"{source}: unknown compression scheme {scheme!r}")
    if comp.get("embeddings", "fp32") not in EMBEDDINGS:
        raise LLMClockError(f"{source}: unknown embeddings mode {comp.get('embeddings')!r}")
    hidden = comp.get("mlp_hidden")
    if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
        raise LLMClockError(f"{source}: mlp_hidden must be a positive integer, got {hidden!r}")
    heads = comp.get("heads")
    if heads is not None and (not isinstance(heads, list) or len(heads) != config.n_layer
                              or not all(isinstance(h, int) and 1 <= h <= config.n_head for h in heads)):
        raise LLMClockError(f"{source}: heads must be a list of {config.n_layer} head counts in 1..{config.n_head}, "
                            f"got {heads!r}")
    return comp


def build_compressed(config: ModelConfig, comp: dict):
    """The empty (meta-device) module tree a compressed checkpoint with `comp` loads into."""
    from ..model import GPT

    with torch.device("meta"):
        model = GPT(config)
        if comp.get("mlp_hidden"):
            resize_mlp(model, comp["mlp_hidden"])
        if comp.get("heads"):
            resize_attention(model, comp["heads"])
        scheme = comp["scheme"]
        if scheme != "fp32":
            group = comp.get("group") or 64
            for parent, name in blocks_linears(model):
                lin = getattr(parent, name)
                setattr(parent, name, QuantLinear(lin.in_features, lin.out_features, scheme, group, lin.bias is not None))
            model.lm_head = QuantLinear(config.n_embd, config.vocab_size, scheme, group, bias=False)
            if comp.get("embeddings") == "tied":
                model.transformer.wte = QuantEmbedding(model.lm_head)
    model.compression = comp
    return model


def load_compressed(ckpt: Path, config: ModelConfig, comp: dict, device="cpu"):
    """The model of a compressed checkpoint, in eval mode, with every tensor checked against the config."""
    path = Path(ckpt) / WEIGHTS
    comp = check_compression(comp, Path(ckpt) / CONFIG, config)
    tensors = read_tensors(path)
    model = build_compressed(config, comp)
    model = model.to_empty(device="cpu")
    load_weights(model, tensors, path, expected=state_to_save(model))
    if comp["scheme"] == "fp32":
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(device).eval()


def dequantized_state(model, source, *, allow: bool) -> dict[str, torch.Tensor]:
    """A plain GPT state dict (fp32, tied head left out) for export; a quantized model only if `allow`.

    With embeddings='fp32' the exported head is the exact token table (GPT-2 ties the two)."""
    from ..checkpoint import model_state

    comp = compression_of(model)
    if comp is not None and comp.get("heads"):
        raise LLMClockError(f"{source} has attention heads pruned per layer ({comp['heads']}), which a GPT-2 "
                            "checkpoint (one head count for every layer) cannot hold")
    if comp is None or comp["scheme"] == "fp32":
        return model_state(model)
    if not allow:
        raise LLMClockError(f"{source} is quantized ({comp['scheme']}), which GPT-2 checkpoints cannot hold; "
                            "pass --dequantize to export its weights as fp32")
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and name != "lm_head":
            state[f"{name}.weight"] = mod.dequantized()
            if mod.bias is not None:
                state[f"{name}.bias"] = mod.bias
        elif isinstance(mod, (nn.LayerNorm, nn.Embedding)):
            state.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
    if comp.get("embeddings") == "tied":
        state["transformer.wte.weight"] = model.lm_head.dequantized()
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def read_compression(ckpt: Path) -> dict | None:
    """The checkpoint's `compression` object, or None for a plain checkpoint."""
    return read_json(Path(ckpt) / CONFIG, missing="missing (not an llmclock checkpoint?)").get("compression")
