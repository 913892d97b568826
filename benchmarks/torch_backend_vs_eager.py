"""torch backend vs eager PyTorch at the benchmark suite's small logits shapes, interleaved medians on 1 thread:

    python benchmarks/torch_backend_vs_eager.py forward_kl,reverse_kl,jsd [--fwd-only] [--suite-malloc]

Loss + backward by default (the suite's ``kd_logits`` op), the loss alone under no_grad with ``--fwd-only``
(``kd_logits_fwd``). ``--suite-malloc``: glibc set as in the suite's CPU workers (freed buffers of 64 KiB and more
go back to the OS, so every temporary is page-faulted afresh), the regime of `benchmarks/run.py`'s small shapes.
The eager definitions are the suite's (benchmarks/_bench_providers.py). This is the quick check of
docs/BENCHMARKS.md, "The torch backend"; `benchmarks/run.py` has the full table.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_common import ALPHA, BETA, interleaved_medians, malloc_returns_memory  # noqa: E402
from _bench_providers import eager_kd_loss  # noqa: E402

import kd_kernels  # noqa: E402

SHAPES = ((16, 8000), (16, 32000), (64, 32000), (256, 32000), (16, 128256))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("divergences")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--suite-malloc", action="store_true")
    a = ap.parse_args()
    if a.suite_malloc:
        malloc_returns_memory()
    torch.set_num_threads(1)
    for div in a.divergences.split(","):
        for dt in (getattr(torch, d) for d in a.dtypes.split(",")):
            for n, v in SHAPES:
                s, t = torch.randn(n, v).to(dt), torch.randn(n, v).to(dt)

                def call(f, s=s):
                    if a.fwd_only:
                        with torch.no_grad():
                            f(s)
                    else:
                        x = s.clone().requires_grad_()
                        f(x).backward()

                fs = {
                    "eager": lambda x, t=t, div=div: eager_kd_loss(x, t, div),
                    "torch": lambda x, t=t, div=div: kd_kernels.kd_loss(
                        x, t, divergence=div, backend="torch", alpha=ALPHA, beta=BETA
                    ),
                }
                reps = max(3, min(30, int(2e7 // (n * v))))
                ms = interleaved_medians(
                    {k: (lambda f=f: call(f)) for k, f in fs.items()}, a.rounds, reps
                )
                te, tk = ms["eager"], ms["torch"]
                print(
                    f"{div:16s} {str(dt)[6:]:9s} {n:4d}x{v:6d} {'fwd' if a.fwd_only else 'fwd+bwd'} "
                    f"eager {te:8.3f} ms  torch {tk:8.3f} ms  eager/torch {te / tk:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
