"""Sparse-teacher KD, loss + student gradient: kd_kernels.sparse_kd against eager PyTorch and
torch.compile doing the same (log_softmax, gather, tail logsumexp), side by side in one process.

    python benchmarks/bench_sparse.py                      # 1024 x 32000 fp32, K = 64, forward_kl bucket
    python benchmarks/bench_sparse.py --device cuda --n 8192 --v 128256 --dtype bf16
    python benchmarks/run.py --sparse [same options]      # the same, from the suite's entry point

Providers: ``kd_<backend>`` for each sparse backend that runs on the device (cpu, torch, triton),
``eager`` and ``compile`` (torch.compile of the eager function, compile time excluded: its first
calls are warm-up). Every provider's loss is checked against kd_kernels' torch backend first.
Absolute CPU times on a loaded shared machine are inflated; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import kd_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_forward_kl_bucket(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Forward KL between the K+1 categories (the ids and the tail), as people write it today."""
    lq = torch.log_softmax(s.float(), -1)
    lq_k = lq.gather(1, ids)
    in_support = torch.zeros_like(lq, dtype=torch.bool).scatter_(1, ids, True)
    lq_tail = lq.masked_fill(in_support, -math.inf).logsumexp(-1)
    p = lp.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(1e-6)
    loss = (p * (lp - lq_k)).sum(-1) + p_tail * (p_tail.log() - lq_tail)
    return loss.mean()


def timed(fn, device: str, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dt = args.device, DTYPES[args.dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    s0 = (torch.randn(args.n, args.v, device=dev, generator=g) * 2).to(dt)
    t = torch.randn(args.n, args.v, device=dev, generator=g) * 2
    lp, ids = t.log_softmax(-1).topk(args.k, -1)
    del t
    backends = [
        b
        for b in ("cpu", "torch", "triton")
        if not (b == "cpu" and dev != "cpu") and not (b == "triton" and dev == "cpu")
    ]
    compiled = torch.compile(eager_forward_kl_bucket)
    providers = {
        f"kd_{b}": (lambda s, b=b: kd_kernels.sparse_kd(s, ids, lp, backend=b)) for b in backends
    }
    providers["eager"] = lambda s: eager_forward_kl_bucket(s, ids, lp)
    providers["compile"] = lambda s: compiled(s, ids, lp)
    if args.providers:
        providers = {k: v for k, v in providers.items() if k in args.providers.split(",")}

    def step(f):
        s = s0.clone().requires_grad_()
        loss = f(s)
        loss.backward()
        return float(loss)

    want = kd_kernels.sparse_kd(s0, ids, lp, backend="torch").item()
    print(
        f"sparse_kd forward_kl bucket, N={args.n} V={args.v} K={args.k} {args.dtype} on {dev}, "
        f"{torch.get_num_threads()} threads, loss + gradient; median of {args.reps}"
    )
    rows = {}
    for name, f in providers.items():
        try:
            t0 = time.perf_counter()
            got = step(f)
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (a provider that cannot run is a row, not a crash)
            print(f"  {name:<10} unavailable: {type(e).__name__}: {str(e)[:120]}")
            continue
        if not math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-4):
            print(f"  {name:<10} WRONG: loss {got} != {want}")
            continue
        ts = timed(lambda f=f: step(f), dev, args.reps, warmup=2 if name == "compile" else 1)
        rows[name] = statistics.median(ts)
        print(
            f"  {name:<10} median {rows[name] * 1e3:9.1f} ms  (min {min(ts) * 1e3:.1f}, "
            f"first call {first:.1f} s)",
            flush=True,
        )
    for base in ("eager", "compile"):
        if base in rows:
            ratios = ", ".join(
                f"{k} {rows[base] / v:.2f}x" for k, v in rows.items() if k.startswith("kd_")
            )
            print(f"speed-up over {base}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
