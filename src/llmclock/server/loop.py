"""Continuous batching: one engine runs its clock; requests join between cycles.

    HTTP handlers ──submit(Job)──▶ EngineLoop ──("add" | "abort")──▶ EngineCore: add / abort, engine.step()
         ▲                                                                                  │
         └──── asyncio.Queue per job (call_soon_threadsafe, once per cycle) ◀── Report ◀────┘

EngineLoop is the server's side: admission (at most `slots + queue` sequences in flight; `submit`
refuses more and the caller answers 429 with Retry-After), metrics, and each cycle's events handed
to the jobs' queues. EngineCore is the engine's side: it alone touches the engine (no locks), adds
and aborts requests between two cycles, runs a cycle, and reports it. A request's sequences take
the next free slots; a cycle that admits sequences prefills them while the others tick. An aborted
request (its client went away) is dropped at the next cycle boundary, freeing its slot.

The core runs either on a thread of the server's process (`EngineLoop.in_thread`: a model already
in memory) or in a process of its own (`EngineLoop.in_process`, what `llmclock serve --ckpt` does,
as vLLM runs its engine core). In its own process the engine has an interpreter (and a GIL) of its
own: the event loop frames a cycle's tokens for 16 streams in several ms of Python, which on a thread
the engine waits behind. GPT-2 124M shape, 1 thread, 16 streaming clients, four alternated rounds:
411.8 / 406.7 / 332.1 / 371.9 tokens/s in a process, 381.5 / 367.2 / 329.6 / 313.6 on a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import sys
import threading
import time
from dataclasses import dataclass, field

from ..errors import LLMClockError

SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the GIL while another waits for it (Python's default: 5 ms), set for the
process when an engine thread starts (ThreadCore). The engine thread takes the GIL back after every kernel call, and the
event loop frames one cycle's tokens for every stream in one go (16 streams: several ms of Python):
with 5 ms the engine could wait that long mid-cycle. bench/serve.py (GPT-2 124M shape, 1 thread) gave
1 client over HTTP 0.95-0.96x the engine with 0.5 ms and 0.91-0.93x with the default in two pairs of
runs; later runs with 0.5 ms spread over 0.84-0.97x, so this 2-core VM's noise is as large as the effect."""


class Busy(Exception):
    """The admission queue is full (or the server is draining)."""

    def __init__(self, retry_after: float, draining: bool = False):
        super().__init__("draining" if draining else "queue full")
        self.retry_after, self.draining = retry_after, draining


@dataclass
class Job:
    """One HTTP request: one sequence per choice, all answered through one asyncio queue."""

    prompts: list[list[int]]
    """Token ids of each choice's prompt (a prompt asked for n times appears n times)."""
    params: list  # list[SamplingParams], one per choice
    trace: bool = False
    ids: list[str] = field(default_factory=list)
    """Engine request ids, one per choice (set by submit)."""
    queue: asyncio.Queue | None = None
    aloop: asyncio.AbstractEventLoop | None = None
    t_submit: float = 0.0
    last: list[float] = field(default_factory=list)
    """Per choice: when its latest token was delivered (0 before the first)."""
    tokens: list[int] = field(default_factory=list)
    """Per choice: tokens delivered so far."""
    open: int = 0
    """Choices not yet finished."""


@dataclass
class Report:
    """What the core tells the loop after a cycle (or after commands that failed)."""

    events: list = field(default_factory=list)
    """The cycle's engine Events."""
    records: dict = field(default_factory=dict)
    """Trace records (dicts) of traced requests, by request id."""
    errors: list = field(default_factory=list)
    """(request ids, message, HTTP status): requests the engine refused or dropped (ids None: all of them)."""
    outlook: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    """(cycles left of each running sequence, expected cycles of each waiting one)."""
    cycle_s: float | None = None
    """Seconds per busy cycle (moving average)."""
    mean_len: float | None = None
    """Tokens per finished sequence (moving average)."""
    waiting: int = 0
    running: int = 0


