"""Loss + gradient on the CPU: compiled kernel ("cpu") vs the torch backend vs eager PyTorch.

Prints, for reverse KL and skew forward KL at (N, V) = (1024, 32000) fp32 (defaults), the median wall time of
forward + backward with its p20-p80 spread, the speed-up over eager PyTorch, and the peak extra memory over the
inputs (peak RSS, each provider in a fresh subprocess on the same inputs), as a multiple of the gradient's size.

Eager PyTorch is what a user writes:
    lq = (s / T).log_softmax(-1); lp = (t / T).log_softmax(-1)
    reverse_kl:      (lq.exp() * (lq - lp)).sum(-1).mean()
    skew_forward_kl: lm = torch.logaddexp(lp + log α, lq + log(1 − α)); (lp.exp() * (lp - lm)).sum(-1).mean()
followed by .backward().

    python benchmarks/bench_cpu.py                 # the issue's shape, < 1 minute on 2 cores
    python benchmarks/bench_cpu.py --rows 256 --vocab 32000 --reps 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import kd_kernels

DIVERGENCES = ("reverse_kl", "skew_forward_kl")
PROVIDERS = ("eager", "torch", "cpu")
ALPHA = 0.1
TEMPERATURE = 1.0


def eager_loss(div: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    lq = (s / TEMPERATURE).log_softmax(-1)
    lp = (t / TEMPERATURE).log_softmax(-1)
    if div == "reverse_kl":
        return (lq.exp() * (lq - lp)).sum(-1).mean()
    lm = torch.logaddexp(lp + math.log(ALPHA), lq + math.log1p(-ALPHA))
    return (lp.exp() * (lp - lm)).sum(-1).mean()


def step(provider: str, div: str, s: torch.Tensor, t: torch.Tensor) -> None:
    s.grad = None
    if provider == "eager":
        loss = eager_loss(div, s, t)
    else:
        loss = kd_kernels.kd_loss(
            s, t, divergence=div, alpha=ALPHA, temperature=TEMPERATURE, backend=provider
        )
    loss.backward()


def make_inputs(rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Filled in place: no full-size temporaries, so the memory children's peak before the step is the inputs.
    g = torch.Generator().manual_seed(0)
    s = torch.empty(rows, vocab).normal_(0.0, 2.0, generator=g).requires_grad_()
    t = torch.empty(rows, vocab).normal_(0.0, 2.0, generator=g)
    return s, t


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_child(provider: str, divs: list[str], rows: int, vocab: int) -> None:
    """Runs in a fresh process: one step per divergence, each with the peak RSS reset before it; prints the
    peak over the RSS with the inputs allocated, per divergence, as JSON.

    ``cpu-kernel`` calls the cpu launcher directly (gradient buffer + kernel, no autograd or custom op).
    """
    from kd_kernels._backends import get_backend
    from kd_kernels._spec import KDSpec

    s, t = make_inputs(rows, vocab)
    w = torch.ones(rows)
    out = {}
    for div in divs:
        if provider == "cpu-kernel":
            spec = KDSpec.make(div, alpha=ALPHA, beta=0.5, temperature=TEMPERATURE)

            def run(spec: KDSpec = spec) -> None:
                g = torch.empty_like(s)
                get_backend("cpu").loss_grad(s.detach(), t, w, spec, g)
        else:

            def run(div: str = div) -> None:
                step(provider, div, s, t)
                s.grad = None

        # Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS") * 1024
        run()
        out[div] = _status_kib("VmHWM") * 1024 - base
    print(json.dumps(out))


def measure_memory_all(providers: list[str], divs: list[str], rows: int, vocab: int) -> dict:
    """{(provider, divergence): peak extra bytes}, one process per provider, all started at once (a peak
    RSS is per process, so running them side by side does not change it, and it keeps the script short)."""
    procs = {
        p: subprocess.Popen(
            [sys.executable, __file__, "--memory-child", p, ",".join(divs), "--rows", str(rows),
             "--vocab", str(vocab)],
            stdout=subprocess.PIPE, text=True,
        )
        for p in providers
    }
    out = {}
    for p, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement of {p} failed with exit code {proc.returncode}")
        for div, extra in json.loads(stdout.strip().splitlines()[-1]).items():
            out[(p, div)] = extra
    return out


def time_it(provider: str, div: str, s: torch.Tensor, t: torch.Tensor, reps: int) -> list[float]:
    step(provider, div, s[:8].detach().requires_grad_(), t[:8])  # warm-up (first-call costs) on 8 rows
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(provider, div, s, t)
        times.append(time.perf_counter() - t0)
    return times


def _mem_cols(mem: int | None, grad_bytes: int) -> str:
    return f"{'-':>10} {'-':>7}" if mem is None else f"{mem / 2**20:10.0f} {mem / grad_bytes:7.2f}"


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--no-memory", action="store_true", help="skip the peak-RSS subprocesses (Linux only)"
    )
    ap.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "DIVERGENCE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        memory_child(a.memory_child[0], a.memory_child[1].split(","), a.rows, a.vocab)
        return

    info = kd_kernels.build_info()
    if "cpu" not in kd_kernels.available_backends("cpu"):
        sys.exit(f"the compiled cpu backend is not available: {info.get('error')}; run `pip install -e .`")
    grad_bytes = a.rows * a.vocab * 4
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), kd_kernels {info['version']} cpu_isa={info.get('cpu_isa')}; "
        f"N={a.rows} V={a.vocab} fp32, T={TEMPERATURE}, alpha={ALPHA}, {a.reps} reps"
    )
    s, t = make_inputs(a.rows, a.vocab)
    bytes_moved = 3 * grad_bytes  # one read of s and t, one write of the gradient (the least possible)
    print(
        f"{'divergence':<16} {'provider':<10} {'median ms':>10} {'p20-p80 ms':>14} {'GB/s*':>6} "
        f"{'vs eager':>9} {'extra MiB':>10} {'x grad':>7}"
    )
    times = {(p, d): time_it(p, d, s, t, a.reps) for d in DIVERGENCES for p in PROVIDERS}
    del s, t
    mem = {}
    if not a.no_memory:
        mem = measure_memory_all([*PROVIDERS, "cpu-kernel"], list(DIVERGENCES), a.rows, a.vocab)
    for div in DIVERGENCES:
        eager = statistics.median(times[("eager", div)])
        for p in PROVIDERS:
            ts = times[(p, div)]
            med = statistics.median(ts)
            spread = f"{quantile(ts, 0.2) * 1e3:.0f}-{quantile(ts, 0.8) * 1e3:.0f}"
            print(
                f"{div:<16} {p:<10} {med * 1e3:10.1f} {spread:>14} {bytes_moved / med / 1e9:6.2f} "
                f"{eager / med:8.2f}x {_mem_cols(mem.get((p, div)), grad_bytes)}"
            )
        if mem:
            cols = _mem_cols(mem[("cpu-kernel", div)], grad_bytes)
            print(f"{div:<16} {'cpu-kernel':<10} {'':>10} {'':>14} {'':>6} {'':>9} {cols}")
    print("# GB/s* = 3·N·V·4 bytes (read s, t; write grad) / time; extra = peak RSS − RSS with the inputs")
    print("# cpu-kernel: the cpu launcher called directly (gradient buffer + kernel, no autograd / custom op)")
    print("# memory: one process per provider, divergences in table order, peak reset before each")
    print("# timings are wall clock on a possibly shared machine: re-run and compare the spread")


if __name__ == "__main__":
    main()
