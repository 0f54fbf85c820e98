"""Shared fixtures: a tiny corpus, its char tokenizer and shards, a tiny model. All seeded."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

torch.set_num_threads(2)

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
) * 40


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="session")
def char_tok():
    from llmclock.tokenizer import Tokenizer

    return Tokenizer.train_char([CORPUS])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file, char_tok):
    from llmclock.data import prepare

    out = tmp_path_factory.mktemp("data") / "shards"
    prepare([str(corpus_file)], char_tok, out, val_fraction=0.1, test_fraction=0.1, shuffle_files=False)
    char_tok.save(out / "tokenizer.json")
    return out


@pytest.fixture
def tiny_model(char_tok):
    from llmclock.config import preset
    from llmclock.model import GPT

    torch.manual_seed(0)
    return GPT(preset("test", vocab_size=char_tok.vocab_size)).eval()


def requires(module: str):
    """Import an optional package (an extra the Makefile installs): skipped where it is missing
    locally, but a failure in CI (`CI` set), where it must be installed."""
    import importlib

    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def requires_tool(*names: str) -> str:
    """The path of the first program in `names`; the test is skipped where any is not installed,
    except in CI (the CI variable set), where .ci/run installs them and their absence fails."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"needs {', '.join(missing)} on PATH (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return shutil.which(names[0])


def requires_kernels(module) -> None:
    """Skip a test of the compiled kernels where the package was not built (a source checkout run
    without installing); with LLMCLOCK_REQUIRE_KERNELS=1 (CI) a missing build is an error instead."""
    if module.get_lib() is None:
        pytest.skip("compiled kernels not built (install the package: make setup)")


def kernel_or_fallback(request, monkeypatch, module) -> bool:
    """For a `mode` fixture parametrised [False, True]: run a test on `module`'s compiled kernels
    (skipped where they are not built) or, for True, on the torch fallback a missing build leaves."""
    if request.param:
        monkeypatch.setattr(module._kernels, "lib", False)  # what a missing build leaves behind
    else:
        monkeypatch.setattr(module._kernels, "lib", None)
        requires_kernels(module)
    return request.param


def full_forward_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, each from a full forward over everything so far (no cache): what
    cached decoding must reproduce."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids + out]))
        out.append(int(logits[0, -1].argmax()))
    return out
