import errno
import json
import os

import pytest
import torch

from llmclock import checkpoint as ck
from llmclock.errors import LLMClockError


def _logits(model, vocab):
    torch.manual_seed(3)
    x = torch.randint(vocab, (2, 16))
    with torch.no_grad():
        return model(x)[0]


def test_save_load_identical_logits(tmp_path, tiny_model, char_tok):
    ck.save_checkpoint(tmp_path / "ckpt", tiny_model, char_tok, step=1)
    model, tok = ck.load_checkpoint(tmp_path / "ckpt")
    assert tok.hash == char_tok.hash
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(_logits(model, tok.vocab_size), _logits(tiny_model, tok.vocab_size), rtol=0, atol=0)
    assert not any(p.suffix == ".pkl" or p.name.endswith(".bin") for p in (tmp_path / "ckpt").iterdir())


def test_resave_swaps_link_and_prunes_old_versions(tmp_path, tiny_model, char_tok):
    ck.save_checkpoint(tmp_path / "ckpt", tiny_model, char_tok, step=1)
    ck.save_checkpoint(tmp_path / "ckpt", tiny_model, char_tok, step=2)
    assert os.readlink(tmp_path / "ckpt") == "ckpt.step0000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.step0000002"]


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, tiny_model, char_tok, monkeypatch):
    ck.save_checkpoint(tmp_path / "ckpt", tiny_model, char_tok, step=1)
    before = _logits(ck.load_checkpoint(tmp_path / "ckpt")[0], char_tok.vocab_size)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with torch.no_grad():
        tiny_model.transformer.wte.weight.add_(1.0)
    with pytest.raises(LLMClockError, match="no space left"):
        ck.save_checkpoint(tmp_path / "ckpt", tiny_model, char_tok, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.step0000001"]  # no temp left over
    torch.testing.assert_close(_logits(ck.load_checkpoint(tmp_path / "ckpt")[0], char_tok.vocab_size), before)


def test_missing_directory(tmp_path):
    with pytest.raises(LLMClockError, match="not found"):
        ck.load_checkpoint(tmp_path / "nope")


def test_truncated_weights_named(tmp_path, tiny_model, char_tok):
    ck.write_checkpoint(tmp_path / "c", tiny_model, char_tok)
    w = tmp_path / "c" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(LLMClockError, match="model.safetensors: truncated or corrupt"):
        ck.load_checkpoint(tmp_path / "c")


def test_other_architecture_named(tmp_path, tiny_model, char_tok):
    ck.write_checkpoint(tmp_path / "c", tiny_model, char_tok)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["n_layer"] = 3
    cfg["n_embd"] = 48
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMClockError, match=r"model.safetensors: does not match config.json: missing transformer\.h\.2"):
        ck.load_checkpoint(tmp_path / "c")


def test_foreign_config_and_corrupt_json(tmp_path, tiny_model, char_tok):
    ck.write_checkpoint(tmp_path / "c", tiny_model, char_tok)
    (tmp_path / "c" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(LLMClockError, match="import-hf"):
        ck.load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(LLMClockError, match="config.json: not valid JSON"):
        ck.load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "config.json").unlink()
    with pytest.raises(LLMClockError, match="config.json: missing"):
        ck.load_checkpoint(tmp_path / "c")


def test_refuses_to_overwrite_existing_directory(tmp_path, tiny_model, char_tok):
    (tmp_path / "c").mkdir()
    with pytest.raises(LLMClockError, match="already exists"):
        ck.write_checkpoint(tmp_path / "c", tiny_model, char_tok)
    with pytest.raises(LLMClockError, match="not a checkpoint link"):
        ck.save_checkpoint(tmp_path / "c", tiny_model, char_tok, step=1)
