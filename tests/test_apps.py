"""The applications: the docstring summarization set, summarize, retrieval for chat."""

import json
import os

import pytest

from llmclock.errors import LLMClockError

MODULE = '''
def add(a, b):
    """Return the sum of two numbers.

    More text that is not the summary.
    """
    return a + b


class Box:
    def open(self, force=False):
        """Open the box unless it is locked."""
        if force:
            return True
        return not self.locked

    def undocumented(self):
        return 1


def one_liner():
    """Only a docstring here."""
'''


def test_functions_drop_the_docstring_and_keep_its_first_line():
    from llmclock.docstrings import functions

    fns = {f.name: f for f in functions(MODULE)}
    assert set(fns) == {"add", "Box.open", "Box.undocumented", "one_liner"}
    assert fns["add"].summary == "Return the sum of two numbers."
    assert fns["add"].source == "def add(a, b):\n    return a + b"
    assert fns["Box.open"].source.startswith("def open(self, force=False):\n    if force:")  # dedented
    assert fns["Box.undocumented"].summary is None


def test_build_splits_by_module_deterministically(tmp_path):
    from llmclock.docstrings import build, split_of

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"mod{i}.py").write_text(MODULE)
    m = build(tmp_path / "set", sources=[str(src)], val_pct=20, test_pct=20)
    rows = {s: [json.loads(line) for line in (tmp_path / "set" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}
    modules = {s: {r["module"] for r in rs} for s, rs in rows.items()}
    assert not (modules["train"] & modules["val"]) and not (modules["train"] & modules["test"])
    assert not (modules["val"] & modules["test"])
    assert all(modules.values()) and sum(v["examples"] for v in m["splits"].values()) == 80  # add + Box.open each
    for s, rs in rows.items():
        assert all(split_of(r["module"], 20, 20) == s for r in rs)
        assert all(r["prompt"].endswith("\n# Summary:") and r["completion"] == " " + r["reference"] + "\n" for r in rs)
    with pytest.raises(LLMClockError, match="already exists"):
        build(tmp_path / "set", sources=[str(src)])  # never over an earlier set


def test_the_stdlib_gives_a_summarization_set():
    from llmclock.corpus import stdlib_root
    from llmclock.docstrings import examples

    files = [str(stdlib_root() / n) for n in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py")]
    out = examples(files, stdlib_root(), max_chars=600, val_pct=5, test_pct=5)
    rows = [r for rs in out.values() for r in rs]
    assert len(rows) >= 10
    assert all('"""' not in r["input"] for r in rows)


def test_summarize_file_one_line_per_function(tmp_path, tiny_model, char_tok):
    from llmclock.docstrings import summarize_file
    from llmclock.engine import Engine

    path = tmp_path / "f.py"
    path.write_text("def speak():\n    return 'First Citizen'\n\ndef all():\n    return 'resolved'\n")
    with pytest.raises(LLMClockError):  # 'd', 'f' and friends are outside the tiny char vocabulary
        summarize_file(Engine(tiny_model, char_tok, slots=2), path)
    from llmclock.tokenizer import Tokenizer

    tok = Tokenizer.train_char([path.read_text() + "\n# Summary:"])
    from llmclock.config import preset
    from llmclock.model import GPT

    eng = Engine(GPT(preset("test", vocab_size=tok.vocab_size)), tok, slots=2)
    out = summarize_file(eng, path, max_new_tokens=5)
    assert [f.name for f, _ in out] == ["speak", "all"] and all("\n" not in s for _, s in out)
    (tmp_path / "bad.py").write_text("def (:\n")
    with pytest.raises(LLMClockError, match="not a Python source file"):
        summarize_file(eng, tmp_path / "bad.py")


def test_retrieval_finds_the_passage_with_the_answer_and_reindexes_changes(tmp_path):
    from llmclock.retrieval import DocIndex, with_passages

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "birds.txt").write_text("Sparrows are small birds.\n\nThe albatross has the largest wingspan of any bird.")
    (docs / "fish.md").write_text("Salmon swim upstream to spawn.\n\nSharks have cartilage, not bone.")
    (docs / "notes.txt").write_text("Nothing relevant here at all.")
    idx = DocIndex(docs, tmp_path / "index.sqlite", max_chars=60)
    assert idx.refresh() == {"indexed": 3, "unchanged": 0, "removed": 0}
    best = idx.search("Which bird has the largest wingspan?", k=2)[0]
    assert best.path == "birds.txt" and "albatross" in best.text
    assert idx.search("what do sharks have instead of bone")[0].path == "fish.md"
    idx.close()

    idx = DocIndex(docs, tmp_path / "index.sqlite", max_chars=60)  # cached: nothing re-indexed
    assert idx.refresh() == {"indexed": 0, "unchanged": 3, "removed": 0}
    (docs / "fish.md").write_text("Tuna are fast swimmers.")
    st = (docs / "fish.md").stat()
    os.utime(docs / "fish.md", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (docs / "notes.txt").unlink()
    assert idx.refresh() == {"indexed": 1, "unchanged": 1, "removed": 1}
    assert idx.search("sharks cartilage") == [] and idx.search("tuna")[0].path == "fish.md"

    hits = idx.search("albatross sparrows birds", k=3)
    assert len(hits) == 2
    one_fits = lambda m: m[0]["content"].count("[") <= 1  # noqa: E731  (a budget that holds one passage)
    msgs, used = with_passages([{"role": "user", "content": "birds?"}], hits, one_fits)
    assert used == hits[:1] and msgs[0]["role"] == "system" and hits[0].text in msgs[0]["content"]
    assert with_passages(msgs[1:], hits, lambda m: False) == (msgs[1:], [])  # nothing fits: no passages


def test_retrieval_refuses_a_missing_folder(tmp_path):
    from llmclock.retrieval import DocIndex

    with pytest.raises(LLMClockError, match="not a directory"):
        DocIndex(tmp_path / "nope", tmp_path / "i.sqlite")
