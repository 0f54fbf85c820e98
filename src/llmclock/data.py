"""Corpus -> token shards (train/val/test ``.bin`` + ``manifest.json``) -> batches.

A prepared data directory holds one flat token stream per split, stored as raw uint16 (or
uint32 for vocabularies over 65536) exactly as nanoGPT's ``train.bin``/``val.bin``, plus a
manifest recording how it was made. Batches are a pure function of (seed, step, micro,
rank), so resuming a run needs no saved RNG state. No torch here: batches are numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import SourceStats, expand_sources, iter_pieces, iter_sources
from .errors import LLMClockError
from .tokenizer import Tokenizer, umask

__all__ = [
    "SourceStats", "TokenData", "eval_batches", "expand_sources", "get_batch", "iter_sources", "prepare", "token_dtype",
]

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
"""The tokenizer the shards were made with, kept beside them so `train` needs no --tokenizer."""
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
CHUNK_CHARS = 4 * 2**20
"""Characters of text encoded per batch in `prepare`; bounds its memory."""
_COPY_BYTES = 16 * 2**20
_MAX_LISTED_SKIPS = 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise LLMClockError(f"vocab_size {vocab_size} cannot be stored as tokens (need 1 .. 2**32)")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---------------------------------------------------------------- prepare


def _batches(pieces: Iterator[tuple[str, str, bool]], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for _, text, end in pieces:
        if batch and size + len(text) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append((text, end))
        size += len(text)
    if batch:
        yield batch


def _progress_fn(progress: Any) -> Callable[[int], Any]:
    if progress is None:
        return lambda n: None
    if hasattr(progress, "update"):
        return progress.update
    if callable(progress):
        return progress
    raise LLMClockError("progress must be callable or have an update(n) method")


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    # Decimal fractions (0.05 -> 1/20) so that 1 - 0.05 - 0.05 is exactly 9/10.
    val, test = Fraction(str(val_fraction)), Fraction(str(test_fraction))
    train_end = n * (1 - val - test).numerator // (1 - val - test).denominator
    val_end = n * (1 - test).numerator // (1 - test).denominator
    counts = {"train": train_end, "val": val_end - train_end, "test": n - val_end}
    for split, frac in (("train", 1), ("val", val), ("test", test)):
        if frac > 0 and counts[split] == 0:
            raise LLMClockError(f"corpus too small: split '{split}' gets 0 of {n} tokens")
    return counts


def _split_stream(stream: Path, counts: dict[str, int], itemsize: int) -> None:
    """Copy the stream's tail into val.bin and test.bin, then cut it down to train."""
    start = counts["train"]
    with open(stream, "r+b") as f:
        for split in ("val", "test"):
            f.seek(start * itemsize)
            remaining = counts[split] * itemsize
            with open(stream.with_name(f"{split}.bin"), "wb") as out:
                while remaining:
                    block = f.read(min(remaining, _COPY_BYTES))
                    if not block:
                        raise LLMClockError(f"{stream}: token stream ended early (disk full?)")
                    out.write(block)
                    remaining -= len(block)
            start += counts[split]
        f.truncate(counts["train"] * itemsize)


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished data dir into place; manifest.json goes last, as the commit mark."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for name in [f"{split}.bin" for split in SPLITS] + [TOKENIZER] * (tmp / TOKENIZER).exists():
        os.replace(tmp / name, out_dir / name)
    os.replace(tmp / MANIFEST, out_dir / MANIFEST)
    tmp.rmdir()


