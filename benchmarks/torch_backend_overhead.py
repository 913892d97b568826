"""Per-call cost of the torch backend at a small shape (docs/BENCHMARKS.md, "The torch backend"): 16 x 8000 fp32
forward KL, the loss alone under no_grad, 1 thread, interleaved medians of 400 calls.

    python benchmarks/torch_backend_overhead.py

eager (the suite's definition) / the same ops inline / the rows function / the backend's launcher / kd_loss.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_providers import eager_kd_loss  # noqa: E402

import kd_kernels  # noqa: E402
from kd_kernels._backends import get_backend  # noqa: E402
from kd_kernels._backends import torch_backend as TB  # noqa: E402
from kd_kernels._spec import KDSpec  # noqa: E402

torch.set_num_threads(1)
n, v = 16, 8000
s, t = torch.randn(n, v), torch.randn(n, v)
w, spec = torch.full((n,), 1 / n), KDSpec.make("forward_kl")


def inline():
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    return torch.sub(lp, lq).mul_(lp.exp()).sum(-1)


def rows():
    return TB.rows_loss_and_dlogits(
        s.log_softmax(-1), t.log_softmax(-1), spec, False, redo_rows=True
    )


fs = {
    "eager": lambda: eager_kd_loss(s, t, "forward_kl"),
    "inline": inline,
    "rows": rows,
    "launcher": lambda: get_backend("torch").loss_grad(s, t, w, spec, None),
    "kd_loss": lambda: kd_kernels.kd_loss(s, t, divergence="forward_kl", backend="torch"),
}
ts = {k: [] for k in fs}
with torch.no_grad():
    for f in fs.values():
        f()
    for _ in range(400):
        for k, f in fs.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
for k in fs:
    print(f"{k:10s} {statistics.median(ts[k]) * 1e3:.3f} ms")
