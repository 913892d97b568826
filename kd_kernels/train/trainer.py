"""One readable path from the config to the optimizer step, the checkpoints and the final evaluation.

``train(cfg)`` is the loop (``run.Run`` holds the models, the data and the distributed context). Under
``torchrun`` every process trains on its own slice of each step's batch through DistributedDataParallel
(``--dist ddp``) or FSDP2 (``--dist fsdp``: ``run.shard_fsdp``), gloo on CPU, NCCL on GPU; rank 0
generates the cached teacher responses, logs, checkpoints and evaluates.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ._optional import missing_message, progress_bar, warn_missing
from .config import CONFIG_NAME, TrainConfig, config_from_dict, config_text, validate
from .evaluate import evaluate, token_metrics
from .methods import Method, get_method, method_plot
from .models import count_params
from .plots import draw_losses
from .run import Run, any_rank, barrier, init_distributed, shard_fsdp

CKPT_NAME = "ckpt.pt"


class Interrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is written; the CLI exits with status 130."""


class DistillModule(nn.Module):
    """The student plus the method's loss, so DistributedDataParallel sees one forward per step, and so
    that under FSDP2 (this module is the student's root) the lm_head is gathered where the loss uses it.

    The teacher is held outside the module tree (no DDP broadcast of frozen weights, not in state_dict;
    under FSDP2 it is sharded on its own).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, method: Method, run: Run):
        super().__init__()
        self.student = student
        self._outside = (teacher, method, run)

    def forward(self, batch: dict[str, torch.Tensor]):
        teacher, method, run = self._outside
        return method.step_loss(self.student, teacher, batch, run)


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


def _as_float(x) -> float:
    """A scalar tensor (or DTensor, e.g. clip_grad_norm_'s total norm over FSDP2 shards) as a float."""
    full = getattr(x, "full_tensor", None)
    return float(full() if callable(full) else x)


def _sharded(model: nn.Module) -> int:
    """How many of ``model``'s parameters are DTensors (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(p, DTensor) for p in model.parameters())


def _consolidate(run: Run, copies: dict) -> None:
    """Collective under FSDP2: the student's full weights gathered into rank 0's unsharded copy (built on
    first use, with the teacher's, which is gathered once: it does not change)."""
    from .models import Models
    from .run import full_state_dict, plain_copy

    models = run.models
    student_state = full_state_dict(models.student)
    first = not copies.get("gathered")  # the same on every rank (only rank 0 holds the copies)
    teacher_state = full_state_dict(models.teacher) if first else None
    copies["gathered"] = True
    if not run.is_main:
        return
    if first:
        copies["models"] = Models(
            plain_copy(models.teacher, teacher_state, run.device).eval(),
            plain_copy(models.student, student_state, run.device),
            models.tokenizer,
            models.teacher_id,
        )
    else:
        copies["models"].student.load_state_dict(student_state)


@contextmanager
def plain_models(run: Run, fsdp: bool, copies: dict):
    """Under FSDP2, ``run.models`` on rank 0 are consolidated unsharded copies inside the block."""
    if not fsdp:
        yield
        return
    _consolidate(run, copies)
    sharded = run.models
    if run.is_main:
        run.models = copies["models"]
    try:
        yield
    finally:
        run.models = sharded


class TrainError(Exception):
    """A failure with a one-line message for the user (what, where, the fix); the CLI prints it and exits 1."""


def _tmp_path(path: Path) -> Path:
    # unique per process: two writers never share a temporary file
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never a part,
    and a failed write (disk full) leaves the old file as it was."""
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(
            e, (OSError, RuntimeError)
        ):  # torch.save reports a failed write as RuntimeError
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrainError(
                f"could not write {path} ({why}); free disk space or choose another --out "
                f"(the previous {path.name}, if any, is intact)"
            ) from None
        raise


# The optimizer state is saved as ``opt.state_dict()`` (parameters numbered in order: one process, DDP)
# or, under FSDP2, as torch.distributed.checkpoint's full state dict keyed by parameter name
# (``optimizer_format`` "fqn"); either loads into either layout (``load_optimizer_state``).
OPT_BY_INDEX, OPT_BY_NAME = "index", "fqn"


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(
    path: Path,
    student: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    elapsed: float,
    method_state: dict | None = None,
    *,
    fsdp: bool = False,
    is_main: bool = True,
) -> None:
    """Write ``ckpt.pt`` (rank 0). Under FSDP2 every rank must call it: the consolidated (full, plain CPU
    tensor) student and optimizer states are gathered to rank 0, which writes them."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from .run import full_state_dict

        weights = full_state_dict(student)
        optim = get_optimizer_state_dict(student, opt, options=_full_options())
        fmt = OPT_BY_NAME
    else:
        weights, optim, fmt = student.state_dict(), opt.state_dict(), OPT_BY_INDEX
    if not is_main:
        return
    state = {
        "config": cfg.to_dict(),
        "step": step,
        "student": weights,
        "optimizer": optim,
        "optimizer_format": fmt,
        "train_time_s": elapsed,
        "torch_rng": torch.get_rng_state(),
        "method_state": method_state or {},
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _adamw(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def optimizer_state_by_name(student: nn.Module, saved: dict, fmt: str, cfg: TrainConfig) -> dict:
    """A saved optimizer state as a by-name full state dict; an index-numbered one is converted on the
    (still unsharded) ``student`` through a temporary optimizer. Call before sharding."""
    if fmt == OPT_BY_NAME:
        return saved
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    tmp = _adamw([p for p in student.parameters() if p.requires_grad], cfg)
    tmp.load_state_dict(saved)
    return get_optimizer_state_dict(student, tmp, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(
    student: nn.Module, opt: torch.optim.Optimizer, saved: dict, fmt: str
) -> None:
    """Load a saved optimizer state (either format) into ``opt`` of ``student`` (plain or sharded)."""
    if fmt == OPT_BY_INDEX:
        opt.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(student, opt, saved, options=StateDictOptions(full_state_dict=True))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The checkpoint at ``path``; a missing, truncated or foreign file is a TrainError naming it."""
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {path}; run without --resume first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle garbage, ...: all mean "not a checkpoint"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(
            f"--resume: {path} is not a readable checkpoint ({first}); it may be truncated: "
            "delete it and run without --resume"
        ) from None
    keys = ("config", "step", "student", "optimizer", "train_time_s", "torch_rng")
    if (
        not isinstance(state, dict)
        or any(k not in state for k in keys)
        or not isinstance(state["config"], dict)
    ):
        raise TrainError(
            f"--resume: {path} is not a kd-train checkpoint (expected the keys {list(keys)})"
        )
    return state


def resume_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The checkpoint's config, with the flags given explicitly on this command line on top."""
    path = Path(cfg.out) / CKPT_NAME
    state = load_checkpoint(path)
    saved = state["config"]
    if saved.get("method") != cfg.method:
        raise TrainError(
            f"--resume: {path} was trained with method {saved.get('method')!r}, not "
            f"{cfg.method!r}; run kd-train {saved.get('method')} --out {cfg.out} --resume"
        )
    try:
        merged = config_from_dict(saved)
    except (TypeError, ValueError) as e:
        raise TrainError(
            f"--resume: {path} has a config this kd-train cannot read ({e}); it was written "
            "by another version: resume with that version or start a new run"
        ) from None
    for name in explicit | {"resume", "out"}:
        setattr(merged, name, getattr(cfg, name))
    merged.overwrite = False
    try:
        validate(merged)
    except ValueError as e:
        raise TrainError(f"--resume: {e}") from None
    step = int(state["step"])
    if merged.steps < step:
        raise TrainError(
            f"--resume: {path} is at step {step}, past --steps {merged.steps}; pass "
            f"--steps {step} or more"
        )
    return merged


RUN_FILES = (CKPT_NAME, "metrics.jsonl", "summary.json", "loss.png")
LOCK_NAME = ".kd-train.lock"


class RunDirLock:
    """An exclusive lock on a run directory (``flock`` on ``.kd-train.lock``, which holds the owner's pid).

    The kernel drops the lock when the process ends, however it ends: a killed run leaves no stale lock.
    """

    def __init__(self, out: Path):
        import fcntl

        self.path = out / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainError(
                f"--out {out}: cannot create files there ({e.strerror}); choose a writable "
                "directory"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise TrainError(
                f"--out {out} is in use by another kd-train process (pid {other}); wait for it "
                "to finish or choose another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def prepare_run_dir(cfg: TrainConfig) -> RunDirLock:
    """Create and lock ``--out``; a fresh run refuses a directory holding another run unless --overwrite."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(
            f"--out {out}: cannot create the directory ({e.strerror}); choose a writable path"
        ) from None
    lock = RunDirLock(out)
    if not cfg.resume:
        present = [name for name in RUN_FILES if (out / name).exists()]
        if present and not cfg.overwrite:
            lock.release()
            raise TrainError(
                f"--out {out} already holds a run ({', '.join(present)}); pass --resume to "
                "continue it, --overwrite to replace it, or choose another --out"
            )
        for name in present:
            (out / name).unlink()
    return lock


def _finite_or_none(value):
    """JSON has no NaN / inf: non-finite numbers (at any depth) become null (json.dumps would write a bare
    NaN, which strict JSON readers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _json_rows(path: Path, keep) -> list[str]:
    """The lines of a metrics file that parse and pass ``keep`` (a torn last line from a crash is dropped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and keep(row):
            out.append(line)
    return out


def plot_losses(metrics_path: Path, png_path: Path, method: str) -> None:
    """``loss.png`` of a run of ``method`` from its ``metrics.jsonl`` (``plots.plot_data`` chooses the
    curves). Needs matplotlib (ImportError without it)."""
    rows = [json.loads(line) for line in _json_rows(metrics_path, lambda r: "step" in r)]
    draw_losses(method_plot(rows, method), png_path)


@contextmanager
def phase(phases: dict[str, dict[str, float]], name: str):
    """Adds the wall and CPU seconds (all threads of this process) of the block to ``phases[name]``."""
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        p = phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        p["wall_s"] += time.perf_counter() - w0
        p["cpu_s"] += time.process_time() - c0


def make_summary(
    cfg: TrainConfig,
    run: Run,
    step: int,
    world: int,
    device: torch.device,
    t_start: float,
    train_time: float,
    peak_mem: float,
    final: dict,
    phases: dict,
) -> dict:
    student, teacher = run.models.student, run.models.teacher
    return {
        "method": cfg.method,
        "steps": step,
        "world_size": world,
        "device": str(device),
        "dist": cfg.dist
        if world > 1
        else "none",  # the layout used: "ddp", "fsdp", "none" (one process)
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "peak_mem_mb": peak_mem,
        "teacher_params": count_params(teacher),
        "student_params": count_params(student),
        "train_examples": len(run.train_examples),
        "final": final,
        "evaluated": bool(final),
        "phases": {k: dict(v) for k, v in phases.items()},
        "outputs": {"dir": str(Path(cfg.out).resolve())},
        "teacher_cache": getattr(run, "teacher_cache_info", None),
        "config": cfg.to_dict(),
    }


def write_summary(out: Path, summary: dict) -> None:
    text = json.dumps(_finite_or_none(summary), indent=2, allow_nan=False) + "\n"
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------------------------------------ loop


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict:
    """Train, checkpoint and evaluate; returns the summary (also written to ``out/summary.json``)."""

    t_start = time.time()
    cfg.out = cfg.out or os.path.join("out", cfg.method)
    out = Path(cfg.out)
    validate(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = (
        prepare_run_dir(cfg) if is_main else None
    )  # before anything reads or writes the run directory
    try:
        return _train(cfg, explicit, t_start, out)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, explicit: set[str] | None, t_start: float, out: Path) -> dict:
    if cfg.resume:
        cfg = resume_config(cfg, explicit or set())
    rank, world, device = init_distributed(cfg.device)
    is_main = rank == 0
    method = get_method(cfg.method)
    if is_main:
        # the resolved config (a resumed run's merged one), for `kd-train METHOD --config FILE`
        text = config_text(cfg)
        write_atomic(out / CONFIG_NAME, lambda tmp: tmp.write_text(text))
        warn_missing()
    phases: dict[str, dict[str, float]] = {}
    with phase(phases, "load"):
        run = Run(cfg, rank, world, device)
    student, teacher = run.models.student, run.models.teacher
    with phase(phases, "teacher_references"):
        run.train_examples = run.examples("train", method.train_responses(run))
        _ = run.references("test")  # generate / load the evaluation references up front
        if cfg.eval_every > 0:
            _ = run.references("valid")

    # --dist fsdp on one process: nothing to shard, a plain run (documented in docs/TRAINER.md)
    fsdp = cfg.dist == "fsdp" and world > 1
    if cfg.dist == "fsdp" and world == 1 and is_main:
        print(
            "[kd-train] --dist fsdp on one process: nothing to shard, training without FSDP2 "
            "(launch with torchrun --nproc_per_node N to shard)",
            file=sys.stderr,
        )
    start_step, train_time = 0, 0.0
    ckpt_path, metrics_path = out / CKPT_NAME, out / "metrics.jsonl"
    saved_opt = None
    if cfg.resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        fmt = state.get("optimizer_format", OPT_BY_INDEX)
        try:
            # the saved student is a full state dict in every layout: load it before any sharding
            student.load_state_dict(state["student"])
            saved_opt = (
                optimizer_state_by_name(student, state["optimizer"], fmt, cfg)
                if fsdp
                else state["optimizer"],
                OPT_BY_NAME if fsdp else fmt,
            )
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrainError(
                f"--resume: {ckpt_path} does not fit this run's student ({first}); resume "
                "with the model flags it was trained with"
            ) from None
        start_step, train_time = int(state["step"]), float(state["train_time_s"])
        torch.set_rng_state(state["torch_rng"].cpu())
        method.load_state_dict(state.get("method_state", {}))
        if is_main and metrics_path.is_file():  # drop rows logged after the checkpoint
            keep = _json_rows(metrics_path, lambda r: r.get("step", 0) <= start_step)
            write_atomic(metrics_path, lambda tmp: tmp.write_text("".join(k + "\n" for k in keep)))
        del state

    model: nn.Module = DistillModule(student, teacher, method, run)
    if fsdp:
        # FSDP2: the student's layers and root (this module: the loss is computed inside its forward),
        # and the frozen teacher, sharded over the ranks; the teacher's forwards go through its root
        model._outside = (shard_fsdp(model, student, teacher, world, device), method, run)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # after sharding: under FSDP2 the optimizer holds the DTensor shards
    opt = _adamw([p for p in student.parameters() if p.requires_grad], cfg)
    if saved_opt is not None:
        try:
            load_optimizer_state(student, opt, *saved_opt)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrainError(
                f"--resume: {ckpt_path}'s optimizer state does not fit this run's student "
                f"({first}); resume with the model flags it was trained with"
            ) from None
        saved_opt = None
    if is_main:
        layout = "one process" if world == 1 else "DDP"
        if fsdp:
            layout = (
                f"FSDP2 ({_sharded(student)} student and {_sharded(teacher)} teacher parameters "
                f"sharded over {world} ranks)"
            )
        print(
            f"[kd-train] {cfg.method}: teacher {count_params(teacher) / 1e6:.1f}M params, student "
            f"{count_params(student) / 1e6:.1f}M, {len(run.train_examples)} train examples, "
            f"world {world}, {layout}, device {device}, steps {start_step}→{cfg.steps}",
            file=sys.stderr,
        )

    eval_copies: dict = {}  # FSDP2: rank 0's unsharded teacher and student for evaluation
    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        stop["flag"] = True
        if is_main:
            print(
                "\n[kd-train] Ctrl-C: finishing this step, saving a checkpoint, then exiting "
                "(Ctrl-C again to abort)",
                file=sys.stderr,
            )

    previous = signal.signal(signal.SIGINT, on_sigint)
    interrupted = False
    step = start_step
    loop_wall0, loop_cpu0 = time.perf_counter(), time.process_time()
    phases_tokens = 0
    try:
        bar = progress_bar(
            total=cfg.steps,
            initial=start_step,
            desc=f"train {cfg.method}",
            disable=not run.progress,
            dynamic_ncols=True,
        )
        while step < cfg.steps:
            t0 = time.time()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = method.step_batch(run, step)
            loss, parts = model(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = _as_float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
            opt.step()
            step += 1
            dt = time.time() - t0
            train_time += dt
            tokens = int(batch["attention_mask"].sum()) * world
            phases_tokens += tokens
            row = {
                "step": step,
                "loss": float(loss.detach()),
                **parts,
                "lr": lr,
                "grad_norm": gnorm,
                "tokens_per_s": tokens / dt,
                "step_s": dt,
                "mem_mb": memory_mb(device),
            }
            if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps:
                with plain_models(run, fsdp, eval_copies):  # FSDP2: consolidated copies on rank 0
                    if is_main:
                        v = token_metrics(run, "valid", cfg.batch_size, run.progress)
                        row |= {
                            k: v[k] for k in ("valid_ce", "valid_forward_kl", "valid_reverse_kl")
                        }
                barrier(world)
            if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                line = json.dumps(_finite_or_none(row), allow_nan=False) + "\n"
                try:
                    with metrics_path.open("a") as f:
                        f.write(line)
                except OSError as e:
                    raise TrainError(
                        f"could not append to {metrics_path} ({e.strerror}); free disk "
                        "space, then continue with --resume"
                    ) from None
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            interrupted = any_rank(stop["flag"], world, device)
            if (fsdp or is_main) and (
                interrupted or step % cfg.ckpt_every == 0 or step == cfg.steps
            ):
                save_checkpoint(
                    ckpt_path,
                    student,
                    opt,
                    cfg,
                    step,
                    train_time,
                    method.state_dict(),
                    fsdp=fsdp,
                    is_main=is_main,
                )
            if interrupted:
                break
        bar.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    peak_mem = memory_mb(device)  # peak up to the end of training (loading and references included)
    barrier(world)
    if interrupted:
        if is_main:
            print(
                f"[kd-train] interrupted at step {step}; checkpoint saved to {ckpt_path}; continue with "
                f"kd-train {cfg.method} --out {cfg.out} --resume",
                file=sys.stderr,
            )
        raise Interrupted(step)

    phases["train"] = {
        "wall_s": time.perf_counter() - loop_wall0,
        "cpu_s": time.process_time() - loop_cpu0,
        "tokens": phases_tokens,
    }
    summary: dict = {}
    if (
        fsdp and not cfg.skip_eval
    ):  # rank 0 evaluates (and samples the teacher) on consolidated copies
        _consolidate(run, eval_copies)
        run.models = eval_copies["models"] if is_main else run.models
    if is_main:
        # what training produced is on disk before the evaluation and anything needing an optional library
        summary = make_summary(
            cfg, run, step, world, device, t_start, train_time, peak_mem, {}, phases
        )
        write_summary(out, summary)
    if not cfg.skip_eval and cfg.eval_teacher:
        # collective (every rank): fetching teacher samples has a barrier, evaluation runs on rank 0 only
        with phase(phases, "teacher_samples"):
            for seed in cfg.seeds():
                run.teacher_samples("test", temperature=1.0, seed=seed)
    if is_main:
        final: dict = {}
        if not cfg.skip_eval:
            with phase(phases, "evaluation"):
                final = evaluate(run, run.progress)
        summary = make_summary(
            cfg, run, step, world, device, t_start, train_time, peak_mem, final, phases
        )
        write_summary(out, summary)
        if metrics_path.is_file():
            try:
                plot_losses(metrics_path, out / "loss.png", cfg.method)
            except ImportError:
                print(
                    f"[kd-train] no loss.png: {missing_message('matplotlib')}; the numbers are in "
                    f"{metrics_path}",
                    file=sys.stderr,
                )
    barrier(world)
    return summary
