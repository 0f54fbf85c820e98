"""Checkpoints: a directory of safetensors + JSON, never pickle, always written atomically.

    CKPT/
      config.json            model shape (+ format marker)
      model.safetensors      weights, GPT-2 names (lm_head is tied to wte and not stored)
      tokenizer.json         the tokenizer the model was trained with
      optimizer.safetensors  AdamW moments, keyed by parameter name   (training checkpoints)
      train_state.json       step, recipe, RNG states, data position  (training checkpoints)

A training run's `ckpt` is a symlink to a versioned sibling directory (`ckpt.step0000500`).
Saving writes a new sibling under a temporary name, renames it into place, then swaps the link
with `os.replace`, so at every instant `ckpt` names a complete checkpoint; a crash or a full disk
mid-save leaves the previous one untouched.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import LLMClockError
from .tokenizer import umask

FORMAT = "llmclock-checkpoint-v1"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
OPTIMIZER, STATE = "optimizer.safetensors", "train_state.json"
TIED = ("lm_head.weight",)
HASHES = "sha256"
"""config.json's map of every other file in the checkpoint to its sha256, checked when the file is read."""


def write_json(path: Path, obj) -> None:
    """JSON that other tools can read: a NaN or infinity is an error here, not a non-standard token."""
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_hash(path: Path) -> None:
    """If `path` sits in an llmclock checkpoint whose config.json records its sha256, check it."""
    path = Path(path)
    try:
        d = json.loads((path.parent / CONFIG).read_text())
    except (OSError, ValueError):
        return  # no readable config here (a Hugging Face directory, a bare file): nothing recorded
    want = d.get(HASHES, {}).get(path.name) if isinstance(d, dict) and d.get("format") == FORMAT else None
    if want and file_sha256(path) != want:
        raise LLMClockError(f"{path}: content hash mismatch (the file changed after it was saved: damaged or edited)")


