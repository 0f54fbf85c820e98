"""Tokenizer: exact round trips, save/load stability, GPT-2 file loading, clear errors."""

import json

import pytest

from llmclock.errors import LLMClockError
from llmclock.tokenizer import EOT, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 20,
    "def add(a, b):\n    return a + b\n\n" * 10,
    "日本語のテキスト 😀🎉 mixed\ttabs  and\r\nCRLF lines\n",
]

TRICKY = [
    "hello world",
    " leading space and trailing space ",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇯🇵",
    "CJK 中文 日本語 한국어",
    "mixed \t\twhitespace\r\n\n\n   \x0b\x0c end",
    "",
    b"bad \xff\xfe bytes \xc3( end\xe2\x82".decode("utf-8", errors="replace"),
    "unicode é ñ ß \u200b zero-width \U0001d54f math",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, 320)


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_replacement_char_text_round_trips(bpe):
    text = b"\x80abc\xff".decode("utf-8", errors="replace")
    assert "\ufffd" in text
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_layout(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 320
    assert bpe.eot_id == 319  # last, as in GPT-2
    assert bpe.id_to_token(bpe.eot_id) == EOT
    assert bpe.decode([bpe.eot_id]) == EOT
    assert bpe.encode_batch(["hello", "world"]) == [bpe.encode("hello"), bpe.encode("world")]


def test_literal_eot_is_ordinary_text(bpe):
    ids = bpe.encode(f"a{EOT}b")
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == f"a{EOT}b"


def test_bpe_vocab_size_bounds():
    with pytest.raises(LLMClockError, match="257"):
        Tokenizer.train_bpe(CORPUS, 256)
    with pytest.raises(LLMClockError, match="2\\*\\*31"):
        Tokenizer.train_bpe(CORPUS, 2**31 + 1)
    assert Tokenizer.train_bpe(CORPUS, 257).vocab_size == 257  # bytes + EOT, no merges


def test_save_load_same_ids_and_hash(bpe, tmp_path):
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    for loaded in (Tokenizer.load(path), Tokenizer.load(tmp_path)):
        assert loaded.hash == bpe.hash
        assert loaded.kind == "bpe" and loaded.eot_id == bpe.eot_id
        for text in TRICKY:
            assert loaded.encode(text) == bpe.encode(text)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write cleaned up


def test_hash_differs_between_tokenizers(bpe):
    assert Tokenizer.train_bpe(CORPUS, 300).hash != bpe.hash


def test_gpt2_files_round_trip(bpe, tmp_path):
    bpe.save_gpt2_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[EOT] == bpe.eot_id
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == bpe.vocab_size and loaded.eot_id == bpe.eot_id
    for text in TRICKY + CORPUS:
        assert loaded.encode(text) == bpe.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_gpt2_files_eot_id_taken_from_vocab(bpe, tmp_path):
    # GPT-2's real vocab.json puts <|endoftext|> at 50256; whatever id it says is kept.
    bpe.save_gpt2_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert Tokenizer.load(tmp_path).eot_id == vocab[EOT]


def test_bad_merges_line(bpe, tmp_path):
    bpe.save_gpt2_files(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot_a_pair\n", encoding="utf-8")
    with pytest.raises(LLMClockError, match="merges.txt:2"):
        Tokenizer.load(tmp_path)


def test_char_round_trip_and_layout():
    text = "Hello,  world!\n\tTabs\r\nand é 😀\n\n"
    tok = Tokenizer.train_char([text])
    assert tok.kind == "char"
    assert tok.vocab_size == len(set(text)) + 1 and tok.eot_id == tok.vocab_size - 1
    assert [tok.id_to_token(i) for i in range(tok.vocab_size - 1)] == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text)
    assert tok.decode(tok.encode(" \n ")) == " \n "


def test_char_unknown_character(tmp_path):
    tok = Tokenizer.train_char(["abc"])
    with pytest.raises(LLMClockError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(LLMClockError, match="U\\+00E9"):
        tok.encode_batch(["ab", "é"])


def test_char_save_load(tmp_path):
    tok = Tokenizer.train_char(["some text\nwith lines\n"])
    loaded = Tokenizer.load(tok.save(tmp_path / "char.json"))
    assert loaded.kind == "char" and loaded.hash == tok.hash
    assert loaded.encode("text lines\n") == tok.encode("text lines\n")
    with pytest.raises(LLMClockError, match="byte-level"):
        tok.save_gpt2_files(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(LLMClockError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(LLMClockError, match="tokenizer.json"):
        Tokenizer.load(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMClockError, match="empty"):
        Tokenizer.load(empty)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text("{not json", encoding="utf-8")
    (gpt2 / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(LLMClockError, match="vocab.json"):
        Tokenizer.load(gpt2)


def test_decode_rejects_out_of_range(bpe):
    with pytest.raises(LLMClockError, match="outside"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(LLMClockError, match="outside"):
        bpe.id_to_token(10**6)
