"""Data: sources -> prepared shards -> batches; plus the built-in stdlib corpus."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

from llmclock.corpus import describe_stdlib, stdlib_sources
from llmclock.data import (
    SourceStats,
    TokenData,
    eval_batches,
    get_batch,
    iter_sources,
    prepare,
    token_dtype,
)
from llmclock.errors import LLMClockError
from llmclock.tokenizer import Tokenizer

ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n\t\r"


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train_char([ALPHABET])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def corpus(tmp_path: Path, n_files: int = 6) -> Path:
    root = tmp_path / "corpus"
    for i in range(n_files):
        write(root / f"doc{i}.txt", f"document {i}\n" + "lorem ipsum dolor sit amet\n" * (i + 3))
    return root


class SpyTokenizer:
    """Wraps a tokenizer and records the characters of text in each encode_batch call."""

    def __init__(self, inner: Tokenizer, fail_after: int | None = None) -> None:
        self.inner, self.calls, self.fail_after = inner, [], fail_after
        self.vocab_size, self.eot_id, self.hash, self.kind = inner.vocab_size, inner.eot_id, inner.hash, inner.kind

    def encode_batch(self, texts):
        self.calls.append(sum(len(t) for t in texts))
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.inner.encode_batch(texts)


class WideTokenizer:
    """A fake tokenizer with more than 65536 ids: id = code point + 70000."""

    vocab_size, eot_id, hash, kind = 70200, 70199, "wide", "char"

    def encode_batch(self, texts):
        return [[ord(c) + 70000 for c in t] for t in texts]


# ---------------------------------------------------------------- prepare


def test_prepare_is_deterministic(tmp_path, char_tok):
    src = corpus(tmp_path)
    m1 = prepare([src], char_tok, tmp_path / "a", val_fraction=0.2, test_fraction=0.2)
    m2 = prepare([src], char_tok, tmp_path / "b", val_fraction=0.2, test_fraction=0.2)
    assert m1 == m2
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    for split in ("train", "val", "test"):
        assert (tmp_path / f"a/{split}.bin").read_bytes() == (tmp_path / f"b/{split}.bin").read_bytes()
    assert m1["tokenizer_hash"] == char_tok.hash and m1["eot_id"] == char_tok.eot_id
    assert m1["documents"] == 6 and m1["files"] == 6 and m1["dtype"] == "uint16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "corpus"]  # no temp dirs left


def test_single_file_matches_nanogpt_split(tmp_path, char_tok):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 7
    f = write(tmp_path / "input.txt", text)
    prepare([f], char_tok, tmp_path / "d", val_fraction=0.1, test_fraction=0.0, shuffle_files=False)
    stream = np.array(char_tok.encode(text) + [char_tok.eot_id])
    n = len(stream)
    data = TokenData(tmp_path / "d")
    np.testing.assert_array_equal(data.tokens("train"), stream[: int(n * 0.9)])
    np.testing.assert_array_equal(data.tokens("val"), stream[int(n * 0.9) :])
    assert data.num_tokens("test") == 0 and len(data.tokens("test")) == 0


def test_contiguous_split_fractions(tmp_path, char_tok):
    src = corpus(tmp_path)
    m = prepare([src], char_tok, tmp_path / "d", val_fraction=0.05, test_fraction=0.05, shuffle_files=False)
    data = TokenData(tmp_path / "d")
    whole = np.concatenate([data.tokens(s) for s in ("train", "val", "test")])
    files = sorted(src.iterdir())
    expected = np.concatenate([char_tok.encode(f.read_text()) + [char_tok.eot_id] for f in files])
    np.testing.assert_array_equal(whole, expected)
    n = len(expected)
    assert m["total_tokens"] == n
    assert m["splits"]["train"]["tokens"] == n * 9 // 10
    assert m["splits"]["val"]["tokens"] == n * 95 // 100 - n * 9 // 10


def test_shuffle_files_is_seeded(tmp_path, char_tok):
    src = corpus(tmp_path, n_files=12)
    prepare([src], char_tok, tmp_path / "s1", seed=1, val_fraction=0.3, test_fraction=0)
    prepare([src], char_tok, tmp_path / "s2", seed=2, val_fraction=0.3, test_fraction=0)
    prepare([src], char_tok, tmp_path / "s1b", seed=1, val_fraction=0.3, test_fraction=0)
    read = lambda d: (tmp_path / d / "val.bin").read_bytes()  # noqa: E731
    assert read("s1") == read("s1b") and read("s1") != read("s2")


def test_dtype_choice(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(2**32) == np.uint32
    with pytest.raises(LLMClockError, match="2\\*\\*32"):
        token_dtype(2**32 + 1)
    write(tmp_path / "a.txt", "hello there, a wide vocabulary\n" * 4)
    m = prepare([tmp_path / "a.txt"], WideTokenizer(), tmp_path / "d", val_fraction=0.25, test_fraction=0)
    data = TokenData(tmp_path / "d")
    assert m["dtype"] == "uint32" and data.tokens("train").dtype == np.uint32
    assert data.tokens("train")[0] == ord("h") + 70000


def test_non_utf8_file_skipped_and_counted(tmp_path, char_tok):
    src = corpus(tmp_path)
    write(src / "zz_latin1.txt", "")
    (src / "zz_latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    stats = SourceStats()
    docs = list(iter_sources([src], stats=stats))
    assert len(docs) == 6 and stats.files == 7
    assert stats.skipped_non_utf8 == [str(src / "zz_latin1.txt")]
    m = prepare([src], char_tok, tmp_path / "d", val_fraction=0.1, test_fraction=0.1)
    assert m["skipped_non_utf8"] == {"count": 1, "files": [str(src / "zz_latin1.txt")]}


def test_missing_and_empty_corpus(tmp_path, char_tok):
    with pytest.raises(LLMClockError, match="no such file"):
        prepare([tmp_path / "missing"], char_tok, tmp_path / "d")
    with pytest.raises(LLMClockError, match="no files match"):
        list(iter_sources([str(tmp_path / "*.none")]))
    write(tmp_path / "empty/a.txt", "")
    write(tmp_path / "empty/b.txt", "")
    (tmp_path / "empty/c.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LLMClockError, match="no text found"):
        prepare([tmp_path / "empty"], char_tok, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_corpus_too_small_for_split(tmp_path, char_tok):
    write(tmp_path / "tiny.txt", "hi")
    with pytest.raises(LLMClockError, match="split 'val' gets 0 of 3 tokens"):
        prepare([tmp_path / "tiny.txt"], char_tok, tmp_path / "d", val_fraction=0.2, test_fraction=0.1)
    with pytest.raises(LLMClockError, match="sum to less than 1"):
        prepare([tmp_path / "tiny.txt"], char_tok, tmp_path / "d", val_fraction=0.5, test_fraction=0.5)


def test_jsonl_sources(tmp_path, char_tok):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "first doc"}\n\n{"body": "x", "text": "second\\ndoc"}\n{"text": ""}\n', encoding="utf-8")
    stats = SourceStats()
    assert [t for _, t in iter_sources([f], stats=stats)] == ["first doc", "second\ndoc"]
    assert stats.documents == 2 and stats.empty_documents == 1
    m = prepare([f], char_tok, tmp_path / "d", val_fraction=0.2, test_fraction=0, shuffle_files=False)
    assert m["documents"] == 2
    data = TokenData(tmp_path / "d")
    stream = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert char_tok.decode(stream) == "first doc<|endoftext|>second\ndoc<|endoftext|>"


def test_jsonl_bad_lines(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(LLMClockError, match="bad.jsonl:2: not a JSON"):
        list(iter_sources([f]))
    f.write_text('{"text": "ok"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(LLMClockError, match="bad.jsonl:2: no string field 'text'"):
        list(iter_sources([f]))


def test_directory_and_glob_sources(tmp_path):
    write(tmp_path / "d/b.txt", "b")
    write(tmp_path / "d/a.txt", "a")
    write(tmp_path / "d/sub/c.txt", "c")
    write(tmp_path / "d/.hidden/h.txt", "hidden")
    write(tmp_path / "d/.dotfile", "hidden")
    write(tmp_path / "g/x2.md", "x2")
    write(tmp_path / "g/x1.md", "x1")
    write(tmp_path / "g/y.txt", "y")
    texts = [t for _, t in iter_sources([tmp_path / "d", str(tmp_path / "g/*.md"), tmp_path / "d/a.txt"])]
    assert texts == ["a", "b", "c", "x1", "x2"]  # sorted walk, sorted glob, duplicates once
    texts = [t for _, t in iter_sources([str(tmp_path / "**/*.txt")])]
    assert texts == ["a", "b", "c", "y"]


def test_existing_out_dir(tmp_path, char_tok):
    src = corpus(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    write(out / "tokenizer.json", "{}")  # a dir with other files (no manifest) is fine
    prepare([src], char_tok, out, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(LLMClockError, match="already holds prepared data"):
        prepare([src], char_tok, out)
    m = prepare([src], char_tok, out, val_fraction=0.2, test_fraction=0.1, overwrite=True)
    assert TokenData(out).manifest == m and (out / "tokenizer.json").exists()
    write(tmp_path / "file", "x")
    with pytest.raises(LLMClockError, match="not a directory"):
        prepare([src], char_tok, tmp_path / "file")


def test_crash_leaves_nothing_behind(tmp_path, char_tok):
    src = corpus(tmp_path)
    spy = SpyTokenizer(char_tok, fail_after=2)
    with pytest.raises(RuntimeError):
        prepare([src], spy, tmp_path / "out", chunk_chars=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_prepare_streams_in_bounded_chunks(tmp_path):
    lines = []
    for i in range(400):  # code-like text: indented lines, blank lines, CRLF, unicode
        lines.append(f"def f{i}(x):\r\n    return x * {i}  # é😀\n\n" if i % 3 else f"Line {i} of prose.\n")
    big = "".join(lines)
    write(tmp_path / "src/big.txt", big)
    for i in range(20):
        write(tmp_path / f"src/small{i:02d}.txt", f"small file {i}\n" * 3)
    bpe = Tokenizer.train_bpe([big], 400)
    spy = SpyTokenizer(bpe)
    progress = []
    prepare([tmp_path / "src"], spy, tmp_path / "chunked", chunk_chars=500, progress=progress.append)
    assert len(spy.calls) > 20 and max(spy.calls) < 1000  # never the whole corpus at once
    assert sum(progress) == sum(f.stat().st_size for f in (tmp_path / "src").iterdir())
    prepare([tmp_path / "src"], bpe, tmp_path / "whole", chunk_chars=10**9)
    for split in ("train", "val", "test"):  # chunking does not change a single token
        a = (tmp_path / f"chunked/{split}.bin").read_bytes()
        assert a == (tmp_path / f"whole/{split}.bin").read_bytes()


# ---------------------------------------------------------------- TokenData


def test_token_data_detects_bad_files(tmp_path, char_tok):
    prepare([corpus(tmp_path)], char_tok, tmp_path / "d", val_fraction=0.1, test_fraction=0.1)
    data = TokenData(tmp_path / "d")
    assert data.vocab_size == char_tok.vocab_size and data.tokenizer_hash == char_tok.hash
    assert isinstance(data.tokens("train"), np.memmap) and not data.tokens("train").flags.writeable
    with pytest.raises(LLMClockError, match="no split 'dev'"):
        data.tokens("dev")
    val = tmp_path / "d/val.bin"
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(LLMClockError, match="val.bin: .* bytes, but the manifest says"):
        TokenData(tmp_path / "d")
    val.unlink()
    with pytest.raises(LLMClockError, match="val.bin: missing"):
        TokenData(tmp_path / "d")
    (tmp_path / "d/manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(LLMClockError, match="manifest.json: invalid"):
        TokenData(tmp_path / "d")
    with pytest.raises(LLMClockError, match="manifest.json: not found"):
        TokenData(tmp_path)


# ---------------------------------------------------------------- batches


def test_get_batch_deterministic_and_shifted():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 4, 16, seed=7, step=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x + 1)  # arange: the next token is x + 1
    x2, _ = get_batch(data, 4, 16, seed=7, step=3)
    np.testing.assert_array_equal(x, x2)
    for other in (dict(seed=8, step=3), dict(seed=7, step=4), dict(seed=7, step=3, micro=1), dict(seed=7, step=3, rank=1)):
        assert not np.array_equal(get_batch(data, 4, 16, **other)[0], x)
    # the last window may end exactly at the final token
    xs, ys = get_batch(np.arange(17, dtype=np.uint16), 8, 16, seed=0, step=0)
    np.testing.assert_array_equal(ys[0], np.arange(1, 17))


def test_get_batch_split_too_small():
    with pytest.raises(LLMClockError, match="split 'val' has 16 tokens, need more than block_size=16"):
        get_batch(np.zeros(16, np.uint16), 2, 16, seed=0, step=0, split="val")
    with pytest.raises(LLMClockError, match="need more than block_size"):
        eval_batches(np.zeros(0, np.uint16), 2, 16, 3, seed=0)


def test_eval_batches_fixed():
    data = np.arange(500, dtype=np.uint32)
    x, y = eval_batches(data, 4, 8, 3, seed=1)
    assert x.shape == y.shape == (12, 8)
    np.testing.assert_array_equal(y, x + 1)
    x2, y2 = eval_batches(data, 4, 8, 3, seed=1)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(eval_batches(data, 4, 8, 3, seed=2)[0], x)


# ---------------------------------------------------------------- the stdlib corpus


def test_stdlib_corpus():
    start = time.perf_counter()
    files = stdlib_sources()
    info = describe_stdlib()
    assert time.perf_counter() - start < 1.0
    assert files == sorted(files) and info["files"] == len(files) > 100
    assert any(f.endswith(os.path.join("pydoc_data", "topics.py")) for f in files)
    parts = {part for f in files for part in Path(f).relative_to(info["path"]).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    assert info["bytes"] == sum(os.path.getsize(f) for f in files)