class EngineCore:
    """The engine's side: commands between cycles, one cycle, one Report. `run` loops until told to stop,
    taking commands with `take(block)` (a list, or None to stop) and handing Reports to `send`."""

    def __init__(self, engine, trace_top_n: int = 5):
        self.engine, self.trace_top_n = engine, trace_top_n
        self.held: set[str] = set()
        """Request ids the engine holds (added, not yet finished or aborted)."""
        self.made: dict[str, int] = {}
        """Request id -> tokens made so far."""
        self.traced: set[str] = set()
        self._tracer = None
        self.cycle_s: float | None = None
        self.mean_len: float | None = None

    def run(self, take, send) -> None:
        eng = self.engine
        while True:
            cmds = take(not eng.has_work())
            if cmds is None:
                break
            errors = [e for cmd in cmds for e in self.apply(cmd)]
            if not eng.has_work():
                send(self.report(errors=errors))
                continue
            self._attach_tracer()
            t0 = time.perf_counter()
            try:
                events = eng.step()
            except Exception as e:  # noqa: BLE001 - the engine must outlive one bad cycle
                send(self.fail_all(f"engine error: {type(e).__name__}: {e}", 500, errors))
                continue
            records = self._take_records()
            for ev in events:
                self.made[ev.request_id] = self.made.get(ev.request_id, 0) + 1
                if ev.finish_reason is not None:
                    n = self._forget(ev.request_id)
                    self.mean_len = n if self.mean_len is None else 0.9 * self.mean_len + 0.1 * n
            self._attach_tracer()  # detach once the last traced request is done
            dt = time.perf_counter() - t0
            self.cycle_s = dt if self.cycle_s is None else 0.8 * self.cycle_s + 0.2 * dt
            send(self.report(events, records, errors))
        send(self.fail_all("the server is shutting down", 503))

    def apply(self, cmd) -> list:
        """Carry out one command; the errors to report."""
        if cmd[0] == "abort":
            for rid in cmd[1]:
                if rid in self.held:
                    self.engine.abort(rid)
                    self._forget(rid)
            return []
        _, rids, prompts, params, trace = cmd
        for i, (ids, p, rid) in enumerate(zip(prompts, params, rids)):
            try:
                self.engine.add(ids, p, request_id=rid)
            except LLMClockError as e:
                for r in rids[:i]:
                    self.engine.abort(r)
                    self._forget(r)
                return [(rids, str(e), 400)]
            self.held.add(rid)
            if trace:
                self.traced.add(rid)
        return []

    def report(self, events=(), records=None, errors=()) -> Report:
        eng = self.engine
        running = [expected(s.params.max_new_tokens, len(s.output_ids), self.mean_len) for s in eng.running.values()]
        waiting = [expected(s.params.max_new_tokens, 0, self.mean_len) for s in eng.waiting]
        return Report(list(events), records or {}, list(errors), (running, waiting), self.cycle_s, self.mean_len,
                      len(eng.waiting), len(eng.running))

    def fail_all(self, message: str, status: int, errors=()) -> Report:
        rids = list(self.held)
        for rid in rids:
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - already failing; free what can be freed
                pass
            self._forget(rid)
        return self.report(errors=[*errors, (rids, message, status)] if rids else errors)

    def _forget(self, rid: str) -> int:
        self.held.discard(rid)
        self.traced.discard(rid)
        return self.made.pop(rid, 0)

    def _attach_tracer(self) -> None:
        """Trace a cycle only while some traced request is in flight: with none, the engine runs probe-free."""
        want = bool(self.traced)
        if want and self._tracer is None:
            from ..trace import Tracer

            self._tracer = Tracer(self.engine, top_n=self.trace_top_n)
        self.engine.probe = self._tracer if want else None

    def _take_records(self) -> dict[str, dict]:
        tr = self.engine.probe
        if tr is None:
            return {}
        out = {r.request_id: r.to_dict() for r in tr.records if r.request_id in self.traced}
        tr.records.clear()
        tr.requests.clear()
        return out


