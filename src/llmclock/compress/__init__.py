"""Compression for deployment: quantize (bf16, int8, int4) and prune, then measure what it cost.

    from llmclock.compress import CompressConfig, compress
    compress("runs/demo/ckpt", "runs/demo-int4", CompressConfig(scheme="int4", group=64, prune_mlp=0.25),
             data="runs/.cache/data")

The steps run in this order on a fp32 model: structured attention-head pruning, then structured MLP
pruning (each with importance measured on the calibration split), magnitude pruning, the optional
recovery fine-tune, quantization; then the checkpoint is written atomically (see compress/model.py
for its layout). Nothing here touches model.py: layers are rewritten or swapped (gpt-fast's
quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LLMClockError
from .quant import GROUPS, SCHEMES, check_group

SCHEMES_ALL = ("fp32",) + SCHEMES
"""Every --scheme: fp32 is pruning without quantization."""
from .prune import SCOPES, check_fraction, kept_width


@dataclass
class CompressConfig:
    """What `compress` does to a checkpoint."""

    scheme: str = "int8"
    """fp32 (pruning only), bf16, int8 (per output channel) or int4 (per group, symmetric)."""
    group: int = 64
    """int4 group size along each layer's input (32, 64 or 128)."""
    embeddings: str = "fp32"
    """'fp32': keep the token table exact, apart from the quantized head; 'tied': quantize it too (one tensor)."""
    sparsity: float = 0.0
    """Unstructured magnitude pruning of the block linears, in [0, 1)."""
    sparsity_scope: str = "layer"
    """'layer': each layer to the target sparsity; 'global': one threshold over all block linears."""
    prune_mlp: float = 0.0
    """Structured pruning: fraction of every MLP's hidden neurons removed, in [0, 1)."""
    prune_heads: float = 0.0
    """Structured pruning: fraction of all attention heads removed (least important over all layers,
    at least one kept per layer), in [0, 1)."""
    calib_batches: int = 8
    """Calibration batches (8 windows each) from the data's validation split, for neuron and head importance."""
    recover_steps: int = 0
    """Recovery fine-tune steps on the train split after pruning (0: none)."""
    recover_lr: float = 1e-4
    """Learning rate of the recovery fine-tune."""
    block_size: int = 256
    """Window length for calibration, fine-tune and evaluation (capped at the model's context)."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES_ALL:
            raise LLMClockError(f"unknown scheme {self.scheme!r}; choose one of fp32, {', '.join(SCHEMES)}")
        if self.group not in GROUPS:
            raise LLMClockError(f"group size must be one of {', '.join(map(str, GROUPS))}, got {self.group}")
        if self.embeddings not in ("fp32", "tied"):
            raise LLMClockError(f"embeddings must be 'fp32' or 'tied', got {self.embeddings!r}")
        check_fraction(self.sparsity, "sparsity")
        check_fraction(self.prune_mlp, "MLP pruning fraction")
        check_fraction(self.prune_heads, "head pruning fraction")
        if self.sparsity_scope not in SCOPES:
            raise LLMClockError(f"sparsity scope must be one of {SCOPES}, got {self.sparsity_scope!r}")
        for name in ("calib_batches", "block_size"):
            if getattr(self, name) < 1:
                raise LLMClockError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.recover_steps < 0 or self.recover_lr <= 0:
            raise LLMClockError("recover_steps must be >= 0 and recover_lr > 0")
        if self.scheme == "fp32" and not (self.sparsity or self.prune_mlp or self.prune_heads):
            raise LLMClockError("scheme fp32 with no pruning would change nothing; give --prune or another scheme")

    @property
    def needs_data(self) -> bool:
        return bool(self.prune_mlp or self.prune_heads or self.recover_steps)


PRUNE_KINDS = {"mlp": ("prune_mlp", None), "heads": ("prune_heads", None), "magnitude": ("sparsity", "layer"),
               "magnitude-global": ("sparsity", "global")}


def parse_prune(specs: list[str]) -> dict:
    """`--prune` specs ('mlp:0.25', 'heads:0.25', 'magnitude:0.5', 'magnitude-global:0.5'; '=' also
    separates, as in heads=0.25) -> CompressConfig fields."""
    out: dict = {}
    for spec in specs:
        kind, _, value = spec.replace("=", ":", 1).partition(":")
        if kind not in PRUNE_KINDS:
            raise LLMClockError(f"--prune {spec!r}: kind must be one of {', '.join(PRUNE_KINDS)} (as in mlp:0.25)")
        try:
            fraction = float(value)
        except ValueError:
            raise LLMClockError(f"--prune {spec!r}: expected KIND:FRACTION, e.g. {kind}:0.25") from None
        field, scope = PRUNE_KINDS[kind]
        if field in out:
            raise LLMClockError(f"--prune {spec!r}: {field.replace('_', ' ')} given twice")
        out[field] = fraction
        if scope:
            out["sparsity_scope"] = scope
    return out


def check_device(scheme: str, device: str) -> None:
    """Refuse a scheme the device cannot run."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LLMClockError(f"device {device!r}: compressed models run on cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLMClockError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise LLMClockError(f"device {device!r}: compressed models run on cpu or cuda")
    if scheme == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LLMClockError(f"device {device!r} has no bfloat16 support; use int8 or int4")


