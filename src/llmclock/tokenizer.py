"""Text <-> token ids: byte-level BPE (GPT-2 style) or a character vocabulary.

Both kinds are plain Hugging Face `tokenizers` pipelines, so either saves as an ordinary
`tokenizer.json`. This module does not import torch.

The literal text ``<|endoftext|>`` inside ordinary text is encoded as ordinary text (the
way tiktoken's ``encode_ordinary`` does, which nanoGPT's data preparation uses): document
boundaries are never injected by the data itself, only by code that appends `eot_id`
explicitly. Decoding `eot_id` yields the text ``<|endoftext|>``, so
``decode(encode(s)) == s`` holds for every string a tokenizer can encode.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import LLMClockError

EOT = "<|endoftext|>"
"""The one special token: separates documents (GPT-2's id 50256)."""


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half.

    The file gets the permissions of any file the user creates (mkstemp's would be 0600)."""
    if not path.absolute().parent.is_dir():
        raise LLMClockError(f"{path}: the folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise LLMClockError(f"{path}: cannot write in {path.parent} ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise LLMClockError(f"{path}: cannot write ({e.strerror})") from None
        raise


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LLMClockError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LLMClockError(f"{path}: cannot read tokenizer file ({e})") from None


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the symbols of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


class Tokenizer:
    """A byte-level BPE or character-level tokenizer with an ``<|endoftext|>`` token.

    Build one with `train_bpe`, `train_char` or `load`. Encoding never adds special tokens;
    callers append `eot_id` where a document ends.
    """

    def __init__(self, hf: HFTokenizer, *, origin: str = "tokenizer") -> None:
        """Wrap a HF tokenizer; `origin` (a file name) is used in error messages."""
        hf.no_truncation()  # ids must be exactly the text's, whatever a loaded file configured
        hf.no_padding()
        spec = json.loads(hf.to_str())
        model_type = spec["model"]["type"]
        if model_type == "BPE":
            self.kind = "bpe"
        elif model_type == "WordLevel":
            self.kind = "char"
        else:
            raise LLMClockError(f"{origin}: unsupported tokenizer model {model_type!r} (need BPE or WordLevel)")
        eot_id = hf.token_to_id(EOT)
        if eot_id is None:
            raise LLMClockError(f"{origin}: the vocabulary has no {EOT} token")
        hf.encode_special_tokens = True  # literal "<|endoftext|>" in text is ordinary text
        self._hf = hf
        self._spec = spec
        self._origin = origin
        self.eot_id: int = eot_id
        """Id of ``<|endoftext|>``."""

    # ---------------------------------------------------------------- building

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE with `vocab_size` ids in all.

        All 256 bytes are in the base alphabet, so any text round-trips exactly. The trained
        vocabulary takes ids ``0 .. vocab_size-2`` and ``<|endoftext|>`` comes last, as in
        GPT-2. A corpus too small to learn that many merges gives a smaller vocabulary.
        """
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise LLMClockError(f"tokenizer: vocab_size must be an integer, got {vocab_size!r}")
        if not 257 <= vocab_size <= 2**31:
            raise LLMClockError(
                f"tokenizer: vocab_size must be between 257 (256 bytes + {EOT}) and 2**31, got {vocab_size}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        hf.train_from_iterator(texts, trainer)
        hf.add_special_tokens([EOT])
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str], *, progress: bool = False) -> Tokenizer:
        """Build a vocabulary of every character seen (sorted), then ``<|endoftext|>`` last.

        `progress` is accepted for symmetry with `train_bpe`; counting characters is quick.
        """
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise LLMClockError("tokenizer: no text to build a character vocabulary from")
        vocab = {ch: i for i, ch in enumerate(sorted(seen))}
        vocab[EOT] = len(vocab)
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
        # One pre-token per code point; Fuse joins tokens back without separators.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([EOT])
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` file, a directory holding one, or GPT-2's vocab.json + merges.txt."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls._load_gpt2_files(path / "vocab.json", path / "merges.txt")
            else:
                raise LLMClockError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this directory")
        text = _read_text(path)
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception
            raise LLMClockError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        return cls(hf, origin=str(path))

    @classmethod
    def _load_gpt2_files(cls, vocab_path: Path, merges_path: Path) -> Tokenizer:
        try:
            vocab = json.loads(_read_text(vocab_path))
        except json.JSONDecodeError as e:
            raise LLMClockError(f"{vocab_path}: not valid JSON ({e})") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise LLMClockError(f"{vocab_path}: expected a JSON object mapping token -> id")
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(_read_text(merges_path).splitlines(), 1):
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
                raise LLMClockError(f"{merges_path}:{lineno}: bad merge line {line!r}")
            merges.append((pair[0], pair[1]))
        try:
            hf = HFTokenizer(models.BPE(vocab, merges))
        except Exception as e:
            raise LLMClockError(f"{merges_path}: cannot build BPE from these files ({e})") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOT])  # reuses the id vocab.json gives it (50256 for GPT-2)
        return cls(hf, origin=str(vocab_path))

    def as_byte_level(self) -> Tokenizer:
        """This tokenizer as an equal byte-level BPE (same ids), the only kind GPT-2's loaders read.

        A character vocabulary becomes BPE with no merges when each character is one UTF-8 byte
        (ASCII): every character is then a byte symbol of its own. A character of several bytes
        would need ids for its byte pieces, which the model does not have, so it is refused.
        """
        if self.kind == "bpe":
            return self
        vocab = {ch: i for ch, i in self._hf.get_vocab(with_added_tokens=False).items() if ch != EOT}
        wide = sorted(ch for ch in vocab if len(ch.encode("utf-8")) != 1)
        if wide:
            shown = ", ".join(repr(ch) for ch in wide[:3]) + (f" and {len(wide) - 3} more" if len(wide) > 3 else "")
            raise LLMClockError(
                f"{self._origin}: the character vocabulary has {len(wide)} character(s) outside ASCII ({shown}); "
                "byte-level BPE cannot give each of them one id"
            )
        to_unicode = _byte_to_unicode()
        byte_vocab = {to_unicode[ch.encode("utf-8")[0]]: i for ch, i in vocab.items()}
        byte_vocab[EOT] = self.eot_id
        hf = HFTokenizer(models.BPE(byte_vocab, []))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOT])
        return Tokenizer(hf, origin=self._origin)

    # ---------------------------------------------------------------- saving

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically; `path` is the file, or a directory to put it in."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        _atomic_write_text(path, self._hf.to_str(pretty=True))
        return path

    def save_gpt2_files(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write GPT-2's vocab.json + merges.txt (byte-level BPE only), e.g. for a HF export."""
        pre = self._spec.get("pre_tokenizer") or {}
        if self.kind != "bpe" or pre.get("type") != "ByteLevel":
            raise LLMClockError(f"{self._origin}: only a byte-level BPE tokenizer has GPT-2 vocab/merges files")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = self._hf.get_vocab(with_added_tokens=True)
        ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        lines = ["#version: 0.2"]
        for merge in self._spec["model"]["merges"]:
            lines.append(merge if isinstance(merge, str) else " ".join(merge))  # old and new JSON forms
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        _atomic_write_text(vocab_path, json.dumps(ordered, ensure_ascii=False))
        _atomic_write_text(merges_path, "\n".join(lines) + "\n")
        return vocab_path, merges_path

    # ---------------------------------------------------------------- using

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @cached_property
    def hash(self) -> str:
        """sha256 hex of the canonical tokenizer JSON: equal hashes mean equal token ids."""
        canonical = json.dumps(self._spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; no special tokens are added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for each text, encoded in parallel by the Rust batch path."""
        try:
            encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
        except Exception as e:
            if self.kind == "char":
                self._raise_unknown_chars(texts)
            raise LLMClockError(f"{self._origin}: cannot encode text ({e})") from None
        return [enc.ids for enc in encodings]

    def _raise_unknown_chars(self, texts: Sequence[str]) -> None:
        known = {tok for tok in self._hf.get_vocab() if len(tok) == 1}
        for text in texts:
            unknown = sorted(set(text) - known)
            if unknown:
                ch = unknown[0]
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                raise LLMClockError(
                    f"{self._origin}: character {ch!r} (U+{ord(ch):04X}) is not in the char vocabulary{more}"
                )

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids` (numpy arrays welcome); `eot_id` decodes to ``<|endoftext|>``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise LLMClockError(f"{self._origin}: token id {bad} is outside the vocabulary (size {self.vocab_size})")
        return self._hf.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry for id `i` (byte-level BPE entries use GPT-2's byte-to-char map)."""
        token = self._hf.id_to_token(int(i))
        if token is None:
            raise LLMClockError(f"{self._origin}: token id {i} is outside the vocabulary (size {self.vocab_size})")
        return token

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"
