import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmclock.config import TrainConfig, preset
from llmclock.data import TokenData
from llmclock.errors import LLMClockError
from llmclock.train import lr_at, train


def _cfg(**kw):
    base = dict(max_steps=12, batch_size=4, block_size=32, warmup_steps=3, eval_interval=5, eval_batches=2,
                learning_rate=3e-3, min_lr=3e-4, device="cpu")
    return TrainConfig(**{**base, **kw})


def _mcfg(data):
    return preset("test", vocab_size=data.vocab_size, dropout=0.1)


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_loss_falls_and_files_written(tmp_path, data_dir, char_tok):
    data = TokenData(data_dir)
    r = train(_mcfg(data), _cfg(max_steps=40), data, tmp_path / "run", tokenizer=char_tok, progress=False, log_interval=1)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40 and losses[-1] < losses[0] - 0.5
    assert set(r.evals) == {"val", "test"} and r.evals["val"]["ppl"] > 1
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "ckpt" / "optimizer.safetensors").exists()


def test_resume_gives_same_losses_as_uninterrupted_run(tmp_path, data_dir, char_tok):
    data = TokenData(data_dir)
    cfg = _cfg()
    train(_mcfg(data), cfg, data, tmp_path / "a", tokenizer=char_tok, progress=False, log_interval=1)

    def stop_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_mcfg(data), cfg, data, tmp_path / "b", tokenizer=char_tok, progress=False, log_interval=1, on_step=stop_at_7)
    assert json.loads((tmp_path / "b" / "ckpt" / "train_state.json").read_text())["step"] == 7
    train(_mcfg(data), cfg, data, tmp_path / "b", tokenizer=char_tok, resume=True, progress=False, log_interval=1)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 12
    assert a == b  # bit for bit: same batches, schedule, dropout RNG and optimizer moments


def test_existing_run_needs_resume_flag(tmp_path, data_dir, char_tok):
    data = TokenData(data_dir)
    train(_mcfg(data), _cfg(max_steps=2), data, tmp_path / "r", tokenizer=char_tok, progress=False)
    with pytest.raises(LLMClockError, match="--resume"):
        train(_mcfg(data), _cfg(max_steps=2), data, tmp_path / "r", tokenizer=char_tok, progress=False)


def test_block_size_larger_than_context(tmp_path, data_dir):
    data = TokenData(data_dir)
    with pytest.raises(LLMClockError, match="larger than the model's context"):
        train(_mcfg(data), _cfg(block_size=128), data, tmp_path / "r", progress=False)


def test_vocab_larger_than_model(tmp_path, data_dir):
    data = TokenData(data_dir)
    with pytest.raises(LLMClockError, match="vocab_size"):
        train(preset("test", vocab_size=10), _cfg(), data, tmp_path / "r", progress=False)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=2000, warmup_steps=100, learning_rate=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) < lr_at(99, cfg) <= 1e-3
    assert abs(lr_at(100, cfg) - 1e-3) < 1e-9
    assert abs(lr_at(1050, cfg) - 5.5e-4) < 1e-9
    assert lr_at(2000, cfg) == pytest.approx(1e-4)


def test_torchrun_two_processes(tmp_path, data_dir):
    """DDP on CPU (gloo): two ranks train together and rank 0 writes the checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmclock",
           "train", "--data", str(data_dir), "--out", str(tmp_path / "ddp"), "--preset", "test", "--steps", "4",
           "--batch-size", "2", "--block-size", "16", "--eval-interval", "2", "--eval-batches", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    state = json.loads((tmp_path / "ddp" / "ckpt" / "train_state.json").read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 16 * 2


def test_keep_freed_memory(monkeypatch):
    from llmclock import threads

    for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    if not sys.platform.startswith("linux"):
        assert not threads.keep_freed_memory()
        return
    assert threads.keep_freed_memory()  # glibc took both settings
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own choice wins
    assert not threads.keep_freed_memory()