def expected(max_new: int, done: int, mean_len: float | None) -> int:
    """Cycles a sequence that has made `done` of at most `max_new` tokens still needs: up to the mean
    length of the sequences finished so far (at least one more cycle), never beyond `max_new`."""
    left = max_new - done
    if mean_len is not None:
        left = min(left, max(1, round(mean_len) - done))
    return max(1, left)


class EngineLoop:
    """The server's side of the engine: admission, metrics, and each cycle's events to the jobs.
    Build it with `in_thread` (an Engine in this process) or `in_process` (a checkpoint loaded by a
    process of its own); `start()` it from the server, `submit` and `abort` from the event loop."""

    def __init__(self, core, slots: int, metrics=None, *, queue: int = 64):
        self.core, self.slots, self.metrics = core, slots, metrics
        self.capacity = slots + queue
        self._jobs: dict[str, tuple[Job, int]] = {}  # request id -> (job, choice index), until it ends
        self._unseen: list[int] = []
        """max_new_tokens of the sequences submitted since the last report (not in its outlook yet)."""
        self._inflight = 0
        self._lock = threading.Lock()
        self.draining = False
        self._stopped = False
        self._ids = 0
        self._cycle_s: float | None = None
        """Seconds per busy cycle (moving average), for Retry-After."""
        self._mean_len: float | None = None
        """Tokens per finished sequence (moving average), for Retry-After."""
        self._outlook: tuple[list[int], list[int]] = ([], [])
        if metrics is not None:
            metrics.slots.set(slots)
            metrics.queue_capacity.set(queue)

    @classmethod
    def in_thread(cls, engine, metrics=None, *, queue: int = 64, trace_top_n: int = 5, threads: int = 0):
        """The engine (already built, in this process) run by a thread of its own."""
        return cls(ThreadCore(EngineCore(engine, trace_top_n), threads), engine.slots, metrics, queue=queue)

    @classmethod
    def in_process(cls, config, metrics=None, *, trace_top_n: int = 5):
        """config's checkpoint (and adapter) loaded and run by a process of its own; blocks until that
        process has loaded it (LLMClockError if it cannot). `.info` then holds max_len and vocab_size."""
        core = ProcessCore(config, trace_top_n)
        loop = cls(core, config.slots, metrics, queue=config.queue)
        loop.info = core.open()
        return loop

    # ------------------------------------------------------------------ called from the server

    def start(self, on_dead=None) -> None:
        """Start the engine's cycles. `on_dead(message)`: called if the engine's process dies."""
        self.core.start(self._on_report, on_dead)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self.core.stop(timeout)

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, job: Job) -> Job:
        """Queue a job's sequences for the engine, or raise Busy. Call from the asyncio loop."""
        k = len(job.prompts)
        with self._lock:
            if self.draining or self._stopped:
                raise Busy(5.0, draining=True)
            if self._inflight + k > self.capacity:
                raise Busy(self._retry_after(k))
            self._inflight += k
            job.ids = [f"r{self._ids + i}" for i in range(k)]
            self._ids += k
            job.queue, job.aloop = asyncio.Queue(), asyncio.get_running_loop()
            job.t_submit, job.last, job.tokens, job.open = time.monotonic(), [0.0] * k, [0] * k, k
            for i, rid in enumerate(job.ids):
                self._jobs[rid] = (job, i)
            self._unseen += [p.max_new_tokens for p in job.params]
        self.core.send(("add", job.ids, job.prompts, job.params, job.trace))
        return job

    def abort(self, job: Job) -> None:
        """Drop a job's unfinished sequences (the client went away): their slots free at the next cycle boundary."""
        with self._lock:
            gone = [rid for rid in job.ids if self._jobs.pop(rid, None) is not None]
            self._inflight -= len(gone)
        if gone:
            self.core.send(("abort", gone))

    def _retry_after(self, k: int) -> float:
        """Seconds until `k` more sequences would be admitted (call holding the lock): the cycles until
        enough in-flight sequences finish, times the measured cycle time."""
        running, waiting = self._outlook
        waiting = waiting + [expected(m, 0, self._mean_len) for m in self._unseen]
        need = self._inflight + k - self.capacity
        cycles = cycles_until(need, running, waiting, self.slots)
        return cycles * (self._cycle_s or 1.0)

    # ------------------------------------------------------------------ the core's reports

    def _on_report(self, rep: Report) -> None:
        """One cycle's outcome, on the core's thread (or the thread reading the core's process)."""
        now = time.monotonic()
        per_job: dict[int, tuple[Job, list]] = {}
        m = self.metrics
        with self._lock:
            self._outlook, self._unseen = rep.outlook, []
            self._cycle_s, self._mean_len = rep.cycle_s, rep.mean_len
            for ev in rep.events:
                entry = self._jobs.get(ev.request_id)
                if entry is None:
                    continue  # aborted meanwhile
                job, i = entry
                if m is not None:
                    if not job.last[i]:
                        m.prompt_tokens.inc(len(job.prompts[i]))
                    (m.itl if job.last[i] else m.ttft).observe(now - (job.last[i] or job.t_submit))
                job.last[i] = now
                job.tokens[i] += 1
                rec = rep.records.get(ev.request_id) if job.trace else None
                per_job.setdefault(id(job), (job, []))[1].append(("event", i, ev, rec))
                if ev.finish_reason is not None:
                    del self._jobs[ev.request_id]
                    self._inflight -= 1
            for rids, message, status in rep.errors:
                jobs = {}
                for rid in list(self._jobs) if rids is None else rids:
                    entry = self._jobs.pop(rid, None)
                    if entry is not None:
                        self._inflight -= 1
                        jobs[id(entry[0])] = entry[0]
                for job in jobs.values():
                    per_job.setdefault(id(job), (job, []))[1].append(("error", message, status))
        if m is not None:
            if rep.events:
                m.tokens(len(rep.events), now)
            m.queue_depth.set(rep.waiting)
            m.busy_slots.set(rep.running)
        _post_all(per_job.values())


