"""Where the public cpu call's time beyond the kernel goes (docs/BENCHMARKS.md, "CPU kernel";
benchmarks/results/NOTES.md, "2026-12-02: the public CPU call at 2x torch.compile"): 1024 x 32000 fp32
reverse KL, 2 threads, medians of 7 after a warm-up call.

    python benchmarks/cpu_first_touch.py

kernel into a preallocated gradient / kernel into a fresh torch.empty / zero-filling a fresh buffer alone /
the public kd_loss forward + backward.
"""

import time

import torch

import kd_kernels
from kd_kernels._backends import get_backend
from kd_kernels._spec import KDSpec

torch.set_num_threads(2)
s, t = torch.randn(1024, 32000) * 2, torch.randn(1024, 32000) * 2
w, spec = torch.full((1024,), 1 / 1024), KDSpec.make("reverse_kl", temperature=1.0)
g, leaf = torch.empty_like(s), s.clone().requires_grad_()


def kernel_preallocated():
    get_backend("cpu").loss_grad(s, t, w, spec, g)


def kernel_fresh():
    get_backend("cpu").loss_grad(s, t, w, spec, torch.empty_like(s))


def fill_fresh():
    torch.empty_like(s).fill_(0)


def public():
    leaf.grad = None
    kd_kernels.kd_loss(leaf, t, divergence="reverse_kl", backend="cpu").backward()


for f in (kernel_preallocated, kernel_fresh, fill_fresh, public):
    f()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    print(f"{f.__name__:20s} {sorted(ts)[3] * 1e3:7.1f} ms")
