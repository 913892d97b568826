"""One readable path from the config to the optimizer step, the checkpoints and the final evaluation.

``train(cfg)`` is the loop (``run.Run`` holds the models, the data and the distributed context). Under
``torchrun`` every process trains on its own slice of each step's batch through DistributedDataParallel
(gloo on CPU, NCCL on GPU); rank 0 generates the cached teacher responses, logs, checkpoints and evaluates.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig, config_from_dict
from .evaluate import evaluate, token_metrics
from .methods import Method, get_method
from .models import count_params
from .run import Run, any_rank, barrier, init_distributed

CKPT_NAME = "ckpt.pt"


class Interrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is written; the CLI exits with status 130."""


class DistillModule(nn.Module):
    """The student plus the method's loss, so DistributedDataParallel sees one forward per step.

    The teacher is held outside the module tree (no DDP broadcast of frozen weights, not in state_dict).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, method: Method, run: Run):
        super().__init__()
        self.student = student
        self._outside = (teacher, method, run)

    def forward(self, batch: dict[str, torch.Tensor]):
        teacher, method, run = self._outside
        return method.loss(self.student, teacher, batch, run)


# ----------------------------------------------------------------------------------------- utilities


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (peak RSS)


def save_checkpoint(path: Path, student: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    step: int, elapsed: float, method_state: dict | None = None) -> None:
    state = {"config": cfg.to_dict(), "step": step, "student": student.state_dict(),
             "optimizer": opt.state_dict(), "train_time_s": elapsed,
             "torch_rng": torch.get_rng_state(), "method_state": method_state or {}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken ckpt.pt


def resume_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The checkpoint's config, with the flags given explicitly on this command line on top."""
    path = Path(cfg.out) / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume first")
    saved = torch.load(path, map_location="cpu", weights_only=False)["config"]
    if saved["method"] != cfg.method:
        raise ValueError(f"--resume: {path} was trained with method {saved['method']!r}, not {cfg.method!r}")
    merged = config_from_dict(saved)
    for name in explicit | {"resume", "out"}:
        setattr(merged, name, getattr(cfg, name))
    return merged


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "ce", "kd"):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
        if pts:
            ax.plot(*zip(*pts), label=key)
    val = [(r["step"], r["valid_ce"]) for r in rows if "valid_ce" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="valid ce")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ loop


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Train, checkpoint and evaluate; returns the summary (also written to ``out/summary.json``)."""

    t_start = time.time()
    cfg.out = cfg.out or os.path.join("out", cfg.method)
    out = Path(cfg.out)
    if cfg.resume:
        cfg = resume_config(cfg, explicit or set())
    rank, world, device = init_distributed(cfg.device)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    method = get_method(cfg.method)
    run = Run(cfg, rank, world, device)
    student, teacher = run.models.student, run.models.teacher
    run.train_examples = run.examples("train", method.train_responses(run))
    _ = run.references("test")  # generate / load the evaluation references up front
    if cfg.eval_every > 0:
        _ = run.references("valid")

    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start_step, train_time = 0, 0.0
    ckpt_path, metrics_path = out / CKPT_NAME, out / "metrics.jsonl"
    if cfg.resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        start_step, train_time = int(state["step"]), float(state["train_time_s"])
        torch.set_rng_state(state["torch_rng"].cpu())
        method.load_state_dict(state.get("method_state", {}))
        if is_main and metrics_path.is_file():  # drop rows logged after the checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            metrics_path.write_text("".join(k + "\n" for k in keep))
    elif is_main and metrics_path.exists():
        metrics_path.unlink()

    model: nn.Module = DistillModule(student, teacher, method, run)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if is_main:
        print(f"[kd-train] {cfg.method}: teacher {count_params(teacher) / 1e6:.1f}M params, student "
              f"{count_params(student) / 1e6:.1f}M, {len(run.train_examples)} train examples, "
              f"world {world}, device {device}, steps {start_step}→{cfg.steps}", file=sys.stderr)

    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        stop["flag"] = True
        if is_main:
            print("\n[kd-train] Ctrl-C: finishing this step, saving a checkpoint, then exiting "
                  "(Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    interrupted = False
    step = start_step
    try:
        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {cfg.method}",
                   disable=not run.progress, dynamic_ncols=True)
        while step < cfg.steps:
            t0 = time.time()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = method.batch(run, step)
            loss, parts = model(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
            opt.step()
            step += 1
            dt = time.time() - t0
            train_time += dt
            tokens = int(batch["attention_mask"].sum()) * world
            row = {"step": step, "loss": float(loss.detach()), **parts, "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": tokens / dt, "step_s": dt, "mem_mb": memory_mb(device)}
            if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps:
                if is_main:
                    v = token_metrics(run, "valid", cfg.batch_size, run.progress)
                    row |= {k: v[k] for k in ("valid_ce", "valid_forward_kl", "valid_reverse_kl")}
                barrier(world)
            if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            interrupted = any_rank(stop["flag"], world, device)
            if is_main and (interrupted or step % cfg.ckpt_every == 0 or step == cfg.steps):
                save_checkpoint(ckpt_path, student, opt, cfg, step, train_time, method.state_dict())
            if interrupted:
                break
        bar.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    peak_mem = memory_mb(device)  # peak up to the end of training (loading and references included)
    barrier(world)
    if interrupted:
        if is_main:
            print(f"[kd-train] interrupted at step {step}; checkpoint saved to {ckpt_path}; continue with "
                  f"kd-train {cfg.method} --out {cfg.out} --resume", file=sys.stderr)
        raise Interrupted(step)

    if not cfg.skip_eval and cfg.eval_teacher:
        # collective (every rank): fetching teacher samples has a barrier, evaluation runs on rank 0 only
        for seed in cfg.seeds():
            run.teacher_samples("test", temperature=1.0, seed=seed)
    summary: dict = {}
    if is_main:
        final = {} if cfg.skip_eval else evaluate(run, run.progress)
        summary = {
            "method": cfg.method, "steps": step, "world_size": world, "device": str(device),
            "wall_time_s": time.time() - t_start, "train_time_s": train_time,
            "peak_mem_mb": peak_mem,
            "teacher_params": count_params(teacher), "student_params": count_params(student),
            "train_examples": len(run.train_examples), "final": final, "config": cfg.to_dict(),
            "teacher_cache": getattr(run, "teacher_cache_info", None),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if metrics_path.is_file():
            plot_losses(metrics_path, out / "loss.png")
    barrier(world)
    return summary
