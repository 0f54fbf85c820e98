"""`llmclock compress`: quantize and prune a checkpoint, then print what it cost (before -> after)."""

from __future__ import annotations

from . import options
from .common import check_out, echo


def add_compress(sub) -> None:
    from ..compress import SCHEMES_ALL
    from ..compress.quant import GROUPS

    p = sub.add_parser("compress", help="quantize (bf16, int8, int4) and prune a checkpoint; before -> after table")
    p.add_argument("--ckpt", required=True, type=options.nonempty, help="checkpoint to compress (not changed)")
    p.add_argument("--out", required=True, type=options.nonempty, help="new checkpoint directory")
    p.add_argument("--scheme", default="int8", type=options.choice_of(lambda: list(SCHEMES_ALL), "scheme"),
                   help="fp32 (pruning only), bf16, int8 (per output channel) or int4 (symmetric, per group)")
    p.add_argument("--group", type=options.choice_of(lambda: [str(g) for g in GROUPS], "group size"), default="64",
                   help="int4 group size along each layer's input: 32, 64 or 128")
    p.add_argument("--embeddings", default="fp32", type=options.choice_of(lambda: ["fp32", "tied"], "embeddings mode"),
                   help="fp32: keep the token table exact (default); tied: it is the quantized head, stored once")
    p.add_argument("--prune", action="append", default=[], metavar="KIND:FRACTION",
                   help="repeatable: mlp:0.25 (structured: MLP neurons), heads:0.25 (structured: attention heads, "
                   "least important over all layers, one kept per layer), magnitude:0.5 (zeros, each layer), "
                   "magnitude-global:0.5 (zeros, one threshold)")
    p.add_argument("--data", type=options.nonempty,
                   help="prepared data: calibration (val), fine-tune (train) and the table's quality (--split)")
    p.add_argument("--calib-batches", type=options.integer(1, 10_000), default=8, help="8 windows each")
    p.add_argument("--recover-steps", type=options.integer(0, 1_000_000), default=0,
                   help="recovery fine-tune steps after pruning")
    p.add_argument("--block-size", type=options.integer(1, 1 << 20), default=256,
                   help="window length for calibration, fine-tune and the table (capped at the context)")
    p.add_argument("--split", default="test", help="held-out split for the table's perplexity and bits per byte")
    p.add_argument("--eval-batches", type=options.integer(1, 10_000), default=8)
    p.add_argument("--threads", type=options.integer(1, 4096), help="torch threads for the table's decode speeds")
    p.add_argument("--device", type=options.device, default="cpu", help="where the compressed model will run (checked)")
    p.add_argument("--no-report", action="store_true", help="skip the before -> after measurements")
    p.set_defaults(fn=cmd_compress)


def cmd_compress(a) -> None:
    from ..compress import CompressConfig, check_device, compress, parse_prune
    from ..compress.report import measure_in_subprocess, table

    cfg = CompressConfig(scheme=a.scheme, group=int(a.group), embeddings=a.embeddings, **parse_prune(a.prune),
                         calib_batches=a.calib_batches, recover_steps=a.recover_steps, block_size=a.block_size)
    check_device(cfg.scheme, a.device)
    out = check_out(a.out, "--out", kind="dir")
    comp = compress(a.ckpt, out, cfg, data=a.data, progress=echo)
    echo(f"compressed -> {out} ({', '.join(f'{k}={v}' for k, v in comp.items() if v is not None and k != 'source')})")
    if a.no_report:
        return
    kw = dict(split=a.split, batches=a.eval_batches, block_size=a.block_size, threads=a.threads)
    echo("measuring before and after, each in a process of its own ...")
    before = measure_in_subprocess(a.ckpt, a.data, **kw)
    echo(table(before, measure_in_subprocess(out, a.data, **kw)))
