"""The oscilloscope: one record per clock cycle per slot, and exact replay of a recorded run.

    with Tracer(engine, logit_lens=[0, -1], top_n=5) as tr:
        engine.complete(prompts, params)
    tr.write("out/", tr.header(ckpt="ckpt/"))   # trace.jsonl, trace.perfetto.json, trace.png

The Tracer is the engine's Probe: the engine calls begin / mark / residual / end once per cycle,
and only when a probe is attached, so with tracing off the hot path does no extra work. Each
record holds what the slot emitted (token, logprob, entropy, the top-N alternatives), the wall
time of every stage of the cycle (embed, block0.., head, sample, post) and the KV-cache bytes in
use. Stage times exclude the tracer's own work (logit lens, top-N, bookkeeping), which is kept
apart in `probe`. On GPU each stage boundary synchronises the device, so times are honest.

A trace's header holds everything needed to run it again (checkpoint and its hash, requests with
the seeds actually drawn, engine shape); `replay` re-runs it and `diff` finds the first cycle at
which two traces part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import torch

from .errors import LLMClockError

FORMAT = "llmclock-trace-v1"
JSONL, PERFETTO, PLOT = "trace.jsonl", "trace.perfetto.json", "trace.png"


@dataclass(slots=True)
class Record:
    """One slot in one clock cycle."""

    kind: str
    """'prefill' (the prompt's forward, emitting the first token) or 'tick'."""
    cycle: int
    slot: int
    request_id: str
    position: int
    """Position the emitted token occupies in its sequence."""
    token_id: int
    token: str
    """The emitted token decoded on its own."""
    text: str
    """Text the engine released this cycle (may lag the token: partial characters, stop strings)."""
    logprob: float
    """Of the emitted token under the model's own distribution (as the engine's Event)."""
    entropy: float
    """Of the model's own next-token distribution, in nats."""
    top: list[tuple[int, str, float]]
    """The top-N tokens: (id, text, probability)."""
    t: float
    """Start, in seconds since the tracer's epoch."""
    dur: float
    """Seconds of engine work for this slot's cycle (the tracer's own work excluded)."""
    stages: dict[str, tuple[float, float]]
    """Stage -> (start offset from t, seconds): embed..head of the forward this slot ran in (one
    packed forward for the cycle's prompts, one batched forward for its ticks, each shared by its
    slots), then sample and post, shared by every slot of the cycle."""
    probe: float
    """Seconds the tracer itself spent in this cycle."""
    kv_bytes: int
    """KV-cache bytes this slot holds."""
    kv_total: int
    """KV-cache bytes in use over all slots."""
    finish_reason: str | None = None
    lens: dict[int, list[tuple[int, str, float]]] | None = None
    """Logit lens: layer -> top (id, text, probability) had the clock stopped after that block."""
    cycle_kind: str | None = None
    """What the whole cycle ran: 'prefill', 'tick' or 'prefill+tick' (prompts prefilled, in chunks
    of a token budget, in the same cycle as the other slots' ticks: a tick record's stages are its
    own forward's, and the prefill ran before it). None in traces from before mixed cycles."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        d = dict(d)
        d["top"] = [tuple(x) for x in d["top"]]
        d["stages"] = {k: tuple(v) for k, v in d["stages"].items()}
        if d.get("lens") is not None:
            d["lens"] = {int(k): [tuple(x) for x in v] for k, v in d["lens"].items()}
        return cls(**d)


def parse_layers(spec: str | list[int] | None, n_layer: int) -> list[int]:
    """'all' | '0,5,-1' | [0, -1] -> sorted distinct block indices (negative counts from the end)."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(n_layer))
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise LLMClockError(f"logit lens: expected 'all' or comma-separated layer numbers, got {spec!r}") from None
    out = set()
    for k in spec:
        if not -n_layer <= k < n_layer:
            raise LLMClockError(f"logit lens: layer {k} is outside the model's {n_layer} blocks (0..{n_layer - 1})")
        out.add(k % n_layer)
    return sorted(out)


class Tracer:
    """The engine's probe: builds one Record per slot per cycle."""

    def __init__(self, engine, *, logit_lens: str | list[int] | None = None, top_n: int = 5):
        V = engine.model.config.vocab_size
        if not isinstance(top_n, int) or not 0 <= top_n <= V:
            raise LLMClockError(f"trace: top_n must be an integer in [0, {V}], got {top_n!r}")
        self.engine, self.top_n = engine, top_n
        self.lens = parse_layers(logit_lens, engine.model.config.n_layer)
        self._lens_at = [i in self.lens for i in range(engine.model.config.n_layer)]
        self._device, self._cuda = engine.device, engine.device.type == "cuda"
        self.records: list[Record] = []
        self.requests: list[dict] = []
        """Each admitted sequence: id, slot, admission cycle, prompt ids, sampling params with the seed used."""
        self.first_cycle: int | None = None
        self.idle_start = not engine.running
        self.epoch = perf_counter()
        self._bpp = engine.cache.nbytes // (engine.cache.slots * engine.cache.max_len)  # bytes per position
        self._pieces: dict[int, str] = {}
        self._prompt_len: dict[str, int] = {}  # request id -> prompt tokens: an event at that position is a prefill's
        self._prev = None

    def __enter__(self) -> Tracer:
        self._prev, self.engine.probe = self.engine.probe, self
        return self

    def __exit__(self, *exc) -> None:
        self.engine.probe = self._prev

    # ---------------------------------------------------------------- the Probe interface

    def begin(self, kind: str, slots: list[int]) -> None:
        t = perf_counter()
        eng = self.engine
        if self.first_cycle is None:
            self.first_cycle = eng.cycle
        for slot in slots:
            seq = eng.running[slot]
            if seq.prefilled == 0:  # admitted this cycle
                self.requests.append(_request(seq, eng.cycle, eng.tokenizer))
                self._prompt_len[seq.request_id] = len(seq.prompt_ids)
        self._kind = kind
        self._spans: list[tuple[str, float, float, int]] = []  # (stage, start, seconds, group)
        self._group = -1  # the forward a stage belongs to: 0, then 1 for the ticks of a 'prefill+tick' cycle
        self._res: list[list[torch.Tensor]] = [[] for _ in self.lens]
        if self._cuda:
            torch.cuda.synchronize(self._device)
        self._last = perf_counter()
        self._skip = 0.0
        self._probe = self._last - t

    def mark(self, stage: str) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)
        now = perf_counter()
        if stage == "embed":
            self._group += 1
        shared = stage in ("sample", "post")
        self._spans.append((stage, self._last, now - self._last - self._skip, -1 if shared else self._group))
        self._last, self._skip = now, 0.0

    def residual(self, layer: int, x: torch.Tensor) -> None:
        if self._lens_at[layer]:
            t = perf_counter()
            self._res[self.lens.index(layer)].append(x.detach().clone())  # (n, C)
            dt = perf_counter() - t
            self._skip += dt
            self._probe += dt

    def end(self, events: list, logits: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.mark("post")  # the engine's own bookkeeping after sampling: detokenise, stop checks
        if not events:  # the cycle only advanced a long prompt's prefill: no token, no record
            return
        t_in = perf_counter()
        n, k, kl = len(events), self.top_n, max(self.top_n, 1)
        lp = logprobs.float()  # (n, V): the model's own distribution
        cols = [-torch.linalg.vecdot(lp.exp(), lp).double().unsqueeze(1)]  # (n, 1) entropy in nats
        if k:
            v, i = lp.topk(k, dim=-1)  # (n, k)
            cols += [v.exp(), i]
        if self.lens:
            R = torch.stack([torch.cat(r) for r in self._res])  # (L, n, C): the forwards' rows in event order
            lg = self.engine.model.head(R).float()  # (L, n, V): every lens layer through one matmul
            lv, li = lg.topk(kl, dim=-1)  # (L, n, kl)
            lv = (lv - lg.logsumexp(-1, keepdim=True)).exp()
            cols += [lv.transpose(0, 1).reshape(n, -1), li.transpose(0, 1).reshape(n, -1)]  # (n, L*kl)
        rows = torch.cat(cols, dim=1).tolist()  # float64 (ids exact); one device->host copy per cycle
        if any(r[0] != r[0] for r in rows):  # NaN: some p = 0 with log p = -inf; entr takes 0 log 0 = 0
            for r, h in zip(rows, torch.special.entr(lp.exp()).sum(-1).tolist()):
                r[0] = h
        out = self._records(events, rows, k, kl)
        self._probe += perf_counter() - t_in
        for r in out:
            r.probe = self._probe

    # ---------------------------------------------------------------- building records

    def _records(self, events, rows, k: int, kl: int) -> list[Record]:
        spans, nl = self._spans, len(self.lens)
        finished = sum(ev.position for ev in events if ev.finish_reason)
        kv_total = (sum(self.engine.cache.lengths) + finished) * self._bpp
        ticks_after_prefill = int(self._kind == "prefill+tick")  # the tick forward is group 1
        out = []
        for ev, row in zip(events, rows):
            kind = "prefill" if ev.position == self._prompt_len.get(ev.request_id) else "tick"
            group = 0 if kind == "prefill" else ticks_after_prefill
            t0, stages, dur = _relative([s for s in spans if s[3] in (group, -1)])
            top = self._top(row[1 + k : 1 + 2 * k], row[1 : 1 + k])
            lens = None
            if nl:
                p, i = 1 + 2 * k, 1 + 2 * k + nl * kl  # lens probabilities, then lens ids
                lens = {layer: self._top(row[i + j * kl : i + (j + 1) * kl], row[p + j * kl : p + (j + 1) * kl])
                        for j, layer in enumerate(self.lens)}
            out.append(Record(
                kind, ev.cycle, ev.slot, ev.request_id, ev.position, ev.token_id, self._piece(ev.token_id),
                ev.text, ev.logprob, row[0], top, t0 - self.epoch, dur, stages, 0.0, ev.position * self._bpp,
                kv_total, ev.finish_reason, lens, self._kind,
            ))
        self.records += out
        return out

    def _top(self, ids: list[float], probs: list[float]) -> list[tuple[int, str, float]]:
        return [(int(t), self._piece(int(t)), p) for t, p in zip(ids, probs)]

    def _piece(self, tok: int) -> str:
        p = self._pieces.get(tok)
        if p is None:
            p = self._pieces[tok] = self.engine.tokenizer.decode([tok])
        return p

    # ---------------------------------------------------------------- output

    def header(self, ckpt: str | Path | None = None, **extra) -> dict:
        """What a replay needs (and what a reader wants to know) about this run."""
        from . import __version__

        eng = self.engine
        tok = eng.tokenizer
        return {
            "format": FORMAT,
            "llmclock": __version__,
            "torch": torch.__version__,
            "device": str(eng.device),
            "dtype": str(eng.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "ckpt": str(Path(ckpt).absolute()) if ckpt else None,
            "weights_sha256": weights_hash(ckpt) if ckpt else None,
            "tokenizer_sha256": getattr(tok, "hash", None),
            "model": eng.model.config.to_dict(),
            "engine": {"slots": eng.slots, "max_len": eng.max_len, "compile": eng.compiled,
                       "max_batched_tokens": eng.max_batched_tokens},
            "first_cycle": self.first_cycle,
            "idle_start": self.idle_start,
            "top_n": self.top_n,
            "logit_lens": self.lens,
            "requests": self.requests,
            **extra,
        }

    def write(self, out_dir: str | Path, header: dict | None = None) -> dict[str, Path]:
        """trace.jsonl, trace.perfetto.json and trace.png into out_dir; -> their paths."""
        from .trace_export import json_safe, plot_waveform, to_perfetto

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        header = header if header is not None else self.header()
        paths = {"jsonl": out / JSONL, "perfetto": out / PERFETTO, "plot": out / PLOT}
        with open(paths["jsonl"], "w") as f:
            f.write(json.dumps(json_safe(header), allow_nan=False) + "\n")
            f.writelines(json.dumps(json_safe(r.to_dict()), ensure_ascii=False, allow_nan=False) + "\n"
                         for r in self.records)
        paths["perfetto"].write_text(json.dumps(to_perfetto(header, self.records), allow_nan=False))
        plot_waveform(self.records, paths["plot"], title=header.get("ckpt") or "")
        return paths

    def summary(self) -> str:
        from .trace_export import summary

        return summary(self.records)


def _relative(spans) -> tuple[float, dict[str, tuple[float, float]], float]:
    """(start, stage -> (offset from start, seconds), seconds from start to the last stage's end)."""
    t0 = spans[0][1]
    stages = {name: (start - t0, d) for name, start, d, _ in spans}
    return t0, stages, max(o + d for o, d in stages.values())


def _request(seq, cycle: int, tokenizer) -> dict:
    params = dataclasses.asdict(seq.params)
    if seq.seed is not None:
        params["seed"] = seq.seed  # the seed actually used, drawn if none was given
    return {"request_id": seq.request_id, "slot": seq.slot, "cycle": cycle, "prompt": tokenizer.decode(seq.prompt_ids),
            "prompt_ids": list(seq.prompt_ids), "params": params}


def weights_hash(ckpt: str | Path) -> str:
    """sha256 of a checkpoint's model.safetensors."""
    from .checkpoint import WEIGHTS

    path = Path(ckpt) / WEIGHTS
    if not path.is_file():
        raise LLMClockError(f"{path}: missing")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- reading, replay, diff


def load(path: str | Path) -> tuple[dict, list[Record]]:
    """(header, records) of a trace.jsonl (or of the trace.jsonl in a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL
    if not path.is_file():
        raise LLMClockError(f"{path}: trace not found")
    try:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("format") != FORMAT:
            raise LLMClockError(f"{path}: not an llmclock trace (no {FORMAT} header)")
        return header, [Record.from_dict(json.loads(line)) for line in lines[1:] if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise LLMClockError(f"{path}: corrupt trace ({e})") from None


@dataclass
class Divergence:
    """The first cycle at which two traces differ, with what each emitted there (None: no record)."""

    cycle: int
    slot: int
    a: Record | None
    b: Record | None

    def describe(self, names: tuple[str, str] = ("a", "b")) -> str:
        lines = [f"first difference at cycle {self.cycle}, slot {self.slot}"]
        for name, r in zip(names, (self.a, self.b)):
            if r is None:
                lines.append(f"  {name}: no record")
                continue
            alts = "  ".join(f"{s!r} {p:.3f}" for _, s, p in r.top)
            lines.append(f"  {name}: {r.token!r} (id {r.token_id}, logprob {r.logprob:.4f}); top: {alts}")
        return "\n".join(lines)


def diff(a: list[Record], b: list[Record]) -> Divergence | None:
    """The first (cycle, slot) at which the emitted tokens differ or one trace has no record."""
    ka = {(r.cycle, r.slot): r for r in a}
    kb = {(r.cycle, r.slot): r for r in b}
    for key in sorted(ka.keys() | kb.keys()):
        ra, rb = ka.get(key), kb.get(key)
        if ra is None or rb is None or ra.token_id != rb.token_id:
            return Divergence(key[0], key[1], ra, rb)
    return None


@dataclass
class Replay:
    header: dict
    recorded: list[Record]
    replayed: list[Record]
    divergence: Divergence | None
    max_logprob_diff: float

    @property
    def cycles(self) -> int:
        return len({r.cycle for r in self.recorded})


def replay(path: str | Path, ckpt: str | Path | None = None) -> Replay:
    """Re-run a recorded generation from its header and compare, cycle by cycle, with the record."""
    from .checkpoint import load_checkpoint
    from .engine import Engine, SamplingParams
    from .train import resolve_device

    header, recorded = load(path)
    ckpt = ckpt or header.get("ckpt")
    if not ckpt:
        raise LLMClockError(f"{path}: the trace names no checkpoint; give one with --ckpt")
    if not header.get("idle_start", True):
        raise LLMClockError(f"{path}: tracing began while sequences were running; this run cannot be replayed")
    got = weights_hash(ckpt)
    if header.get("weights_sha256") and got != header["weights_sha256"]:
        raise LLMClockError(
            f"{ckpt}: weights sha256 {got[:12]}… differ from the traced model's {header['weights_sha256'][:12]}…"
        )
    model, tok = load_checkpoint(ckpt, device=resolve_device(header["device"]))
    if header.get("tokenizer_sha256") and tok.hash != header["tokenizer_sha256"]:
        raise LLMClockError(f"{ckpt}: tokenizer differs from the one the trace was recorded with")
    model.to(getattr(torch, header.get("dtype", "float32")))
    e = header["engine"]
    eng = Engine(model, tok, slots=e["slots"], max_len=e["max_len"], compile=e["compile"],
                 max_batched_tokens=e.get("max_batched_tokens"))
    eng.cycle = (header.get("first_cycle") or 1) - 1
    pending = sorted(header["requests"], key=lambda q: q["cycle"])
    threads = torch.get_num_threads()
    torch.set_num_threads(header.get("threads") or threads)  # CPU kernels' sums depend on the thread count
    try:
        with Tracer(eng, top_n=header.get("top_n", 5)) as tr:  # the lens does not change the tokens: skip it
            while pending or eng.has_work():
                while pending and (pending[0]["cycle"] <= eng.cycle + 1 or not eng.has_work()):
                    q = pending.pop(0)
                    eng.add(q["prompt_ids"], SamplingParams(**q["params"]), request_id=q["request_id"])
                eng.step()
    finally:
        torch.set_num_threads(threads)
    lp = {(r.cycle, r.slot): r.logprob for r in tr.records}
    worst = max((abs(r.logprob - lp[(r.cycle, r.slot)]) for r in recorded if (r.cycle, r.slot) in lp), default=0.0)
    return Replay(header, recorded, tr.records, diff(recorded, tr.records), worst)
