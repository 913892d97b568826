"""Shared pieces of the benchmark suite: cases and sweeps, inputs, float64 references, timing, memory, counts.

Nothing here knows about providers (``_bench_providers.py``) or the command line (``run.py``).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kd_kernels._spec import Divergence

REPO = Path(__file__).resolve().parent.parent

# Operations. "fwd_bwd" ops return the loss and the gradients a training step needs; "fwd" ops run under
# no_grad (evaluation, or scoring rollouts).
OPS: dict[str, str] = {
    "kd_logits": "logits-level KD loss + gradient w.r.t. the student logits (reduction='mean')",
    "kd_logits_fwd": "logits-level KD loss only, under no_grad (evaluation)",
    "fl_kd": "fused-linear KD: loss + gradients w.r.t. student hidden states and lm_head weight",
    "fl_kd_fwd": "fused-linear KD loss only, under no_grad (evaluation)",
    "fl_logprobs": "fused-linear token log-probs + gradients w.r.t. hidden states and weight (of their sum)",
    "fl_logprobs_fwd": "fused-linear token log-probs only, under no_grad (rollout scoring)",
}
DIVERGENCES = tuple(d.label for d in Divergence)
# alpha: skew divergences, alpha_beta and renyi; beta: jsd and alpha_beta.
ALPHA, BETA, TEMPERATURE = 0.1, 0.5, 1.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_fused(op: str) -> bool:
    return op.startswith("fl_")


def is_fwd_only(op: str) -> bool:
    return op.endswith("_fwd")


@dataclass(frozen=True)
class Case:
    """One measured configuration. ``d_s`` / ``d_t`` are 0 for logits-level ops, ``d_t`` 0 for log-probs."""

    op: str
    divergence: str  # "" for the log-prob ops
    n: int
    v: int
    d_s: int
    d_t: int
    dtype: str
    device: str
    sweep: str  # "N", "V" or "N,V": which sweep(s) this shape belongs to (used by the plots)

    @property
    def key(self) -> str:
        return f"{self.op}-{self.divergence or 'na'}-N{self.n}-V{self.v}-D{self.d_s}x{self.d_t}-{self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sweep:
    """Tokens swept at vocabulary ``v0`` and vocabulary swept at ``n0``; hidden sizes for fused linear."""

    ns: tuple[int, ...]
    v0: int
    vs: tuple[int, ...]
    n0: int
    d_s: int = 0
    d_t: int = 0

    def shapes(self) -> list[tuple[int, int, str]]:
        tags: dict[tuple[int, int], list[str]] = {}
        for n in self.ns:
            tags.setdefault((n, self.v0), []).append("N")
        for v in self.vs:
            tags.setdefault((self.n0, v), []).append("V")
        return [(n, v, ",".join(t)) for (n, v), t in tags.items()]


# Shapes per (device, logits/fused, quick). GPU vocabularies are those of Llama-2 (32000), Llama-3 (128256),
# Qwen2 (151936) and Gemma (262144). CPU sizes are scaled far down so that a full run fits in ~20 minutes on
# 2 cores shared with other work (at a load average of 10, each process gets a fifth of a core).
SWEEPS: dict[tuple[str, str, bool], Sweep] = {
    ("cuda", "logits", False): Sweep(
        ns=(1024, 4096, 16384), v0=128256, vs=(32000, 128256, 151936, 262144), n0=4096
    ),
    ("cuda", "fused", False): Sweep(
        ns=(2048, 8192, 16384),
        v0=128256,
        vs=(32000, 128256, 151936, 262144),
        n0=8192,
        d_s=2048,
        d_t=4096,
    ),
    ("cuda", "logits", True): Sweep(ns=(4096,), v0=128256, vs=(128256,), n0=4096),
    ("cuda", "fused", True): Sweep(
        ns=(4096,), v0=128256, vs=(128256,), n0=4096, d_s=2048, d_t=4096
    ),
    ("cpu", "logits", False): Sweep(ns=(16, 64, 256), v0=32000, vs=(8000, 32000, 128256), n0=16),
    ("cpu", "fused", False): Sweep(
        ns=(16, 64), v0=32000, vs=(8000, 32000), n0=16, d_s=256, d_t=512
    ),
    ("cpu", "logits", True): Sweep(ns=(128,), v0=8000, vs=(8000,), n0=128),
    ("cpu", "fused", True): Sweep(ns=(64,), v0=4000, vs=(4000,), n0=64, d_s=64, d_t=128),
}


# The N·V ≥ 2^31 case on CUDA (full run, kd_logits reverse_kl bf16, the kd_kernels providers): 64-bit
# offsets in the kernels, rows past element 2^31 checked against the reference like every other row.
BIG_CUDA_CASE = (16384, 131072)


# --------------------------------------------------------------------------------------------- inputs


def _seed(case: Case) -> int:
    # Same inputs for every provider of a case, and for every process: derived from the shape, not the provider.
    shape_key = f"{case.n}-{case.v}-{case.d_s}-{case.d_t}-{case.dtype}"
    return int(hashlib.sha256(shape_key.encode()).hexdigest()[:8], 16)


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Deterministic inputs: logits with std 2 (a realistic spread), or hidden states and weights giving that."""
    g = torch.Generator().manual_seed(_seed(case))
    dt, dev = DTYPES[case.dtype], torch.device(case.device)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt)

    if not is_fused(case.op):
        return {"s": randn(case.n, case.v, scale=2.0), "t": randn(case.n, case.v, scale=2.0)}
    out = {
        "h_s": randn(case.n, case.d_s),
        "w_s": randn(case.v, case.d_s, scale=2.0 / math.sqrt(case.d_s)),
    }
    if case.op.startswith("fl_kd"):
        out["h_t"] = randn(case.n, case.d_t)
        out["w_t"] = randn(case.v, case.d_t, scale=2.0 / math.sqrt(case.d_t))
    else:
        out["tokens"] = torch.randint(0, case.v, (case.n,), generator=g).to(dev)
    return out


