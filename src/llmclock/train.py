"""The training loop: single process, or many under `torchrun` (DDP or FSDP; see distributed.py).

Everything a step depends on is a pure function of the step number (the batch offsets, the
learning rate), and every rank's RNG and the optimizer moments are checkpointed, so a run stopped
and resumed produces the same losses as one that never stopped, also on another number of ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import distributed
from .config import ModelConfig, TrainConfig, resolve_device  # noqa: F401 (resolve_device: also imported from here)
from .distributed import Dist, init_distributed  # noqa: F401  (re-exported: train.Dist)
from .errors import LLMClockError
from .evaluate import evaluate
from .fused import fuse_cpu_ops
from .model import GPT
from .threads import keep_freed_memory


@dataclass
class TrainResult:
    step: int
    """Optimizer steps completed."""
    elapsed: float
    """Seconds spent in this call (evaluations included)."""
    tokens_per_s: float
    """Training tokens processed per second in this call."""
    ms_per_step: float
    """Mean wall time per optimizer step in this call, evaluations included."""
    last_loss: float
    """Training loss of the final step."""
    evals: dict = field(default_factory=dict)
    """Final evaluation per split: {'val': {'loss', 'ppl', 'acc'}, 'test': {...}}."""
    ckpt: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr at lr_decay_steps."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms); fused kernel where possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)




class MetricsLog:
    """metrics.jsonl (append, so a resumed run continues it), TensorBoard when installed, and
    Weights & Biases when `wandb` (keyword arguments for `wandb.init`: project, config, ...) is given."""

    def __init__(self, path: Path, enabled: bool, *, wandb: dict | None = None):
        self.path, self.enabled, self.tb, self.wandb = path, enabled, None, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                pass
        if enabled and wandb is not None:
            try:
                import wandb as wb
            except ImportError:
                raise LLMClockError("--wandb needs Weights & Biases: pip install 'llmclock[wandb]'") from None
            self.wandb = wb.init(dir=str(path.parent), **wandb)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, float) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self.wandb is not None:
            prefix = record.get("split", "train")
            scalars = {f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, float) and k != "time"}
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def report_step(log: MetricsLog, bar, step: int, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> None:
    """A training step's record in the metrics log and on the progress bar."""
    log.write(step=step, split="train", loss=loss, lr=lr, tokens_per_s=tokens_per_s, time=elapsed)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")


