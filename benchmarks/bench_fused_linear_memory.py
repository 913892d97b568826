"""Peak memory and time of fused-linear KD against the naive path, each provider in its own process.

Providers (loss + every gradient of the student's hidden states and lm_head weight):
  naive      materialized logits, log_softmax, F.kl_div, autograd (what a script writes first);
  logits_kd  materialized logits + kd_kernels.kd_loss (fused row kernel, inplace_grad=True);
  fused      kd_kernels.fused_linear_kd (chunks over tokens, the logits never exist);
  fused_sparse  kd_kernels.fused_linear_sparse_kd against the teacher's top-K (--k, computed with
             teacher_topk before the measurement: what an offline cache holds; no teacher head at all).

Memory is the peak resident set (``ru_maxrss``) of the worker process minus its resident set once
the inputs exist, so each provider is measured from a clean process. CPU only (RSS).

    python benchmarks/bench_fused_linear_memory.py      # N=4096 D=128 V=65536 fp32 reverse_kl
    python benchmarks/bench_fused_linear_memory.py --n 1024 --v 32000 --csv out.csv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROVIDERS = ("naive", "logits_kd", "fused", "fused_sparse")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import kd_kernels

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(args.n, args.d, generator=g).to(dtype).requires_grad_()
    w_s = (torch.randn(args.v, args.d, generator=g) / args.d**0.5).to(dtype).requires_grad_()
    h_t = torch.randn(args.n, args.d, generator=g).to(dtype)
    w_t = (torch.randn(args.v, args.d, generator=g) / args.d**0.5).to(dtype)
    if args.provider == "fused_sparse":  # the cache's content; the teacher is then dropped
        top_ids, top_lp = kd_kernels.teacher_topk(h_t, w_t, args.k)
        del h_t, w_t
        # Forget the peak of writing the cache (a separate job in practice): reset the high-water mark
        # (Linux clear_refs 5), so ru_maxrss below is this provider's training step alone.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def step() -> float:
        h_s.grad = w_s.grad = None
        if args.provider == "naive":
            s = h_s @ w_s.T
            with torch.no_grad():
                t = h_t @ w_t.T
            # KL(q‖p) per token = kl_div(input=log p, target=log q, log_target=True).sum(-1)
            loss = (
                F.kl_div(
                    t.float().log_softmax(-1),
                    s.float().log_softmax(-1),
                    log_target=True,
                    reduction="none",
                )
                .sum(-1)
                .mean()
            )
        elif args.provider == "logits_kd":
            s = h_s @ w_s.T
            with torch.no_grad():
                t = h_t @ w_t.T
            loss = kd_kernels.kd_loss(
                s, t, divergence=args.divergence, backend=args.backend, inplace_grad=True
            )
        elif args.provider == "fused_sparse":
            loss = kd_kernels.fused_linear_sparse_kd(
                h_s,
                w_s,
                top_ids,
                top_lp,
                divergence=args.divergence,
                backend=args.backend,
                chunk_size=args.chunk_size,
            )
        else:
            loss = kd_kernels.fused_linear_kd(
                h_s,
                w_s,
                h_t,
                w_t,
                divergence=args.divergence,
                backend=args.backend,
                chunk_size=args.chunk_size,
            )
        loss.backward()
        return float(loss)

    base = rss_mib()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    peak_extra = peak_rss_mib() - base
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    grad_norm = float(w_s.grad.float().norm())
    from kd_kernels._backends import resolve_backend

    return {
        "provider": args.provider,
        "loss": loss,
        "grad_w_norm": grad_norm,
        "peak_extra_mib": peak_extra,
        "base_rss_mib": base,
        "first_s": first,
        "median_s": statistics.median(times),
        "p20_s": q[0],
        "p80_s": q[3],
        "backend": "-"
        if args.provider == "naive"
        else args.backend
        if args.provider == "fused_sparse"
        else resolve_backend(args.backend, torch.device("cpu")).name,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096, help="tokens")
    ap.add_argument("--d", type=int, default=128, help="hidden size (student = teacher)")
    ap.add_argument("--v", type=int, default=65536, help="vocabulary")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--divergence", default="reverse_kl")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--k", type=int, default=64, help="teacher top-k of fused_sparse")
    ap.add_argument(
        "--reps", type=int, default=3, help="timed repetitions after the measured first step"
    )
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--csv", default=None, help="append one row per provider to this CSV file")
    ap.add_argument("--provider", default=None, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()

    if args.provider is not None:
        print(json.dumps(worker(args)))
        return

    results = []
    for provider in args.providers.split(","):
        if provider not in PROVIDERS:
            raise SystemExit(
                f"--providers: unknown {provider!r}; use any of {', '.join(PROVIDERS)}"
            )
        cmd = [
            sys.executable,
            __file__,
            "--provider",
            provider,
            "--n",
            str(args.n),
            "--d",
            str(args.d),
            "--v",
            str(args.v),
            "--dtype",
            args.dtype,
            "--divergence",
            args.divergence,
            "--backend",
            args.backend,
            "--reps",
            str(args.reps),
            "--k",
            str(args.k),
        ]
        if args.chunk_size is not None:
            cmd += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))

    flops = (
        2 * args.n * args.v * (2 * args.d) + 4 * args.n * args.v * args.d
    )  # fwd both logits + bwd
    by = {r["provider"]: r for r in results}
    print(
        f"N={args.n} D={args.d} V={args.v} {args.dtype} {args.divergence}, backend={args.backend}, "
        f"{results[0]['threads']} threads; CPU times are noisy on a shared machine"
    )
    print(
        f"{'provider':<10} {'backend':<7} {'peak extra MiB':>14} {'vs naive':>8} {'median s':>9} "
        f"{'p20':>7} {'p80':>7} {'first s':>8} {'GFLOP/s':>8} {'loss':>12}"
    )
    for r in results:
        ratio = (
            r["peak_extra_mib"] / by["naive"]["peak_extra_mib"] if "naive" in by else float("nan")
        )
        print(
            f"{r['provider']:<10} {r['backend']:<7} {r['peak_extra_mib']:>14.1f} {ratio:>8.3f} "
            f"{r['median_s']:>9.3f} {r['p20_s']:>7.3f} {r['p80_s']:>7.3f} {r['first_s']:>8.3f} "
            f"{flops / r['median_s'] / 1e9:>8.1f} {r['loss']:>12.6f}"
        )
    if args.csv:
        import platform

        import torch

        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        new = not os.path.exists(args.csv)
        with open(args.csv, "a") as f:
            if new:
                f.write(
                    "provider,backend,n,d,v,dtype,divergence,peak_extra_mib,median_s,p20_s,p80_s,"
                    "device,torch,commit\n"
                )
            for r in results:
                f.write(
                    f"{r['provider']},{r['backend']},{args.n},{args.d},{args.v},{args.dtype},"
                    f"{args.divergence},{r['peak_extra_mib']:.1f},{r['median_s']:.4f},"
                    f"{r['p20_s']:.4f},"
                    f"{r['p80_s']:.4f},cpu:{platform.processor() or platform.machine()},"
                    f"{torch.__version__},{commit}\n"
                )


if __name__ == "__main__":
    main()
