"""GPU benchmark of the logits-level KD losses: loss + gradient of the student logits, one shape, each divergence.

    python benchmarks/bench_gpu.py [--n 8192] [--v 128256] [--dtype bfloat16] [--sets 3] [--reps 10]
                                   [--providers cuda,cuda_kernel,triton,eager,compile,liger] [--out DIR]

Providers (each checked against the float64 reference on the first ``--check-rows`` rows before it is timed;
a provider that disagrees is reported "wrong" and not timed):
- ``cuda`` / ``triton``: ``kd_kernels.kd_loss(..., backend=...)`` then ``backward()`` (the public path);
- ``cuda_kernel``: the "cuda" backend's ``loss_grad`` alone into a preallocated gradient (the kernel);
- ``eager``: the plain PyTorch a user writes (``kd_kernels.reference`` formulas on fp32 upcasts), autograd;
- ``compile``: ``torch.compile`` of exactly that function (compilation excluded from the timings);
- ``liger``: Liger-Kernel's ``LigerJSD`` on fp32 log-softmaxes: β = 0.5 for jsd, and its endpoints β = 0 / 1
  for forward / reverse KL, the mapping verified numerically (both endpoints are tried against each).

Timing: CUDA events around each call, after warm-up, rotating over ``--sets`` independent input sets (each far
larger than L2 at the default shape); median with p20 / p80 of all samples. Counted bytes are the fewest a
loss + gradient must move: read s and t once, write the gradient once (N·V·(|s| + |t| + |s|)); GB/s = counted
bytes / median time. The device-to-device copy bandwidth measured at start (bytes read + written) is the
ceiling. Writes ``results.csv`` and ``results.md`` under ``--out`` and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")
ALL_PROVIDERS = ("cuda", "cuda_kernel", "triton", "eager", "compile", "liger")
ALPHA, BETA, TEMPERATURE = 0.1, 0.5, 1.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192, help="tokens (rows)")
    p.add_argument("--v", type=int, default=128256, help="vocabulary (columns)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="student and teacher dtype")
    p.add_argument("--divergences", default=",".join(DIVERGENCES), help="comma-separated")
    p.add_argument("--providers", default=",".join(ALL_PROVIDERS), help="comma-separated")
    p.add_argument("--sets", type=int, default=3, help="independent input sets rotated while timing")
    p.add_argument("--reps", type=int, default=10, help="timed calls per input set")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--check-rows", type=int, default=64, help="rows compared with the float64 reference")
    p.add_argument("--out", default=os.environ.get("OUT", ".bench_out"), help="output folder")
    a = p.parse_args(argv)
    a.divergences = [d for d in a.divergences.split(",") if d]
    a.providers = [x for x in a.providers.split(",") if x]
    for d in a.divergences:
        if d not in DIVERGENCES:
            p.error(f"unknown divergence {d!r}; use {', '.join(DIVERGENCES)}")
    for x in a.providers:
        if x not in ALL_PROVIDERS:
            p.error(f"unknown provider {x!r}; use {', '.join(ALL_PROVIDERS)}")
    return a


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=False)
        return out.stdout.strip() or os.environ.get("KD_COMMIT", "unknown")
    except OSError:
        return os.environ.get("KD_COMMIT", "unknown")


# ------------------------------------------------------------------------------------------ the providers


def eager_loss(divergence: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a user writes: fp32 upcast, the reference formulas (log_softmax, logaddexp mixtures), token mean."""
    from kd_kernels import reference as R

    per = R.per_token(divergence, s.float() / TEMPERATURE, t.float() / TEMPERATURE, alpha=ALPHA, beta=BETA)
    return per.mean()


_COMPILED: dict[str, object] = {}


