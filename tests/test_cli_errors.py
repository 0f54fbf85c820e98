"""Every subcommand against a battery of bad inputs, one table: each row must end with a non-zero
exit, exactly one `llmclock: error:` line on stderr (no traceback, no internal error) and every
file that existed before unchanged (and nothing new left behind).

The commands run in-process (`main(argv)`) in one directory of tiny files made once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from llmclock.cli import main

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30
BIG = str(2**64)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Good files (ck, data, tok.json, corpus.txt, tr/, hf/) and bad ones beside them."""
    from safetensors.torch import load_file, save_file

    from llmclock.checkpoint import write_checkpoint
    from llmclock.config import preset
    from llmclock.data import prepare
    from llmclock.engine import Engine, SamplingParams
    from llmclock.hf import export_hf
    from llmclock.model import GPT
    from llmclock.tokenizer import Tokenizer
    from llmclock.trace import Tracer

    d = tmp_path_factory.mktemp("bad")
    (d / "corpus.txt").write_text(TEXT)
    tok = Tokenizer.train_char([TEXT])
    tok.save(d / "tok.json")
    prepare([str(d / "corpus.txt")], tok, d / "data", val_fraction=0.1, test_fraction=0.1, shuffle_files=False)
    other = Tokenizer.train_char([TEXT + "xyz"])
    prepare([str(d / "corpus.txt")], other, d / "data-other", val_fraction=0.1, test_fraction=0.1)
    torch.manual_seed(0)
    model = GPT(preset("test", vocab_size=tok.vocab_size)).eval()
    write_checkpoint(d / "ck", model, tok)
    export_hf(d / "ck", d / "hf")
    eng = Engine(model, tok)
    with Tracer(eng) as tr:
        eng.complete(["First"], SamplingParams(max_new_tokens=4, seed=1))
    tr.write(d / "tr", tr.header(ckpt=d / "ck"))

    def ckpt_copy(name: str) -> Path:
        dst = d / name
        dst.mkdir()
        for f in (d / "ck").iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    w = ckpt_copy("ck-trunc") / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    w = ckpt_copy("ck-flip") / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-7] ^= 0x10  # a bit deep in the last tensor's data: the header still parses
    w.write_bytes(bytes(raw))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    write_checkpoint(d / "ck-nan", model, tok)  # hashes match: only the finite check can catch it
    (ckpt_copy("ck-notok") / "tokenizer.json").unlink()
    hf_nan = d / "hf-nan"
    hf_nan.mkdir()
    for f in (d / "hf").iterdir():
        (hf_nan / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(hf_nan / "model.safetensors"))
    sd["transformer.h.0.ln_1.weight"][0] = float("inf")
    save_file(sd, str(hf_nan / "model.safetensors"), metadata={"format": "pt"})

    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (d / "latin1-dir").mkdir()
    (d / "latin1-dir" / "a.txt").write_bytes((d / "latin1.txt").read_bytes())
    (d / "emptydir").mkdir()
    (d / "trunc.json").write_text((d / "tok.json").read_text()[:200])
    (d / "tr-empty.jsonl").write_text("")
    (d / "tr-trunc.jsonl").write_text((d / "tr" / "trace.jsonl").read_text()[:300])
    (d / "data-trunc").mkdir()
    for f in (d / "data").iterdir():
        (d / "data-trunc" / f.name).write_bytes(f.read_bytes())
    with open(d / "data-trunc" / "val.bin", "r+b") as f:
        f.truncate(10)
    (d / "run").mkdir()
    return d


def _args(s: str) -> list[str]:
    return [BIG if a == "BIG" else "\udcff\udcfe" if a == "NONUTF8" else a for a in s.split()]


CKPT_BAD = [("ck-missing", "not found"), ("emptydir", "config.json: missing"), ("latin1.txt", "not found"),
            ("ck-trunc", "model.safetensors"), ("ck-flip", "content hash mismatch"), ("ck-nan", "NaN"),
            ("ck-notok", "tokenizer.json: missing")]
