"""JSONL task files (evaluation sets, fine-tuning sets): one JSON object per line, checked with
the file and line number in every error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LLMClockError


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; an error names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise LLMClockError(f"{path}: file not found")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise LLMClockError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise LLMClockError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                out.append((lineno, obj))
    except UnicodeDecodeError:
        raise LLMClockError(f"{path}: not UTF-8 text") from None
    if not out:
        raise LLMClockError(f"{path}: empty (no JSON lines)")
    return out


def field(path, lineno: int, obj: dict, *names: str, kind=str):
    """The first of `names` present in `obj`, checked to be a `kind`; an error if none is."""
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, kind):
                want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise LLMClockError(f"{path}:{lineno}: field {name!r} must be a {want}, got {type(value).__name__}")
            return value
    raise LLMClockError(f"{path}:{lineno}: missing field {' or '.join(repr(n) for n in names)}")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows atomically (temporary file, then rename)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