def input_bytes(inputs: dict[str, torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in inputs.values())


# ------------------------------------------------------------------------------------------ references

# Rows per float64 reference chunk: bounds the reference's memory (a few (rows, V) float64 buffers).
_REF_CHUNK_ELEMS = 2**23


def reference(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 loss (scalar, or (N,) log-probs) and gradients of the case, from ``kd_kernels.reference``.

    Computed on the inputs' device (a GPU's float64 is fast enough for V = 262144) in row chunks: every row's
    loss and logits gradient depend on that row only.
    """
    from kd_kernels import reference as R

    x = {k: v.detach() for k, v in inputs.items()}
    n = case.n
    rows = max(1, _REF_CHUNK_ELEMS // case.v)
    want_grad = not is_fwd_only(case.op)
    f64 = {"dtype": torch.float64, "device": x["s" if "s" in x else "h_s"].device}
    if not is_fused(case.op):
        loss = torch.zeros((), **f64)
        grad = torch.empty(n, case.v, **f64) if want_grad else None
        for lo in range(0, n, rows):
            s = x["s"][lo : lo + rows].double().requires_grad_(want_grad)
            t = x["t"][lo : lo + rows].double()
            with torch.set_grad_enabled(want_grad):
                part = (
                    R.kd_loss(
                        case.divergence,
                        s,
                        t,
                        alpha=ALPHA,
                        beta=BETA,
                        temperature=TEMPERATURE,
                        reduction="sum",
                    )
                    / n
                )
            if want_grad:
                (g,) = torch.autograd.grad(part, s)
                grad[lo : lo + rows] = g
            loss += part.detach()
        return {"loss": loss, "grads": [grad] if want_grad else []}

    h = x["h_s"].double()
    w = x["w_s"].double().requires_grad_(want_grad)
    gh = torch.empty_like(h) if want_grad else None
    gw = torch.zeros_like(w) if want_grad else None
    kd = case.op.startswith("fl_kd")
    w_t = x["w_t"].double() if kd else None
    loss = torch.zeros((), **f64) if kd else torch.empty(n, **f64)
    for lo in range(0, n, rows):
        hc = h[lo : lo + rows].clone().requires_grad_(want_grad)
        with torch.set_grad_enabled(want_grad):
            s = hc @ w.T
            if kd:
                t = x["h_t"][lo : lo + rows].double() @ w_t.T
                part = (
                    R.kd_loss(
                        case.divergence,
                        s,
                        t,
                        alpha=ALPHA,
                        beta=BETA,
                        temperature=TEMPERATURE,
                        reduction="sum",
                    )
                    / n
                )
                objective = part
            else:
                part = -R.cross_entropy_per_token(s / TEMPERATURE, x["tokens"][lo : lo + rows])
                objective = part.sum()
        if want_grad:
            g_h, g_w = torch.autograd.grad(objective, (hc, w))
            gh[lo : lo + rows] = g_h
            gw += g_w
        if kd:
            loss += part.detach()
        else:
            loss[lo : lo + rows] = part.detach()
    return {"loss": loss, "grads": [gh, gw] if want_grad else []}


def reference_cached(case: Case, inputs: dict[str, torch.Tensor], cache_dir: str | None) -> dict:
    """``reference``, through an on-disk cache shared by the provider processes of one CPU run (on a GPU the
    float64 reference is cheaper to recompute than to write and read back)."""
    if not cache_dir or case.device != "cpu":
        return reference(case, inputs)
    path = Path(cache_dir) / f"{case.key}.pt"
    if path.exists():
        return torch.load(path)
    ref = reference(case, inputs)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref


def _max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| in float64, a few rows at a time (no float64 copy of a whole (N, V) tensor)."""
    a2 = a.reshape(-1, a.shape[-1]) if a.dim() >= 2 else a.reshape(1, -1)
    r2 = ref.reshape(a2.shape)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, a2.shape[1]))
    worst = 0.0
    for lo in range(0, a2.shape[0], rows):
        worst = max(worst, (a2[lo : lo + rows].double() - r2[lo : lo + rows]).abs().max().item())
    return worst


