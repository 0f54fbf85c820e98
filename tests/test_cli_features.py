"""Behaviour of the command line beyond bad input: resume rules, generate's report and flags, chat's
Ctrl-C, interrupts, file permissions, valid JSON, the trace plot. In-process where it can be."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmclock.cli import main

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "System: User: Assistant: def class\n") * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from llmclock.checkpoint import write_checkpoint
    from llmclock.config import preset
    from llmclock.model import GPT
    from llmclock.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("feat")
    (d / "corpus.txt").write_text(TEXT)
    tok = Tokenizer.train_char([TEXT])
    torch.manual_seed(0)
    write_checkpoint(d / "ck", GPT(preset("test", vocab_size=tok.vocab_size)).eval(), tok)
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_resume_refuses_contradictions_and_stops_at_steps(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "prepare", tiny / "corpus.txt", "--tokenizer", tiny / "ck", "--out", "data")[0] == 0
    base = ["train", "--data", "data", "--out", "r", "--preset", "test", "--block-size", "16", "--batch-size", "2",
            "--eval-batches", "1", "--steps", "3"]
    assert run(capsys, *base)[0] == 0  # the tokenizer comes from data/, as prepare left it
    metrics = Path("r/metrics.jsonl").read_text()
    code, _, err = run(capsys, *base[:-2], "--batch-size", "3", "--steps", "5", "--resume")
    assert code == 1 and "--batch-size 3 (checkpoint: 2)" in err and "--override" in err
    code, _, err = run(capsys, *base, "--resume", "--n-embd", "64", "--n-head", "2")
    assert code == 1 and "--n-embd 64 (checkpoint: 32)" in err
    code, out, _ = run(capsys, "train", "--data", "data", "--out", "r", "--resume")
    assert code == 0 and "already at step 3" in out and "nothing to do" in out
    assert Path("r/metrics.jsonl").read_text() == metrics  # no second record for step 3
    code, out, _ = run(capsys, "train", "--data", "data", "--out", "r", "--resume", "--steps", "4", "--lr", "2e-3",
                       "--override")
    assert code == 0 and "trained to step 4" in out


def test_generate_reports_and_flags(tiny, capsys):
    ck = tiny / "ck"
    code, out, err = run(capsys, "generate", "--ckpt", ck, "--prompt", "First", "--prompt", "All", "--temperature", "0",
                         "--max-new-tokens", "4", "--logprobs", "2", "--ignore-eos")
    assert code == 0 and "--- prompt 1" in out and "--- prompt 2" in out and out.count("logprobs (token") == 2
    assert err.count("[length: --max-new-tokens 4 reached; 4 tokens]") == 2
    code, out, err = run(capsys, "generate", "--ckpt", ck, "--prompt", "First " * 20, "--truncate", "--temperature", "0")
    assert code == 0 and "the context (64 tokens) is full; 1 token; --truncate kept the last 64" in err
    # a bias of +100 on one id makes it the greedy choice; that id as a stop token ends at once
    code, out, err = run(capsys, "generate", "--ckpt", ck, "--prompt", "First", "--temperature", "0",
                         "--logit-bias", "5=100", "--stop-token-id", "5")
    assert code == 0 and "[stop: a --stop-token-id; 1 token]" in err


def test_chat_ctrl_c_stops_the_reply_and_bad_utf8_is_refused(tiny):
    from llmclock.chat import chat_loop
    from llmclock.checkpoint import load_checkpoint
    from llmclock.engine import Engine, SamplingParams

    engine = Engine(*load_checkpoint(tiny / "ck"))
    lines = iter(["hear me", "caf\udce9", "speak"])
    said, state = [], {"replying": False, "tokens": 0}

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def echo(*a, end="\n"):
        text = "".join(map(str, a)) + end
        if text == "bot> ":
            state["replying"] = True
        elif state["replying"] and end == "":  # a token of the reply
            state["tokens"] += 1
            if state["tokens"] == 3:  # Ctrl-C in the middle of the first reply
                raise KeyboardInterrupt
        else:
            state["replying"] = False
        said.append(text)

    history = chat_loop(engine, SamplingParams(max_new_tokens=6, seed=1, ignore_eos=True), echo=echo, read=read)
    text = "".join(said)
    assert " [stopped]" in text and "not valid UTF-8" in text
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert not engine.has_work() and history[-1]["content"]  # the one slot was freed: the next reply ran


def test_ctrl_c_during_imports_is_one_line(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def interrupted(name, *a, **k):
        if "checkpoint" in name:
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    code = main(["generate", "--ckpt", "x", "--prompt", "y"])
    assert code == 130 and capsys.readouterr().err.strip() == "llmclock: interrupted"


@pytest.mark.slow
def test_sigint_at_any_moment_exits_130(tiny):
    """A real SIGINT at several moments of a run (imports, loading, generating): one line, exit 130."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for delay in (0.3, 0.8, 1.5, 3.0):
        p = subprocess.Popen([sys.executable, "-m", "llmclock", "generate", "--ckpt", str(tiny / "ck"), "--prompt",
                              "First", "--ignore-eos", "--num-samples", "10000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            p.wait(delay)
            pytest.fail(f"finished before the interrupt at {delay} s")
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if p.returncode != 0 and "/llmclock/" not in err and "llmclock: " not in err:
            continue  # the interpreter itself was still starting (site, .pth files): no llmclock file had run yet
        # generate's finish lines ("[length: ...]") of samples done before the interrupt may precede it
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[")]
        assert p.returncode == 130 and lines == ["llmclock: interrupted"], (delay, p.returncode, err)


def test_sigint_while_the_command_imports_is_one_line():
    """From the first line of llmclock/__init__.py on, a command's Ctrl-C is one line and exit 130,
    even before __main__.run's handler exists; a plain `import llmclock` leaves SIGINT alone."""
    code = ("import os, signal, sys, time; sys.argv[0] = sys.argv[0] if LIB else '/usr/bin/llmclock'; import llmclock; "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5); print('still here')")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for lib in (False, True):
        p = subprocess.run([sys.executable, "-c", f"LIB = {lib}; " + code], capture_output=True, text=True, env=env,
                           timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        if lib:  # a library import: Python's own KeyboardInterrupt, as any program would get
            assert p.returncode != 130 and "KeyboardInterrupt" in p.stderr, p.stderr
        else:
            assert (p.returncode, p.stderr, p.stdout) == (130, "llmclock: interrupted\n", ""), p.stderr


def test_files_follow_the_umask(tiny, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert run(capsys, "export-hf", tiny / "ck", tmp_path / "hf")[0] == 0
        assert run(capsys, "import-hf", tmp_path / "hf", tmp_path / "back")[0] == 0
        assert run(capsys, "tokenizer", "train", tiny / "corpus.txt", "--char", "--out", tmp_path / "t.json")[0] == 0
    finally:
        os.umask(old)
    for f in [*(tmp_path / "back").iterdir(), *(tmp_path / "hf").iterdir(), tmp_path / "t.json"]:
        assert f.stat().st_mode & 0o777 == 0o640, f
    # --overwrite replaces an earlier export whole
    assert run(capsys, "export-hf", tiny / "ck", tmp_path / "hf", "--overwrite")[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_train_reports_skipped_files_and_no_blank_lines(tiny, tmp_path, capfd):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(TEXT)
    (tmp_path / "src" / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert main(["tokenizer", "train", str(tmp_path / "src"), "--vocab-size", "300", "--out",
                 str(tmp_path / "t.json")]) == 0
    out = capfd.readouterr()
    assert "skipped 1 non-UTF-8 file(s): " in out.out and "latin1.txt" in out.out
    assert "" not in (out.out + out.err).splitlines()


def test_trace_json_stays_valid_with_nan(tiny, tmp_path):
    from llmclock.checkpoint import load_checkpoint
    from llmclock.engine import Engine, SamplingParams
    from llmclock.trace import Tracer

    engine = Engine(*load_checkpoint(tiny / "ck"), slots=2)
    with Tracer(engine) as tr:
        engine.complete(["First", "All"], SamplingParams(max_new_tokens=3, seed=1))
    tr.records[1].logprob, tr.records[2].entropy = float("nan"), float("-inf")
    paths = tr.write(tmp_path / "t", tr.header())

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    strict(paths["perfetto"].read_text())
    for line in paths["jsonl"].read_text().splitlines():
        strict(line)


def test_waveform_labels_stay_apart_and_inside(tiny):
    """Several slots, many cycles: token labels neither overlap nor leave their panel; ticks are integers."""
    from llmclock.checkpoint import load_checkpoint
    from llmclock.engine import Engine, SamplingParams
    from llmclock.trace import Tracer
    from llmclock.trace_export import STAGE_COLORS, waveform_figure

    engine = Engine(*load_checkpoint(tiny / "ck"), slots=3)
    with Tracer(engine) as tr:
        engine.complete(["First", "All", "Speak"], [SamplingParams(max_new_tokens=n, seed=1, ignore_eos=True)
                                                    for n in (50, 20, 58)])
    fig = waveform_figure(tr.records, "test")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    panel = ax.get_window_extent(r)
    boxes = [t.get_window_extent(r) for t in ax.texts if t.get_visible()]
    assert len(boxes) >= 50
    for b in boxes:
        assert panel.x0 <= b.x0 and b.x1 <= panel.x1 and panel.y0 <= b.y0 and b.y1 <= panel.y1
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    assert ax.get_legend() is not None and [t.get_text() for t in ax.get_legend().get_texts()] == [
        "slot 0", "slot 1", "slot 2"]
    slot_colors = {t.get_color() for t in ax.texts}
    assert not slot_colors & set(STAGE_COLORS.values())
    ticks = fig.axes[3].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    assert any(t.get_text() == "prefill" for t in fig.axes[1].texts)
    assert math.isfinite(sum(b.width for b in boxes))
