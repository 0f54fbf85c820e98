"""Many processes under torchrun: DDP or FSDP (`fully_shard`), elastic restarts, bounded collectives.

The training loop (train.py) calls these and stays the same loop for 1 or N ranks:

  * a step's global batch is G micro-batches of batch_size sequences, numbered 0..G-1, and micro-batch
    g is `get_batch(seed, step, micro=g)` whatever the number of ranks; rank r of W runs g = r*G/W ..
    (r+1)*G/W - 1. So a run resumed on another number of ranks (G/W micro-batches each) sees exactly
    the batches it would have seen, and one process with grad_accum=G equals G/k processes with k.
  * every collective has a timeout (`dist_timeout`), so a rank that crashes or hangs ends the job with
    one clear line instead of a silent hang; checkpoints are written by rank 0 only, atomically.
  * under FSDP the checkpoint is gathered to rank 0 and written in the single-process format.
  * every rank's RNG state is saved, so dropout continues exactly after a resume on the same ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import LLMClockError


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    restart: int = 0
    """torchrun's restart count (TORCHELASTIC_RESTART_COUNT): > 0 after a worker failed and the job restarted."""

    @property
    def main(self) -> bool:
        return self.rank == 0


def restarted() -> bool:
    """Whether torchrun restarted this job after a worker failed (TORCHELASTIC_RESTART_COUNT > 0)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (gloo on the CPU, NCCL on GPUs), every collective bounded by `timeout_s`."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(restart=restart), device
    import torch.distributed as dist

    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]), restart)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", store=_attempt_store(d, timeout), rank=d.rank,
            world_size=d.world, timeout=timeout,
        )
    return d, device


def _attempt_store(d: Dist, timeout: datetime.timedelta):
    """torchrun's store (MASTER_ADDR:MASTER_PORT) under a prefix of its own for each restart.

    torchrun's c10d rendezvous keeps one store across restarts, and `env://` reads it without a
    prefix: a restarted rank then found the dead ranks' addresses there (gloo: "connection refused").
    """
    import torch.distributed as dist

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), d.world,
        is_master=not agent_hosts_it and d.rank == 0, timeout=timeout,
    )
    return dist.PrefixStore(f"llmclock/attempt_{d.restart}", store)


def shutdown(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- the global batch


@dataclass
class BatchPlan:
    """How a step's global batch of `global_micro` micro-batches is split over the ranks."""

    global_micro: int
    """Micro-batches per optimizer step over all ranks (kept across resumes)."""
    accum: int
    """Micro-batches this rank runs per step (gradient accumulation)."""
    first: int
    """Global index of this rank's first micro-batch."""

    def micro_index(self, micro: int) -> int:
        return self.first + micro


def batch_plan(grad_accum: int, d: Dist, saved: dict | None = None) -> BatchPlan:
    """The split for this run: a new run's global batch is grad_accum x world; a resumed one keeps its own."""
    global_micro = grad_accum * d.world
    if saved is not None:
        global_micro = int(saved.get("global_micro", saved["train_config"]["grad_accum"] * saved.get("world", 1)))
    if global_micro % d.world:
        divisors = [w for w in range(1, global_micro + 1) if global_micro % w == 0]
        raise LLMClockError(
            f"the run's global batch is {global_micro} micro-batches per step, which {d.world} ranks cannot share "
            f"evenly; resume it on {', '.join(map(str, divisors))} ranks"
        )
    accum = global_micro // d.world
    return BatchPlan(global_micro, accum, d.rank * accum)


def mean_over_ranks(value: float, d: Dist) -> float:
    """The mean of a per-rank float over all ranks (the step's loss over the global batch)."""
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world


# ---------------------------------------------------------------- wrapping the model


