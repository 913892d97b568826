"""The fused-linear entry points vs eager PyTorch at the suite's CPU fused shapes, interleaved medians on 1 thread
(docs/BENCHMARKS.md, "The torch backend"):

    python benchmarks/fused_linear_vs_eager.py [logprobs] [--suite-malloc]    # forward, no_grad, D = 256
    python benchmarks/fused_linear_vs_eager.py kd [--suite-malloc]            # loss + grad of h_s, W_s

``logprobs``: ``fused_linear_logprobs`` (backend auto) against ``log_softmax(h @ Wᵀ).gather(...)``, 400
alternations. ``kd``: ``fused_linear_kd(..., backend="torch")`` against eager's full logits of both models then the
loss (``fl_kd``, D_s = 256, D_t = 512, forward KL and JSD), 40 alternations. ``--suite-malloc``: glibc set as in
the suite's CPU workers (every freed buffer of 64 KiB or more goes back to the OS).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _bench_common import ALPHA, BETA, interleaved_medians, malloc_returns_memory  # noqa: E402
from _bench_providers import eager_fl_kd, eager_fl_logprobs  # noqa: E402

import kd_kernels  # noqa: E402


def logprobs() -> None:
    for n, v in ((16, 8000), (16, 32000), (64, 32000)):
        h, w, y = torch.randn(n, 256), torch.randn(v, 256) * 0.05, torch.randint(0, v, (n,))
        with torch.no_grad():
            t = interleaved_medians(
                {
                    "eager": lambda h=h, w=w, y=y: eager_fl_logprobs(h, w, y),
                    "kd": lambda h=h, w=w, y=y: kd_kernels.fused_linear_logprobs(h, w, y),
                },
                400,
            )
        print(
            f"logprobs {n:3d} x {v:6d}  eager {t['eager']:.3f} ms  kd_kernels {t['kd']:.3f} ms  "
            f"eager / kd_kernels {t['eager'] / t['kd']:.3f}",
            flush=True,
        )


def kd() -> None:
    for div in ("forward_kl", "jsd"):
        for n, v in ((16, 8000), (16, 32000), (64, 8000), (64, 32000)):
            hs, ws = torch.randn(n, 256), torch.randn(v, 256) / 8
            ht, wt = torch.randn(n, 512), torch.randn(v, 512) * (2 / 512**0.5)

            def step(f, hs=hs, ws=ws):
                a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
                f(a, b).backward()

            def eager(a, b, ht=ht, wt=wt, div=div):
                return eager_fl_kd(a, b, ht, wt, div)

            def fused(a, b, ht=ht, wt=wt, div=div):
                return kd_kernels.fused_linear_kd(
                    a, b, ht, wt, divergence=div, backend="torch", alpha=ALPHA, beta=BETA
                )

            t = interleaved_medians({"eager": lambda: step(eager), "kd": lambda: step(fused)}, 40)  # noqa: B023
            print(
                f"fl_kd {div:10s} {n:3d} x {v:6d}  eager {t['eager']:.2f} ms  kd_kernels[torch] "
                f"{t['kd']:.2f} ms  eager / kd_kernels {t['eager'] / t['kd']:.3f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", choices=("logprobs", "kd"), default="logprobs")
    ap.add_argument("--suite-malloc", action="store_true")
    a = ap.parse_args()
    if a.suite_malloc:
        malloc_returns_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    (logprobs if a.what == "logprobs" else kd)()


if __name__ == "__main__":
    main()