def compress(ckpt, out, cfg: CompressConfig, *, data=None, progress=None) -> dict:
    """Compress checkpoint `ckpt` into the new checkpoint directory `out`; returns what was done.

    `progress(msg)` (optional) hears each step. `data` (a prepared data directory) is needed for
    structured pruning (calibration: its val split) and the recovery fine-tune (its train split).
    """
    import torch

    from ..checkpoint import load_checkpoint
    from .model import head_counts, quantize_model, read_compression, save_compressed
    from .prune import head_importance, kept_heads, magnitude_prune, mlp_importance, prune_heads, prune_mlp, recover

    say = progress or (lambda msg: None)
    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        raise LLMClockError(f"{out} already exists; refusing to overwrite it")
    if read_compression(ckpt) is not None:
        raise LLMClockError(f"{ckpt} is already compressed ({read_compression(ckpt).get('scheme')}); "
                            "compress the original checkpoint instead")
    model, tok = load_checkpoint(ckpt)
    C = model.config.n_embd
    hidden = model.transformer.h[0].mlp.c_fc.out_features
    width = kept_width(hidden, cfg.prune_mlp) if cfg.prune_mlp else hidden
    if cfg.scheme == "int4":
        for w in (C, width):
            check_group(w, cfg.group)
    if cfg.prune_heads:
        kept_heads(model.config.n_layer, model.config.n_head, cfg.prune_heads)  # refuse a layer left headless now
    if cfg.needs_data and data is None:
        raise LLMClockError("structured pruning and the recovery fine-tune need --data (a prepared data directory)")
    tokens = None
    if data is not None:
        from ..data import TokenData

        tokens = TokenData(data)
        if tokens.vocab_size > model.config.vocab_size:
            raise LLMClockError(f"data has {tokens.vocab_size} token ids but the model only {model.config.vocab_size}")
    block = min(cfg.block_size, model.config.block_size)
    comp: dict = {"scheme": cfg.scheme, "group": cfg.group if cfg.scheme == "int4" else None,
                  "embeddings": cfg.embeddings if cfg.scheme != "fp32" else "fp32", "mlp_hidden": None,
                  "heads": None, "sparsity": None, "source": str(ckpt)}
    calib = None
    if cfg.prune_mlp or cfg.prune_heads:
        from ..data import eval_batches

        x, _ = eval_batches(tokens.tokens("val"), 8, block, cfg.calib_batches, seed=1, split="val")
        calib = [x[i : i + 8] for i in range(0, len(x), 8)]
    if cfg.prune_heads:
        say(f"measuring attention head importance on {cfg.calib_batches} calibration batches")
        comp["heads"] = prune_heads(model, cfg.prune_heads, head_importance(model, calib))
        say(f"pruned attention heads from {model.config.n_head} per layer to {comp['heads']}")
        if cfg.scheme == "int4":
            for nh in set(head_counts(model)):
                check_group(nh * model.config.head_size, cfg.group)
    if cfg.prune_mlp:
        say(f"measuring MLP neuron importance on {cfg.calib_batches} calibration batches")
        scores = mlp_importance(model, calib)
        comp["mlp_hidden"] = prune_mlp(model, cfg.prune_mlp, scores)
        say(f"pruned every MLP from {hidden} to {comp['mlp_hidden']} neurons")
    if cfg.sparsity:
        comp["sparsity"] = round(magnitude_prune(model, cfg.sparsity, cfg.sparsity_scope), 6)
        say(f"magnitude pruning ({cfg.sparsity_scope}): {100 * comp['sparsity']:.1f}% of block weights are zero")
    if cfg.recover_steps:
        say(f"recovery fine-tune: {cfg.recover_steps} steps")
        with torch.enable_grad():
            losses = recover(model, tokens.tokens("train"), steps=cfg.recover_steps, batch_size=8, block_size=block,
                             lr=cfg.recover_lr)
        comp["recover"] = {"steps": cfg.recover_steps, "lr": cfg.recover_lr, "final_loss": round(losses[-1], 4)}
        say(f"recovery fine-tune: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if cfg.scheme != "fp32":
        quantize_model(model, cfg.scheme, cfg.group, cfg.embeddings)
        say(f"quantized every block linear and the head to {cfg.scheme}")
    model.compression = comp
    save_compressed(out, model, tok)
    return comp

