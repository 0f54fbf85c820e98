"""Parameter-efficient fine-tuning: LoRA and AdaLoRA through `peft`, and the bottleneck Adapter of
Houlsby et al. (2019), which peft does not have, as a small module of ours.

An adapter directory holds only what was trained:

    ADAPTER/
      adapter.safetensors   the adapter's tensors, named as in the adapted model
      adapter_config.json   method and settings, the base model's shape and weights hash
      tokenizer.json, chat_template.json (when fine-tuned on chat)

It is refused on any base whose weights hash differs. LoRA and AdaLoRA fold into plain weights
(`merge`), giving the same logits; a bottleneck adapter has a non-linearity and cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LLMClockError

METHODS = ("full", "lora", "adalora", "adapter")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ADAPTER_FORMAT = "llmclock-adapter-v1"


@dataclass
class AdapterConfig:
    """What to train on top of a base model, and how."""

    method: str = "lora"
    """full (every weight), lora, adalora (through peft) or adapter (Houlsby bottleneck)."""
    r: int = 8
    """LoRA rank; AdaLoRA's average target rank."""
    alpha: float = 16.0
    """LoRA scale numerator: updates are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    """Names of the Linear layers LoRA/AdaLoRA adapt (matched as suffixes: c_attn, attn.c_proj, ...)."""
    init_r: int = 12
    """AdaLoRA: every adapted layer's rank at the start, before the budget prunes it."""
    tinit: int = 0
    """AdaLoRA: steps of warm-up before ranks are pruned."""
    tfinal: int = 0
    """AdaLoRA: final steps with the rank pattern fixed."""
    delta_t: int = 10
    """AdaLoRA: steps between two budget allocations."""
    total_step: int = 0
    """AdaLoRA: the run's length in steps (set by finetune)."""
    bottleneck: int = 32
    """Adapter: bottleneck width of each adapter (down-projection size)."""
    adapter_targets: list[str] = field(default_factory=lambda: ["attn.c_proj", "mlp.c_proj"])
    """Adapter: the Linear layers followed by an adapter (Houlsby: after attention's and the MLP's output)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LLMClockError(f"adapter: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("r", "init_r", "bottleneck", "delta_t"):
            if getattr(self, name) < 1:
                raise LLMClockError(f"adapter: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LLMClockError(f"adapter: dropout must be in [0, 1), got {self.dropout}")
        if self.method == "adalora" and self.init_r < self.r:
            raise LLMClockError(f"adapter: AdaLoRA's init_r ({self.init_r}) must be >= its target r ({self.r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- Houlsby bottleneck adapter


class Bottleneck(nn.Module):
    """h + up(gelu(down(h))): down-project, non-linearity, up-project, skip. `up` starts at zero,
    so an untrained adapter is the identity (Houlsby et al. start near it)."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class AdaptedLinear(nn.Module):
    """A Linear followed by a bottleneck adapter. Deliberately not an nn.Linear and with no
    `weight`: code that reads a Linear's weights directly (fused kernels, the engine's packed
    GEMV) cannot take it for a plain layer and skip the adapter."""

    def __init__(self, base: nn.Linear, bottleneck: int):
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(base.out_features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def _add_bottlenecks(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in cfg.adapter_targets):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, AdaptedLinear(module, cfg.bottleneck))
            found += 1
    if not found:
        raise LLMClockError(f"adapter: no Linear layer matches {cfg.adapter_targets}")
    for name, p in model.named_parameters():  # Houlsby et al. also train the layer norms
        if ".adapter." in name or ".ln_" in name:
            p.requires_grad_(True)
    return model


# ---------------------------------------------------------------- applying, saving, loading


