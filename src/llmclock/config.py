"""Typed configuration: the model's shape and the training recipe, with named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import LLMClockError


ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclass
class ModelConfig:
    """The shape of a GPT-2-architecture model."""

    vocab_size: int = 50257
    """Number of token ids the embedding and the head cover."""
    block_size: int = 1024
    """Context length: the most positions the learned position table holds."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; n_embd must divide evenly among them."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches while training."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them)."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""
    activation: str = "gelu_tanh"
    """MLP non-linearity: 'gelu_tanh' (GPT-2's tanh approximation) or 'gelu' (exact erf, as nanoGPT)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LLMClockError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise LLMClockError(
                f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.activation not in ACTIVATIONS:
            raise LLMClockError(f"model config: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LLMClockError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def gelu_approximate(self) -> str:
        """`activation` as F.gelu's `approximate` argument."""
        return "tanh" if self.activation == "gelu_tanh" else "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LLMClockError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise LLMClockError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LLMClockError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise LLMClockError(f"{path}: expected a JSON object")
        return cls.from_dict(d)


# Named shapes. vocab_size and block_size of the small presets are defaults that the
# tokenizer and the command line override.
PRESETS: dict[str, dict] = {
    "test": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "demo": dict(n_layer=4, n_head=4, n_embd=192, block_size=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}
PRESET_ALIASES = {"124M": "gpt2", "350M": "gpt2-medium", "774M": "gpt2-large", "1.5B": "gpt2-xl"}


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name (or alias such as '124M'), with fields overridden."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        names = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise LLMClockError(f"unknown preset {name!r}; choose one of: {names}")
    return ModelConfig(**{**PRESETS[key], **overrides})


@dataclass
class TrainConfig:
    """A training recipe. Steps count optimizer updates."""

    max_steps: int = 2000
    """Optimizer steps to run (the cosine schedule ends here unless lr_decay_steps is set)."""
    max_seconds: float | None = None
    """Stop after this much wall time (checked between steps); None = no limit."""
    batch_size: int = 12
    """Sequences per micro-batch (per process)."""
    block_size: int = 64
    """Tokens per sequence; at most the model's context."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warm-up length."""
    lr_decay_steps: int | None = None
    """Step where cosine decay reaches min_lr; None = max_steps."""
    weight_decay: float = 0.1
    """AdamW decay on 2-D weights (not on biases, norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    eval_interval: int = 250
    """Evaluate on validation every this many steps (and at the end)."""
    eval_batches: int = 20
    """Batches of batch_size sequences per evaluation."""
    checkpoint_interval: int = 0
    """Save a checkpoint every this many steps; 0 = only at the end."""
    seed: int = 1337
    """Seeds initialisation, batch order and dropout."""
    dtype: str = "float32"
    """Autocast dtype for the forward pass: float32 or bfloat16."""
    compile: bool = False
    """torch.compile the model."""
    fused_kernels: bool = True
    """On the CPU in float32 without compile: llmclock's compiled whole-block, attention, GELU and LayerNorm kernels."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP's fully_shard) instead of DDP."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait for the other ranks before the job ends with an error (a crashed or hung rank)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "block_size", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise LLMClockError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise LLMClockError(f"train config: {name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise LLMClockError("train config: learning rates must be positive")
        if self.dtype not in ("float32", "bfloat16"):
            raise LLMClockError(f"train config: dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise LLMClockError("train config: max_seconds must be positive")
        if self.dist_timeout <= 0:
            raise LLMClockError("train config: dist_timeout must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

