"""Prometheus metrics, one registry per app (no process-wide state), names prefixed llmclock_."""

from __future__ import annotations

import collections
import threading
import time

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmclock_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("llmclock_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("llmclock_generated_tokens", "Tokens generated", registry=r)
        self.request_seconds = Histogram("llmclock_request_duration_seconds", "Request duration by route",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmclock_time_to_first_token_seconds", "From admission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmclock_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("llmclock_queue_depth", "Sequences waiting for a slot", registry=r)
        self.queue_capacity = Gauge("llmclock_queue_capacity", "Sequences that may wait for a slot", registry=r)
        self.busy_slots = Gauge("llmclock_busy_slots", "Slots decoding a sequence", registry=r)
        self.slots = Gauge("llmclock_slots", "Slots in the engine", registry=r)
        self.tokens_per_second = Gauge("llmclock_tokens_per_second", "Tokens generated per second, last 10 s",
                                       registry=r)
        self.rejected = Counter("llmclock_rejected", "Requests refused before admission, by reason",
                                ["reason"], registry=r)
        for reason in ("auth", "rate_limit", "queue_full", "draining"):
            self.rejected.labels(reason)  # export zeros, so rates exist before the first refusal
        self.ready = Gauge("llmclock_ready", "1 once the model is loaded and the engine runs", registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._in_window = 0
        """Tokens in `_window` (kept as a running sum: the window holds thousands of cycles)."""
        self._lock = threading.Lock()

    def tokens(self, n: int, now: float | None = None) -> None:
        """Count n tokens generated now; keeps the 10-second rate gauge current."""
        now = time.monotonic() if now is None else now
        self.generated_tokens.inc(n)
        with self._lock:
            self._window.append((now, n))
            self._in_window += n
            while self._window and self._window[0][0] < now - 10.0:
                self._in_window -= self._window.popleft()[1]
            self.tokens_per_second.set(self._in_window / 10.0)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.tokens(0)  # let the rate decay when nothing is generated
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def merge(texts: dict[str, bytes | str], label: str = "replica") -> bytes:
    """Several exports (Prometheus text) in one, each sample labelled with its source's name: how
    one replica answers /metrics for all of them (`sum by` in PromQL adds them up again)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for source, text in sorted(texts.items()):
        text = text.decode() if isinstance(text, bytes) else text
        for fam in text_string_to_metric_families(text):
            out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            out.samples += [s._replace(labels={**s.labels, label: source}) for s in fam.samples]

    class Collected:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())
    return generate_latest(registry)