def make_runner(provider: str, divergence: str, liger_beta: float | None = None):
    """A callable (s, t) -> (loss, grad of s) for one provider; s is a leaf that requires grad."""
    import kd_kernels

    if provider in ("cuda", "triton"):

        def run(s, t):
            s.grad = None
            loss = kd_kernels.kd_loss(s, t, divergence=divergence, alpha=ALPHA, beta=BETA,
                                      temperature=TEMPERATURE, backend=provider)
            loss.backward()
            return loss, s.grad

        return run
    if provider == "cuda_kernel":
        from kd_kernels._backends import get_backend
        from kd_kernels._spec import KDSpec

        spec = KDSpec.make(divergence, alpha=ALPHA, beta=BETA, temperature=TEMPERATURE)
        backend = get_backend("cuda")
        cache: dict = {}

        def run(s, t):
            n = s.shape[0]
            key = (s.shape, s.dtype, s.device)
            if key not in cache:  # allocated once, outside the timed calls after warm-up
                cache.clear()
                cache[key] = (torch.empty_like(s, requires_grad=False),
                              torch.full((n,), 1.0 / n, device=s.device))
            grad, w = cache[key]
            rows = backend.loss_grad(s.detach(), t, w, spec, grad)
            return (rows * w).sum(), grad

        return run
    if provider in ("eager", "compile"):
        fn = (lambda s, t: eager_loss(divergence, s, t))
        if provider == "compile":
            fn = _COMPILED.setdefault(divergence, torch.compile(fn))

        def run(s, t):
            s.grad = None
            loss = fn(s, t)
            loss.backward()
            return loss, s.grad

        return run
    if provider == "liger":
        from liger_kernel.transformers.jsd import LigerJSD

        mod = LigerJSD(beta=liger_beta)

        def run(s, t):
            s.grad = None
            log_q = torch.log_softmax(s.float() / TEMPERATURE, dim=-1)
            log_p = torch.log_softmax(t.float() / TEMPERATURE, dim=-1)
            loss = mod(log_q, log_p)
            loss.backward()
            return loss, s.grad

        return run
    raise ValueError(provider)


def unavailable(provider: str, divergence: str) -> str | None:
    import kd_kernels

    if provider in ("cuda", "cuda_kernel", "triton"):
        name = "cuda" if provider == "cuda_kernel" else provider
        if name not in kd_kernels.available_backends("cuda"):
            from kd_kernels._backends import get_backend

            return "; ".join(get_backend(name).unsupported_reasons(torch.device("cuda")))
    if provider == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError as e:
            return f"liger-kernel not importable ({e}); carry its wheel (see benchmarks/gpu_check.sh)"
        if divergence not in ("forward_kl", "reverse_kl", "jsd"):
            return f"Liger has no logits-level {divergence}"
    return None


# ------------------------------------------------------------------------------------------ checking


def reference(divergence: str, s: torch.Tensor, t: torch.Tensor):
    from kd_kernels import reference as R

    s64 = s.detach().double().requires_grad_()
    per = R.per_token(divergence, s64 / TEMPERATURE, t.double() / TEMPERATURE, alpha=ALPHA, beta=BETA)
    loss = per.mean()
    loss.backward()
    return loss.detach(), s64.grad


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(runner, divergence: str, s_small, t_small) -> tuple[bool, str]:
    loss, grad = runner(s_small, t_small)
    ref_loss, ref_grad = reference(divergence, s_small, t_small)
    el, eg = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12), rel(grad, ref_grad)
    ok = math.isfinite(el) and math.isfinite(eg) and el < 1e-2 and eg < 2e-2
    return ok, f"loss rel err {el:.1e}, grad rel err {eg:.1e}"


# ------------------------------------------------------------------------------------------ timing