def read_json(path: Path, *, missing: str = "missing") -> dict:
    """A JSON object from `path`, or an LLMClockError naming the file and what is wrong."""
    if not path.is_file():
        raise LLMClockError(f"{path}: {missing}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LLMClockError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LLMClockError(f"{path}: expected a JSON object")
    return d


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors to store: contiguous CPU copies, tied weights left out."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in TIED}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments keyed by parameter name (the param order in the optimizer is not stable)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        for key, t in st.items():
            out[f"{names[id(p)]}.{key}"] = torch.as_tensor(t).detach().to("cpu").contiguous()
    return out


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    for n, p in model.named_parameters():
        st = {k[len(n) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == n}
        if st:
            optimizer.state[p] = {
                k: v.to(p.device) if k != "step" else v.to(torch.float32) for k, v in st.items()
            }


def rng_state() -> dict:
    st = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        st["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(st["torch"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in st["cuda"]])


def write_checkpoint(
    dest: Path,
    model: torch.nn.Module,
    tokenizer,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    state: dict[str, torch.Tensor] | None = None,
    config_extra: dict | None = None,
    extra=None,
) -> None:
    """Write a complete checkpoint to a new directory `dest` (temp dir + rename; `overwrite`
    replaces an earlier checkpoint there). `state` replaces model_state(model) as the tensors
    stored (llmclock.compress's layers; an FSDP run's full weights, gathered to rank 0),
    `optimizer_tensors` the optimizer's moments, `config_extra` adds keys to config.json and
    `extra(tmp)` may add files of its own first (llmclock.finetune: the chat template)."""
    from safetensors.torch import save_file

    with atomic_dir(dest, overwrite=overwrite) as tmp:
        save_file(model_state(model) if state is None else state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if optimizer_tensors is None and optimizer is not None:
            optimizer_tensors = optimizer_state(model, optimizer)
        if optimizer_tensors is not None:
            save_file(optimizer_tensors, str(tmp / OPTIMIZER))
        if train_state is not None:
            write_json(tmp / STATE, train_state)
        if extra is not None:
            extra(tmp)
        hashes = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        write_json(tmp / CONFIG, model.config.to_dict() | {"format": FORMAT, "architecture": "gpt2", HASHES: hashes}
                   | (config_extra or {}))


@contextlib.contextmanager
def atomic_dir(dest: Path, *, overwrite: bool = False, marker: str = CONFIG):
    """Yield a temporary sibling directory to fill; on success fsync it and rename it to `dest`.

    On any failure the temporary directory is removed and `dest` never appears half-written.
    `overwrite` replaces an existing `dest` (only an empty one or one holding `marker`, so a
    mistyped path never deletes someone's folder): the old one is renamed aside, the new one
    renamed in, then the old one removed.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise LLMClockError(f"{dest} already exists; refusing to overwrite it (overwrite: --overwrite)")
        if not dest.is_dir() or dest.is_symlink() or (any(dest.iterdir()) and not (dest / marker).exists()):
            raise LLMClockError(f"{dest}: not empty and holds no {marker}; refusing to replace it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LLMClockError(f"{dest.parent}: cannot create this folder ({e.strerror})") from None
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise LLMClockError(f"{dest.parent}: cannot write here ({e.strerror})") from None
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    try:
        yield tmp
        mode = 0o666 & ~umask()  # what the user's other files get (safetensors writes 0600)
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise LLMClockError(f"no space left on device while writing {dest}") from None
        if isinstance(e, OSError):
            raise LLMClockError(f"{dest}: cannot write ({e.strerror})") from None
        raise


def replace_dir(dest: Path, marker: str = "trace.jsonl"):
    """atomic_dir that replaces an earlier output of the same kind (one holding `marker`)."""
    return atomic_dir(dest, overwrite=True, marker=marker)


def save_checkpoint(
    link: Path, model, tokenizer, *, step: int, optimizer=None, train_state=None, state=None, optimizer_tensors=None
) -> Path:
    """Save a training checkpoint behind the symlink `link` and atomically repoint it.

    Returns the versioned directory written. Older versions are removed only after the link
    points at the new one.
    """
    return save_versioned(link, step, lambda target: write_checkpoint(
        target, model, tokenizer, optimizer=optimizer, train_state=train_state, state=state,
        optimizer_tensors=optimizer_tensors,
    ))


def save_versioned(link: Path, step: int, write) -> Path:
    """`write(target)` creates the versioned directory (atomically); then `link` is repointed to it."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise LLMClockError(f"{link} is a directory, not a checkpoint link; refusing to replace it")
    target = link.parent / f"{link.name}.step{step:07d}"
    if target.exists():  # re-saving the same step (e.g. after an interrupt): replace it
        if link.is_symlink() and os.readlink(link) == target.name:
            os.unlink(link)
        shutil.rmtree(target)
    write(target)
    tmp_link = link.parent / f".{link.name}.link-{os.getpid()}"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(target.name, tmp_link)
    os.replace(tmp_link, link)
    _fsync_dir(link.parent)
    for old in link.parent.glob(f"{link.name}.step*"):
        if old.name != target.name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return target


def read_config(ckpt: Path) -> ModelConfig:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise LLMClockError(f"checkpoint directory {ckpt} not found")
    path = ckpt / CONFIG
    d = read_json(path, missing="missing (not an llmclock checkpoint?)")
    d.pop(HASHES, None)
    d.pop("compression", None)  # read by llmclock.compress (quantized / pruned checkpoints)
    if d.pop("format", None) != FORMAT or d.pop("architecture", None) != "gpt2":
        raise LLMClockError(
            f"{path}: not an llmclock GPT-2 checkpoint config (Hugging Face checkpoints: use `llmclock import-hf`)"
        )
    return ModelConfig.from_dict(d)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LLMClockError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMClockError(f"{path}: truncated or corrupt safetensors file ({e})") from None
    verify_hash(path)  # after the parse, so a cut file is named as such; flipped bytes that parse end here
    return tensors


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path, *,
                 expected: dict[str, torch.Tensor] | None = None) -> None:
    """Copy tensors into the model, naming every missing, unexpected or misshapen tensor.
    `expected` (name -> tensor, dtypes checked too) replaces the model's state less the tied head."""
    exact_dtype = expected is not None
    if expected is None:
        expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, config expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems += [f"{k} is {tensors[k].dtype}, config expects {v.dtype}" for k, v in expected.items()
                 if exact_dtype and k in tensors and tensors[k].dtype != v.dtype]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LLMClockError(f"{source}: does not match {CONFIG}: {'; '.join(problems[:3])}{more}")
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise LLMClockError(f"{source}: {k} holds NaN or infinite values (a diverged or damaged model); "
                                "refusing to use it")
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu", *, with_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None) from a checkpoint directory, validated."""
    from .model import GPT

    ckpt = Path(ckpt)
    config = read_config(ckpt)
    comp = read_json(ckpt / CONFIG).get("compression")
    if comp is not None:  # quantized or pruned: its own module tree (llmclock.compress)
        from .compress.model import load_compressed

        model = load_compressed(ckpt, config, comp, device)
        return model, (load_tokenizer(ckpt, config) if with_tokenizer else None)
    tensors = read_tensors(ckpt / WEIGHTS)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    load_weights(model, tensors, ckpt / WEIGHTS)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty breaks the tie; restore it
    model.to(device).eval()
    tokenizer = load_tokenizer(ckpt, config) if with_tokenizer else None
    return model, tokenizer


def load_tokenizer(ckpt: Path, config: ModelConfig):
    from .tokenizer import Tokenizer

    path = Path(ckpt) / TOKENIZER
    if not path.is_file():
        raise LLMClockError(f"{path}: missing")
    verify_hash(path)
    tok = Tokenizer.load(path)
    if tok.vocab_size > config.vocab_size:
        raise LLMClockError(
            f"{path}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
        )
    return tok


def load_train_state_json(ckpt: Path) -> dict:
    """train_state.json of a training checkpoint (step, recipe, RNG states), checked."""
    path = Path(ckpt) / STATE
    state = read_json(path, missing="missing (checkpoint has no training state to resume from)")
    verify_hash(path)
    if not isinstance(state.get("step"), int) or state["step"] < 0 or not isinstance(state.get("rng"), dict):
        raise LLMClockError(f"{path}: no valid step and RNG state")
    return state


def load_train_state(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(train_state.json, optimizer tensors) of a training checkpoint."""
    return load_train_state_json(ckpt), read_tensors(Path(ckpt) / OPTIMIZER)
