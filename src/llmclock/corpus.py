"""Where text comes from: files, directories, globs and ``.jsonl`` -> documents.

Also the built-in default corpus, the running interpreter's own standard library: every
Python install carries ~10 MB of it, so a model can be trained with no download (code and
docstrings, plus English prose in ``pydoc_data/topics.py``, the reference manual's topics).

Non-UTF-8 files are skipped, not fatal: they are counted and listed in `SourceStats`.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LLMClockError

# ---------------------------------------------------------------- files -> documents


@dataclass
class SourceStats:
    """What reading the sources found; filled in while documents are being read."""

    files: int = 0
    """Files opened (including skipped and empty ones)."""
    documents: int = 0
    """Non-empty documents yielded."""
    empty_documents: int = 0
    """Empty files and empty jsonl texts, which are skipped."""
    skipped_non_utf8: list[str] = field(default_factory=list)
    """Files skipped because they are not valid UTF-8."""
    bytes_read: int = 0
    """Bytes of source files consumed so far (the unit `prepare` reports progress in)."""


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root, n) for n in names if not n.startswith(".") and Path(root, n).is_file()]
    return sorted(found)


def expand_sources(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by `sources`: files, directories (walked, sorted, hidden skipped) and globs.

    Each file appears once, at its first mention. A missing path or a glob that matches
    nothing is an error.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    seen: set[Path] = set()
    for source in sources:
        text = str(source)
        if Path(text).exists():
            matches = [Path(text)]
        elif any(c in text for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise LLMClockError(f"{text}: no files match this pattern")
        else:
            raise LLMClockError(f"{text}: no such file or directory")
        for match in matches:
            if match.is_dir():
                found = _walk(match)
            elif match.is_file():
                found = [match]
            elif len(matches) == 1:
                raise LLMClockError(f"{match}: not a regular file")
            else:
                found = []
            for path in found:
                key = path.resolve()
                if key not in seen:
                    seen.add(key)
                    files.append(path)
    return files


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(2**20):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _text_pieces(path: Path, stats: SourceStats, max_chars: int | None) -> Iterator[tuple[str, bool]]:
    """One text file as (piece, is_last) pairs; pieces break only before a line that starts
    with a non-space character, where byte-level BPE pre-tokens break anyway, so chunked
    encoding gives the same ids. A file with no such break is cut at 4 x max_chars."""
    if max_chars is None or path.stat().st_size <= max_chars:
        raw = path.read_bytes()
        stats.bytes_read += len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8.append(str(path))
            return
        yield text, True
        return
    if not _is_utf8(path):
        stats.skipped_non_utf8.append(str(path))
        stats.bytes_read += path.stat().st_size
        return
    lines: list[str] = []
    size = 0
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as is
        for line in f:
            if size >= 4 * max_chars or (size >= max_chars and not line[:1].isspace()):
                piece = "".join(lines)
                stats.bytes_read += len(piece.encode("utf-8"))
                yield piece, False
                lines, size = [], 0
            lines.append(line)
            size += len(line)
    piece = "".join(lines)
    stats.bytes_read += len(piece.encode("utf-8"))
    yield piece, True


def _jsonl_texts(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    if not _is_utf8(path):
        stats.skipped_non_utf8.append(str(path))
        stats.bytes_read += path.stat().st_size
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            stats.bytes_read += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise LLMClockError(f"{path}:{lineno}: not a JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise LLMClockError(f"{path}:{lineno}: no string field {text_field!r}")
            yield record[text_field]


def iter_pieces(
    files: Sequence[Path], text_field: str, stats: SourceStats, max_chars: int | None
) -> Iterator[tuple[str, str, bool]]:
    """(source name, text, ends a document) for each file in order; raises if no text at all.

    With `max_chars`, a plain text file longer than that comes in several pieces (the last
    with ends=True), so callers can encode a huge file without holding it whole.
    """
    for path in files:
        stats.files += 1
        if path.suffix == ".jsonl":
            pieces = ((text, True) for text in _jsonl_texts(path, text_field, stats))
        else:
            pieces = _text_pieces(path, stats, max_chars)
        for text, end in pieces:
            if not text:
                stats.empty_documents += 1
                continue
            if end:
                stats.documents += 1
            yield str(path), text, end
    if stats.documents == 0:
        raise LLMClockError(
            f"no text found in {stats.files} file(s) "
            f"({len(stats.skipped_non_utf8)} not UTF-8, {stats.empty_documents} empty)"
        )


def iter_sources(
    sources: Sequence[str | os.PathLike], *, text_field: str = "text", stats: SourceStats | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (source name, text) per document: a plain file is one document, a ``.jsonl``
    line is one (its `text_field`). Non-UTF-8 files are skipped and listed in `stats`
    (pass a `SourceStats` to see them); empty documents are skipped."""
    stats = SourceStats() if stats is None else stats
    for name, text, _ in iter_pieces(expand_sources(sources), text_field, stats, None):
        yield name, text


# ---------------------------------------------------------------- the stdlib corpus


EXCLUDED_DIRS = frozenset({
    "site-packages",  # third-party code, not the stdlib
    "dist-packages",
    "__pycache__",
    "test",  # test suites: huge, repetitive, and full of deliberately odd files
    "tests",
    "idle_test",
    "idlelib",
    "encodings",  # generated codec tables: mostly escaped character data, not code
})
"""Directory names skipped anywhere under the stdlib root (hidden directories are too)."""


def stdlib_root() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk_py(root: Path) -> list[tuple[str, int]]:
    found = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                found.append((path, st.st_size))
    found.sort()
    return found


def stdlib_sources() -> list[str]:
    """Sorted paths of the stdlib's ``.py`` files, minus tests, IDLE, codecs and site-packages."""
    return [path for path, _ in _walk_py(stdlib_root())]


def describe_stdlib() -> dict:
    """{"path": stdlib root, "files": number of source files, "bytes": their total size}."""
    found = _walk_py(stdlib_root())
    return {"path": str(stdlib_root()), "files": len(found), "bytes": sum(size for _, size in found)}