def _post_all(deliveries) -> None:
    """Hand each job its items: one wake-up of each event loop per cycle, not one per job."""
    by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
    for job, items in deliveries:
        by_loop.setdefault(id(job.aloop), (job.aloop, []))[1].append((job.queue, items))
    for aloop, batch in by_loop.values():
        try:
            aloop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:
            pass  # its event loop has closed: nobody is listening


def _put_all(batch: list) -> None:
    for queue, items in batch:
        queue.put_nowait(items)


class ThreadCore:
    """An EngineCore on a thread of this process; commands pass through a list under a lock."""

    def __init__(self, core: EngineCore, threads: int = 0):
        self.core, self.threads = core, threads
        """threads: torch threads for the engine thread (0 = torch's default); OpenMP keeps this per thread."""
        self._inbox: list = []
        self._stop = False
        self._wake = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="llmclock-engine", daemon=True)

    def start(self, on_report, on_dead=None) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._on_report = on_report
        self._thread.start()

    def send(self, cmd) -> None:
        with self._wake:
            self._inbox.append(cmd)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self, block: bool):
        with self._wake:
            while block and not self._stop and not self._inbox:
                self._wake.wait(0.5)
            if self._stop:
                return None
            cmds, self._inbox = self._inbox, []
        return cmds

    def _run(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # set here: a thread does not inherit another's setting
        self.core.run(self._take, self._on_report)


class ProcessCore:
    """An EngineCore in a process of its own (spawned: this process has threads), over a pipe: commands
    go down as they come, one Report per cycle comes up, read by a thread here."""

    def __init__(self, config, trace_top_n: int = 5):
        self.config, self.trace_top_n = config, trace_top_n
        self._send_lock = threading.Lock()
        self._stopping = False
        self.proc = self.conn = None

    def open(self) -> dict:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        c = self.config
        self.proc = ctx.Process(target=_core_main, name="llmclock-engine", daemon=True,
                                args=(child, self.config, self.trace_top_n))
        self.proc.start()
        child.close()
        try:
            kind, info = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise LLMClockError(f"the engine process exited with code {self.proc.exitcode} while loading") from None
        if kind != "ready":
            self.proc.join(5)
            raise LLMClockError(info)
        return info

    def start(self, on_report, on_dead=None) -> None:
        self._on_report, self._on_dead = on_report, on_dead
        threading.Thread(target=self._read, name="llmclock-engine-reader", daemon=True).start()

    def send(self, cmd) -> None:
        with self._send_lock:
            try:
                self.conn.send(cmd)
            except (BrokenPipeError, OSError):
                pass  # the process is gone: the reader says so

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.send(("stop",))
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)

    def _read(self) -> None:
        while True:
            try:
                rep = self.conn.recv()
            except (EOFError, OSError):
                break
            self._on_report(rep)
        if not self._stopping:
            self.proc.join(5)
            message = f"the engine process exited with code {self.proc.exitcode}"
            self._on_report(Report(errors=[(None, message, 500)]))
            if self._on_dead is not None:
                self._on_dead(message)