def _peft_config(cfg: AdapterConfig):
    try:
        from peft import AdaLoraConfig, LoraConfig
    except ImportError as e:
        raise LLMClockError(f"LoRA and AdaLoRA need peft: pip install 'llmclock[finetune]' ({e})") from None
    targets = list(cfg.targets)
    if cfg.method == "lora":
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    if cfg.total_step < 1:
        raise LLMClockError("adapter: AdaLoRA needs total_step (the run's length in steps)")
    tfinal = cfg.tfinal or max(1, cfg.total_step // 5)
    if cfg.tinit + tfinal >= cfg.total_step:
        raise LLMClockError(
            f"adapter: AdaLoRA's tinit ({cfg.tinit}) + tfinal ({tfinal}) must be below the run's steps ({cfg.total_step})"
        )
    return AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                         target_modules=targets, tinit=cfg.tinit, tfinal=tfinal, deltaT=cfg.delta_t,
                         total_step=cfg.total_step)


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """The model to train: `model` itself (full), with bottleneck adapters (adapter), or wrapped by
    peft's LoRA / AdaLoRA tuner (whose attributes reach through to the GPT). Base weights frozen."""
    if cfg.method == "full":
        return model
    if cfg.method == "adapter":
        return _add_bottlenecks(model, cfg)
    from peft import AdaLoraModel, LoraModel

    tuner = LoraModel if cfg.method == "lora" else AdaLoraModel
    try:
        return tuner(model, _peft_config(cfg), "default")
    except ValueError as e:  # peft: target modules not found, ...
        raise LLMClockError(f"adapter: {e}") from None


def gpt_of(model: nn.Module) -> nn.Module:
    """The GPT inside a peft tuner (or the model itself)."""
    return model.model if hasattr(model, "peft_config") else model


def is_adapted(module: nn.Module) -> bool:
    """Whether `module` holds an adapter (LoRA/AdaLoRA layers or a bottleneck)."""
    return any(isinstance(m, AdaptedLinear) or hasattr(m, "lora_A") for m in module.modules())


def guard_fused(model: nn.Module) -> int:
    """Check that no fused block holding an adapter is taken for a plain one: the whole-block
    kernel reads the Linear weights directly and would skip the adapter. A FusedBlock takes that
    kernel with its own weights only when made of its own plain parts (llmclock.fused.is_plain); a
    block whose Linears carry LoRA/AdaLoRA (no dropout while training) takes it with the effective
    weights W + s*B@A (llmclock.fused.kernel_params), exact, gradients reaching A and B by autograd;
    any other adapted block (a bottleneck, LoRA with dropout while training) runs op by op (its
    attention, GELU and LayerNorm kernels act on module outputs and stay). Returns the number of
    adapted fused blocks."""
    from .fused import FusedBlock, is_plain

    n = 0
    for block in gpt_of(model).transformer.h:
        if is_adapted(block) and isinstance(block, FusedBlock):
            if is_plain(block):
                raise LLMClockError("an adapted block would take the fused whole-block kernel and skip its adapter")
            n += 1
    return n


def _base_key(key: str) -> str:
    """A wrapped model's state key as the plain GPT names it."""
    key = key.removeprefix("model.")
    return key.replace(".base_layer.", ".").replace(".base.", ".")


