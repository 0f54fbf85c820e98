"""Views of a trace: Chrome/Perfetto trace events, the clock-waveform plot, a terminal summary.

All three read Records (in memory or loaded from trace.jsonl); none needs the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GROUPS = ("embed", "blocks", "head", "sample", "post")


@dataclass
class Cycle:
    """One clock cycle over all its slots."""

    cycle: int
    kind: str
    t: float
    stages: dict[str, float]
    """Stage -> seconds of engine work (summed over the cycle's forwards: prompts, then ticks)."""
    probe: float
    records: list = field(default_factory=list)

    @property
    def dur(self) -> float:
        return sum(self.stages.values())

    def groups(self) -> dict[str, float]:
        g = dict.fromkeys(GROUPS, 0.0)
        for name, d in self.stages.items():
            key = "blocks" if name.startswith("block") else name
            g[key] = g.get(key, 0.0) + d
        return g


def cycles(records) -> list[Cycle]:
    by: dict[int, list] = {}
    for r in records:
        by.setdefault(r.cycle, []).append(r)
    out = []
    for c, rs in sorted(by.items()):
        # Slots that ran in the same forward share its stages; older traces gave each prefilled slot
        # its own forward. A stage counts once per distinct start.
        spans = {(name, round(r.t + off, 9)): d for r in rs for name, (off, d) in r.stages.items()}
        stages: dict[str, float] = {}
        for (name, _), d in spans.items():
            stages[name] = stages.get(name, 0.0) + d
        kind = rs[0].cycle_kind or rs[0].kind
        out.append(Cycle(c, kind, min(r.t for r in rs), stages, rs[0].probe, rs))
    return out


# ---------------------------------------------------------------- Chrome trace events (Perfetto)


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def to_perfetto(header: dict, records) -> dict:
    """Trace Event Format: a track per slot, a slice per cycle with its stages nested, counters."""
    pid = 1
    m = header.get("model") or {}
    shape = f"{m.get('n_layer', '?')}L x {m.get('n_embd', '?')}" if m else ""
    ev = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"llmclock {shape}".strip()}}]
    for s in sorted({r.slot for r in records}):
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": s + 1, "args": {"name": f"slot {s}"}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": s + 1, "args": {"sort_index": s}})
    for r in records:
        tid = r.slot + 1
        kids, prev = [], _us(r.t)
        for name, (off, d) in sorted(r.stages.items(), key=lambda kv: kv[1][0]):
            a = max(_us(r.t + off), prev)  # integer microseconds, never overlapping the previous stage
            b = max(a, _us(r.t + off + d))
            kids.append({"ph": "X", "name": name, "cat": "stage", "pid": pid, "tid": tid, "ts": a, "dur": b - a})
            prev = b
        start = min([_us(r.t)] + [k["ts"] for k in kids])
        end = max([_us(r.t + r.dur)] + [k["ts"] + k["dur"] for k in kids])
        args = {
            "request_id": r.request_id, "position": r.position, "token_id": r.token_id, "token": r.token,
            "text": r.text, "logprob": r.logprob, "entropy": r.entropy, "kv_bytes": r.kv_bytes,
            "top": [f"{s!r} {p:.4f}" for _, s, p in r.top], "tracer_us": _us(r.probe),
        }
        if r.finish_reason:
            args["finish_reason"] = r.finish_reason
        if r.lens:
            args["lens"] = {f"after block {k}": [f"{s!r} {p:.3f}" for _, s, p in v] for k, v in r.lens.items()}
        ev.append({"ph": "X", "name": f"{r.kind} {r.token!r}", "cat": r.kind, "pid": pid, "tid": tid,
                   "ts": start, "dur": end - start, "args": args})
        ev += kids
        ev.append({"ph": "C", "name": f"entropy slot {r.slot}", "pid": pid, "ts": start, "args": {"nats": r.entropy}})
        ev.append({"ph": "C", "name": f"logprob slot {r.slot}", "pid": pid, "ts": start, "args": {"logprob": r.logprob}})
    for c in cycles(records):
        ev.append({"ph": "C", "name": "kv cache", "pid": pid, "ts": _us(c.t), "args": {"bytes": c.records[0].kv_total}})
    other = {k: header.get(k) for k in ("llmclock", "torch", "device", "ckpt", "weights_sha256")}
    return {"traceEvents": ev, "displayTimeUnit": "ms", "otherData": other}


