"""Subcommands between llmclock and Hugging Face GPT-2 directories: import-hf, export-hf."""

from __future__ import annotations

from . import options
from .common import add_overwrite, check_out, echo


def add_import_hf(sub) -> None:
    p = sub.add_parser("import-hf", help="convert a Hugging Face GPT-2 checkpoint directory to llmclock's")
    p.add_argument("hf_dir", type=options.path, help="config.json + model.safetensors + tokenizer files")
    p.add_argument("out_dir", type=options.path, help="llmclock checkpoint directory to write")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (loaded with weights_only=True)")
    add_overwrite(p, "OUT_DIR (an llmclock checkpoint or an empty directory)")
    p.set_defaults(fn=cmd_import_hf)


def cmd_import_hf(a) -> None:
    from ..hf import import_hf

    out = check_out(a.out_dir, "OUT_DIR", overwrite=a.overwrite, kind="dir", marker="config.json")
    echo(f"imported -> {import_hf(a.hf_dir, out, allow_pickle=a.allow_pickle, overwrite=a.overwrite)}")


def add_export_hf(sub) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint in Hugging Face GPT-2 layout")
    p.add_argument("ckpt_dir", type=options.path)
    p.add_argument("out_dir", type=options.path, help="directory to write (loads with from_pretrained)")
    add_overwrite(p, "OUT_DIR (a Hugging Face export or an empty directory)")
    p.add_argument("--dequantize", action="store_true", help="export a quantized checkpoint (llmclock compress) as fp32")
    p.add_argument("--auto-tokenizer", action="store_true",
                   help="a character vocabulary beyond ASCII (which GPT2TokenizerFast cannot read): write it "
                        "for PreTrainedTokenizerFast, which AutoTokenizer loads")
    p.set_defaults(fn=cmd_export_hf)


def cmd_export_hf(a) -> None:
    from ..hf import export_hf

    out = check_out(a.out_dir, "OUT_DIR", overwrite=a.overwrite, kind="dir", marker="config.json")
    out = export_hf(a.ckpt_dir, out, overwrite=a.overwrite, dequantize=a.dequantize, auto_tokenizer=a.auto_tokenizer)
    echo(f"exported -> {out}")
