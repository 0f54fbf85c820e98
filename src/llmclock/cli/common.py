"""What several subcommands share: printing, checking an output path before work starts, loading a model."""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMClockError
from . import options


def printable(text: str) -> str:
    """`text` with the bytes a non-UTF-8 file name brought in (kept as surrogates) shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def echo(*a, **k) -> None:
    print(*(printable(str(x)) for x in a), **k, flush=True)


def check_out(path, flag: str, *, overwrite: bool = False, kind: str = "file", marker: str | None = None) -> Path:
    """Refuse an output path before any work: one that exists (unless --overwrite), one of the
    wrong kind, a directory that --overwrite would replace but that is neither empty nor holds
    `marker` (an earlier output of this command), or a file whose folder is missing.
    Directories are created with their parents."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if kind == "file" and path.is_dir():
            raise LLMClockError(f"{flag} {path}: is a directory; give a file name")
        if kind == "dir" and not path.is_dir():
            raise LLMClockError(f"{flag} {path}: exists and is not a directory")
        if not overwrite:
            raise LLMClockError(f"{flag} {path}: already exists (pass --overwrite to replace it)")
        if kind == "dir" and marker and any(path.iterdir()) and not (path / marker).exists():
            raise LLMClockError(f"{flag} {path}: not empty and holds no {marker}; --overwrite replaces only "
                                "an earlier output of this command")
    if kind == "file" and not path.absolute().parent.is_dir():
        raise LLMClockError(f"{flag} {path}: the folder {path.parent} does not exist")
    return path


def add_overwrite(p, what: str = "the output") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")


def add_device_flags(p, default: str = "cpu") -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", type=options.device, default=default,
                   help=f"auto (CUDA when available), cpu, cuda, cuda:N or mps (default: {default})")
    g.add_argument("--threads", type=options.integer(1, 4096), help="CPU threads (default: torch's choice)")


def load_model(a, *, tokenizer: bool = True, merged: bool = True):
    """(model, tokenizer) from --ckpt on --device with --threads, verified (hash, finite weights),
    with --adapter applied when given (`merged`, for the engine: LoRA/AdaLoRA folded into the
    weights in memory, as it streams each Linear's plain weight; a bottleneck adapter left in place,
    its adapted Linears run op by op)."""
    import torch

    from ..checkpoint import load_checkpoint
    from ..config import resolve_device

    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    if getattr(a, "adapter", None):
        from ..adapters import load_adapted

        return load_adapted(a.ckpt, a.adapter, device=resolve_device(a.device), merged=merged)
    return load_checkpoint(a.ckpt, device=resolve_device(a.device), with_tokenizer=tokenizer)


def add_adapter(p) -> None:
    p.add_argument("--adapter", type=options.path,
                   help="an adapter directory written by `llmclock finetune` (LoRA, AdaLoRA, bottleneck adapter) to apply unmerged")