# ---------------------------------------------------------------- the clock waveform


def _show(s: str) -> str:
    return s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") or "·"


def plot_waveform(records, path: str | Path, title: str = "") -> Path | None:
    """Per-cycle latency (stacked by stage), logprob and entropy as strips under the emitted tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cs = cycles(records)
    if not cs:
        return None
    slots = sorted({r.slot for r in records})
    width = min(40.0, max(9.0, 0.09 * len(cs) + 4))
    heights = [0.4 + 0.3 * len(slots), 1.6, 1.2, 1.2]
    fig = Figure(figsize=(width, sum(heights) + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": heights})
    colors = {s: f"C{i % 10}" for i, s in enumerate(slots)}
    x = [c.cycle for c in cs]

    ax = axes[0]
    rot = 90 if len(cs) > 40 else 0
    for r in records:
        ax.text(r.cycle, r.slot, _show(r.token), ha="center", va="center", fontsize=7, rotation=rot,
                family="monospace", color=colors[r.slot])
    ax.set_ylim(max(slots) + 0.7, min(slots) - 0.7)
    ax.set_yticks(slots, [f"slot {s}" for s in slots])
    ax.set_title(f"clock waveform {title}".strip(), fontsize=9, loc="left")

    ax, bottom = axes[1], [0.0] * len(cs)
    for g in GROUPS:
        h = [c.groups()[g] * 1e3 for c in cs]
        ax.bar(x, h, bottom=bottom, width=0.9, label=g)
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.set_ylabel("ms")
    ax.legend(fontsize=6, ncol=len(GROUPS), loc="upper right")

    for ax, attr, label in ((axes[2], "logprob", "logprob"), (axes[3], "entropy", "entropy (nats)")):
        for s in slots:
            val = {r.cycle: getattr(r, attr) for r in records if r.slot == s}
            ax.step(x, [val.get(c, float("nan")) for c in x], where="mid", color=colors[s], lw=1)  # gaps: idle
        ax.set_ylabel(label, fontsize=8)
    axes[3].set_xlabel("clock cycle")
    for ax in axes:
        for c in cs:
            if "prefill" in c.kind:
                ax.axvspan(c.cycle - 0.5, c.cycle + 0.5, color="0.9", zorder=0)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


# ---------------------------------------------------------------- terminal summary


def summary(records, slowest: int = 3) -> str:
    cs = cycles(records)
    if not cs:
        return "trace: no cycles recorded"
    busy = sum(c.dur for c in cs)
    probe = sum(c.probe for c in cs)
    n_pre = sum(c.kind == "prefill" for c in cs)
    n_mixed = sum(c.kind == "prefill+tick" for c in cs)
    share = dict.fromkeys(GROUPS, 0.0)
    for c in cs:
        for g, d in c.groups().items():
            share[g] += d
    lines = [
        (f"trace: {len(cs)} cycles ({n_pre} prefill, {len(cs) - n_pre - n_mixed} tick, {n_mixed} both), "
         f"{len(records)} tokens in "
         f"{busy:.3f} s of engine time = {len(records) / busy if busy else 0:.1f} tokens/s; "
         f"tracer overhead {probe:.3f} s"),
        "time share: " + "  ".join(f"{g} {100 * d / busy if busy else 0:.1f}%" for g, d in share.items()),
        "slowest cycles: " + ", ".join(
            f"#{c.cycle} {c.kind} {c.dur * 1e3:.2f} ms" for c in sorted(cs, key=lambda c: -c.dur)[:slowest]
        ),
    ]
    return "\n".join(lines)
