"""fused_linear_logprobs forward (no_grad) vs eager ``log_softmax(h @ Wᵀ).gather(...)``, interleaved medians of
400 calls each on 1 thread, D = 256, the suite's fl_logprobs_fwd shapes (docs/BENCHMARKS.md, 2026-12-02):

    python benchmarks/fl_logprobs_vs_eager.py
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_providers import eager_fl_logprobs  # noqa: E402

import kd_kernels  # noqa: E402

torch.set_num_threads(1)
for n, v in ((16, 8000), (16, 32000), (64, 32000)):
    h, w, y = torch.randn(n, 256), torch.randn(v, 256) * 0.05, torch.randint(0, v, (n,))
    fs = {"eager": lambda: eager_fl_logprobs(h, w, y), "kd": lambda: kd_kernels.fused_linear_logprobs(h, w, y)}
    ts = {k: [] for k in fs}
    with torch.no_grad():
        for f in fs.values():
            f()
        for i in range(400):
            for k in (("eager", "kd") if i % 2 else ("kd", "eager")):
                t0 = time.perf_counter()
                fs[k]()
                ts[k].append(time.perf_counter() - t0)
    me, mk = (statistics.median(ts[k]) * 1e3 for k in ("eager", "kd"))
    print(f"{n:3d} x {v:6d}  eager {me:.3f} ms  kd_kernels {mk:.3f} ms  eager / kd_kernels {me / mk:.3f}")