def prepare(
    sources: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shuffle_files: bool = True,
    seed: int = 1337,
    text_field: str = "text",
    overwrite: bool = False,
    progress: Any = None,
    chunk_chars: int = CHUNK_CHARS,
) -> dict:
    """Tokenize `sources` into `out_dir`/{train,val,test}.bin + manifest.json, with a copy of the
    tokenizer (tokenizer.json) so that `train` finds it there; return the manifest.

    Every document is followed by `tokenizer.eot_id`. The stream is split contiguously:
    the first (1 - val - test) of the tokens are train, then val, then test. Files are
    ordered by a seeded shuffle (so val/test come from random files) unless
    `shuffle_files` is False. Text is encoded `chunk_chars` at a time, and the output is
    built in a temporary directory beside `out_dir`, so a crash leaves no half-written
    data dir. `progress` gets ``update(n)`` (or is called with n) per batch, n in bytes.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise LLMClockError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum to less than 1"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LLMClockError(f"{out_dir}: exists and is not a directory")
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise LLMClockError(f"{out_dir}: already holds prepared data (overwrite: --overwrite / overwrite=True)")
    dtype = token_dtype(tokenizer.vocab_size)
    files = expand_sources(sources)
    if shuffle_files:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    report = _progress_fn(progress)
    eot = np.array([tokenizer.eot_id], dtype=dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~umask())  # the data directory a user shares, not mkdtemp's private 0700
        if hasattr(tokenizer, "save"):  # every Tokenizer can; a stand-in object need not
            tokenizer.save(tmp / TOKENIZER)
        stats = SourceStats()
        stream = tmp / "train.bin"  # the whole stream first; cut to the train prefix below
        n_tokens, reported = 0, 0
        with open(stream, "wb") as f:
            pieces = iter_pieces(files, text_field, stats, chunk_chars)
            for batch in _batches(pieces, chunk_chars):
                encoded = tokenizer.encode_batch([text for text, _ in batch])
                parts = []
                for ids, (_, end) in zip(encoded, batch):
                    parts.append(np.asarray(ids, dtype=dtype))
                    if end:
                        parts.append(eot)
                tokens = np.concatenate(parts)
                tokens.tofile(f)
                n_tokens += len(tokens)
                report(stats.bytes_read - reported)
                reported = stats.bytes_read
        counts = _split_counts(n_tokens, val_fraction, test_fraction)
        _split_stream(stream, counts, dtype.itemsize)
        manifest = {
            "format": "llmclock-tokens",
            "version": FORMAT_VERSION,
            "tokenizer_hash": tokenizer.hash,
            "tokenizer": TOKENIZER if (tmp / TOKENIZER).exists() else None,
            "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "dtype": dtype.name,
            "splits": {s: {"file": f"{s}.bin", "tokens": counts[s]} for s in SPLITS},
            "total_tokens": n_tokens,
            "sources": [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
            "files": stats.files,
            "documents": stats.documents,
            "empty_documents": stats.empty_documents,
            "skipped_non_utf8": {
                "count": len(stats.skipped_non_utf8),
                "files": stats.skipped_non_utf8[:_MAX_LISTED_SKIPS],
            },
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "shuffle_files": shuffle_files,
            "seed": seed,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if (out_dir / MANIFEST).exists() and not overwrite:  # someone else finished first
            raise LLMClockError(f"{out_dir}: already holds prepared data (overwrite: --overwrite / overwrite=True)")
        _install(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and str(tmp) in str(e.filename or tmp):  # name the output, not the temp file
            raise LLMClockError(f"{out_dir}: cannot write the token shards ({e.strerror or e})") from None
        raise
    return manifest


# ---------------------------------------------------------------- reading shards


class TokenData:
    """A prepared data directory: its manifest, and each split as a read-only memmap."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        """Read and check the manifest and split file sizes; memmaps open on first use."""
        self.data_dir = Path(data_dir)
        path = self.data_dir / MANIFEST
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            if m.get("format") != "llmclock-tokens" or m.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported format {m.get('format')!r} version {m.get('version')!r}")
            self.dtype = np.dtype(m["dtype"])
            if self.dtype not in (np.uint16, np.uint32):
                raise ValueError(f"unsupported dtype {m['dtype']!r}")
            self._splits = {s: (self.data_dir / v["file"], int(v["tokens"])) for s, v in m["splits"].items()}
            self.vocab_size: int = int(m["vocab_size"])
            self.tokenizer_hash: str = m["tokenizer_hash"]
            self.eot_id: int = int(m["eot_id"])
        except FileNotFoundError:
            raise LLMClockError(f"{path}: not found (is this a prepared data directory?)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LLMClockError(f"{path}: invalid manifest ({type(e).__name__}: {e})") from None
        self.manifest: dict = m
        for file, n in self._splits.values():
            if not file.is_file():
                raise LLMClockError(f"{file}: missing (listed in {path})")
            size, want = file.stat().st_size, n * self.dtype.itemsize
            if size != want:
                raise LLMClockError(f"{file}: {size} bytes, but the manifest says {n} tokens = {want} bytes")
        self._maps: dict[str, np.ndarray] = {}

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer kept with the shards (it may be missing in data prepared by older versions)."""
        return self.data_dir / TOKENIZER

    def num_tokens(self, split: str) -> int:
        """Tokens in `split`."""
        return self._split(split)[1]

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only memmap (an empty array for an empty split)."""
        if split not in self._maps:
            file, n = self._split(split)
            self._maps[split] = np.memmap(file, self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        return self._maps[split]

    def _split(self, split: str) -> tuple[Path, int]:
        if split not in self._splits:
            raise LLMClockError(f"{self.data_dir}: no split {split!r} (have {', '.join(self._splits)})")
        return self._splits[split]


def _check_len(data: np.ndarray, block_size: int, split: str | None) -> int:
    n = len(data)
    if n <= block_size:
        what = f"split '{split}'" if split else "token data"
        raise LLMClockError(f"{what} has {n} tokens, need more than block_size={block_size}")
    return n


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    idx = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
    chunk = np.asarray(data[idx], dtype=np.int64)  # (B, T+1)
    return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])  # (B, T) each


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, *,
    seed: int, step: int, micro: int = 0, rank: int = 0, split: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random (x, y) windows, int64 (B, T), y = x shifted by one; a pure function of
    (seed, step, micro, rank). `split` only names the data in error messages."""
    n = _check_len(data, block_size, split)
    if min(seed, step, micro, rank) < 0:
        raise LLMClockError(f"seed/step/micro/rank must be >= 0, got {(seed, step, micro, rank)}")
    rng = np.random.Generator(np.random.PCG64([seed, step, micro, rank]))
    return _windows(data, rng.integers(0, n - block_size, size=batch_size), block_size)


def eval_batches(
    data: np.ndarray, batch_size: int, block_size: int, n_batches: int, seed: int, *, split: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The same (n_batches * batch_size, T) windows on every call, so eval curves compare."""
    n = _check_len(data, block_size, split)
    if seed < 0:
        raise LLMClockError(f"seed must be >= 0, got {seed}")
    # A 5-word key: a seed stream of its own, apart from get_batch's 4-word keys.
    rng = np.random.Generator(np.random.PCG64([seed, 0, 0, 0, 1]))
    return _windows(data, rng.integers(0, n - block_size, size=n_batches * batch_size), block_size)
