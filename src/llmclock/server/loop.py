"""Continuous batching: one thread owns the engine and runs its clock; requests join between cycles.

    HTTP handlers ──submit(Job)──▶ inbox ──▶ [engine thread] add / abort ──▶ engine.step() ──▶ events
         ▲                                                                                      │
         └──────────── asyncio.Queue per job (call_soon_threadsafe, once per cycle) ◀──────────┘

Only the engine thread touches the engine, so the engine needs no locks. A request's sequences
are added between two cycles and take the next free slots; a cycle that admits sequences
prefills them, the others tick every running slot together. An aborted request (its client went
away) is dropped at the next cycle boundary, freeing its slot. Admission is bounded: at most
`slots + queue` sequences are in flight, and `submit` refuses more (the caller answers 429).
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
process when the loop starts. The engine thread takes the GIL back after every kernel call, and the
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


class EngineLoop:
    def __init__(self, engine, metrics=None, *, queue: int = 64, trace_top_n: int = 5, threads: int = 0):
        self.engine, self.metrics, self.queue_limit = engine, metrics, queue
        self.threads = threads
        """torch threads for the engine thread (0 = torch's default); OpenMP keeps this per thread."""
        self.capacity = engine.slots + queue
        self._inbox: list[tuple[str, Job]] = []
        self._jobs: dict[str, tuple[Job, int]] = {}  # engine request id -> (job, choice index)
        self._inflight = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self.draining = False
        self._ids = 0
        self._tracer = None
        self._trace_top_n = trace_top_n
        self._cycle_s: float | None = None
        """Seconds per busy cycle (moving average), for Retry-After."""
        self._mean_len: float | None = None
        """Tokens per finished sequence (moving average), for Retry-After."""
        self._outlook: tuple[list[int], list[int]] = ([], [])
        """(cycles left of each running sequence, expected cycles of each waiting one), after the last cycle."""
        self._thread = threading.Thread(target=self._run, name="llmclock-engine", daemon=True)
        if metrics is not None:
            metrics.slots.set(engine.slots)
            metrics.queue_capacity.set(queue)

    # ------------------------------------------------------------------ called from the event loop

    def start(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, job: Job) -> Job:
        """Queue a job's sequences for the engine, or raise Busy. Call from the asyncio loop."""
        k = len(job.prompts)
        with self._wake:
            if self.draining or self._stop:
                raise Busy(5.0, draining=True)
            if self._inflight + k > self.capacity:
                raise Busy(self._retry_after(k))
            self._inflight += k
            job.ids = [f"r{self._ids + i}" for i in range(k)]
            self._ids += k
            job.queue, job.aloop = asyncio.Queue(), asyncio.get_running_loop()
            job.t_submit, job.last, job.tokens, job.open = time.monotonic(), [0.0] * k, [0] * k, k
            self._inbox.append(("add", job))
            self._wake.notify()
        return job

    def abort(self, job: Job) -> None:
        """Drop a job's unfinished sequences at the next cycle boundary (the client went away)."""
        with self._wake:
            self._inbox.append(("abort", job))
            self._wake.notify()

    def _retry_after(self, k: int) -> float:
        """Seconds until `k` more sequences would be admitted (call holding the lock): the cycles until
        enough in-flight sequences finish, times the measured cycle time."""
        running, waiting = self._outlook
        waiting = waiting + [self._expected(p.max_new_tokens, 0) for op, job in self._inbox if op == "add"
                             for p in job.params]
        need = self._inflight + k - self.capacity
        cycles = cycles_until(need, running, waiting, self.engine.slots)
        return cycles * (self._cycle_s or 1.0)

    def _expected(self, max_new: int, done: int) -> int:
        """Cycles a sequence that has made `done` of at most `max_new` tokens still needs: up to the mean
        length of the sequences finished so far (at least one more cycle), never beyond `max_new`."""
        left = max_new - done
        if self._mean_len is not None:
            left = min(left, max(1, round(self._mean_len) - done))
        return max(1, left)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # set here: a thread does not inherit another's setting
        eng = self.engine
        while True:
            with self._wake:
                while not self._stop and not self._inbox and not eng.has_work():
                    self._wake.wait(0.5)
                if self._stop:
                    break
                inbox, self._inbox = self._inbox, []
            for op, job in inbox:
                (self._admit if op == "add" else self._abort)(job)
            self._gauges()
            if not eng.has_work():
                continue
            self._attach_tracer()
            t0 = time.perf_counter()
            try:
                events = eng.step()
            except Exception as e:  # noqa: BLE001 - the engine thread must outlive one bad cycle
                self._fail_all(f"engine error: {type(e).__name__}: {e}", 500)
                continue
            self._deliver(events, self._take_records())
            self._attach_tracer()  # detach once the last traced job is done
            self._measure(time.perf_counter() - t0)
        self._fail_all("the server is shutting down", 503)

    def _admit(self, job: Job) -> None:
        for i, (ids, params, rid) in enumerate(zip(job.prompts, job.params, job.ids)):
            try:
                self.engine.add(ids, params, request_id=rid)
            except LLMClockError as e:
                for r in job.ids[:i]:
                    self.engine.abort(r)
                    self._jobs.pop(r, None)
                self._release(len(job.ids))
                self._post(job, [("error", str(e), 400)])
                return
            self._jobs[rid] = (job, i)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(ids))

    def _abort(self, job: Job) -> None:
        for rid in job.ids:
            if rid in self._jobs:
                self.engine.abort(rid)
                del self._jobs[rid]
                self._release(1)

    def _release(self, k: int) -> None:
        with self._lock:
            self._inflight -= k

    def _measure(self, dt: float) -> None:
        """After a cycle: its duration into the average, and what is left of each sequence in flight."""
        self._cycle_s = dt if self._cycle_s is None else 0.8 * self._cycle_s + 0.2 * dt
        eng = self.engine
        running = [self._expected(s.params.max_new_tokens, len(s.output_ids)) for s in eng.running.values()]
        waiting = [self._expected(s.params.max_new_tokens, 0) for s in eng.waiting]
        with self._lock:
            self._outlook = (running, waiting)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.engine.waiting))
            self.metrics.busy_slots.set(len(self.engine.running))

    def _attach_tracer(self) -> None:
        """Trace a cycle only while some traced job is in flight: with none, the engine runs probe-free."""
        want = any(job.trace for job, _ in self._jobs.values())
        if want and self._tracer is None:
            from ..trace import Tracer

            self._tracer = Tracer(self.engine, top_n=self._trace_top_n)
        self.engine.probe = self._tracer if want else None

    def _take_records(self) -> dict[str, dict]:
        tr = self.engine.probe
        if tr is None:
            return {}
        out = {r.request_id: r.to_dict() for r in tr.records}
        tr.records.clear()
        tr.requests.clear()
        return out

    def _deliver(self, events, records: dict[str, dict]) -> None:
        now = time.monotonic()
        per_job: dict[int, tuple[Job, list]] = {}
        m = self.metrics
        for ev in events:
            entry = self._jobs.get(ev.request_id)
            if entry is None:
                continue
            job, i = entry
            if m is not None:
                (m.itl if job.last[i] else m.ttft).observe(now - (job.last[i] or job.t_submit))
            job.last[i] = now
            job.tokens[i] += 1
            rec = records.get(ev.request_id) if job.trace else None
            per_job.setdefault(id(job), (job, []))[1].append(("event", i, ev, rec))
            if ev.finish_reason is not None:
                del self._jobs[ev.request_id]
                self._release(1)
                n = job.tokens[i]
                self._mean_len = n if self._mean_len is None else 0.9 * self._mean_len + 0.1 * n
        if m is not None:
            m.tokens(len(events), now)
        self._post_all(per_job.values())
        self._gauges()

    def _fail_all(self, message: str, status: int) -> None:
        jobs = {id(job): job for job, _ in self._jobs.values()}
        for rid in list(self._jobs):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - already failing; free what can be freed
                pass
        self._release(len(self._jobs))
        self._jobs.clear()
        for job in jobs.values():
            self._post(job, [("error", message, status)])

    @staticmethod
    def _post(job: Job, items: list) -> None:
        EngineLoop._post_all([(job, items)])

    @staticmethod
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
