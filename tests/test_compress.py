"""Compression: quantization error bounds, kernels equal to their torch fallback, compressed
checkpoints round-trip exactly and run everywhere a checkpoint runs, pruning really shrinks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmclock.checkpoint import load_checkpoint, write_checkpoint
from llmclock.compress import CompressConfig, compress, parse_prune
from llmclock.compress import quant
from llmclock.compress.model import quantize_model
from llmclock.compress.prune import magnitude_prune
from llmclock.engine import Engine, SamplingParams
from llmclock.errors import LLMClockError
from tests.conftest import kernel_or_fallback
from llmclock.cli import main

SCHEMES = [("bf16", 64), ("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)]
# max |logit - fp32 logit| on the tiny test model (logits of std ~0.6): the stated tolerance per scheme
LOGIT_TOL = {"bf16": 0.01, "int8": 0.02, "int4": 0.25}


def cli(capsys, *args, ok=True):
    """Run the command line in this process (fast); -> (exit code, stdout, stderr lines)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # a usage error, from the parser
        rc = e.code
    out, err = capsys.readouterr()
    assert (rc == 0) == ok, err
    return rc, out, err.strip().splitlines()


def one_line_error(err, needle):
    assert len(err) == 1 and err[0].startswith("llmclock: error:") and needle in err[0], err


@pytest.fixture(params=[False, True], ids=["kernel", "fallback"])
def mode(request, monkeypatch):
    return kernel_or_fallback(request, monkeypatch, quant)


