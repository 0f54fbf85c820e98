"""`llmclock finetune`: full, LoRA, AdaLoRA or bottleneck-adapter fine-tuning of a checkpoint on
a JSONL task, with the pre-training loop's habits: a tqdm bar, metrics.jsonl, a loss plot,
TensorBoard (and W&B on request), atomic versioned checkpoints at OUT/ckpt and an exact --resume.

OUT/ckpt is a full checkpoint (full fine-tuning) or an adapter directory (adapters.py) holding
only the trained tensors; both carry the optimizer moments, the RNG state and the step, and the
chat template the data was rendered with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .adapters import AdapterConfig, apply_adapter, base_weights_hash, gpt_of, guard_fused, write_adapter
from .config import TrainConfig
from .errors import LLMClockError
from .sft import ChatTemplate, batch_indices, collate, load_examples, pack as pack_rows

DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "adalora": 1e-3, "adapter": 1e-3}
"""Peak learning rates: full fine-tuning 1.3 orders below pre-training's 1e-3; adapters train
fresh weights and take pre-training's rate."""
ADALORA_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


@dataclass
class FinetuneResult:
    step: int
    elapsed: float
    tokens_per_s: float
    """Trained (non-padding) tokens per second, prompt tokens included."""
    last_loss: float
    val_loss: float | None
    trainable: int
    total: int
    ckpt: Path
    metrics: Path
    plot: Path | None


@torch.no_grad()
def masked_loss(model, examples, pad_id: int, batch_size: int) -> float:
    """Mean loss over the learned tokens of `examples`."""
    was = model.training
    model.eval()
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i : i + batch_size], pad_id)
        logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
    model.train(was)
    return total / count


def _adalora_state(model) -> dict[str, torch.Tensor]:
    alloc = getattr(model, "rankallocator", None)
    if alloc is None:
        return {}
    return {f"adalora.{attr}.{k}": v.detach().cpu().contiguous()
            for attr in ADALORA_STATE for k, v in getattr(alloc, attr).items()}


def _load_adalora_state(model, tensors: dict) -> None:
    alloc = getattr(model, "rankallocator", None)
    if alloc is None:
        return
    for key, v in tensors.items():
        if key.startswith("adalora."):
            _, attr, name = key.split(".", 2)
            getattr(alloc, attr)[name] = v