def load_engine(config, model=None, tokenizer=None):
    """The Engine `llmclock serve` runs: `model` and `tokenizer` if given, else config's checkpoint loaded as
    `llmclock generate --adapter` loads it (LoRA folded in); torch set to config.threads (0: its default)."""
    import torch

    from ..engine import Engine

    if config.threads:
        torch.set_num_threads(config.threads)
    if model is None:
        from ..adapters import load_adapted
        from ..config import resolve_device

        model, tokenizer = load_adapted(config.ckpt, config.adapter, device=resolve_device(config.device), merged=True)
    return Engine(model, tokenizer, slots=config.slots)


def _core_main(conn, config, trace_top_n) -> None:
    """The engine process: load, say "ready" (or why not), then cycles until "stop" or the pipe closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    try:
        engine = load_engine(config)
    except Exception as e:  # noqa: BLE001 - whatever it is, the server says it in one line
        conn.send(("failed", str(e) if isinstance(e, (LLMClockError, OSError)) else f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"max_len": engine.max_len, "vocab_size": engine.model.config.vocab_size}))

    def take(block: bool):
        cmds = []
        try:
            while block and not conn.poll(0.5):
                pass
            while conn.poll(0):
                cmds.append(conn.recv())
        except (EOFError, OSError):
            return None  # the server is gone
        return None if any(c[0] == "stop" for c in cmds) else cmds

    def send(rep: Report) -> None:
        try:
            conn.send(rep)
        except (BrokenPipeError, OSError):
            pass

    EngineCore(engine, trace_top_n).run(take, send)


def cycles_until(need: int, running: list[int], waiting: list[int], slots: int) -> int:
    """Clock cycles until `need` sequences have finished, when the running ones need `running` more
    cycles each and the waiting ones (in order) take the slots as they free up, needing `waiting`
    cycles each (prefill included). Beyond everything known, one more sequence per slot-round."""
    if need <= 0:
        return 0
    free = sorted(running) + [0] * max(0, slots - len(running))  # when each slot is next free
    heapq.heapify(free)
    done = list(running)
    for cycles in waiting:
        t = heapq.heappop(free) + cycles
        done.append(t)
        heapq.heappush(free, t)
    done.sort()
    if need <= len(done):
        return done[need - 1]
    last = done[-1] if done else 0
    return last + 1 + (need - len(done) - 1) // max(1, slots)


def choice_params(params, n: int) -> list:
    """n copies of one SamplingParams; with a seed, choice i samples with seed + i."""
    return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]
