"""The README's own workflow, as written: its `llmclock` command lines and Python blocks run in order.

Runs in-process in a directory holding a tiny `input.txt` and `corpus/`, with size-only
substitutions so it takes seconds (each must still match the README: an edit that drops one
fails here). `runs/demo` is the checkpoint the README's `train` lines make, as if the demo ran.
Commands other than the ones below (demo, torchrun, and those other sections add) are not run.
"""

from __future__ import annotations

import re
import sys
import time
import shlex
from pathlib import Path

import pytest

from llmclock.cli import main

README = Path(__file__).parents[1] / "README.md"
RUN = ("tokenizer", "prepare", "train", "eval", "generate", "chat", "trace", "replay", "export-hf", "import-hf",
       "compress")
SUBSTITUTE = {
    "--steps 2000": "--steps 12", "--steps 4000": "--steps 16", "--vocab-size 8192": "--vocab-size 300",
    "--eval-interval 250": "--eval-interval 6 --eval-batches 2", "--splits val test": "--splits val test --batches 2", "--max-new-tokens 100": "--max-new-tokens 20",
    "--max-new-tokens 64": "--max-new-tokens 12", "--recover-steps 200": "--recover-steps 2",
}
TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\n'
        'def fib(n):\n    """Return the n-th number."""\n    import os\n    return n\n\nclass You are terse.\nSystem: User: Assistant:\n') * 40


def readme_blocks() -> list[tuple[str, str]]:
    """('sh' | 'python', code) for every fenced block, in order."""
    return re.findall(r"```(sh|python)\n(.*?)```", README.read_text(), flags=re.S)


def commands(code: str) -> list[list[str]]:
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:1] == ["llmclock"] and argv[1] in RUN:
            out.append(argv[1:])
    return out


@pytest.mark.slow
def test_readme_workflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input.txt").write_text(TEXT)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(TEXT)
    (tmp_path / "corpus" / "b.txt").write_text(TEXT[::-1])
    used = set()
    ran = []
    for kind, code in readme_blocks():
        if kind == "python":
            if "llmclock" in code and "runs/demo/ckpt" in code:
                exec(compile(code, "README.md", "exec"), {"print": lambda *a, **k: None})
                ran.append("python")
            continue
        for argv in commands(code):
            line = shlex.join(argv)
            for old, new in SUBSTITUTE.items():
                if old in line:
                    used.add(old)
                    line = line.replace(old, new)
            argv = shlex.split(line)
            if argv[0] == "chat":
                monkeypatch.setattr("sys.stdin", __import__("io").StringIO("def fib\n"))
            t = time.perf_counter()
            code_ = main(argv)
            print(f"{time.perf_counter() - t:6.1f}s {line}", file=sys.__stderr__)
            out = capsys.readouterr()
            expected = (0, 1) if "--against" in argv else (0,)  # replay --against: 1 = the runs differ
            assert code_ in expected and "llmclock: error" not in out.err, f"{argv}: {out.err}"
            ran.append(argv[0])
            if argv[0] == "train" and not (tmp_path / "runs" / "demo").exists():
                (tmp_path / "runs" / "demo").symlink_to("shakespeare")  # the README's runs/demo/ckpt
            if argv[0] == "eval":
                assert "val: loss" in out.out and "test: empty" in out.out, out.out
            if argv[0] == "generate" and "--stop" in argv:
                assert "\n\n" not in out.out.split("class ", 1)[1].rstrip("\n"), out.out  # '\n\n' is a blank line, and stops
    assert used == set(SUBSTITUTE), f"README no longer has {set(SUBSTITUTE) - used}"
    assert set(RUN) | {"python"} <= set(ran), set(RUN) | {"python"} - set(ran)
    assert (tmp_path / "data" / "tokenizer.json").exists()  # prepare kept it; train took it from there
    assert (tmp_path / "runs" / "shakespeare" / "ckpt" / "tokenizer.json").exists()


@pytest.mark.parametrize("escaped, text", [(r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\\n", "\\n"), (r"\x41\u00e9", "Aé"),
                                           (r"\d", "\\d")])
def test_stop_escapes(escaped, text):
    from llmclock.cli.options import escaped as parse

    assert parse(escaped) == text
