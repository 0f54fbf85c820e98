"""Replicas on Ray Serve: the same FastAPI app (one engine each) behind Ray's HTTP proxy, autoscaled.

    llmclock serve --ckpt runs/demo/ckpt --ray --min-replicas 1 --max-replicas 4 --target-ongoing-requests 8

Each replica builds `create_app(config)` itself (the app, its engine and its continuous-batching loop
live in the replica's process), and only counts as started once its model is loaded, so Ray's proxy
never routes a request to a replica that would answer 503. Ray Serve adds and removes replicas to keep
about `target_ongoing_requests` requests in flight per replica. Endpoints, API keys and streaming are
the app's; rate limits are per replica.

/metrics answers for every replica, whichever one Ray's proxy picks: each replica pushes its own
export to a small named actor (the hub) every PUSH_S seconds, and the one answering merges the
others' latest with its own, every sample labelled `replica="<Ray's replica id>"`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

from ..config import Range, check_ranges
from ..errors import LLMClockError
from .config import ServerConfig

DEPLOYMENT = "llmclock"
HUB, HUB_NAMESPACE = "llmclock-metrics", "llmclock"
PUSH_S = 1.0
"""Seconds between two pushes of a replica's metrics to the hub."""


class MetricsHub:
    """Each replica's latest /metrics export; one that stops pushing (killed) is forgotten."""

    def __init__(self):
        self.texts: dict[str, tuple[bytes, float]] = {}

    def put(self, replica: str, text: bytes) -> None:
        self.texts[replica] = (text, time.monotonic())

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def all(self) -> dict[str, bytes]:
        now = time.monotonic()
        self.texts = {r: (t, at) for r, (t, at) in self.texts.items() if now - at < 10 * PUSH_S}
        return {r: t for r, (t, _) in self.texts.items()}


def _hub():
    import ray

    return ray.remote(num_cpus=0)(MetricsHub).options(name=HUB, namespace=HUB_NAMESPACE, get_if_exists=True,
                                                      lifetime="detached").remote()


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


@asynccontextmanager
async def _metrics_for_all(server):
    """While the replica runs: push its metrics to the hub, and answer /metrics with every replica's."""
    from .metrics import merge

    hub, me = [_hub()], _replica_id()

    async def push():
        while True:
            try:
                await hub[0].put.remote(me, server.metrics.render()[0])
            except Exception:  # noqa: BLE001 - the hub died: make (or find) another
                hub[0] = _hub()
            await asyncio.sleep(PUSH_S)

    async def gather() -> bytes:
        mine = server.metrics.render()[0]
        try:
            hub[0].put.remote(me, mine)
            others = await hub[0].all.remote()
        except Exception:  # noqa: BLE001 - no hub right now: this replica's own, still labelled
            others = {}
        return merge({**others, me: mine})

    task = asyncio.create_task(push())
    server.gather_metrics = gather
    try:
        yield
    finally:
        task.cancel()
        server.gather_metrics = None
        try:
            await hub[0].drop.remote(me)
        except Exception:  # noqa: BLE001 - the hub is gone already
            pass


@dataclass
class ReplicaConfig:
    """How many replicas Ray Serve runs and when it adds or removes one."""

    min_replicas: int = 1
    """Replicas kept running however quiet it is."""
    max_replicas: int = 1
    """Most replicas under load (each reserves num_cpus of the cluster)."""
    target_ongoing_requests: float = 8.0
    """Requests in flight per replica that autoscaling aims at (the engine's slots are a good start)."""
    upscale_delay_s: float = 2.0
    """Seconds the load must stay above target before a replica is added."""
    downscale_delay_s: float = 30.0
    """Seconds the load must stay below target before a replica is removed."""
    look_back_period_s: float = 10.0
    """Seconds of load that each decision averages over."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each replica."""
    address: str | None = None
    """Ray cluster to join (`ray start --head` prints it); default: a new local one in this process."""

    RANGES: ClassVar[dict[str, Range]] = {
        "min_replicas": Range(int, 1, 1024), "max_replicas": Range(int, 1, 1024),
        "target_ongoing_requests": Range(float, 0.0, lo_open=True),
        **dict.fromkeys(("upscale_delay_s", "downscale_delay_s"), Range(float, 0.0, 3600.0)),
        "look_back_period_s": Range(float, 0.0, 3600.0, lo_open=True),
        "num_cpus": Range(float, 0.0, lo_open=True),
    }

    def __post_init__(self) -> None:
        check_ranges(self, "serve --ray")
        if self.max_replicas < self.min_replicas:
            raise LLMClockError(
                f"serve --ray: --max-replicas {self.max_replicas} is below --min-replicas {self.min_replicas}"
            )

    def autoscaling(self) -> dict:
        return {
            "min_replicas": self.min_replicas, "initial_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests, "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s, "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.look_back_period_s / 4,  # replicas report their load 4 times per window
        }


