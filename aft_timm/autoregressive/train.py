"""Training loop: AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA, DDP, exact resume.

Launch with `python -m aft_timm.autoregressive train ...`, or under `torchrun --nproc_per_node N` for
DistributedDataParallel (NCCL on GPUs, Gloo on CPU). The batch of step s is a pure function of (seed, s) and is split
evenly across processes and gradient-accumulation micro-batches, and dropout is reseeded from (seed, s, rank) at every
step: a resumed run repeats an uninterrupted one, and N processes repeat one process with the same global batch (up to
floating-point summation order).
"""
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import (
    latest_checkpoint,
    load_train_config,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from .data import eval_split, load_dataset, mix_seed
from .evaluate import autocast, check_compatible, evaluate, resolve_precision
from .model import create_model

ADAM_BETAS = (0.9, 0.95)
LOG_FILE = "log.jsonl"
# Settings that define the optimization trajectory; a resumed run must use the saved values.
RUN_KEYS = ("model", "model_kwargs", "dataset", "batch_size", "max_steps", "lr", "weight_decay", "warmup_steps",
            "grad_clip", "seed")


@dataclass
class TrainConfig:
    """Settings of a training run (the command-line flags of `train`).

    Args:
        model: Named model (see `list_models`).
        dataset: cifar10, enwik8 or bytes:PATH.
        batch_size: Global batch size (sequences per optimizer step, over all processes).
        max_steps: Number of optimizer steps; the cosine schedule ends there.
        output: Run directory for checkpoints and log.jsonl.
        model_kwargs: Overrides of the model's config (e.g. {"depth": 2, "seq_len": 256}).
        data_dir: Where datasets are stored or downloaded to.
        lr: Peak learning rate (paper: 3e-3).
        weight_decay: AdamW weight decay of the linear layers' weights; None: the paper's 0.1 (CIFAR10) or 0.5
            (Enwik8 and other byte data).
        warmup_steps: Linear warm-up steps; None: 5% of max_steps.
        grad_clip: Maximum global gradient norm (0 disables clipping).
        grad_accum_steps: Micro-batches per step and process (the result does not depend on it).
        eval_interval: Steps between evaluations on `eval_batches` batches of the held-out split.
        eval_batches: Batches per periodic evaluation (the `eval` command scores a whole split).
        log_interval: Steps between log.jsonl records and progress-bar updates.
        checkpoint_interval: Steps between checkpoints (the last step is always saved).
        seed: Seed of initialization, data order, augmentation and dropout.
        precision: auto (bf16 autocast on CUDA devices that support it, float32 elsewhere), bf16 or fp32.
        device: cpu, cuda, cuda:1, ...; default CUDA when available (under torchrun: cuda:LOCAL_RANK).
        resume: Continue from the run directory's latest checkpoint, if it has one.
    """

    model: str
    dataset: str
    batch_size: int
    max_steps: int
    output: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str = "data"
    lr: float = 3e-3
    weight_decay: float | None = None
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    eval_interval: int = 500
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 1000
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.weight_decay is None:
            self.weight_decay = 0.1 if self.dataset == "cifar10" else 0.5
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.max_steps))
        for name in ("batch_size", "max_steps", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and weight_decay, grad_clip, warmup_steps >= 0")


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate multiplier of step `step` (0-based): linear warm-up to 1, then cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the linear layers' weights only; embeddings, position biases, norms and biases are exempt."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    env = _Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.device is not None:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank if env.world > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if env.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env, device


def _check_resume(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    current = dataclasses.asdict(cfg)
    diffs = [f"{k}: {current[k]!r} (checkpoint: {saved.get(k)!r})" for k in RUN_KEYS if current[k] != saved.get(k)]
    if diffs:
        raise ValueError("--resume needs the settings of the interrupted run; these differ:\n  " + "\n  ".join(diffs))


def _truncate_log(path: Path, step: int) -> None:
    """Drops records written after `step` by a run that died before its next checkpoint."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) a training run; returns the last logged training and evaluation metrics."""
    env, device = _setup(cfg)
    try:
        return _train(cfg, env, device)
    finally:
        if env.world > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: _Dist, device: torch.device) -> dict[str, Any]:
    micro_batches = env.world * cfg.grad_accum_steps
    if cfg.batch_size % micro_batches:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by processes x grad_accum_steps = "
                         f"{env.world} x {cfg.grad_accum_steps}")
    run_dir = Path(cfg.output)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run ({ckpt.name}); pass --resume to continue it or choose "
                              "another --output")

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_kwargs).to(device)
    seq_len = model.config.seq_len
    if not env.main:
        _barrier(env)  # process 0 downloads a missing dataset while the others wait
    train_data = load_dataset(cfg.dataset, "train", cfg.data_dir, augment=True)
    eval_data = load_dataset(cfg.dataset, eval_split(cfg.dataset), cfg.data_dir)
    if env.main:
        _barrier(env)
    check_compatible(model, train_data)
    precision = resolve_precision(cfg.precision, device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))

    step = 0
    if ckpt is not None:
        _check_resume(cfg, load_train_config(ckpt))
        load_weights(model, ckpt, device)
        state = load_training_state(ckpt, device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    log_path = run_dir / LOG_FILE
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, step)
        print(f"{cfg.model}: {model.num_params() / 1e6:.2f}M parameters, {model.config}; {env.world} process(es) "
              f"on {device}, {precision}; " + (f"resuming at step {step}" if step else "starting"), flush=True)

    ddp = None
    if env.world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = ddp or model
    per_rank = cfg.batch_size // env.world
    tokens_per_step = cfg.batch_size * seq_len
    summary: dict[str, Any] = {"step": step}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not env.main, desc="train", unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    while step < cfg.max_steps:
        torch.manual_seed(mix_seed(cfg.seed, step, env.rank))  # dropout masks depend only on (seed, step, rank)
        batch = train_data.train_batch(step, cfg.batch_size, seq_len, cfg.seed)
        local = batch[env.rank * per_rank : (env.rank + 1) * per_rank].to(device, non_blocking=True).long()
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(local.chunk(cfg.grad_accum_steps)):
            # gradients are averaged across processes once, after the last micro-batch
            skip_sync = ddp is not None and i < cfg.grad_accum_steps - 1
            with ddp.no_sync() if skip_sync else contextlib.nullcontext(), autocast(device, precision):
                logits = net(micro)
                loss = F.cross_entropy(logits.float().flatten(0, 1), micro.flatten()) / cfg.grad_accum_steps
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            if env.world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= env.world
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "loss": loss_sum.item(), "lr": lr,
                      "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9)}
            window_start, window_steps = time.perf_counter(), 0
            summary.update(record)
            if env.main:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
                _append_log(log_path, record)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            if env.main:
                metrics = evaluate(model, eval_data, per_rank // cfg.grad_accum_steps, precision, cfg.eval_batches)
                record = {"step": step, "split": eval_data.name, **metrics}
                summary.update({f"eval_{k}": v for k, v in metrics.items()})
                bar.write(f"step {step}: {eval_data.name} loss {metrics['loss']:.4f}, "
                          f"{eval_data.unit.replace('_', ' ')} {metrics[eval_data.unit]:.4f}")
                _append_log(log_path, record)
            _barrier(env)
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
            if env.main:
                state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(run_dir, model, state, dataclasses.asdict(cfg))
            _barrier(env)
        bar.update(1)
    bar.close()
    summary["step"] = step
    return summary


def _barrier(env: _Dist) -> None:
    if env.world > 1:
        dist.barrier()


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
