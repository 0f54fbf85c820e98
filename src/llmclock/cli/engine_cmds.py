"""Subcommands on the clocked engine: generate, chat, trace, replay."""

from __future__ import annotations

import dataclasses
import sys

from ..config import SamplingParams
from ..errors import LLMClockError
from . import options
from .common import add_adapter, add_device_flags, add_overwrite, check_out, echo, load_model
from .options import add_config_flags, config_from_args, integer

SAMPLING_FLAGS = {name: None for name in (
    "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "ignore_eos", "seed")}


def add_sampling_flags(p, *, logprobs: bool = False) -> None:
    """SamplingParams' fields as flags (defaults and help from the dataclass), and the device flags."""
    g = p.add_argument_group("sampling")
    add_config_flags(g, SamplingParams, SAMPLING_FLAGS | ({"logprobs": None} if logprobs else {}))
    g.add_argument("--stop", action="append", type=options.escaped, default=[],
                   help=r"stop string (repeatable); \n, \t, \\, \xHH and \uXXXX are read as escapes, so "
                   r"--stop '\n\n' stops at a blank line")
    g.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=integer(0), default=[],
                   metavar="ID", help="token id that ends generation (repeatable)")
    g.add_argument("--logit-bias", action="append", type=options.token_bias, default=[], metavar="ID=BIAS",
                   help=f"add BIAS ({SamplingParams.BIAS.describe()}) to token ID's logit (repeatable)")
    add_device_flags(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the tick")


def sampling(a, **extra) -> SamplingParams:
    return config_from_args(SamplingParams, a, stop=a.stop, stop_token_ids=a.stop_token_ids,
                            logit_bias=dict(a.logit_bias), **extra)


def _engine(a, slots: int = 1):
    from ..engine import Engine

    model, tok = load_model(a)
    return Engine(model, tok, slots=slots, compile=a.compile)


def finish_note(engine, params: SamplingParams, seq, prompt_len: int, given_len: int) -> str:
    """Why a sequence stopped and how many tokens it made, e.g. '[stop: end of text; 12 tokens]'."""
    n, tok = len(seq.output_ids), engine.tokenizer
    if seq.finish_reason == "length":
        if n >= params.max_new_tokens:
            why = f"length: --max-new-tokens {params.max_new_tokens} reached"
        else:
            why = f"length: the context ({engine.max_len} tokens) is full"
    elif seq.finish_reason == "stop":
        last = seq.output_ids[-1] if seq.output_ids else None
        why = ("stop: end of text" if last == tok.eot_id and not params.ignore_eos
               else "stop: a --stop-token-id" if last in params.stop_token_ids else "stop: a --stop string")
    else:
        why = str(seq.finish_reason)
    note = f"[{why}; {n} token{'s' * (n != 1)}"
    if prompt_len < given_len:
        note += f"; --truncate kept the last {prompt_len} of the prompt's {given_len} tokens"
    return note + "]"


# ---------------------------------------------------------------- generate


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens as the clock ticks")
    p.add_argument("--ckpt", required=True, type=options.path)
    p.add_argument("--prompt", required=True, action="append", type=options.text,
                   help="text to continue (repeatable: each prompt runs in turn)")
    p.add_argument("--num-samples", type=integer(1, 10_000), default=1, help="samples per prompt (default: 1)")
    p.add_argument("--n", type=integer(1, 1000), default=1,
                   help="samples per prompt drawn at once on the engine's slots (default: 1)")
    p.add_argument("--best-of", type=integer(1, 1000),
                   help="draw this many per prompt and show the --n with the highest mean token logprob")
    add_adapter(p)
    p.add_argument("--truncate", action="store_true", help="drop the prompt's oldest tokens if it exceeds the context")
    add_sampling_flags(p, logprobs=True)
    p.set_defaults(fn=cmd_generate)


def cmd_generate(a) -> None:
    params = sampling(a)
    if a.best_of or a.n > 1:
        return _generate_ranked(a, params)
    engine = _engine(a)
    params.check_vocab(engine.model.config.vocab_size)
    runs = [(k, prompt, i) for k, prompt in enumerate(a.prompt, 1) for i in range(a.num_samples)]
    for k, prompt, i in runs:
        p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
        if len(runs) > 1:
            echo(f"--- prompt {k}" + (f", sample {i + 1}" if a.num_samples > 1 else ""))
        given = len(engine.tokenizer.encode(prompt))
        seq = engine.add(prompt, p, truncate=a.truncate)
        echo(prompt if len(seq.prompt_ids) == given else engine.tokenizer.decode(seq.prompt_ids), end="")
        events = []
        while engine.has_work():
            for ev in engine.step():
                echo(ev.text, end="")
                events.append(ev)
        echo()
        if p.logprobs:
            echo(_logprob_table(engine.tokenizer, events))
        print(finish_note(engine, p, seq, len(seq.prompt_ids), given), file=sys.stderr, flush=True)


def _generate_ranked(a, params) -> None:
    """--n samples per prompt drawn at once on the engine's slots; with --best-of K, the n best
    of K by mean token logprob (sampled sequences of different lengths compare per token)."""
    k = a.best_of or a.n
    if k < a.n:
        raise LLMClockError(f"--best-of ({k}) must be at least --n ({a.n})")
    if a.num_samples > 1:
        raise LLMClockError("give --num-samples (one after another) or --n/--best-of (at once), not both")
    if params.greedy:
        raise LLMClockError("--n/--best-of need sampling (--temperature > 0): greedy decoding repeats one text")
    engine = _engine(a, slots=min(k, 8))
    for j, prompt in enumerate(a.prompt):
        plist = [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(k)]
        done = engine.complete([prompt] * k, plist, truncate=a.truncate)
        mean = {c.request_id: sum(c.logprobs) / max(1, len(c.logprobs)) for c in done}
        ranked = sorted(done, key=lambda c: -mean[c.request_id]) if a.best_of else done
        for i, c in enumerate(ranked[: a.n]):
            head = f"--- prompt {j + 1}, " if len(a.prompt) > 1 else "--- "
            echo(f"{head}sample {i + 1} of {k} (mean logprob {mean[c.request_id]:.3f}, {c.finish_reason})")
            echo(prompt + c.text)


def _logprob_table(tok, events) -> str:
    lines = ["logprobs (token: logprob | the top alternatives):"]
    for ev in events:
        alts = "  ".join(f"{tok.decode([t])!r} {lp:.3f}" for t, lp in ev.top)
        lines.append(f"  {tok.decode([ev.token_id])!r}: {ev.logprob:.3f} | {alts}")
    return "\n".join(lines)


# ---------------------------------------------------------------- chat


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat in the terminal (Ctrl-C stops a reply, Ctrl-D leaves)")
    p.add_argument("--ckpt", required=True, type=options.path)
    p.add_argument("--system", default="", type=options.text, help="system message")
    add_adapter(p)
    p.add_argument("--docs", type=options.nonempty,
                   help="a folder of text: each turn retrieves its best passages (SQLite FTS5, BM25) into the prompt")
    p.add_argument("--index", type=options.nonempty,
                   help="where the --docs index is cached (default: ~/.cache/llmclock/docs-<hash>.sqlite)")
    p.add_argument("--passages", type=integer(1, 50), default=3,
                   help="passages retrieved per turn; fewer are used if the context is full (default: 3)")
    add_sampling_flags(p)
    p.set_defaults(fn=cmd_chat)


def cmd_chat(a) -> None:
    from ..chat import chat_loop, template_for

    params = sampling(a)
    engine = _engine(a)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes reach chat_loop, which says so
    template = template_for(a.ckpt, a.adapter)
    retrieve = None
    if a.docs:
        from ..retrieval import DocIndex

        index = DocIndex(a.docs, a.index)
        n = index.refresh()
        echo(f"docs: {a.docs} indexed in {index.path} ({n['indexed']} new or changed, {n['unchanged']} unchanged, "
             f"{n['removed']} removed)")
        retrieve = lambda text: index.search(text, a.passages)  # noqa: E731
    chat_loop(engine, params, system=a.system, echo=echo, read=input, template=template, retrieve=retrieve)


# ---------------------------------------------------------------- trace / replay


def add_trace(sub) -> None:
    p = sub.add_parser("trace", help="generate with an oscilloscope on the clock: per-cycle records, Perfetto, plot")
    p.add_argument("--ckpt", required=True, type=options.path)
    p.add_argument("--prompt", action="append", required=True, type=options.text,
                   help="repeatable: prompts run as a batch, one slot each")
    p.add_argument("--out", required=True, type=options.path,
                   help="directory for trace.jsonl, trace.perfetto.json, trace.png")
    add_overwrite(p, "an existing --out directory")
    p.add_argument("--logit-lens", type=options.nonempty, help="layers to read the residual stream at: 'all' or e.g. '0,5,-1'")
    p.add_argument("--top-n", type=integer(0, 20), default=5, help="alternatives recorded per cycle (default: 5)")
    p.add_argument("--truncate", action="store_true", help="drop the prompt's oldest tokens if it exceeds the context")
    add_adapter(p)
    add_sampling_flags(p)
    p.set_defaults(fn=cmd_trace)


def cmd_trace(a) -> None:
    from ..checkpoint import replace_dir
    from ..trace import Tracer

    out = check_out(a.out, "--out", overwrite=a.overwrite, kind="dir", marker="trace.jsonl")
    base = sampling(a)
    params = [dataclasses.replace(base, seed=None if base.seed is None else base.seed + i) for i in range(len(a.prompt))]
    engine = _engine(a, slots=len(a.prompt))
    with Tracer(engine, logit_lens=a.logit_lens, top_n=a.top_n) as tr:
        done = engine.complete(a.prompt, params, truncate=a.truncate)
    with replace_dir(out) as tmp:
        tr.write(tmp, tr.header(ckpt=a.ckpt))
    slot = {q["request_id"]: q["slot"] for q in tr.requests}
    for prompt, c in zip(a.prompt, done):
        echo(f"[slot {slot[c.request_id]}] {prompt!r} -> {c.text!r} ({c.finish_reason}, {len(c.token_ids)} tokens)")
    echo(tr.summary())
    echo(f"wrote {out / 'trace.jsonl'}, {out / 'trace.perfetto.json'} (ui.perfetto.dev), {out / 'trace.png'}")


def add_replay(sub) -> None:
    p = sub.add_parser("replay", help="re-run a trace and check it reproduces bit for bit, or diff two traces")
    p.add_argument("trace", type=options.path, help="trace.jsonl (or its directory)")
    p.add_argument("--against", type=options.path,
                   help="another trace: report the first cycle where the two diverge (no model needed)")
    p.add_argument("--ckpt", type=options.path, help="checkpoint to replay with (default: the one named in the trace)")
    p.set_defaults(fn=cmd_replay)


def cmd_replay(a) -> int:
    """Exit status 0 when the traces agree, 1 when they differ."""
    from ..trace import diff, load, replay

    if a.against:
        ours = load(a.trace)[1]
        div = diff(ours, load(a.against)[1])
        if div is None:
            echo(f"traces identical ({len({r.cycle for r in ours})} cycles)")
            return 0
        echo(div.describe((str(a.trace), str(a.against))))
        return 1
    r = replay(a.trace, ckpt=a.ckpt)
    if r.divergence is None:
        echo(f"replay: identical ({r.cycles} cycles)")
        if r.max_logprob_diff:
            echo(f"note: same tokens, but logprobs differ by up to {r.max_logprob_diff:.3g} (other kernels or threads?)")
        return 0
    echo("replay: differs; " + r.divergence.describe(("recorded", "replayed")))
    return 1