def adapter_state(model: nn.Module, base_keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors an adapter consists of: every trainable one, and every one the base lacks."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k in trainable or _base_key(k) not in base_keys}


def base_weights_hash(ckpt: str | Path) -> str:
    """The sha256 of a checkpoint's model.safetensors: the one its config.json records, else computed."""
    from .checkpoint import CONFIG, HASHES, WEIGHTS, file_sha256, read_json

    ckpt = Path(ckpt)
    recorded = read_json(ckpt / CONFIG).get(HASHES, {}).get(WEIGHTS)
    if not (ckpt / WEIGHTS).is_file():
        raise LLMClockError(f"{ckpt / WEIGHTS}: missing")
    return recorded or file_sha256(ckpt / WEIGHTS)


def write_adapter(dest: Path, model: nn.Module, cfg: AdapterConfig, *, base_hash: str, base_config: dict,
                  base_keys: set[str]) -> None:
    """adapter.safetensors + adapter_config.json into an (already temporary) directory."""
    from safetensors.torch import save_file

    from .checkpoint import write_json

    save_file(adapter_state(model, base_keys), str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(dest / ADAPTER_CONFIG, {"format": ADAPTER_FORMAT, "adapter": cfg.to_dict(), "base_weights_hash": base_hash,
                                       "base_config": base_config})


def read_adapter_config(adapter_dir: Path) -> tuple[AdapterConfig, dict]:
    from .checkpoint import read_json

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LLMClockError(f"adapter directory {adapter_dir} not found")
    meta = read_json(adapter_dir / ADAPTER_CONFIG, missing="missing (not an llmclock adapter?)")
    if meta.get("format") != ADAPTER_FORMAT or not isinstance(meta.get("adapter"), dict):
        raise LLMClockError(f"{adapter_dir / ADAPTER_CONFIG}: not an llmclock adapter config")
    try:
        return AdapterConfig(**meta["adapter"]), meta
    except TypeError as e:
        raise LLMClockError(f"{adapter_dir / ADAPTER_CONFIG}: {e}") from None


def check_adapter(adapter_dir: str | Path, base_hash: str) -> AdapterConfig:
    """The adapter's config, once it is known to fit: an llmclock adapter, not a full fine-tune,
    trained on the weights whose file has sha256 `base_hash`.
    Reads no tensors, so a server can refuse a wrong adapter at start-up."""
    adapter_dir = Path(adapter_dir)
    cfg, meta = read_adapter_config(adapter_dir)
    if cfg.method == "full":
        raise LLMClockError(f"{adapter_dir}: a full fine-tune is a checkpoint of its own: pass it as --ckpt")
    if base_hash != meta.get("base_weights_hash"):
        raise LLMClockError(f"{adapter_dir}: this adapter was trained on other base weights (weights hash differs)")
    return cfg


def attach_adapter(model: nn.Module, adapter_dir: str | Path, base_hash: str) -> nn.Module:
    """Load a saved adapter onto `model` (a loaded base GPT whose weights file has sha256
    `base_hash`), refusing an adapter trained on other weights."""
    from .checkpoint import read_tensors

    adapter_dir = Path(adapter_dir)
    cfg = check_adapter(adapter_dir, base_hash)
    tensors = read_tensors(adapter_dir / ADAPTER_WEIGHTS)
    wrapped = apply_adapter(model, cfg)
    state = wrapped.state_dict()
    bad = [k for k in tensors if k not in state or state[k].shape != tensors[k].shape]
    if bad:
        raise LLMClockError(f"{adapter_dir / ADAPTER_WEIGHTS}: does not fit the model: {', '.join(bad[:3])}")
    wrapped.load_state_dict(tensors, strict=False)
    return wrapped.eval()


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA/AdaLoRA into plain weights: a plain GPT with the same logits."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise LLMClockError("a bottleneck adapter has a non-linearity and cannot be folded into the weights")
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def load_adapted(ckpt: str | Path, adapter: str | Path | None, *, device="cpu", merged: bool = False):
    """(model, tokenizer) of a checkpoint with an adapter attached. `merged` (for the engine): LoRA
    and AdaLoRA folded into plain weights, which the engine streams at full speed; a bottleneck
    adapter, which cannot fold, stays in place as a plain GPT whose adapted Linears are
    AdaptedLinear modules: the engine's decode plan calls those as modules (op by op) and keeps
    its packed kernels for the plain ones (engine.kernels.decode_linear, make_block)."""
    from .checkpoint import load_checkpoint

    if adapter is not None:
        check_adapter(adapter, base_weights_hash(ckpt))  # before the base's weights are read
    model, tok = load_checkpoint(ckpt, device="cpu")
    if adapter is None:
        return model.to(device), tok
    model = attach_adapter(model, adapter, base_weights_hash(ckpt))
    if merged:
        model = for_engine(model)
    return model.to(device).eval(), tok


def for_engine(model: nn.Module) -> nn.Module:
    """The model as the engine takes it: LoRA/AdaLoRA folded into plain weights (merge); a GPT
    with bottleneck adapters as it is (its AdaptedLinear modules run op by op in the decode)."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        return gpt_of(model)
    return merge(model)