@pytest.fixture
def ckpt(tmp_path, tiny_model, char_tok):
    write_checkpoint(tmp_path / "ck", tiny_model, char_tok)
    return tmp_path / "ck"


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantize_dequantize_within_bound(scheme, group):
    torch.manual_seed(0)
    w = torch.randn(40, 256) * torch.rand(40, 1) * 0.1  # rows of different ranges
    w[3, :] = 0.0  # an all-zero row stays exactly zero (scales are clamped, not 0/0)
    q, s = quant.quantize(w, scheme, group)
    err = (quant.dequantize(q, s, scheme) - w).abs()
    bound = quant.error_bound(w, scheme, group)
    assert (err <= bound * (1 + 1e-6) + 1e-12).all()
    assert err.max() > 0.1 * bound.max()  # the bound is tight, not vacuous
    assert (quant.dequantize(q, s, scheme)[3] == 0).all()
    expected_bytes = {"bf16": 2, "int8": 1, "int4": 0.5}[scheme] * w.numel()
    assert q.numel() * q.element_size() == expected_bytes


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("n", [16, 45, 300])
def test_kernel_equals_torch_fallback(scheme, group, n):
    if quant.get_lib() is None:
        pytest.skip("no C++ compiler")
    torch.manual_seed(1)
    m = quant.QuantLinear.from_linear(torch.randn(n, 256) * 0.05, torch.randn(n), scheme, group)
    f = m.decode_linear()
    assert f.packed is not None
    for rows in (1, 3, 5, 8):
        x = torch.randn(rows, 256)
        ref = m.reference(x)  # torch: dequantize, then F.linear
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)  # forward: the kernel up to KERNEL_ROWS rows
        torch.testing.assert_close(f(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f(x, gelu=True), F.gelu(ref, approximate="tanh"), atol=1e-5, rtol=1e-5)
        acc = torch.randn(rows, n)
        torch.testing.assert_close(f(x, out=acc.clone(), accumulate=True), acc + ref, atol=1e-5, rtol=1e-5)
        exact = m.decode_linear(approximate="none")  # nanoGPT's exact GELU, also fused
        torch.testing.assert_close(exact(x, gelu=True), F.gelu(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme,group", [("bf16", 64), ("int8", 64), ("int4", 32)])
def test_quantized_logits_close_to_fp32(tiny_model, scheme, group):
    x = torch.randint(tiny_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = tiny_model(x)
        q = quantize_model(tiny_model, scheme, group)
        out, _ = q(x)
    assert (out - ref).abs().max() <= LOGIT_TOL[scheme]


@pytest.mark.parametrize("scheme,group,emb", [("bf16", 64, "tied"), ("int8", 64, "fp32"), ("int4", 32, "tied")])
def test_save_load_exact_and_engine_matches_forward(ckpt, tmp_path, mode, scheme, group, emb):
    out = tmp_path / "q"
    compress(ckpt, out, CompressConfig(scheme=scheme, group=group, embeddings=emb))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compression"]["scheme"] == scheme and cfg["compression"]["embeddings"] == emb
    m1, tok = load_checkpoint(out)
    m2, _ = load_checkpoint(out)
    ref = quantize_model(load_checkpoint(ckpt)[0], scheme, group, emb)
    for k, v in ref.state_dict().items():  # every stored tensor bit for bit, dtype included
        assert torch.equal(m1.state_dict()[k], v) and m1.state_dict()[k].dtype == v.dtype, k
    # the engine's tick (kernel or torch fallback) gives the logprobs of a full forward on the same model
    eng = Engine(m1, tok, slots=2)
    done = eng.complete(["First", "All:\nSp"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    for c in done:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(m2(ids)[0][0].float(), -1)  # (T, V)
        n = len(c.prompt_ids)
        want = [lp[n - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        assert c.logprobs == pytest.approx(want, abs=2e-4)


def test_magnitude_pruning_sparsity_survives_int4(tiny_model):
    assert magnitude_prune(tiny_model, 0.5, "layer") == pytest.approx(0.5, abs=0.01)
    for b in tiny_model.transformer.h:
        assert (b.mlp.c_fc.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert magnitude_prune(tiny_model, 0.75, "global") == pytest.approx(0.75, abs=0.01)
    zeros = [b.attn.c_attn.weight == 0 for b in tiny_model.transformer.h]
    quantize_model(tiny_model, "int4", 32)
    for z, b in zip(zeros, tiny_model.transformer.h):
        assert (b.attn.c_attn.dequantized()[z] == 0).all()  # symmetric: 0 stays 0


def test_structured_pruning_shrinks_and_runs_everywhere(ckpt, data_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    cli(capsys, "compress", "--ckpt", ckpt, "--out", out, "--scheme", "int8", "--prune", "mlp:0.5", "--prune",
        "magnitude:0.3", "--recover-steps", "2", "--data", data_dir, "--block-size", "32", "--no-report")
    before, _ = load_checkpoint(ckpt)
    after, _ = load_checkpoint(out)
    assert after.transformer.h[0].mlp.c_fc.out_features == 64  # 128 -> 64 neurons
    assert after.transformer.h[0].mlp.c_proj.weight.shape == (32, 64)
    def mlp_weights(m):
        return sum(t.numel() for b in m.transformer.h for t in (b.mlp.c_fc.weight, b.mlp.c_proj.weight))

    assert mlp_weights(after) == mlp_weights(before) // 2
    _, text, _ = cli(capsys, "eval", "--ckpt", out, "--data", data_dir, "--batches", "2", "--block-size", "32")
    assert "test: loss" in text
    _, text, _ = cli(capsys, "generate", "--ckpt", out, "--prompt", "First", "--max-new-tokens", "5", "--temperature", "0")
    assert text.startswith("First")
    cli(capsys, "trace", "--ckpt", out, "--prompt", "All", "--prompt", "Sp", "--out", tmp_path / "tr", "--max-new-tokens", "4")
    assert (tmp_path / "tr" / "trace.jsonl").exists()


@pytest.mark.slow
def test_report_measures_both_sides(ckpt, data_dir, tmp_path):
    from llmclock.compress.report import measure, table

    compress(ckpt, tmp_path / "q", CompressConfig(scheme="int4", group=32))
    kw = dict(split="test", batches=1, block_size=32, new_tokens=4)
    b, a = measure(ckpt, data_dir, **kw), measure(tmp_path / "q", data_dir, **kw)
    assert a["size_mb"] < b["size_mb"] and a["bpb"] > 0 and set(a["stages_ms"]) >= {"embed", "blocks", "head"}
    t = table(b, a)
    for row in ("size on disk", "peak memory", "batch 1", "batch 8", "perplexity", "bits per byte", "trace: blocks"):
        assert row in t


def test_export_hf_refuses_or_dequantizes(ckpt, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    compress(ckpt, tmp_path / "q", CompressConfig(scheme="int4", group=32, embeddings="tied"))
    one_line_error(cli(capsys, "export-hf", tmp_path / "q", tmp_path / "hf", ok=False)[2], "--dequantize")
    assert not (tmp_path / "hf").exists()
    cli(capsys, "export-hf", tmp_path / "q", tmp_path / "hf", "--dequantize")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_checkpoint(tmp_path / "q")
    x = torch.randint(ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)


BAD = [
    (["--scheme", "int3"], "unknown scheme 'int3'"),
    (["--scheme", "int4", "--group", "48"], "unknown group size '48'"),
    (["--scheme", "int4", "--group", "64"], "does not divide the layer width 32"),
    (["--prune", "magnitude:1.0"], "sparsity must be in [0, 1)"),
    (["--prune", "mlp:-0.1"], "must be in [0, 1)"),
    (["--prune", "mlp:0.5"], "need --data"),
    (["--prune", "neurons:0.5"], "kind must be one of"),
    (["--prune", "heads:1.0"], "head pruning fraction must be in [0, 1)"),
    (["--prune", "heads=0.8"], "would remove all heads of a layer"),
    (["--scheme", "fp32"], "would change nothing"),
    (["--device", "mps"], "run on cpu or cuda"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line(ckpt, tmp_path, capsys, args, needle):
    one_line_error(cli(capsys, "compress", "--ckpt", ckpt, "--out", tmp_path / "out", *args, "--no-report", ok=False)[2],
                   needle)
    assert not (tmp_path / "out").exists()


def engine_matches_forward(model, tok, prompts=("First", "All:\nSp", "Be"), new=8):
    """Greedy engine completions (3 slots, tick kernels or fallback) == argmax of a full forward, logprobs too."""
    eng = Engine(model, tok, slots=3)
    done = eng.complete(list(prompts), SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True))
    for c in done:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            logits = model(ids)[0][0].float()  # (T, V)
        n = len(c.prompt_ids)
        assert c.token_ids == logits[n - 1 : -1].argmax(-1).tolist()
        lp = torch.log_softmax(logits, -1)
        assert c.logprobs == pytest.approx([lp[n - 1 + i, t].item() for i, t in enumerate(c.token_ids)], abs=2e-4)


@pytest.mark.parametrize("scheme", ["fp32", "int8"])
def test_head_pruning_shrinks_and_runs_everywhere(ckpt, data_dir, tmp_path, capsys, mode, scheme):
    """heads:0.25 of the tiny model's 2 x 2 heads removes the least important one: one layer keeps 2,
    the other 1, so the matrices, the KV cache and the checkpoint hold per-layer head counts."""
    out = tmp_path / "heads"
    cli(capsys, "compress", "--ckpt", ckpt, "--out", out, "--scheme", scheme, "--prune", "heads:0.25", "--data", data_dir,
        "--block-size", "32", "--calib-batches", "2", "--no-report")
    comp = json.loads((out / "config.json").read_text())["compression"]
    assert sorted(comp["heads"]) == [1, 2]
    before, _ = load_checkpoint(ckpt)
    after, tok = load_checkpoint(out)
    hs = after.config.head_size
    for b, nh in zip(after.transformer.h, comp["heads"]):
        assert b.attn.n_head == nh and b.attn.c_attn.out_features == 3 * nh * hs
        assert b.attn.c_proj.in_features == nh * hs
    if scheme == "fp32":
        attn = lambda m: sum(p.numel() for b in m.transformer.h for p in b.attn.parameters())  # noqa: E731
        C = before.config.n_embd
        assert attn(before) - attn(after) == 4 * C * hs + 3 * hs  # one head: q, k, v rows (+ bias), c_proj columns
        assert after.num_params() < before.num_params()
        # pruning kept the other heads exactly: their weights are the original's rows
        from llmclock.compress.prune import head_importance
        x = torch.randint(before.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        scores = head_importance(before, [x])
        assert len(scores) == 2 and all(s.shape == (2,) and (s > 0).all() for s in scores)
    # save -> load exact
    again, _ = load_checkpoint(out)
    for k, v in after.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # the engine's KV cache holds each layer's own head count, and greedy decoding == full forward argmax
    eng = Engine(after, tok, slots=2)
    assert [k.size(1) for k in eng.cache.k] == comp["heads"]
    hs_bytes = 2 * sum(comp["heads"]) * hs * 4 * eng.cache.slots * eng.cache.max_len  # k and v, fp32
    assert eng.runner.memory()["kv cache"] == hs_bytes
    if mode is False and scheme == "int8":  # kernel mode: the decode plan's packed int8 panels are counted
        assert eng.runner.memory()["packed copies"] > 0
    engine_matches_forward(after, tok)
    _, text, _ = cli(capsys, "eval", "--ckpt", out, "--data", data_dir, "--batches", "2", "--block-size", "32")
    assert "test: loss" in text
    cli(capsys, "trace", "--ckpt", out, "--prompt", "All", "--prompt", "Sp", "--out", tmp_path / "tr", "--max-new-tokens", "4")
    assert len((tmp_path / "tr" / "trace.jsonl").read_text().splitlines()) > 4
    # GPT-2's format has one head count for every layer: export is refused, nothing written
    one_line_error(cli(capsys, "export-hf", out, tmp_path / "hf", "--dequantize", ok=False)[2], "heads pruned per layer")
    assert not (tmp_path / "hf").exists()


def test_head_choice_global_with_one_per_layer():
    from llmclock.compress.prune import choose_heads, kept_heads

    scores = [torch.tensor([5.0, 4.0, 3.0]), torch.tensor([0.1, 0.2, 0.05])]
    keep = choose_heads(scores, kept_heads(2, 3, 0.5))  # keep 3 of 6: layer 1 keeps only its best
    assert [k.tolist() for k in keep] == [[0, 1], [1]]
    assert [k.tolist() for k in choose_heads(scores, 2)] == [[0], [1]]
    assert kept_heads(12, 12, 0.25) == 108
    with pytest.raises(LLMClockError, match="would remove all heads of a layer"):
        kept_heads(2, 3, 0.8)  # 6 heads -> 1 kept, 2 layers
    with pytest.raises(LLMClockError, match=r"head pruning fraction must be in \[0, 1\)"):
        kept_heads(2, 3, -0.1)


def test_already_compressed_and_existing_out_refused(ckpt, tmp_path):
    compress(ckpt, tmp_path / "q", CompressConfig(scheme="int8"))
    with pytest.raises(LLMClockError, match="already compressed"):
        compress(tmp_path / "q", tmp_path / "q2", CompressConfig(scheme="int4", group=32))
    before = (tmp_path / "q" / "model.safetensors").read_bytes()
    with pytest.raises(LLMClockError, match="already exists"):
        compress(ckpt, tmp_path / "q", CompressConfig(scheme="bf16"))
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == before
    with pytest.raises(LLMClockError, match="given twice"):
        parse_prune(["mlp:0.1", "mlp:0.2"])
