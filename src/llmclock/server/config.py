"""ServerConfig: everything `llmclock serve` can be told, checked once, with the keys gathered."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..config import Range, check_ranges
from ..errors import LLMClockError

KEYS_ENV = "LLMCLOCK_API_KEYS"
"""Environment variable with API keys, comma- or whitespace-separated."""


@dataclass
class ServerConfig:
    """How the server runs. Keys come from `api_keys`, `api_keys_file` and $LLMCLOCK_API_KEYS together."""

    ckpt: str | None = None
    """Checkpoint directory to serve (loaded in the background at start-up; /ready says when)."""
    adapter: str | None = None
    """An adapter directory (`llmclock finetune`) for ckpt, loaded as `generate --adapter` loads it."""
    model_name: str | None = None
    """The model id in /v1/models and responses; default: the checkpoint directory's name."""
    host: str = "127.0.0.1"
    """Interface to bind; loopback unless told otherwise."""
    port: int = 8000
    slots: int = 8
    """Sequences decoded together per clock cycle (the engine's slots)."""
    queue: int = 64
    """Requests that may wait for a slot; beyond that a request gets 429 with Retry-After."""
    max_n: int = 4
    """Most choices (`n` times the number of prompts) one request may ask for; beyond that: 400."""
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str | None = None
    """One key per line; blank lines and lines starting with '#' are skipped."""
    rpm: int = 0
    """Requests per minute per key (per client address when no keys are set); 0 = unlimited."""
    tpm: int = 0
    """Tokens (prompt + max_tokens) per minute per key; 0 = unlimited."""
    max_tokens: int = 0
    """Most tokens one choice may generate (also the default when a request names none); 0 = the context."""
    max_body: int = 1 << 20
    """Largest request body in bytes; beyond: 413."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins allowed to call from a browser; empty = no CORS headers at all."""
    redact: bool = False
    """Mask e-mails, phone numbers, card numbers, IP addresses and API-key-like secrets in logs."""
    redact_prompts: bool = False
    """Also mask them in prompts before they reach the model."""
    log_prompts: bool = False
    """Put prompts and outputs in the access log (masked when `redact`)."""
    drain_timeout: float = 30.0
    """Seconds SIGTERM waits for in-flight requests before closing them."""
    threads: int = 0
    """torch threads for the engine; 0 = torch's default."""
    engine_process: bool = True
    """Run the engine in a process of its own (as vLLM does), not on a thread next to the HTTP server's
    event loop, where the same engine served 16 clients up to a sixth slower."""
    device: str = "cpu"

    RANGES: ClassVar[dict[str, Range]] = {
        "port": Range(int, 0, 65535), "slots": Range(int, 1, 4096), "queue": Range(int, 0, 1_000_000),
        "max_n": Range(int, 1, 128), "rpm": Range(int, 0), "tpm": Range(int, 0), "max_tokens": Range(int, 0),
        "max_body": Range(int, 1), "drain_timeout": Range(float, 0, 3600), "threads": Range(int, 0, 4096),
    }

    def __post_init__(self) -> None:
        check_ranges(self, "serve")
        if self.redact_prompts:
            self.redact = True
        if self.model_name is None:  # runs/demo/ckpt -> "demo"; with an adapter, the adapter's run
            source = self.adapter or self.ckpt
            path = Path(source).absolute() if source else None
            self.model_name = "llmclock" if path is None else path.parent.name if path.name == "ckpt" else path.name

    def check_files(self) -> None:
        """Refuse, in one line and before anything starts, a missing or broken checkpoint, an adapter
        that is not for it (or cannot be folded into it), and a broken chat template."""
        from ..adapters import base_weights_hash, check_adapter
        from ..chat import template_for
        from ..checkpoint import read_config

        if not self.ckpt:
            raise LLMClockError("serve: give a checkpoint (--ckpt)")
        read_config(Path(self.ckpt))
        if self.adapter:
            check_adapter(self.adapter, base_weights_hash(self.ckpt))
        template_for(self.ckpt, self.adapter)

    def keys(self) -> list[str]:
        """Every API key configured, from all three sources; empty means no authentication."""
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise LLMClockError(f"{path}: cannot read the API keys file ({e.strerror})") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        keys += os.environ.get(KEYS_ENV, "").replace(",", " ").split()
        if any(len(k) < 8 for k in keys):
            raise LLMClockError("serve: API keys must be at least 8 characters long")
        return list(dict.fromkeys(keys))
