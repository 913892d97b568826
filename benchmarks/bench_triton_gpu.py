"""GPU benchmark of the "triton" backend: loss + student-logit gradient at the logits level.

Written for an H100 session; it has not been run on a GPU yet (``--help`` is all that runs without one).

What it measures, per divergence (default N = 8192, V = 128256, bf16 student and teacher):

- providers, each computing the mean loss and ∂loss/∂s:
  ``kd_triton_kernel`` (the launcher alone, gradient buffer preallocated), ``kd_triton_autotune`` (the same with
  ``triton.autotune``), ``kd_triton`` (public API ``kd_kernels.kd_loss(..., backend="triton")`` +
  ``torch.autograd.grad``), ``kd_cuda`` (when the CUDA extension is built), ``torch_eager`` (the float64-reference
  formula run eagerly on fp32 upcasts), ``torch_compile`` (the same under ``torch.compile``) and ``liger_jsd``
  (Liger-Kernel's ``LigerJSD`` on fp32 log-softmax inputs: at β = 0 / 1 for forward / reverse KL, at β for JSD;
  the endpoint mapping is checked against the reference before anything is timed);
- time: ``triton.testing.do_bench`` median (and p20 / p80) on each of ``--sets`` input sets, then the median
  over sets;
- bandwidth: counted bytes / time. ``gbps_counted`` uses the bytes the kernel moves (KL: s and t read twice, the
  gradient written once; skew / JSD: read three times), ``gbps_min`` the unavoidable bytes (s and t read once,
  the gradient written once), the fair number to compare providers by;
- correctness: the mean loss against a float64 reference over all rows (chunked) and the gradient against float64
  autograd on ``--check-rows`` rows;
- peak memory above the inputs;
- two extra runs of the kernel: N·V ≥ 2^31 (16384 × 131072, rows past element 2^31 checked) and V = 262144.

Writes ``results.csv`` and ``results.md`` to ``--out``.

Liger-Kernel on a machine without network: ``pip download liger-kernel --no-deps -d wheels/`` where there is a
network, carry ``wheels/`` along, then ``pip install --no-deps wheels/liger_kernel-*.whl`` before running.
Without it the Liger rows say "not installed".

Example: ``python benchmarks/bench_triton_gpu.py --out bench_out``; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")
PROVIDERS = ("kd_triton_kernel", "kd_triton_autotune", "kd_triton", "kd_cuda", "torch_eager", "torch_compile",
             "liger_jsd")
COEF = {"skew_forward_kl": 0.1, "skew_reverse_kl": 0.1, "jsd": 0.5}


@dataclass
class Row:
    run: str
    divergence: str
    provider: str
    n: int
    v: int
    dtype: str
    ms_p50: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    gbps_counted: float = math.nan
    gbps_min: float = math.nan
    peak_mem_gib: float = math.nan
    loss_rel_err: float = math.nan
    grad_rel_err: float = math.nan
    note: str = ""
    meta: dict = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="directory for results.csv and results.md")
    p.add_argument("--n", type=int, default=8192, help="tokens (rows)")
    p.add_argument("--v", type=int, default=128256, help="vocabulary size")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--divergences", nargs="+", choices=DIVERGENCES, default=list(DIVERGENCES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--sets", type=int, default=3, help="input sets to time on (median over them)")
    p.add_argument("--check-rows", type=int, default=128, help="rows whose gradient is checked in float64")
    p.add_argument("--warmup-ms", type=int, default=50)
    p.add_argument("--rep-ms", type=int, default=300)
    p.add_argument("--no-big", action="store_true", help="skip the N·V ≥ 2^31 and V = 262144 runs")
    p.add_argument("--quick", action="store_true", help="small N, one set, short timing: a smoke run")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the plumbing under TRITON_INTERPRET=1 (tiny shapes, wall-clock timer, "
                        "no compile / Liger / big runs); its times mean nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.sets, args.warmup_ms, args.rep_ms, args.check_rows = 1024, 1, 10, 50, 32
    return args


# ------------------------------------------------------------------------------------------------ helpers


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def counted_bytes(divergence: str, n: int, v: int, e_s: int, e_t: int) -> tuple[int, int]:
    """(bytes the triton kernel moves, unavoidable bytes) for loss + gradient; MATH.md 'How many passes'."""
    reads = 2 if divergence in ("forward_kl", "reverse_kl") else 3
    return n * v * (reads * (e_s + e_t) + e_s) + 8 * n, n * v * (2 * e_s + e_t) + 8 * n


def rel_err(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(n, v, dtype, seed, device="cuda"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    # Spread like real LM logits: a few large entries over a broad base; teacher correlated with student.
    s = torch.randn(n, v, device=device, generator=g, dtype=torch.float32).mul_(2.0)
    t = s + torch.randn(n, v, device=device, generator=g, dtype=torch.float32).mul_(1.5)
    return s.to(dtype), t.to(dtype)


def reference_loss(divergence, s, t, chunk=256) -> float:
    """float64 mean of the per-token divergence over all rows, a chunk of rows at a time."""
    import torch

    from kd_kernels import reference as R

    total = 0.0
    a = COEF.get(divergence, 0.5)
    with torch.no_grad():
        for lo in range(0, s.shape[0], chunk):
            per = R.per_token(divergence, s[lo:lo + chunk].double(), t[lo:lo + chunk].double(), alpha=a, beta=a)
            total += per.sum().item()
    return total / s.shape[0]


def reference_grad_rows(divergence, s, t, rows, n_total):
    """float64 ∂(mean loss)/∂s on the given rows."""
    import torch

    from kd_kernels import reference as R

    a = COEF.get(divergence, 0.5)
    s64 = s[rows].double().requires_grad_()
    per = R.per_token(divergence, s64, t[rows].double(), alpha=a, beta=a)
    (g,) = torch.autograd.grad(per.sum() / n_total, s64)
    return g


# ---------------------------------------------------------------------------------------------- providers


def liger_mapping(device="cuda"):
    """{divergence: beta} for LigerJSD, verified against the float64 reference; or an error string."""
    import torch

    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError as e:
        return f"not installed ({e})"
    from kd_kernels import reference as R

    s, t = make_inputs(64, 4099, torch.float32, seed=123, device=device)
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    refs = {d: R.per_token(d, s.double(), t.double(), beta=COEF.get(d, 0.5)).mean().item()
            for d in ("forward_kl", "reverse_kl", "jsd")}
    out = {}
    for beta in (0.0, 1.0, COEF["jsd"]):
        val = LigerJSD(beta=beta)(lq, lp).item()
        for d, ref in refs.items():
            close = abs(val - ref) <= 1e-4 * abs(ref) + 1e-6
            if close and d not in out and (d != "jsd" or beta == COEF["jsd"]):
                out[d] = beta
    print(f"LigerJSD mapping checked against the reference: {out} (reference means {refs})")
    return out


def build_provider(name, divergence, spec, liger_beta, device):
    """A function (s, t) -> (loss, grad) or a string saying why this provider is skipped."""
    import torch

    import kd_kernels
    from kd_kernels import reference as R
    from kd_kernels._backends.triton_backend import launch

    a = COEF.get(divergence, 0.5)
    w = None

    if name in ("kd_triton_kernel", "kd_triton_autotune"):
        autotune = name == "kd_triton_autotune"
        grads = {}

        def run(s, t):
            nonlocal w
            if w is None:
                # Row weights 1/N make the gradient that of the mean loss, as the other providers compute it.
                w = torch.full((s.shape[0],), 1.0 / s.shape[0], device=s.device, dtype=torch.float32)
            g = grads.get(s.data_ptr())
            if g is None:
                g = grads[s.data_ptr()] = torch.empty_like(s)
            loss = launch(s, t, w, spec, g, autotune=autotune)
            return loss.mean(), g

        return run
    if name in ("kd_triton", "kd_cuda"):
        backend = name[3:]
        if backend not in kd_kernels.available_backends(device):
            return f"backend {backend!r} not available here"

        def run(s, t):
            sl = s.detach().requires_grad_()
            loss = kd_kernels.kd_loss(sl, t, divergence=divergence, alpha=a, beta=a, backend=backend)
            (g,) = torch.autograd.grad(loss, sl)
            return loss, g

        return run
    if name in ("torch_eager", "torch_compile"):
        def eager(s, t):
            sl = s.detach().requires_grad_()
            loss = R.per_token(divergence, sl.float(), t.float(), alpha=a, beta=a).mean()
            (g,) = torch.autograd.grad(loss, sl)
            return loss, g

        return eager if name == "torch_eager" else torch.compile(eager, dynamic=False)
    if name == "liger_jsd":
        if isinstance(liger_beta, str):
            return liger_beta
        if divergence not in liger_beta:
            return f"LigerJSD has no setting equal to {divergence}"
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=liger_beta[divergence])

        def run(s, t):
            sl = s.detach().requires_grad_()
            loss = jsd(sl.float().log_softmax(-1), t.float().log_softmax(-1))
            (g,) = torch.autograd.grad(loss, sl)
            return loss, g

        return run
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------ timing


def timed(fn, args):
    """(p50, p20, p80) in ms: triton.testing.do_bench on a GPU, a plain wall-clock loop for the CPU dry run."""
    if args.device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[1], times[0], times[2]]


def bench_one(row: Row, fn, sets, args, bytes_counted, bytes_min, ref_loss, ref_rows, ref_grad) -> None:
    import torch

    cuda = args.device == "cuda"
    try:
        s0, t0 = sets[0]
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss, g = fn(s0, t0)
        if cuda:
            torch.cuda.synchronize()
            row.peak_mem_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        row.loss_rel_err = abs(loss.item() - ref_loss) / max(abs(ref_loss), 1e-30)
        row.grad_rel_err = rel_err(g[ref_rows], ref_grad)
        del loss, g
        stats = []
        for s, t in sets:
            stats.append(timed(lambda s=s, t=t: fn(s, t), args))
        row.ms_p50 = statistics.median(q[0] for q in stats)
        row.ms_p20 = statistics.median(q[1] for q in stats)
        row.ms_p80 = statistics.median(q[2] for q in stats)
        row.gbps_counted = bytes_counted / (row.ms_p50 * 1e-3) / 1e9
        row.gbps_min = bytes_min / (row.ms_p50 * 1e-3) / 1e9
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    except Exception as e:  # noqa: BLE001 - a failing provider is a result row, not the end of the run
        row.note = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        if cuda:
            torch.cuda.empty_cache()


def big_run(label, n, v, dtype, divergence, args, rows_out, meta):
    """The triton kernel alone at a large shape; checks rows at both ends (past element 2^31 when N·V ≥ 2^31)."""
    import torch

    from kd_kernels._backends.triton_backend import launch
    from kd_kernels._spec import KDSpec

    row = Row(label, divergence, "kd_triton_kernel", n, v, str(dtype).replace("torch.", ""), meta=meta)
    try:
        s, t = make_inputs(n, v, dtype, seed=7)
        g = torch.empty_like(s)
        w = torch.full((n,), 1.0 / n, device="cuda")
        spec = KDSpec.make(divergence, alpha=COEF.get(divergence, 0.5), beta=COEF.get(divergence, 0.5),
                           temperature=1.0)
        loss = launch(s, t, w, spec, g)
        rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
        ref_grad = reference_grad_rows(divergence, s, t, rows, n)
        row.grad_rel_err = rel_err(g[rows], ref_grad)
        from kd_kernels import reference as R

        a = COEF.get(divergence, 0.5)
        ref_l = R.per_token(divergence, s[rows].double(), t[rows].double(), alpha=a, beta=a)
        row.loss_rel_err = rel_err(loss[rows], ref_l)
        last = (n - 1) * s.stride(0) + v - 1
        row.note = f"last element index {last} ({'≥' if last >= 2**31 else '<'} 2^31)"
        q = timed(lambda: launch(s, t, w, spec, g), args)
        row.ms_p50, row.ms_p20, row.ms_p80 = q
        bc, bm = counted_bytes(divergence, n, v, s.element_size(), t.element_size())
        row.gbps_counted, row.gbps_min = bc / (q[0] * 1e-3) / 1e9, bm / (q[0] * 1e-3) / 1e9
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    finally:
        torch.cuda.empty_cache()
    rows_out.append(row)
    print(fmt(row), flush=True)


# ------------------------------------------------------------------------------------------------ output


def fmt(r: Row) -> str:
    return (f"{r.run:>8} {r.divergence:>16} {r.provider:>18} {r.ms_p50:9.3f} ms  {r.gbps_min:7.0f} GB/s(min) "
            f"{r.gbps_counted:7.0f} GB/s(counted)  mem {r.peak_mem_gib:6.2f} GiB  loss err {r.loss_rel_err:.1e}  "
            f"grad err {r.grad_rel_err:.1e}  {r.note}")


def write(rows, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    keys = [k for k in asdict(rows[0]) if k != "meta"] + list(meta)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        for r in rows:
            d = asdict(r)
            d.pop("meta")
            wr.writerow({**d, **meta})
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("# Triton backend benchmark (loss + student-logit gradient)\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n")
        f.write("GB/s(min): unavoidable bytes (s, t read once, gradient written once) / median time; "
                "GB/s(counted): bytes the triton kernel actually moves / time.\n\n")
        f.write("| run | divergence | provider | N | V | median ms | p20 | p80 | GB/s(min) | GB/s(counted) | "
                "peak GiB | loss rel err | grad rel err | note |\n")
        f.write("|" + "---|" * 14 + "\n")
        for r in rows:
            f.write(f"| {r.run} | {r.divergence} | {r.provider} | {r.n} | {r.v} | {r.ms_p50:.3f} | "
                    f"{r.ms_p20:.3f} | {r.ms_p80:.3f} | {r.gbps_min:.0f} | {r.gbps_counted:.0f} | "
                    f"{r.peak_mem_gib:.2f} | {r.loss_rel_err:.1e} | {r.grad_rel_err:.1e} | {r.note} |\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import triton

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cuda" and (not torch.cuda.is_available() or interpret):
        print("bench_triton_gpu.py needs a CUDA GPU (and TRITON_INTERPRET unset); --device cpu is a dry run",
              file=sys.stderr)
        return 2
    if args.device == "cpu":
        if not interpret:
            print("--device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        args.providers = [p for p in args.providers if p not in ("torch_compile", "liger_jsd", "kd_cuda")]
        args.no_big = True
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kd_kernels._spec import KDSpec

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (TRITON_INTERPRET dry run)", "torch": torch.__version__, "triton": triton.__version__,
        "liger_kernel": version("liger-kernel"), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(meta, flush=True)
    liger_beta = liger_mapping() if "liger_jsd" in args.providers else "not requested"
    n, v = args.n, args.v
    rows: list[Row] = []
    for divergence in args.divergences:
        a = COEF.get(divergence, 0.5)
        spec = KDSpec.make(divergence, alpha=a, beta=a, temperature=1.0)
        sets = [make_inputs(n, v, dtype, seed=i, device=args.device) for i in range(args.sets)]
        ref_loss = reference_loss(divergence, *sets[0])
        ref_rows = torch.randperm(n, device=args.device)[: args.check_rows].sort().values
        ref_grad = reference_grad_rows(divergence, *sets[0], ref_rows, n)
        e = sets[0][0].element_size()
        bc, bm = counted_bytes(divergence, n, v, e, e)
        for name in args.providers:
            row = Row("main", divergence, name, n, v, args.dtype, meta=meta)
            fn = build_provider(name, divergence, spec, liger_beta, args.device)
            if isinstance(fn, str):
                row.note = fn
            else:
                bench_one(row, fn, sets, args, bc, bm, ref_loss, ref_rows, ref_grad)
            rows.append(row)
            print(fmt(row), flush=True)
        del sets
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if not args.no_big:
        for divergence in ("forward_kl", "jsd"):
            big_run("2^31", 16384, 131072, dtype, divergence, args, rows, meta)
            big_run("V=262144", 4096, 262144, dtype, divergence, args, rows, meta)
    write(rows, meta, args.out)
    print(f"wrote {args.out}/results.csv and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
