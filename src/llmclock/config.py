"""Typed configuration: the model's shape and the training recipe, with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .errors import LLMClockError


ACTIVATIONS = ("gelu_tanh", "gelu")
DTYPES = ("float32", "bfloat16")
SEED_MAX = 2**63 - 1
"""Seeds are signed 64-bit integers' non-negative half (torch's and numpy's generators take them)."""


def _show(v: float) -> str:
    if isinstance(v, int) and v > 2**20 and (v + 1) & v == 0:
        return f"2**{(v + 1).bit_length() - 1} - 1"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Range:
    """The values a numeric field takes: an int, or a finite float, within optional (open or closed) bounds.

    The config dataclasses check their fields with these, and the command line builds its option
    types from the same objects, so a flag accepts exactly what its field does.
    """

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind is int and not isinstance(v, int) or not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        """'an integer >= 1', 'a number in (0, 1]', ..."""
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{_show(lo)}, {_show(hi)}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_show(lo)}"
        if hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_show(hi)}"
        return what


POSITIVE_INT, COUNT = Range(int, 1), Range(int, 0)
SEED = Range(int, 0, SEED_MAX)


def check_ranges(obj, what: str) -> None:
    """Raise LLMClockError for the first field of `obj` outside its class's RANGES (None = unset, allowed)."""
    for name, r in type(obj).RANGES.items():
        v = getattr(obj, name)
        if v is not None and not r.ok(v):
            raise LLMClockError(f"{what}: {name} must be {r.describe()}, got {v!r}")


DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def resolve_device(name: str):
    """The torch.device for a --device value: 'auto' is CUDA when available, else the CPU."""
    import torch

    if not DEVICE.fullmatch(name):
        raise LLMClockError(f"device {name!r} is not one of auto, cpu, mps, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LLMClockError(f"device {name!r} requested but CUDA is not available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise LLMClockError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LLMClockError("device 'mps' requested but MPS is not available")
    return torch.device(name)


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

    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(("vocab_size", "block_size", "n_layer", "n_head", "n_embd"), Range(int, 1, SEED_MAX)),
        "dropout": Range(float, 0.0, 1.0, hi_open=True),
        "layer_norm_epsilon": Range(float, 0.0, lo_open=True),
    }

    def __post_init__(self) -> None:
        check_ranges(self, "model config")
        if self.n_embd % self.n_head:
            raise LLMClockError(
                f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.activation not in ACTIVATIONS:
            raise LLMClockError(f"model config: activation must be one of {ACTIVATIONS}, got {self.activation!r}")

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
    """auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP's fully_shard) instead of DDP."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait for the other ranks before the job ends with an error (a crashed or hung rank)."""

    RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(("max_steps", "batch_size", "block_size", "grad_accum", "eval_batches", "lr_decay_steps"),
                        Range(int, 1, SEED_MAX)),
        **dict.fromkeys(("warmup_steps", "eval_interval", "checkpoint_interval"), Range(int, 0, SEED_MAX)),
        **dict.fromkeys(("max_seconds", "learning_rate", "dist_timeout"), Range(float, 0.0, lo_open=True)),
        **dict.fromkeys(("min_lr", "weight_decay", "grad_clip"), Range(float, 0.0)),
        **dict.fromkeys(("beta1", "beta2"), Range(float, 0.0, 1.0, hi_open=True)),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        check_ranges(self, "train config")
        if self.dtype not in DTYPES:
            raise LLMClockError(f"train config: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise LLMClockError(f"train config: device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class SamplingParams:
    """How one sequence picks its tokens. Defaults follow OpenAI's API (temperature 1, no cut-offs)."""

    max_new_tokens: int = 64
    """Tokens to generate at most (the prompt not counted)."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches p; 1 = off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's; 0 = off."""
    repetition_penalty: float = 1.0
    """CTRL / HF penalty on every token already in prompt or output (>1 discourages); 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted once from tokens already generated."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted per occurrence of tokens already generated."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of the given token ids."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; matched across token boundaries and not included in the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (in addition to end-of-text unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep going past <|endoftext|>."""
    seed: int | None = None
    """Seeds this sequence's own generator: same seed, same tokens, whatever else runs."""
    logprobs: int = 0
    """Also return the top-N alternatives (and their logprobs) per token; 0 = only the chosen one."""

    RANGES: ClassVar[dict[str, Range]] = {
        "max_new_tokens": Range(int, 1, SEED_MAX),
        "temperature": Range(float, 0.0),
        "top_k": Range(int, 0, SEED_MAX),
        "top_p": Range(float, 0.0, 1.0, lo_open=True),
        "min_p": Range(float, 0.0, 1.0),
        "repetition_penalty": Range(float, 0.0, lo_open=True),
        **dict.fromkeys(("presence_penalty", "frequency_penalty"), Range(float, -2.0, 2.0)),
        "seed": SEED,
        "logprobs": Range(int, 0, 20),
    }
    BIAS: ClassVar[Range] = Range(float, -100.0, 100.0)
    """What a logit bias may add (OpenAI's range)."""

    def __post_init__(self) -> None:
        check_ranges(self, "sampling")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LLMClockError("sampling: stop strings must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise LLMClockError(f"sampling: stop_token_ids must be integers, got {self.stop_token_ids!r}")
        bias = {}
        for k, v in self.logit_bias.items():
            try:
                k, v = int(k), float(v)
            except (TypeError, ValueError):
                raise LLMClockError(f"sampling: logit_bias maps token ids to numbers, got {k!r}: {v!r}") from None
            if not self.BIAS.ok(v):
                raise LLMClockError(f"sampling: logit_bias for token {k} must be {self.BIAS.describe()}, got {v!r}")
            bias[k] = v
        self.logit_bias = bias

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        for t in list(self.logit_bias) + list(self.stop_token_ids):
            if not 0 <= t < vocab_size:
                raise LLMClockError(f"sampling: token id {t} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