# Error bounds of the correctness gate. Loss: relative error. Gradients: max |error| / max |reference|, so a
# mapping to the wrong divergence, coefficient or normalisation (O(1) errors) fails while the rounding of a
# half-precision gradient or a half-precision GEMM passes. Inputs are the same low-precision tensors the
# reference sees (upcast exactly), so these bound the kernel's own rounding only.
TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-3),
    "bfloat16": (1e-2, 5e-2),
    "float16": (2e-3, 1e-2),
}


def check(case: Case, out: tuple[torch.Tensor, list[torch.Tensor]], ref: dict) -> tuple[bool, str]:
    """(passes, short description of the errors) for a provider's (loss, grads) against the reference."""
    loss_tol, grad_tol = TOLERANCE[case.dtype]
    loss, grads = out
    r = ref["loss"]
    if loss.shape != r.shape:
        return False, f"loss shape {tuple(loss.shape)} != reference {tuple(r.shape)}"
    if not torch.isfinite(loss).all():
        return False, "non-finite loss"
    if len(grads) != len(ref["grads"]):
        return False, f"{len(grads)} gradients returned, {len(ref['grads'])} expected"
    loss_err = _max_abs_err(loss.detach(), r.to(loss.device)) / max(r.abs().max().item(), 1e-12)
    parts = [f"loss rel err {loss_err:.1e}"]
    ok = loss_err <= loss_tol
    for i, (g, rg) in enumerate(zip(grads, ref["grads"])):
        if g.shape != rg.shape or not torch.isfinite(g).all():
            return False, f"grad {i}: shape {tuple(g.shape)} or non-finite values"
        err = _max_abs_err(g.detach(), rg.to(g.device)) / max(rg.abs().max().item(), 1e-30)
        parts.append(f"grad{i} err {err:.1e}")
        ok = ok and err <= grad_tol
    return ok, ", ".join(parts)