def wrap(model: torch.nn.Module, d: Dist, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP's `fully_shard` on every block then the whole model (tied wte/lm_head in the root)."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient reduction on all but a step's last micro-batch (DDP and FSDP)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state(model: torch.nn.Module, optimizer, fsdp: bool) -> tuple[dict | None, dict | None]:
    """(weights, optimizer moments keyed by parameter name) as full CPU tensors on rank 0.

    Under FSDP a collective: every rank must call it; ranks other than 0 get (None, None).
    Without FSDP returns (None, None): checkpoint.py reads the plain model and optimizer itself.
    """
    if not fsdp:
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not weights:  # ranks > 0 get empty dicts with cpu_offload
        return None, None
    moments = {
        f"{name}.{key}": torch.as_tensor(t).detach().contiguous() for name, st in osd["state"].items() for key, t in st.items()
    }
    from .checkpoint import TIED

    return {k: v.contiguous() for k, v in weights.items() if k not in TIED}, moments


def load_optimizer(model: torch.nn.Module, optimizer, tensors: dict, fsdp: bool) -> None:
    """Load optimizer moments saved by name (checkpoint.optimizer_state's layout) into a (sharded) optimizer."""
    from . import checkpoint as ckpt_io

    if not fsdp:
        ckpt_io.load_optimizer_state(model, optimizer, tensors)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, dict] = {}
    for key, t in tensors.items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = t.to(torch.float32) if field == "step" else t
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in optimizer.param_groups]
    names = {id(p): n for n, p in model.named_parameters()}
    for g, group in zip(groups, optimizer.param_groups):
        g["params"] = [names[id(p)] for p in group["params"]]
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )


# ---------------------------------------------------------------- RNG of every rank


def gather_rng(d: Dist) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective when world > 1)."""
    from .checkpoint import rng_state

    mine = rng_state()
    if d.world == 1:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * d.world
    dist.all_gather_object(states, mine)
    return states


def restore_rng(state: dict, d: Dist, seed: int, step: int) -> None:
    """This rank's saved RNG state; a rank the saved run did not have gets a seed of (seed, step, rank)."""
    from .checkpoint import set_rng_state

    saved = state.get("rng_ranks") or [state["rng"]]
    if d.rank < len(saved):
        set_rng_state(saved[d.rank])
    else:
        torch.manual_seed(int(np.random.SeedSequence([seed, step, d.rank]).generate_state(1)[0]))


# ---------------------------------------------------------------- failures


_LOST = re.compile(
    r"timed out|timeout|connection (closed|reset)|broken pipe|socket|gloo|nccl|peer|unreachable",
    re.IGNORECASE,
)


def leave_group() -> None:
    """Destroy a gloo process group on the way out of a failed rank. Left to the interpreter's exit,
    gloo's threads may still be running when the C++ runtime is torn down, and the process then
    aborts ("terminate called without an active exception", exit status 134) instead of exiting
    with its one-line error."""
    import torch.distributed as dist

    try:
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - already failing: leaving is best effort
        pass


def explain_collective_failures(fn):
    """Turn a failed collective (a rank crashed, hangs or left) into one LLMClockError line.

    Gloo and NCCL raise RuntimeError (DistBackendError) on a timeout or a closed connection; the
    process group's timeout bounds the wait, so a hung rank ends the job instead of stalling it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            leave_group()
            if not isinstance(e, RuntimeError) or "RANK" not in os.environ or isinstance(e, LLMClockError) \
                    or not _LOST.search(str(e)):
                raise
            first = str(e).strip().splitlines()[0][:200]
            raise LLMClockError(
                f"rank {os.environ['RANK']}: lost contact with the other ranks ({first}); another rank crashed or "
                "stopped responding. The last checkpoint is intact: rerun with --resume (any number of ranks "
                "that divides the global batch)"
            ) from None

    return wrapper


# ---------------------------------------------------------------- one-machine launcher


def launch_local(nproc: int, argv: list[str], *, max_restarts: int = 0) -> None:
    """Run `llmclock ARGV` on `nproc` local processes through torchrun's elastic agent (`--standalone`).

    Raises LLMClockError naming the failed rank(s) when the job fails after its restarts.
    """
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise LLMClockError(f"--nproc must be >= 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=max_restarts, monitor_interval=0.5,
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "llmclock", *argv)
    except ChildFailedError as e:
        failed = sorted(e.failures.items())
        ranks = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in failed)
        raise LLMClockError(f"training on {nproc} processes failed: {ranks}; see the messages above") from None
