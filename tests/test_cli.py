"""The subcommands end to end on a tiny corpus, and every bad input as one line + non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).parents[1] / "src")


def run(*args, cwd=None, ok=True):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "llmclock", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def one_line_error(p, *needles):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmclock: error:"), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, corpus_file):
    d = tmp_path_factory.mktemp("cli")
    run("tokenizer", "train", corpus_file, "--vocab-size", "300", "--out", d / "tok.json")
    run("prepare", corpus_file, "--tokenizer", d / "tok.json", "--out", d / "data", "--val", "0.1", "--test", "0.1")
    p = run("train", "--data", d / "data", "--tokenizer", d / "tok.json", "--out", d / "run", "--preset", "test",
            "--steps", "30", "--batch-size", "4", "--block-size", "32", "--eval-interval", "10", "--eval-batches", "2",
            "--device", "cpu")
    assert "val   loss" in p.stdout and "test  loss" in p.stdout
    return d


def test_pipeline_files(pipeline):
    d = pipeline
    assert json.loads((d / "data" / "manifest.json").read_text())["splits"]["val"]["tokens"] > 0
    ck = d / "run" / "ckpt"
    assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                              "optimizer.safetensors", "train_state.json"}
    assert (d / "run" / "loss.png").exists() and (d / "run" / "metrics.jsonl").exists()


def test_resume_and_eval_and_generate(pipeline):
    d = pipeline
    p = run("train", "--data", d / "data", "--tokenizer", d / "tok.json", "--out", d / "run", "--preset", "test",
            "--steps", "35", "--batch-size", "4", "--block-size", "32", "--eval-batches", "2", "--device", "cpu",
            "--resume")
    assert "trained to step 35" in p.stdout
    p = run("eval", "--ckpt", d / "run" / "ckpt", "--data", d / "data", "--batches", "2", "--block-size", "32")
    assert p.stdout.startswith("val: loss") and "test: loss" in p.stdout
    p = run("generate", "--ckpt", d / "run" / "ckpt", "--prompt", "First", "--max-new-tokens", "12",
            "--temperature", "0")
    assert p.stdout.startswith("First") and len(p.stdout) > len("First")
    a = run("generate", "--ckpt", d / "run" / "ckpt", "--prompt", "All", "--max-new-tokens", "12", "--seed", "7")
    b = run("generate", "--ckpt", d / "run" / "ckpt", "--prompt", "All", "--max-new-tokens", "12", "--seed", "7")
    assert a.stdout == b.stdout


def test_chat_keeps_history(pipeline):
    d = pipeline
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.run([sys.executable, "-m", "llmclock", "chat", "--ckpt", str(d / "run" / "ckpt"),
                        "--max-new-tokens", "8", "--seed", "1"], input="hello\nhow are you\n", capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("bot> ") == 2


def test_bad_inputs(pipeline, tmp_path):
    d = pipeline
    one_line_error(run("prepare", tmp_path / "missing.txt", "--tokenizer", d / "tok.json", "--out", tmp_path / "o",
                       ok=False), "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(run("prepare", tmp_path / "empty.txt", "--tokenizer", d / "tok.json", "--out", tmp_path / "o",
                       ok=False), "no text")
    one_line_error(run("generate", "--ckpt", tmp_path / "nope", "--prompt", "x", ok=False), "not found")
    one_line_error(run("train", "--data", d / "data", "--tokenizer", d / "tok.json", "--out", tmp_path / "r",
                       "--preset", "gpt7", ok=False), "unknown preset")
    one_line_error(run("train", "--data", d / "data", "--tokenizer", d / "tok.json", "--out", tmp_path / "r",
                       "--preset", "test", "--block-size", "32", "--context", "16", ok=False), "larger than the model's context")
    one_line_error(run("train", "--data", d / "data", "--out", d / "run", "--preset", "test", "--block-size", "32",
                       ok=False), "--resume")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (d / "run" / "ckpt").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    one_line_error(run("generate", "--ckpt", bad, "--prompt", "x", ok=False), "model.safetensors")
    one_line_error(run("generate", "--ckpt", d / "run" / "ckpt", "--prompt", "x", "--top-p", "0", ok=False), "top_p")


def test_non_utf8_files_are_skipped_and_counted(tmp_path, pipeline, corpus_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(corpus_file.read_text())
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    p = run("prepare", src, "--tokenizer", pipeline / "tok.json", "--out", tmp_path / "data")
    assert "skipped 1 non-UTF-8 file" in p.stdout


def test_demo_tiny_budget(tmp_path, monkeypatch):
    """The main job, end to end, on a small slice of the embedded corpus and a seconds-long budget."""
    p = run("demo", "--minutes", "0.15", "--preset", "test", "--vocab-size", "400", "--max-files", "40", cwd=tmp_path)
    out = p.stdout
    for needle in ("standard library", "[3/5] training", "val   loss", "test  loss", "samples", "loss curve"):
        assert needle in out, out
    run_dir = tmp_path / "runs" / "demo"
    assert (run_dir / "ckpt" / "model.safetensors").exists() and (run_dir / "loss.png").exists()
    assert (run_dir / "trace" / "trace.png").exists() and (run_dir / "trace" / "trace.perfetto.json").exists()
    assert "time share:" in out and "llmclock trace --ckpt" in out and "llmclock replay" in out
    again = run("demo", "--minutes", "0.1", "--preset", "test", "--vocab-size", "400", "--max-files", "40", cwd=tmp_path)
    assert "reusing tokenizer" in again.stdout and (tmp_path / "runs" / "demo-1" / "ckpt").exists()


def test_import_export_hf(pipeline, tmp_path):
    d = pipeline
    run("export-hf", d / "run" / "ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    run("import-hf", tmp_path / "hf", tmp_path / "back")
    p = run("generate", "--ckpt", tmp_path / "back", "--prompt", "First", "--max-new-tokens", "8", "--temperature", "0")
    q = run("generate", "--ckpt", d / "run" / "ckpt", "--prompt", "First", "--max-new-tokens", "8", "--temperature", "0")
    assert p.stdout == q.stdout
    torch_bin = tmp_path / "pkl"
    torch_bin.mkdir()
    for f in ("config.json", "vocab.json", "merges.txt"):
        (torch_bin / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    (torch_bin / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    one_line_error(run("import-hf", torch_bin, tmp_path / "x", ok=False), "--allow-pickle")