def finetune(
    base: str | Path,
    train_path: str | Path,
    out_dir: str | Path,
    recipe: TrainConfig,
    adapter: AdapterConfig,
    *,
    val_path: str | Path | None = None,
    template: ChatTemplate | None = None,
    resume: bool = False,
    progress: bool = True,
    log_interval: int = 10,
    wandb: dict | None = None,
    on_step=None,
    pack: bool = False,
) -> FinetuneResult:
    """Fine-tune checkpoint `base` on `train_path` (JSONL of {prompt, completion} or {messages}).
    Rows are one example each, padded, or with `pack` whole examples concatenated up to the block
    size (sft.pack: attention crosses examples within a row; the loss still covers completions only)."""
    from .fused import fuse_cpu_ops
    from .train import MetricsLog, lr_at, make_optimizer, plot_metrics, report_step, resolve_device

    out_dir, base = Path(out_dir), Path(base)
    link = out_dir / "ckpt"
    if link.exists() and not resume:
        raise LLMClockError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not link.exists():
        raise LLMClockError(f"nothing to resume: {link} not found")
    device = resolve_device(recipe.device)
    model, tok = ckpt_io.load_checkpoint(base, device="cpu")
    base_config = model.config
    base_hash, base_keys = base_weights_hash(base), set(ckpt_io.model_state(model))
    template = template or ChatTemplate.load(base) or ChatTemplate()
    max_len = min(recipe.block_size, base_config.block_size) + 1
    train_ex = load_examples(train_path, tok, template, max_len=max_len)
    val_ex = load_examples(val_path, tok, template, max_len=max_len) if val_path else None
    if pack:
        train_ex = pack_rows(train_ex, max_len, recipe.seed)

    torch.manual_seed(recipe.seed)
    model.to(device).train()
    if recipe.fused_kernels and device.type == "cpu" and recipe.dtype == "float32":
        fuse_cpu_ops(model)
    if adapter.method == "adalora":
        adapter = AdapterConfig(**{**adapter.to_dict(), "total_step": recipe.max_steps})
    model = apply_adapter(model, adapter)
    guard_fused(model)
    optimizer = make_optimizer(model, recipe, device)
    step, prior = 0, {}
    if resume:
        state, opt_tensors = ckpt_io.load_train_state(link)
        if state.get("base_weights_hash") != base_hash or state.get("adapter") != adapter.to_dict():
            raise LLMClockError(f"{link}: was trained from another base or with other adapter settings")
        if state.get("pack", False) != pack:
            raise LLMClockError(f"{link}: was trained {'packed' if state.get('pack') else 'padded'}; "
                                f"resume it {'with' if state.get('pack') else 'without'} --pack")
        weights = link / ("model.safetensors" if adapter.method == "full" else "adapter.safetensors")
        missing, unexpected = model.load_state_dict(ckpt_io.read_tensors(weights), strict=False)
        if unexpected:
            raise LLMClockError(f"{weights}: unexpected tensors {unexpected[:3]}")
        ckpt_io.load_optimizer_state(model, optimizer, opt_tensors)
        _load_adalora_state(model, opt_tensors)
        step, prior = state["step"], state
        ckpt_io.set_rng_state(state["rng"])

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out_dir / "metrics.jsonl", True, wandb=wandb)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.max_steps, initial=step, desc=f"finetune ({adapter.method})", unit="step",
                   dynamic_ncols=True, disable=None)

    def save(at_step: int) -> None:
        state = {"step": at_step, "train_config": recipe.to_dict(), "adapter": adapter.to_dict(),
                 "base": str(base), "base_weights_hash": base_hash, "rng": ckpt_io.rng_state(), "pack": pack,
                 "tokens_seen": prior.get("tokens_seen", 0) + tokens}

        def write(target: Path) -> None:
            extra = _adalora_state(model)

            def fill(tmp: Path) -> None:
                from safetensors.torch import save_file

                template.save(tmp)
                if adapter.method != "full":
                    write_adapter(tmp, model, adapter, base_hash=base_hash, base_config=base_config.to_dict(),
                                  base_keys=base_keys)
                    tok.save(tmp / ckpt_io.TOKENIZER)
                    save_file(ckpt_io.optimizer_state(model, optimizer) | extra, str(tmp / ckpt_io.OPTIMIZER))
                    ckpt_io.write_json(tmp / ckpt_io.STATE, state)

            if adapter.method == "full":
                ckpt_io.write_checkpoint(target, model, tok, optimizer=optimizer, train_state=state, extra=fill)
            else:
                with ckpt_io.atomic_dir(target) as tmp:
                    fill(tmp)

        ckpt_io.save_versioned(link, at_step, write)

    val_loss = None
    start, tokens, t0, last_loss = step, 0, time.perf_counter(), float("nan")
    try:
        while step < recipe.max_steps:
            if val_ex and recipe.eval_interval and step % recipe.eval_interval == 0 and step > start:
                val_loss = masked_loss(model, val_ex, tok.eot_id, recipe.batch_size)
                log.write(step=step, split="val", loss=val_loss)
            lr = lr_at(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train_ex[i] for i in batch_indices(len(train_ex), recipe.batch_size, recipe.seed, step)]
            x, y = collate(batch, tok.eot_id)
            _, loss = model(x.to(device), y.to(device))
            loss.backward()
            if recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.grad_clip)
            optimizer.step()
            if adapter.method == "adalora":
                model.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(len(ids) - 1 for ids, _ in batch)
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise LLMClockError(f"fine-tuning diverged at step {step} (loss {last_loss}); lower the learning rate")
            stopping = step == recipe.max_steps or (
                recipe.max_seconds is not None and time.perf_counter() - t0 >= recipe.max_seconds)
            if bar is not None:
                bar.update(1)
            if step % log_interval == 0 or stopping:
                elapsed_now = time.perf_counter() - t0
                report_step(log, bar, step, last_loss, lr, tokens / elapsed_now, elapsed_now)
            if on_step is not None:
                on_step(step, last_loss)
            if recipe.checkpoint_interval and step % recipe.checkpoint_interval == 0 and step < recipe.max_steps:
                save(step)
            if stopping:
                break
    except KeyboardInterrupt:
        if step > start:
            save(step)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if val_ex:
        val_loss = masked_loss(model, val_ex, tok.eot_id, recipe.batch_size)
        log.write(step=step, split="val", loss=val_loss)
    save(step)
    log.close()
    return FinetuneResult(step=step, elapsed=elapsed, tokens_per_s=tokens / elapsed if tokens else 0.0,
                          last_loss=last_loss, val_loss=val_loss, trainable=trainable, total=total, ckpt=link,
                          metrics=log.path, plot=plot_metrics(log.path, out_dir / "loss.png"))


def merge_adapter(base: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """`llmclock merge`: base + LoRA/AdaLoRA adapter -> a plain checkpoint every command takes."""
    from .adapters import load_adapted, merge

    model, tok = load_adapted(base, adapter_dir)
    model = merge(model)  # refuses a bottleneck adapter: it cannot fold
    template = ChatTemplate.load(adapter_dir)
    ckpt_io.write_checkpoint(Path(out), gpt_of(model), tok, extra=template.save if template else None)
    return Path(out)