SAMPLING_BAD = [
    "--max-new-tokens 0", "--max-new-tokens BIG", "--temperature -1", "--temperature nan", "--temperature inf",
    "--top-k -1", "--top-p 0", "--top-p 1.5", "--min-p -0.1", "--min-p 2", "--repetition-penalty 0",
    "--presence-penalty 3", "--frequency-penalty nan", "--seed -1", "--seed BIG", "--stop-token-id -1",
    "--logit-bias 3", "--logit-bias 3=nan", "--logit-bias x=1", "--logit-bias 3=1000", "--threads 0",
    "--threads -2", "--device tpu", "--stop NONUTF8",
]
TRAIN_BAD = [
    "--steps 0", "--steps -5", "--steps 1.5", "--max-seconds 0", "--max-seconds inf", "--batch-size 0",
    "--batch-size BIG", "--block-size 0", "--grad-accum 0", "--lr nan", "--lr inf", "--lr 0", "--lr -1",
    "--min-lr -1", "--warmup -1", "--lr-decay-steps 0", "--weight-decay nan", "--beta1 1", "--beta2 -0.1",
    "--grad-clip nan", "--eval-interval -1", "--eval-batches 0", "--checkpoint-interval -1", "--seed BIG",
    "--seed -1", "--dtype float16", "--device tpu", "--n-layer 0", "--n-head 0", "--n-embd 0", "--dropout 1",
    "--dropout nan", "--context 0", "--preset bogus", "--activation relu",
]
TRAIN = "train --data data --out run/new --preset test --block-size 32"
GEN = "generate --ckpt ck --prompt First"

