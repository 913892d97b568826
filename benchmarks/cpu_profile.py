"""The compiled CPU kernel against torch.compile, side by side, and the CPU's floor for the same work.

    python benchmarks/cpu_profile.py                       # 1024 x 32000 fp32, 2 threads, 5 rounds
    python benchmarks/cpu_profile.py --before /path/to/old/checkout   # also the old build, interleaved
    python benchmarks/cpu_profile.py --limits              # also the exp / log / memory floors (g++ needed)

Providers, each loss + gradient of ``(s, t) ↦ mean_i L_i`` (the bench_cpu.py eager definitions):

- ``kernel``: the cpu launcher called directly (``get_backend("cpu").loss_grad`` into a preallocated gradient);
- ``cpu``: the public ``kd_kernels.kd_loss(..., backend="cpu")`` forward + backward;
- ``compile``: ``torch.compile(eager_loss, dynamic=False)`` forward + backward, after warm-up calls;
- ``eager``: the eager loss forward + backward.

Every round runs every provider once per divergence, in a fresh order, in one process per build; with
``--before`` the rounds alternate between the two builds' processes (same inputs, same machine load), so the
before / after ratios are measured side by side. Reports medians over rounds and the load average, in wall
time and in process CPU time (summed over threads; on a shared machine it says what the work costs, where wall
time says how much of a core the process got; torch's OpenMP spin-waits count in its CPU time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EAGER = (
    "reverse_kl",
    "skew_forward_kl",
)  # the divergences with an eager / torch.compile definition here
PROVIDERS = ("kernel", "cpu", "compile", "eager")
ALPHA = 0.1


def _child(
    rows: int, vocab: int, threads: int, reps: int, providers: list[str], divs: list[str], seed: int
) -> None:
    import torch

    import kd_kernels
    from kd_kernels._backends import get_backend
    from kd_kernels._spec import KDSpec

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    s = torch.empty(rows, vocab).normal_(0.0, 2.0, generator=g)
    t = torch.empty(rows, vocab).normal_(0.0, 2.0, generator=g)

    def eager_loss(div: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lq = s.log_softmax(-1)
        lp = t.log_softmax(-1)
        if div == "reverse_kl":
            return (lq.exp() * (lq - lp)).sum(-1).mean()
        lm = torch.logaddexp(lp + math.log(ALPHA), lq + math.log1p(-ALPHA))
        return (lp.exp() * (lp - lm)).sum(-1).mean()

    compiled = {
        d: torch.compile(lambda s, t, d=d: eager_loss(d, s, t), dynamic=False) for d in EAGER
    }
    w = torch.full((rows,), 1.0 / rows)
    grad = torch.empty_like(s)
    leaf = s.clone().requires_grad_()

    def step(provider: str, div: str) -> None:
        if provider == "kernel":
            spec = KDSpec.make(div, alpha=ALPHA, beta=0.5, temperature=1.0)
            get_backend("cpu").loss_grad(s, t, w, spec, grad)
            return
        leaf.grad = None
        if provider == "cpu":
            loss = kd_kernels.kd_loss(leaf, t, divergence=div, alpha=ALPHA, backend="cpu")
        elif provider == "compile":
            loss = compiled[div](leaf, t)
        else:
            loss = eager_loss(div, leaf, t)
        loss.backward()

    cases = [(p, d) for p in providers for d in divs if p in ("kernel", "cpu") or d in EAGER]
    for p, d in cases:  # warm-up: compilation and first-call costs, at the timed shape
        step(p, d)
        step(p, d)
    rng = random.Random(seed)
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        order = list(cases)
        rng.shuffle(order)
        for p, d in order:
            t0, c0 = time.perf_counter(), time.process_time()
            step(p, d)
            out.setdefault(f"{p}/{d}", []).append(time.perf_counter() - t0)
            out.setdefault(f"cpu:{p}/{d}", []).append(time.process_time() - c0)
    print(json.dumps(out))


def _run_child(pythonpath: str, a: argparse.Namespace, providers: list[str], seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--rows",
        str(a.rows),
        "--vocab",
        str(a.vocab),
        "--threads",
        str(a.threads),
        "--reps",
        "1",
        "--providers",
        ",".join(providers),
        "--divergences",
        a.divergences,
        "--seed",
        str(seed),
    ]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=pythonpath)
    if res.returncode != 0:
        raise RuntimeError(f"child for {pythonpath} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def limits(a: argparse.Namespace) -> dict:
    exe = Path(tempfile.gettempdir()) / f"kd_cpu_limits_{os.getpid()}"
    subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O3",
            "-fno-math-errno",
            "-fno-trapping-math",
            "-fopenmp",
            "-march=x86-64-v4",
            "-mprefer-vector-width=512",
            "-I",
            str(ROOT / "csrc" / "include"),
            str(ROOT / "benchmarks" / "cpu_limits.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run(
        [str(exe), str(a.rows), str(a.vocab), str(a.threads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exe.unlink()
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--before", help="a checkout (with its built kd_kernels/_C*.so) to compare with"
    )
    ap.add_argument("--limits", action="store_true", help="also time the exp / log / memory floors")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument(
        "--divergences",
        default=",".join(EAGER),
        help="kernel / cpu providers run any; compile / eager only reverse_kl, skew_forward_kl",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    providers = a.providers.split(",")
    if a.child:
        _child(a.rows, a.vocab, a.threads, a.reps, providers, a.divergences.split(","), a.seed)
        return

    builds = {"after": str(ROOT)}
    if a.before:
        builds = {"before": str(Path(a.before).resolve()), **builds}
    times: dict[str, dict[str, list[float]]] = {b: {} for b in builds}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for b, path in builds.items() if r % 2 == 0 else reversed(list(builds.items())):
            old = [
                p for p in providers if p in ("kernel", "cpu")
            ]  # the baselines need no second run
            res = _run_child(path, a, providers if b == "after" else old, seed=r)
            for k, v in res.items():
                times[b].setdefault(k, []).extend(v)
        load.append(os.getloadavg()[0])
    print(
        f"# N={a.rows} V={a.vocab} fp32, {a.threads} threads, {a.rounds} rounds (one process per build "
        f"per round, rounds alternate the builds), load average (1 min) during the run: "
        f"median {statistics.median(load):.1f}, max {max(load):.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'divergence':<16} {'build':<7} {'provider':<8} {'median ms':>10} {'min ms':>8} "
        f"{'compile / this':>15} {'CPU-time ms':>12} {'compile / this':>15}"
    )
    for d in a.divergences.split(","):
        comp = statistics.median(times["after"].get(f"compile/{d}", [math.nan]))
        comp_cpu = statistics.median(times["after"].get(f"cpu:compile/{d}", [math.nan]))
        for b in builds:
            for p in providers:
                ts = times[b].get(f"{p}/{d}")
                if not ts:
                    continue
                med = statistics.median(ts)
                cpu = statistics.median(times[b][f"cpu:{p}/{d}"])
                print(
                    f"{d:<16} {b:<7} {p:<8} {med * 1e3:10.1f} {min(ts) * 1e3:8.1f} {comp / med:14.2f}x "
                    f"{cpu * 1e3:12.1f} {comp_cpu / cpu:14.2f}x"
                )
    if a.limits:
        lim = limits(a)
        n = a.rows * a.vocab
        print(
            f"# floors on {a.threads} threads, per element of the {a.rows}x{a.vocab} problem: "
            f"kd_exp {lim['exp_ns']:.3f} ns, kd_log {lim['log_ns']:.3f} ns, read s,t + write g "
            f"{lim['mem_ns']:.3f} ns ({lim['mem_GBps']:.1f} GB/s of the 12 counted bytes); "
            f"whole problem: one exp per element {lim['exp_ns'] * n / 1e6:.1f} ms, memory "
            f"{lim['mem_ns'] * n / 1e6:.1f} ms; as CPU time (all threads): exp {lim['exp_cpu_ns']:.3f} ns, "
            f"log {lim['log_cpu_ns']:.3f} ns, memory {lim['mem_cpu_ns']:.3f} ns per element"
        )


if __name__ == "__main__":
    main()
