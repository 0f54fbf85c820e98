"""HF GPT-2 import/export, pinned against transformers itself on tiny random models (no hub)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

from llmclock.checkpoint import load_checkpoint, write_checkpoint  # noqa: E402
from llmclock.config import ModelConfig  # noqa: E402
from llmclock.errors import LLMClockError  # noqa: E402
from llmclock.hf import export_hf, import_hf  # noqa: E402
from llmclock.model import GPT  # noqa: E402
from llmclock.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak. You are all resolved rather to die than to famish?",
    "Café déjà vu — naïve façade. 🤖 robots 🎉 party 日本語",
] * 20
SAMPLES = ["Hello world!", " speak, speak", "émoji 🤖🎉 and 日本語", "  two  spaces\nnewline"]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """vocab.json + merges.txt of a tiny byte-level BPE trained by `tokenizers` itself."""
    d = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(d))
    return d


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random LayerNorm gains/biases and Linear biases too, so every mapped tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _hf_model(seed=0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=320, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**(cfg | kw))).eval()
    _perturb(model, seed)
    return model


def _hf_dir(tmp_path, bpe_files, model, name="hf", **save_kw):
    d = tmp_path / name
    model.save_pretrained(d, **save_kw)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_files / f, d / f)
    return d


def _assert_same_logits(ours: GPT, theirs: GPT2LMHeadModel, seed=0):
    cfg = ours.config
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = ours(ids)[0]
        b = theirs(ids).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- HF -> llmclock


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(n_layer=1, n_head=3, n_embd=48, n_positions=40, vocab_size=1001),
        dict(n_layer=3, n_head=3, n_embd=96, n_positions=17, vocab_size=301, layer_norm_epsilon=1e-6),
        dict(activation_function="gelu_pytorch_tanh", n_inner=128, reorder_and_upcast_attn=True),
    ],
)
def test_import_matches_transformers(tmp_path, bpe_files, kw):
    hf = _hf_model(**kw)
    out = import_hf(_hf_dir(tmp_path, bpe_files, hf), tmp_path / "ckpt")
    model, _ = load_checkpoint(out)
    assert model.config.block_size == hf.config.n_positions
    assert model.config.layer_norm_epsilon == hf.config.layer_norm_epsilon
    _assert_same_logits(model, hf)


def test_import_old_layout_without_prefix(tmp_path, bpe_files):
    """Hub GPT-2 files: no `transformer.` prefix, mask buffers stored, lm_head stored."""
    hf = _hf_model(n_positions=12)
    d = _hf_dir(tmp_path, bpe_files, hf)
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(12, 12)).view(1, 1, 12, 12)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" in sd
    save_file(sd, str(d / "model.safetensors"))
    model, _ = load_checkpoint(import_hf(d, tmp_path / "ckpt"))
    _assert_same_logits(model, hf)


def test_import_sharded(tmp_path, bpe_files):
    hf = _hf_model()
    d = _hf_dir(tmp_path, bpe_files, hf, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    model, _ = load_checkpoint(import_hf(d, tmp_path / "ckpt"))
    _assert_same_logits(model, hf)


def test_pickle_needs_flag(tmp_path, bpe_files):
    hf = _hf_model()
    d = _hf_dir(tmp_path, bpe_files, hf)
    (d / "model.safetensors").unlink()
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(LLMClockError, match="pytorch_model.bin.*allow-pickle"):
        import_hf(d, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    model, _ = load_checkpoint(import_hf(d, tmp_path / "ckpt", allow_pickle=True))
    _assert_same_logits(model, hf)


def test_untied_head_refused(tmp_path, bpe_files):
    hf = _hf_model()
    d = _hf_dir(tmp_path, bpe_files, hf)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] += 1.0
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LLMClockError, match="lm_head.weight differs"):
        import_hf(d, tmp_path / "ckpt")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(activation_function="relu"), "activation_function"),
        (dict(n_inner=64), "n_inner"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(scale_attn_weights=False), "scale_attn_weights"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(n_head=5), "n_embd=32 is not divisible by n_head=5"),
        (dict(n_embd=64, n_head=2), "model.safetensors.*shape"),
        (dict(vocab_size=200), "tokenizer has"),
    ],
)
def test_unsupported_config_refused(tmp_path, bpe_files, change, match):
    d = _hf_dir(tmp_path, bpe_files, _hf_model())
    cfg = json.loads((d / "config.json").read_text()) | change
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMClockError, match=match):
        import_hf(d, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def _no_config(d):
    (d / "config.json").unlink()


def _bad_json(d):
    (d / "config.json").write_text("{not json")


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_tokenizer(d):
    (d / "vocab.json").unlink()


def _missing_tensor(d):
    sd = load_file(str(d / "model.safetensors"))
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, str(d / "model.safetensors"))


def _missing_shard(d):
    (d / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage, match",
    [
        (_no_config, "config.json: missing"),
        (_bad_json, "config.json: not valid JSON"),
        (_no_weights, "no weights"),
        (_truncated, "model.safetensors: truncated or corrupt"),
        (_no_tokenizer, "no tokenizer.json"),
        (_missing_tensor, "model.safetensors.*missing transformer.h.1.mlp.c_fc.bias"),
        (_missing_shard, "model-00001-of-00002.safetensors: missing"),
    ],
)
def test_damaged_hf_dir(tmp_path, bpe_files, damage, match):
    d = _hf_dir(tmp_path, bpe_files, _hf_model())
    damage(d)
    with pytest.raises(LLMClockError, match=match):
        import_hf(d, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_refuses_existing_out_dir(tmp_path, bpe_files):
    d = _hf_dir(tmp_path, bpe_files, _hf_model())
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(LLMClockError, match="already exists"):
        import_hf(d, tmp_path / "ckpt")


def test_imported_tokenizer_matches_transformers(tmp_path, bpe_files):
    d = _hf_dir(tmp_path, bpe_files, _hf_model())
    _, tok = load_checkpoint(import_hf(d, tmp_path / "ckpt"))
    theirs = GPT2TokenizerFast.from_pretrained(bpe_files)
    for s in SAMPLES:
        assert tok.encode(s) == theirs(s)["input_ids"], s
    assert tok.eot_id == theirs.eos_token_id


def test_import_tokenizer_json_from_transformers(tmp_path, bpe_files):
    """The layout transformers writes: tokenizer.json and friends via save_pretrained."""
    d = _hf_dir(tmp_path, bpe_files, _hf_model())
    for f in ("vocab.json", "merges.txt"):
        (d / f).unlink()
    GPT2TokenizerFast.from_pretrained(bpe_files).save_pretrained(d)
    assert (d / "tokenizer.json").is_file()
    _, tok = load_checkpoint(import_hf(d, tmp_path / "ckpt"))
    theirs = GPT2TokenizerFast.from_pretrained(d)
    for s in SAMPLES:
        assert tok.encode(s) == theirs(s)["input_ids"], s


# ---------------------------------------------------------------- llmclock -> HF


def _llmclock_ckpt(tmp_path, tok=None, **kw) -> tuple:
    tok = tok or Tokenizer.train_bpe(TEXTS, 290)
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size + 7, block_size=20, n_layer=2, n_head=3, n_embd=48) | kw
    model = GPT(ModelConfig(**cfg)).eval()
    _perturb(model)
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, model, tok)
    return ckpt, model, tok


def test_export_loads_in_transformers(tmp_path):
    ckpt, model, tok = _llmclock_ckpt(tmp_path)
    out = export_hf(ckpt, tmp_path / "hf")
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    _assert_same_logits(model, hf.eval())
    assert hf.config.eos_token_id == hf.config.bos_token_id == tok.eot_id
    for cls in (GPT2TokenizerFast, AutoTokenizer):
        theirs = cls.from_pretrained(out)
        assert theirs.eos_token_id == tok.eot_id
        for s in SAMPLES:
            assert theirs(s)["input_ids"] == tok.encode(s), s


def test_export_char_tokenizer_loads_in_gpt2_tokenizer(tmp_path):
    """An ASCII character vocabulary is exported as byte-level BPE with the same ids, so
    GPT2TokenizerFast (and AutoTokenizer) keep spaces, tabs and newlines and decode back exactly."""
    tok = Tokenizer.train_char(["First Citizen: speak,\tspeak.\n\nAll: Speak!  12 ~"])
    ckpt, _, _ = _llmclock_ckpt(tmp_path, tok)
    out = export_hf(ckpt, tmp_path / "hf")
    for cls in (GPT2TokenizerFast, AutoTokenizer):
        theirs = cls.from_pretrained(out)
        assert theirs.eos_token_id == tok.eot_id
        for s in ("speak, speak", "  First\n\n\tAll:  ~12 ", "e"):
            ids = theirs(s)["input_ids"]
            assert ids == tok.encode(s), (cls.__name__, s)
            assert theirs.decode(ids) == s


def test_export_wide_char_tokenizer_refused_or_auto(tmp_path):
    tok = Tokenizer.train_char(TEXTS)  # has é, 🤖, 日本語: several UTF-8 bytes each
    ckpt, _, _ = _llmclock_ckpt(tmp_path, tok)
    with pytest.raises(LLMClockError, match="outside ASCII.*PreTrainedTokenizerFast.*--auto-tokenizer"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = export_hf(ckpt, tmp_path / "hf", auto_tokenizer=True)
    assert not (out / "vocab.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    theirs = AutoTokenizer.from_pretrained(out)
    for s in ("speak, speak", "Café 🤖"):
        assert theirs(s)["input_ids"] == tok.encode(s)


def test_round_trip_is_identical(tmp_path):
    ckpt, _, tok = _llmclock_ckpt(tmp_path)
    back = import_hf(export_hf(ckpt, tmp_path / "hf"), tmp_path / "back")
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((back / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    assert Tokenizer.load(back).hash == tok.hash


def test_export_refusals(tmp_path):
    ckpt, _, _ = _llmclock_ckpt(tmp_path, bias=False)
    with pytest.raises(LLMClockError, match="bias=False"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "hf").mkdir()
    with pytest.raises(LLMClockError, match="already exists"):
        export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(LLMClockError, match="not found"):
        export_hf(tmp_path / "nope", tmp_path / "hf2")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
