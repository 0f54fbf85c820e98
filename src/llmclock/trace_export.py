"""Views of a trace: Chrome/Perfetto trace events, the clock-waveform plot, a terminal summary.

All three read Records (in memory or loaded from trace.jsonl); none needs the model.
"""

from __future__ import annotations

import math
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
    return json_safe({"traceEvents": ev, "displayTimeUnit": "ms", "otherData": other})


def json_safe(obj):
    """`obj` with every NaN or infinity replaced by None: JSON has no such numbers, and a trace
    viewer given the non-standard tokens Python writes for them rejects the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------- the clock waveform

STAGE_COLORS = dict(zip(GROUPS, ("#d9d9d9", "#969696", "#636363", "#bdbdbd", "#252525")))
"""Stages in greys, so that colour in the plot always means a slot."""
LABEL_CHARS = 10
"""Token labels are cut to this many characters (and marked with …) to stay inside their row."""
_CYCLE_IN = 0.14
"""Inches of x axis a cycle needs for its (vertical) token label not to touch the next one."""


def _show(s: str, limit: int = LABEL_CHARS) -> str:
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") or "·"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _finite(v: float) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")


def plot_waveform(records, path: str | Path, title: str = "") -> Path | None:
    """The clock waveform (see `waveform_figure`) as a PNG; None when there are no records."""
    fig = waveform_figure(records, title)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return Path(path)


def waveform_figure(records, title: str = ""):
    """Per-cycle latency (stacked by stage), logprob and entropy as strips under the emitted tokens.

    One colour per slot (tokens, logprob and entropy lines, legend), stages in greys, prefill
    cycles shaded and labelled, integer cycle ticks. Token labels are vertical, cut to
    LABEL_CHARS, and thinned to every k-th cycle when the figure cannot give each its own room.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    cs = cycles(records)
    if not cs:
        return None
    slots = sorted({r.slot for r in records})
    lo, hi = cs[0].cycle, cs[-1].cycle
    span = hi - lo + 1
    margin = 1.6  # inches of y labels and padding around the axes
    width = min(60.0, max(8.0, _CYCLE_IN * span + margin))
    stride = max(1, math.ceil(_CYCLE_IN / ((width - margin) / span)))
    heights = [0.3 + 0.85 * len(slots), 1.6, 1.2, 1.2]
    fig = Figure(figsize=(width, sum(heights) + 1.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": heights})
    colors = {s: f"C{i % 10}" for i, s in enumerate(slots)}
    x = [c.cycle for c in cs]

    ax = axes[0]
    for r in records:
        if (r.cycle - lo) % stride == 0:
            ax.text(r.cycle, r.slot, _show(r.token), ha="center", va="center", fontsize=7, rotation=90,
                    family="monospace", color=colors[r.slot], clip_on=True)
    ax.set_ylim(max(slots) + 0.5, min(slots) - 0.5)
    ax.set_yticks(slots, [f"slot {s}" for s in slots])
    note = f" (every {stride}th token shown)" if stride > 1 else ""
    ax.set_title(f"clock waveform {title}{note}".strip(), fontsize=9, loc="left")

    ax, bottom = axes[1], [0.0] * len(cs)
    for g in GROUPS:
        h = [c.groups()[g] * 1e3 for c in cs]
        ax.bar(x, h, bottom=bottom, width=0.9, label=g, color=STAGE_COLORS[g], edgecolor="none")
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.set_ylabel("ms / cycle", fontsize=8)
    handles = ax.get_legend_handles_labels()[0] + [Patch(color="#fde0c5", label="prefill cycle")]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.005, 1.0), title="stages",
              title_fontsize=6)

    for ax, attr, label in ((axes[2], "logprob", "logprob"), (axes[3], "entropy", "entropy (nats)")):
        for s in slots:
            val = {r.cycle: _finite(getattr(r, attr)) for r in records if r.slot == s}
            ax.step(x, [val.get(c, float("nan")) for c in x], where="mid", color=colors[s], lw=1,
                    label=f"slot {s}")  # gaps: the slot was idle
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(handles=[Patch(color=colors[s], label=f"slot {s}") for s in slots], fontsize=6, loc="upper left",
                   bbox_to_anchor=(1.005, 1.0), title="slots", title_fontsize=6)
    axes[3].set_xlabel("clock cycle")
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].set_xlim(lo - 0.5, hi + 0.5)
    prefills = [c.cycle for c in cs if "prefill" in c.kind]  # 'prefill' or 'prefill+tick'
    for ax in axes:
        for c in prefills:
            ax.axvspan(c - 0.5, c + 0.5, color="#fde0c5", zorder=0, lw=0)
        ax.tick_params(labelsize=7)
    if prefills:
        axes[1].text(prefills[0], 1.0, "prefill", transform=axes[1].get_xaxis_transform(), ha="center",
                     va="bottom", fontsize=7, color="#a0522d")
    fig.tight_layout()
    return fig


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