@distributed.explain_collective_failures
def train(
    model_config: ModelConfig,
    cfg: TrainConfig,
    data,
    out_dir: str | Path,
    *,
    tokenizer=None,
    resume: bool = False,
    init_from: str | Path | None = None,
    progress: bool = True,
    log_interval: int = 10,
    on_step=None,
    wandb: dict | None = None,
) -> TrainResult:
    """Train on `data` (a data.TokenData) and keep a resumable checkpoint at OUT_DIR/ckpt.

    `init_from` starts from a checkpoint's weights (fine-tuning); `resume` continues OUT_DIR's own
    run exactly (on any number of ranks that divides its global batch; a torchrun restart resumes
    by itself); `wandb` (wandb.init's keyword arguments) also logs to Weights & Biases.
    `on_step(step, loss)` is called after every optimizer step; an exception it raises stops
    training. Only a KeyboardInterrupt (Ctrl-C, from anywhere in the loop) saves a checkpoint
    first, and only when a step was taken since the start or the last save.
    """
    from .data import eval_batches, get_batch

    out_dir = Path(out_dir)
    link = out_dir / "ckpt"
    device = resolve_device(cfg.device)
    dist, device = init_distributed(device, cfg.dist_timeout)
    resume = resume or (dist.restart > 0 and link.exists())  # torchrun restarted the job: continue it
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for each step's activations (threads.py)
    if cfg.block_size > model_config.block_size:
        raise LLMClockError(
            f"block size {cfg.block_size} is larger than the model's context ({model_config.block_size})"
        )
    if data.vocab_size > model_config.vocab_size:
        raise LLMClockError(
            f"data was tokenized with {data.vocab_size} ids but the model has vocab_size {model_config.vocab_size}"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    model = GPT(model_config).to(device)
    if dist.rank:
        torch.manual_seed(cfg.seed + dist.rank)  # each rank its own dropout
    step, prior, opt_tensors = 0, {}, None
    if resume:
        if not link.exists():
            raise LLMClockError(f"nothing to resume: {link} not found")
        saved_cfg = ckpt_io.read_config(link)
        if saved_cfg != model_config:
            raise LLMClockError(f"{link}/config.json: model shape differs from the requested one")
        ckpt_io.load_weights(model, ckpt_io.read_tensors(link / ckpt_io.WEIGHTS), link / ckpt_io.WEIGHTS)
        state, opt_tensors = ckpt_io.load_train_state(link)
        step, prior = state["step"], state
        distributed.restore_rng(state, dist, cfg.seed, step)
        if tokenizer is None:
            tokenizer = ckpt_io.load_tokenizer(link, model_config)
    elif init_from is not None:
        src = Path(init_from)
        ckpt_io.load_weights(model, ckpt_io.read_tensors(src / ckpt_io.WEIGHTS), src / ckpt_io.WEIGHTS)
    elif link.exists():
        raise LLMClockError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")

    train_tokens = data.tokens("train")
    val_tokens = data.tokens("val") if data.num_tokens("val") else None
    evx = None
    if val_tokens is not None:
        evx, evy = eval_batches(val_tokens, cfg.batch_size, cfg.block_size, cfg.eval_batches, cfg.seed)

    plan = distributed.batch_plan(cfg.grad_accum, dist, prior or None)
    fsdp = cfg.fsdp and dist.world > 1  # one rank has nothing to shard
    autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    if cfg.fused_kernels and device.type == "cpu" and autocast_dtype is None and not cfg.compile and not fsdp:
        fuse_cpu_ops(model)
    model = distributed.wrap(model, dist, device, fsdp)  # fully_shard shards in place; DDP wraps
    raw_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer = make_optimizer(raw_model, cfg, device)
    if opt_tensors is not None:
        distributed.load_optimizer(raw_model, optimizer, opt_tensors, fsdp)
    if cfg.compile:
        model = torch.compile(model)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(out_dir / "metrics.jsonl", dist.main, wandb=wandb)
    # Evaluation forwards: on a GPU as few as fit ~128 MB of logits (fewer, larger matmuls); on the
    # CPU ~2048 tokens each, whose activations stay in cache (240 x 64 tokens of the bench's model
    # took 0.54 s in one forward, 0.32-0.34 s in forwards of 24 sequences).
    if device.type == "cpu":
        eval_chunk = max(1, 2048 // cfg.block_size)
    else:
        eval_chunk = max(cfg.batch_size, 2**25 // (cfg.block_size * model_config.vocab_size))
    tokens_per_step = cfg.batch_size * cfg.block_size * plan.global_micro
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=None)
    elapsed = 0.0
    eval_dist = None if fsdp else dist  # FSDP: every rank runs every forward (each gathers the shards)

    def run_eval(at_step: int) -> dict | None:
        if evx is None:
            return None
        r = evaluate(raw_model, evx, evy, device=device, chunk=eval_chunk, dist=eval_dist, autocast=autocast)
        log.write(step=at_step, split="val", **r)
        if bar is not None:
            bar.write(f"step {at_step}: val loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  acc {r['acc']:.3f}")
        return r

    def save(at_step: int, collective: bool = True) -> None:
        """Rank 0 writes; every rank takes part in gathering (RNG states, FSDP shards) when `collective`."""
        if not collective and fsdp:
            return  # the shards cannot be gathered from one interrupted rank; the last checkpoint stands
        rngs = distributed.gather_rng(dist) if collective else [ckpt_io.rng_state()]
        weights, moments = distributed.full_state(raw_model, optimizer, fsdp)
        if not dist.main:
            return
        state = {
            "step": at_step,
            "train_config": cfg.to_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "world": dist.world,
            "restart": dist.restart,
            "global_micro": plan.global_micro,
            "tokens_seen": prior.get("tokens_seen", 0) + (at_step - start_step) * tokens_per_step,
            "data_seed": cfg.seed,
            "tokenizer_hash": data.tokenizer_hash,
        }
        ckpt_io.save_checkpoint(
            link, raw_model, tokenizer, step=at_step, optimizer=optimizer, train_state=state,
            state=weights, optimizer_tensors=moments,
        )

    start_step, t0 = step, time.perf_counter()
    last_loss = float("nan")
    model.train()
    try:
        while step < cfg.max_steps:
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step > start_step:
                run_eval(step)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_acc = 0.0
            for micro in range(plan.accum):
                x, y = get_batch(  # micro-batch g of the global batch, whichever rank runs it
                    train_tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed, step=step, micro=plan.micro_index(micro)
                )
                x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                with distributed.no_sync(model, micro == plan.accum - 1), autocast():
                    _, loss = model(x, y)
                    loss = loss / plan.accum
                loss.backward()
                loss_acc += loss.item()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = distributed.mean_over_ranks(loss_acc, dist)
            if not math.isfinite(last_loss):
                raise LLMClockError(f"training diverged at step {step} (loss {last_loss}); lower the learning rate")
            if step % log_interval == 0 or step == cfg.max_steps:
                elapsed_now = time.perf_counter() - t0
                report_step(log, bar, step, last_loss, lr, tokens_per_step * (step - start_step) / elapsed_now,
                            elapsed_now)
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step, last_loss)
            if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < cfg.max_steps:
                save(step)
            if cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds:
                break
        elapsed = time.perf_counter() - t0
    except KeyboardInterrupt:
        if step > start_step:
            save(step, collective=False)
        raise
    finally:
        if bar is not None:
            bar.close()
    evals = {}
    final_val = run_eval(step)
    if final_val is not None:
        evals["val"] = final_val
    if data.num_tokens("test"):
        tx, ty = eval_batches(data.tokens("test"), cfg.batch_size, cfg.block_size, cfg.eval_batches, cfg.seed)
        evals["test"] = evaluate(
            raw_model, tx, ty, device=device, chunk=eval_chunk, dist=eval_dist, autocast=autocast
        )
        log.write(step=step, split="test", **evals["test"])
    save(step)
    log.close()
    n = max(1, step - start_step)
    result = TrainResult(
        step=step,
        elapsed=elapsed,
        tokens_per_s=tokens_per_step * n / elapsed if step > start_step else 0.0,
        ms_per_step=1000 * elapsed / n,
        last_loss=last_loss,
        evals=evals,
        ckpt=link if dist.main else None,
        metrics=log.path if dist.main else None,
    )
    if dist.main:
        result.plot = plot_metrics(log.path, out_dir / "loss.png")
    distributed.shutdown(dist)
    return result


def plot_metrics(metrics: Path, out: Path) -> Path | None:
    """Loss curve (train per logged step, validation per evaluation) as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and a second less to import

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "val"]
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out