CASES: list[tuple[str, str]] = [
    # demo: options first, before the corpus or the tokenizer is touched
    ("demo --minutes 0", "--minutes"), ("demo --minutes nan", "--minutes"), ("demo --minutes -1", "--minutes"),
    ("demo --preset bogus", "unknown preset"), ("demo --vocab-size 10", "--vocab-size"),
    ("demo --max-files 0", "--max-files"), ("demo --seed -1", "--seed"), ("demo --out ck", "already exists"),
    # tokenizer train
    ("tokenizer train missing.txt --out t.json", "missing.txt"), ("tokenizer train empty.txt --out t.json", "no text"),
    ("tokenizer train latin1-dir --out t.json", "not UTF-8"), ("tokenizer train corpus.txt --vocab-size 10", "257"),
    ("tokenizer train corpus.txt --vocab-size BIG", "--vocab-size"),
    ("tokenizer train corpus.txt --out emptydir", "is a directory"),
    ("tokenizer train corpus.txt --out nowhere/t.json", "folder nowhere does not exist"),
    ("tokenizer train corpus.txt --out tok.json", "--overwrite"), ("tokenizer train NONUTF8", "no such file"),
    # prepare
    ("prepare missing.txt --tokenizer tok.json --out d2", "missing.txt"),
    ("prepare empty.txt --tokenizer tok.json --out d2", "no text"),
    ("prepare latin1.txt --tokenizer tok.json --out d2", "not UTF-8"),
    ("prepare corpus.txt --tokenizer missing.json --out d2", "missing.json"),
    ("prepare corpus.txt --tokenizer empty.txt --out d2", "empty.txt"),
    ("prepare corpus.txt --tokenizer latin1.txt --out d2", "latin1.txt"),
    ("prepare corpus.txt --tokenizer trunc.json --out d2", "trunc.json"),
    ("prepare corpus.txt --tokenizer emptydir --out d2", "no tokenizer.json"),
    ("prepare corpus.txt --tokenizer tok.json --out data", "--overwrite"),
    ("prepare corpus.txt --tokenizer tok.json --out corpus.txt", "not a directory"),
    ("prepare corpus.txt --tokenizer tok.json --out d2 --val 1.5", "--val"),
    ("prepare corpus.txt --tokenizer tok.json --out d2 --val nan", "--val"),
    ("prepare corpus.txt --tokenizer tok.json --out d2 --val 0.6 --test 0.6", "sum"),
    ("prepare corpus.txt --tokenizer tok.json --out d2 --seed -1", "--seed"),
    # train
    *[(f"{TRAIN} {bad}", bad.split()[0]) for bad in TRAIN_BAD],
    ("train --data missing --out run/new --preset test", "not found"),
    ("train --data emptydir --out run/new --preset test", "manifest.json"),
    ("train --data data-trunc --out run/new --preset test", "val.bin"),
    ("train --data data --tokenizer latin1.txt --out run/new", "latin1.txt"),
    ("train --data data-other --tokenizer tok.json --out run/new", "not the tokenizer"),
    (f"{TRAIN} --batch-size 100000000", "GiB"),
    (f"{TRAIN} --eval-batches 1000000000", "GiB"),
    (f"{TRAIN} --context 16", "larger than the model's context"),
    (f"{TRAIN} --n-embd 30 --n-head 4", "not divisible"),
    ("train --data data --out run --resume", "nothing to resume"),
    ("train --data data --out run/new --override", "--resume"),
    ("train --data data --out run/new --init-from ck-flip", "content hash mismatch"),
    ("train --data data --out run/new --init-from ck-nan", "NaN"),
    ("train --data data --out run/new --init-from ck --n-layer 3", "--n-layer"),
    ("train --data data --out corpus.txt", "not a directory"),
    # eval
    *[(f"eval --ckpt {c} --data data", why) for c, why in CKPT_BAD],
    ("eval --ckpt ck --data missing", "not found"), ("eval --ckpt ck --data data --splits dev", "no split 'dev'"),
    ("eval --ckpt ck --data data-other", "another tokenizer"), ("eval --ckpt ck --data data --batch-size 0", "--batch-size"),
    ("eval --ckpt ck --data data --batches 0", "--batches"), ("eval --ckpt ck --data data --batches BIG", "--batches"),
    ("eval --ckpt ck --data data --batches 10000000000", "GiB"),
    ("eval --ckpt ck --data data --block-size 0", "--block-size"),
    ("eval --ckpt ck --data data --block-size 1000", "larger than the model's context"),
    ("eval --ckpt ck --data data --seed -1", "--seed"), ("eval --ckpt ck --data data --device cuda:99", "cuda"),
    # generate
    *[(f"generate --ckpt {c} --prompt First", why) for c, why in CKPT_BAD],
    *[(f"{GEN} {bad}", bad.split()[0]) for bad in SAMPLING_BAD],
    (f"{GEN} --logprobs 21", "--logprobs"), (f"{GEN} --num-samples 0", "--num-samples"),
    (f"{GEN} --stop-token-id 100000", "outside the vocabulary"), (f"{GEN} --logit-bias 100000=1", "outside the vocabulary"),
    ("generate --ckpt ck --prompt NONUTF8", "UTF-8"), ("generate --ckpt ck --prompt", "--prompt"),
    ("generate --ckpt ck --prompt @", "not in the char vocabulary"),
    (f"generate --ckpt ck --prompt {'First' * 20}", "context holds 64"),
    # chat
    *[(f"chat --ckpt {c}", why) for c, why in CKPT_BAD],
    *[(f"chat --ckpt ck {bad}", bad.split()[0]) for bad in SAMPLING_BAD],
    ("chat --ckpt ck --system NONUTF8", "UTF-8"),
    # trace
    *[(f"trace --ckpt {c} --prompt First --out t2", why) for c, why in CKPT_BAD],
    *[(f"trace --ckpt ck --prompt First --out t2 {bad}", bad.split()[0]) for bad in SAMPLING_BAD],
    ("trace --ckpt ck --prompt First --out tr", "--overwrite"), ("trace --ckpt ck --prompt First --out corpus.txt", "not a directory"),
    ("trace --ckpt ck --prompt First --out emptydir --top-n 21", "--top-n"),
    ("trace --ckpt ck --prompt First --out t2 --logit-lens 99", "lens"),
    # replay
    ("replay missing.jsonl", "not found"), ("replay tr-empty.jsonl", "not an llmclock trace"),
    ("replay latin1.txt", "latin1.txt"), ("replay emptydir", "not found"), ("replay tr-trunc.jsonl", "tr-trunc.jsonl"),
    ("replay tr --against missing.jsonl", "not found"), ("replay tr --ckpt ck-flip", "ck-flip"),
    ("replay tr --ckpt ck-nan", "ck-nan"),
    # import-hf / export-hf
    ("import-hf missing out2", "not a directory"), ("import-hf emptydir out2", "config.json: missing"),
    ("import-hf corpus.txt out2", "not a directory"), ("import-hf hf ck", "--overwrite"),
    ("import-hf hf-nan out2", "NaN"), ("import-hf hf corpus.txt", "not a directory"),
    *[(f"export-hf {c} out2", why) for c, why in CKPT_BAD],
    ("export-hf ck hf", "--overwrite"), ("export-hf ck corpus.txt --overwrite", "not a directory"),
    ("export-hf ck data --overwrite", "holds no config.json"), ("import-hf hf data --overwrite", "holds no config.json"),
    ("trace --ckpt ck --prompt First --out data --overwrite", "holds no trace.jsonl"),
    # the command line itself
    ("frobnicate", "invalid choice"), ("generate --ckpt ck --prompt x --bogus", "unrecognized"),
]


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size if digest else None, digest)
    return out


@pytest.mark.parametrize("argv, needle", CASES, ids=[c[0][:70] for c in CASES])
def test_bad_input(root, argv, needle, monkeypatch, capsys):
    monkeypatch.chdir(root)
    monkeypatch.setenv("LLMCLOCK_TRACEBACK", "")
    before = _snapshot(root)
    code = main(_args(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("llmclock: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert _snapshot(root) == before
