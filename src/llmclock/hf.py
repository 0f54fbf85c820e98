"""Hugging Face GPT-2 checkpoints <-> llmclock checkpoints.

llmclock's GPT keeps GPT-2's weight names, so the mapping is mechanical: drop the `transformer.`
prefix (older checkpoints have none), drop the causal-mask buffers (`attn.bias`, `attn.masked_bias`),
and transpose the Conv1D weights (stored (in, out)) into nn.Linear's (out, in). The output
embedding is tied to `wte` on both sides, so `lm_head.weight` is checked, never stored.

Pickled weights (`pytorch_model.bin`) can run code when loaded with full unpickling; they are read
only on request, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import (
    FORMAT,
    atomic_dir,
    load_checkpoint,
    load_weights,
    read_json,
    read_tensors,
    write_checkpoint,
    write_json,
)
from .config import ModelConfig
from .errors import LLMClockError
from .model import GPT

HF_CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF activation_function -> ModelConfig.activation ("gelu_new" and "gelu_pytorch_tanh" are both
# GELU's tanh approximation, GPT-2's; "gelu" is the exact erf form).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# GPT2Config's defaults: transformers reads a config.json that omits a field this way.
HF_DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, layer_norm_epsilon=1e-5
)


# ---------------------------------------------------------------- import


def config_from_hf(d: dict, source: Path) -> ModelConfig:
    """The ModelConfig for a HF GPT-2 config.json, refusing what this architecture can't compute."""
    if d.get("format") == FORMAT:
        raise LLMClockError(f"{source}: already an llmclock checkpoint, not a Hugging Face one")
    if d.get("model_type") != "gpt2":
        raise LLMClockError(f"{source}: model_type is {d.get('model_type')!r}; only 'gpt2' can be imported")
    g = HF_DEFAULTS | d
    act = g.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise LLMClockError(
            f"{source}: activation_function {act!r} is not supported (need one of {tuple(ACTIVATIONS)})"
        )
    n_inner = g.get("n_inner")
    if n_inner is not None and n_inner != 4 * g["n_embd"]:
        raise LLMClockError(f"{source}: n_inner={n_inner} is not 4 * n_embd; llmclock's MLP is 4x wide")
    if not g.get("scale_attn_weights", True):
        raise LLMClockError(f"{source}: scale_attn_weights=false is not supported (attention scales by 1/sqrt(hs))")
    if g.get("scale_attn_by_inverse_layer_idx", False):
        raise LLMClockError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
    if g.get("add_cross_attention", False):
        raise LLMClockError(f"{source}: add_cross_attention=true (an encoder-decoder model) is not supported")
    # reorder_and_upcast_attn only changes the order of fp16 arithmetic; in fp32 it is the same model.
    try:
        return ModelConfig(
            vocab_size=g["vocab_size"],
            block_size=g["n_positions"],
            n_layer=g["n_layer"],
            n_head=g["n_head"],
            n_embd=g["n_embd"],
            layer_norm_epsilon=float(g["layer_norm_epsilon"]),
            activation=ACTIVATIONS[act],
            bias=True,
        )
    except LLMClockError as e:
        raise LLMClockError(f"{source}: {e}") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LLMClockError(f"{path}: missing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types; all mean "not a loadable state dict"
        raise LLMClockError(
            f"{path}: not a weights-only state dict: corrupt, or it pickles more than tensors ({type(e).__name__})"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LLMClockError(f"{path}: expected a flat state dict of tensors")
    return sd


def _read_sharded(index: Path, read) -> dict[str, torch.Tensor]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LLMClockError(f"{index}: no weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise LLMClockError(f"{index}: shard {shard!r} is not a file name in this directory")
        tensors |= read(index.parent / shard)
    missing = sorted(k for k in weight_map if k not in tensors)
    if missing:
        raise LLMClockError(f"{index}: {missing[0]} is not in its shard {weight_map[missing[0]]}")
    return tensors


def read_hf_weights(hf_dir: Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """(HF state dict, the file it came from), preferring safetensors over pickle."""
    if (hf_dir / SAFETENSORS).is_file():
        return read_tensors(hf_dir / SAFETENSORS), hf_dir / SAFETENSORS
    if (hf_dir / SAFETENSORS_INDEX).is_file():
        return _read_sharded(hf_dir / SAFETENSORS_INDEX, read_tensors), hf_dir / SAFETENSORS_INDEX
    for name, read in ((PICKLE, _read_pickle), (PICKLE_INDEX, lambda p: _read_sharded(p, _read_pickle))):
        if (hf_dir / name).is_file():
            if not allow_pickle:
                raise LLMClockError(
                    f"{hf_dir / name}: pickled weights can run code when loaded; pass --allow-pickle "
                    f"to read them (weights-only), or convert to {SAFETENSORS}"
                )
            return read(hf_dir / name), hf_dir / name
    raise LLMClockError(f"{hf_dir}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE})")


def weights_from_hf(sd: dict[str, torch.Tensor], source: Path, *, tied: bool = True) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> llmclock names and layout; lm_head must be wte's tied copy."""
    out: dict[str, torch.Tensor] = {}
    head = None
    for key, t in sd.items():
        name = key.removeprefix("transformer.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("bias", "masked_bias"):
            continue  # the causal-mask buffers, not weights
        if name == "lm_head.weight":
            head = t
            continue
        if name.endswith(CONV1D) and t.ndim == 2:
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        out[f"transformer.{name}"] = t.contiguous()
    wte = out.get("transformer.wte.weight")
    if head is None and not tied:
        raise LLMClockError(f"{source}: tie_word_embeddings is false but there is no lm_head.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise LLMClockError(
            f"{source}: lm_head.weight differs from wte.weight; llmclock ties the output embedding to the input one"
        )
    return out


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, allow_pickle: bool = False,
              overwrite: bool = False) -> Path:
    """Convert a Hugging Face GPT-2 checkpoint directory into a new llmclock checkpoint at `out_dir`
    (`overwrite`: replace an llmclock checkpoint there)."""
    from .tokenizer import Tokenizer

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LLMClockError(f"{hf_dir}: not a directory")
    if out_dir.exists() and not overwrite:
        raise LLMClockError(f"{out_dir} already exists; refusing to overwrite it")
    raw = read_json(hf_dir / HF_CONFIG)
    config = config_from_hf(raw, hf_dir / HF_CONFIG)
    tokenizer = Tokenizer.load(hf_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise LLMClockError(
            f"{hf_dir}: tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is {config.vocab_size}"
        )
    sd, source = read_hf_weights(hf_dir, allow_pickle=allow_pickle)
    tensors = weights_from_hf(sd, source, tied=raw.get("tie_word_embeddings", True))
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    load_weights(model, tensors, source)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty breaks the tie; restore it
    write_checkpoint(out_dir, model, tokenizer, overwrite=overwrite)
    return out_dir


# ---------------------------------------------------------------- export


def hf_config(config: ModelConfig, eot_id: int | None) -> dict:
    """A transformers GPT2Config (as config.json) for this model shape."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "tie_word_embeddings": True, "dtype": "float32",
    }  # fmt: skip


def weights_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmclock tensors (lm_head left out) -> HF GPT-2 names and Conv1D layout."""
    out = {}
    for name, t in state.items():
        if name.endswith(CONV1D):
            t = t.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        out[name] = t.contiguous()
    return out


def _hf_tokenizer(tokenizer, *, auto_tokenizer: bool):
    """The tokenizer to export and the HF class that loads it exactly.

    Byte-level BPE is what GPT2TokenizerFast reads, so an ASCII character vocabulary is written in
    that form (same ids). Other character vocabularies are refused unless `auto_tokenizer`: then
    tokenizer.json is written as is, for PreTrainedTokenizerFast (AutoTokenizer).
    """
    try:
        return tokenizer.as_byte_level(), "GPT2Tokenizer"
    except LLMClockError as e:
        if auto_tokenizer:
            return tokenizer, "PreTrainedTokenizerFast"
        raise LLMClockError(
            f"{e}; GPT2TokenizerFast would drop them. It loads exactly with PreTrainedTokenizerFast "
            "(AutoTokenizer): pass --auto-tokenizer to export it for that class"
        ) from None


def _tokenizer_files(tokenizer, tokenizer_class: str, block_size: int, dest: Path) -> None:
    """tokenizer.json, plus vocab.json/merges.txt (byte-level BPE) and the configs HF's loaders read."""
    tokenizer.save(dest / "tokenizer.json")
    if tokenizer.kind == "bpe":
        tokenizer.save_gpt2_files(dest)
    eot = tokenizer.id_to_token(tokenizer.eot_id)
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    write_json(dest / "special_tokens_map.json", special)
    write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": tokenizer_class,
            "model_max_length": block_size,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            **special,
        },
    )


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
              dequantize: bool = False, auto_tokenizer: bool = False) -> Path:
    """Write an llmclock checkpoint as a new Hugging Face GPT-2 directory at `out_dir` (`overwrite`:
    replace an earlier export there). A quantized checkpoint is refused unless `dequantize` (then
    its weights are written as fp32). The tokenizer loads with GPT2TokenizerFast (a character
    vocabulary beyond ASCII is refused unless `auto_tokenizer`: see `_hf_tokenizer`)."""
    from safetensors.torch import save_file

    from .compress.model import dequantized_state

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LLMClockError(f"{out_dir} already exists; refusing to overwrite it")
    model, tokenizer = load_checkpoint(ckpt_dir)
    state = dequantized_state(model, ckpt_dir, allow=dequantize)
    config = model.config
    if not config.bias:
        raise LLMClockError(f"{ckpt_dir}: model has bias=False; GPT-2 (and so a HF export) needs biases")
    tokenizer, tokenizer_class = _hf_tokenizer(tokenizer, auto_tokenizer=auto_tokenizer)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        hf = hf_config(config, tokenizer.eot_id)
        hidden = (getattr(model, "compression", None) or {}).get("mlp_hidden")
        write_json(tmp / HF_CONFIG, hf | ({"n_inner": hidden} if hidden else {}))  # structurally pruned MLPs
        save_file(weights_to_hf(state), str(tmp / SAFETENSORS), metadata={"format": "pt"})
        _tokenizer_files(tokenizer, tokenizer_class, config.block_size, tmp)
    return out_dir