# ---------------------------------------------------------------------------------------------- counts


def counted_bytes(case: Case) -> int:
    """Compulsory HBM / DRAM traffic of a logits-level op: read s and t once, write the gradient once.

    Every provider is charged the same count, so GB/s compares like 1 / time; a kernel that reads a row twice
    still gets credit for one read (the convention of Triton's fused-softmax tutorial).
    """
    b = DTYPES[case.dtype].itemsize
    per_elem = 2 * b if is_fwd_only(case.op) else 3 * b
    return case.n * case.v * per_elem + 4 * case.n


def counted_flops(case: Case) -> int:
    """GEMM FLOPs of a fused-linear op (MATH.md "Fused linear"); elementwise work is not counted."""
    n, v = case.n, case.v
    if case.op.startswith("fl_kd"):
        fwd = 2 * n * v * (case.d_s + case.d_t)
    else:
        fwd = 2 * n * v * case.d_s
    return fwd if is_fwd_only(case.op) else fwd + 4 * n * v * case.d_s


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: int,
    budget_s: float,
    min_reps: int,
    max_reps: int,
) -> list[float]:
    """Per-call seconds over warmed-up repeats: ``warmup`` untimed calls (compilation, caches, allocator),
    then as many timed calls as fit in ``budget_s`` (between ``min_reps`` and ``max_reps``).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / est)))
    times = []
    if device.startswith("cuda"):
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def interleaved_medians(
    fs: dict[str, Callable[[], object]], rounds: int, reps: int = 1
) -> dict[str, float]:
    """Median ms of each CPU function after one warm-up call each, timed ``reps`` calls at a time over ``rounds``
    rounds whose order alternates (so a change of load or allocator state hits every function alike)."""
    for f in fs.values():
        f()
    names = list(fs)
    ts: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 else names[::-1]:
            for _ in range(reps):
                t0 = time.perf_counter()
                fs[k]()
                ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80) of ``times``."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


# ---------------------------------------------------------------------------------------------- memory


def malloc_returns_memory() -> None:
    """Make glibc hand freed buffers of 64 KiB and more back to the OS, so RSS falls when tensors are freed
    and VmHWM measures one call's peak rather than what earlier calls left in the heap (the suite's CPU workers;
    every such temporary is then page-faulted afresh on its next allocation)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: str, inputs_nbytes: int) -> int:
    """Peak memory of one call, inputs included: inputs + the most the call held above its starting point.

    CUDA: the caching allocator's peak (``max_memory_allocated``) above what was allocated before the call.
    CPU: peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) above the RSS before the call; run in a
    process of its own with ``MALLOC_MMAP_THRESHOLD_`` set so freed buffers go back to the OS (see run.py).
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return inputs_nbytes + peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM") - base
    del out
    return inputs_nbytes + max(0, peak) * 1024


# ------------------------------------------------------------------------------------------ bandwidth


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-local copy (median of 5): the ceiling that the
    GB/s column is compared against (``pct_copy_bw``). 2 GiB on CUDA, 256 MiB on CPU."""
    nbytes = 2**31 if device.startswith("cuda") else 2**28
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    x.fill_(1)
    y.copy_(x)
    times = time_fn(lambda: y.copy_(x), device, warmup=1, budget_s=0.2, min_reps=5, max_reps=5)
    return 2 * nbytes / statistics.median(times)


# ----------------------------------------------------------------------------------------- environment


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "kd_kernels", "csrc"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def environment(device: str) -> dict[str, str]:
    """Columns that every CSV row carries."""
    import kd_kernels

    info = kd_kernels.build_info()
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "kd_kernels": kd_kernels.__version__,
        "kd_kernels_native": f"cpu={info['cpu']} cuda={info['cuda']}",
        "commit": git_commit(),
        "threads": str(torch.get_num_threads()),
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