def app_builder(config: ServerConfig):
    """A function (Ray calls it in each replica) returning the app, whose start-up waits for its model."""

    def build():
        from .app import create_app

        # The replica is a process of Ray's already: its engine runs on a thread there (a spawned engine
        # process would start from Ray's worker script as its main module).
        app = create_app(dataclasses.replace(config, engine_process=False))
        server, inner = app.state.server, app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a):
            async with inner(a) as state:
                while server.loop is None:  # Ray starts routing to the replica once this returns
                    if server.load_error:
                        raise LLMClockError(f"serve: {server.load_error}")
                    await asyncio.sleep(0.05)
                async with _metrics_for_all(server):
                    yield state

        app.router.lifespan_context = lifespan
        return app

    return build


def deployment(config: ServerConfig, replicas: ReplicaConfig):
    """The Ray Serve application: one deployment of the app, autoscaled on ongoing requests."""
    from ray import serve

    @serve.ingress(app_builder(config))
    class LLMClock:
        pass

    # A replica takes as many requests as its engine can hold or queue; beyond that Ray's proxy waits.
    ongoing = max(1, config.slots + config.queue)
    return serve.deployment(
        LLMClock, name=DEPLOYMENT, autoscaling_config=replicas.autoscaling(), max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": replicas.num_cpus}, health_check_period_s=5, graceful_shutdown_timeout_s=config.drain_timeout,
    ).bind()


def start(config: ServerConfig, replicas: ReplicaConfig, *, blocking: bool = False):
    """Start (or join) Ray, its HTTP proxy on config.host:config.port, and the deployment; returns its handle."""
    config.check_files()  # a missing or broken checkpoint or a wrong adapter fails here, before Ray starts
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LLMClockError("serve --ray needs Ray Serve: pip install 'llmclock[ray]'") from None

    if not ray.is_initialized():
        ray.init(address=replicas.address, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        return serve.run(deployment(config, replicas), name=DEPLOYMENT, route_prefix="/", blocking=blocking)
    except RuntimeError as e:  # a replica could not start (its log is in Ray's session directory)
        raise LLMClockError(f"serve --ray: Ray Serve could not start the replicas ({str(e).splitlines()[0]})") from None


def replica_count() -> int:
    """Replicas of the deployment running now."""
    from ray import serve

    app = serve.status().applications.get(DEPLOYMENT)
    if app is None:
        return 0
    states = app.deployments[DEPLOYMENT].replica_states
    return int(states.get("RUNNING", 0))


def stop(*, local: bool = True) -> None:
    """Remove the deployment; with `local` (the cluster is this process's own) also Serve and Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # never started (a bad checkpoint): nothing to take down
        return
    if local:
        serve.shutdown()
        ray.shutdown()
        return
    serve.delete(DEPLOYMENT)
    try:
        ray.kill(ray.get_actor(HUB, namespace=HUB_NAMESPACE))
    except ValueError:  # no hub: no replica ever started
        pass


def serve_forever(config: ServerConfig, replicas: ReplicaConfig, echo=None) -> None:
    """`llmclock serve --ray`: run the deployment until Ctrl-C or SIGTERM, then take it down."""
    import signal

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        start(config, replicas)
        if echo is not None:
            echo(f"llmclock: serving {config.model_name} on http://{config.host}:{config.port} through Ray Serve, "
                 f"{replicas.min_replicas}-{replicas.max_replicas} replicas (target {replicas.target_ongoing_requests:g} "
                 "ongoing requests each); Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(local=replicas.address is None)