def time_calls(runner, sets, warmup: int, reps: int) -> list[float]:
    for i in range(warmup):
        runner(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        for s, t in sets:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner(s, t)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (median of 10)."""
    x = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ts = time_calls(lambda a, b: b.copy_(a), [(x, y)], 3, 10)
    del x, y
    return 2 * 2**31 / (statistics.median(ts) * 1e-3)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    import kd_kernels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    n, v = args.n, args.v
    esize = torch.empty((), dtype=dtype).element_size()
    counted = n * v * 3 * esize
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device {dev}; copy bandwidth {bw / 1e9:.0f} GB/s; N={n} V={v} {args.dtype}; "
          f"counted bytes {counted / 1e9:.2f} GB -> floor {counted / bw * 1e3:.2f} ms", flush=True)
    meta = {
        "device": dev, "torch": torch.__version__, "triton": version("triton"),
        "liger": version("liger-kernel"), "kd_kernels": kd_kernels.__version__, "commit": commit(),
        "cuda_archs": kd_kernels.build_info().get("cuda_archs", ""), "date": time.strftime("%Y-%m-%d"),
    }

    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    sets = []
    for _ in range(args.sets):
        s = (torch.randn(n, v, generator=gen, device="cuda") * 2).to(dtype).requires_grad_()
        t = (torch.randn(n, v, generator=gen, device="cuda") * 2).to(dtype)
        sets.append((s, t))
    k = min(args.check_rows, n)
    s_small = sets[0][0].detach()[:k].clone().requires_grad_()
    t_small = sets[0][1][:k].clone()

    rows = []
    for divergence in args.divergences:
        for provider in args.providers:
            label, note, times = provider, "", []
            why = unavailable(provider, divergence)
            runner = None
            if why is None:
                try:
                    if provider == "liger":
                        # Verify which β gives this divergence instead of trusting a mapping.
                        betas = (BETA,) if divergence == "jsd" else (0.0, 1.0)
                        for b in betas:
                            cand = make_runner(provider, divergence, liger_beta=b)
                            ok, msg = check(cand, divergence, s_small, t_small)
                            if ok:
                                runner, label, note = cand, f"liger[beta={b:g}]", msg
                                break
                        if runner is None:
                            why = f"no LigerJSD beta in {betas} matches {divergence} ({msg})"
                    else:
                        runner = make_runner(provider, divergence)
                        ok, note = check(runner, divergence, s_small, t_small)
                        if not ok:
                            why, runner = f"wrong: {note}", None
                except Exception as e:  # noqa: BLE001  (any provider failure is reported as a row)
                    why, runner = f"{type(e).__name__}: {str(e)[:200]}", None
            if runner is not None:
                try:
                    torch.cuda.reset_peak_memory_stats()
                    times = time_calls(runner, sets, args.warmup, args.reps)
                    peak = torch.cuda.max_memory_allocated() / 2**30
                except torch.cuda.OutOfMemoryError as e:
                    why, times = f"out of memory: {str(e)[:120]}", []
                    torch.cuda.empty_cache()
            row = {"divergence": divergence, "provider": label, "n": n, "v": v, "dtype": args.dtype}
            if times:
                med = statistics.median(times)
                row.update(median_ms=f"{med:.3f}", p20_ms=f"{quantile(times, 0.2):.3f}",
                           p80_ms=f"{quantile(times, 0.8):.3f}", samples=len(times),
                           gbps=f"{counted / (med * 1e-3) / 1e9:.0f}",
                           pct_copy_bw=f"{100 * counted / (med * 1e-3) / bw:.0f}",
                           peak_gib=f"{peak:.1f}", note=note)
            else:
                row.update(median_ms="", p20_ms="", p80_ms="", samples=0, gbps="", pct_copy_bw="",
                           peak_gib="", note=why or "")
            row.update(meta)
            rows.append(row)
            print(f"{divergence:16s} {label:18s} {row['median_ms'] or '-':>9s} ms  "
                  f"{row['gbps'] or '-':>5s} GB/s  {row['note']}", flush=True)
            torch.cuda.empty_cache()

    fields = list(rows[0].keys())
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cols = ["divergence", "provider", "median_ms", "p20_ms", "p80_ms", "gbps", "pct_copy_bw", "peak_gib",
            "note"]
    lines = [
        f"# kd_kernels GPU benchmark: loss + grad, N={n}, V={v}, {args.dtype}",
        "",
        (
            f"{dev}, torch {meta['torch']}, triton {meta['triton']}, liger {meta['liger']}, commit "
            f"{meta['commit']}, {meta['date']}. Copy bandwidth {bw / 1e9:.0f} GB/s (read + write); "
            f"counted bytes {counted / 1e9:.2f} GB (s, t read once, grad written once): floor "
            f"{counted / bw * 1e3:.2f} ms."
        ),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
