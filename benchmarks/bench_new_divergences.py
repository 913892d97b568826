"""kd_kernels[cpu] against eager PyTorch for the divergences of issue [K] (tvd, jeffreys, alpha_beta, renyi):
loss + gradient of the token mean at N x V fp32 on the CPU, the providers interleaved in one process (so a change
of load hits both alike), median of the repeats.

    python benchmarks/bench_new_divergences.py [--n 1024 --v 32000 --threads 2 --reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_providers import ALPHA, BETA, eager_kd_loss

import kd_kernels

DIVERGENCES = ("tvd", "jeffreys", "alpha_beta", "renyi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.n, args.v, generator=g) * 2
    t = torch.randn(args.n, args.v, generator=g) * 2

    def kd(div):
        x = s.clone().requires_grad_()
        kd_kernels.kd_loss(x, t, divergence=div, alpha=ALPHA, beta=BETA, backend="cpu").backward()
        return x.grad

    def eager(div):
        x = s.clone().requires_grad_()
        eager_kd_loss(x, t, div).backward()
        return x.grad

    print(f"N={args.n} V={args.v} fp32, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print("| divergence | kd_kernels[cpu] ms | eager ms | cpu vs eager |")
    print("|---|---|---|---|")
    for div in DIVERGENCES:
        g_kd, g_eager = kd(div), eager(div)  # warm-up, and the two agree
        # fp32 against fp32, to 1e-3 of the largest gradient entry; tvd's gradient jumps where p = q, so
        # entries whose sign fp32 rounding decides may differ (allow a handful in N·V)
        bad = ~torch.isclose(g_kd, g_eager, rtol=1e-3, atol=1e-3 * float(g_eager.abs().max()))
        if int(bad.sum()) > 10:
            raise AssertionError(f"{div}: {int(bad.sum())} gradient entries disagree with eager")
        times = {"kd": [], "eager": []}
        for _ in range(args.reps):
            for name, fn in (("kd", kd), ("eager", eager)):
                t0 = time.perf_counter()
                fn(div)
                times[name].append(time.perf_counter() - t0)
        a, b = statistics.median(times["kd"]) * 1e3, statistics.median(times["eager"]) * 1e3
        print(f"| {div} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
