"""Benchmark suite: every provider x op x shape x dtype, checked against the float64 reference, then timed.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--ops OP ...] [--out DIR]
    python benchmarks/run.py --ratio [--threads 2]      # the CPU ratio report (see below)
    python benchmarks/run.py --sparse [--n N --v V --k K --dtype fp32|bf16]   (benchmarks/bench_sparse.py)

Writes ``DIR/results.csv`` (one row per op x shape x dtype x provider), ``DIR/results.md`` (tables) and PNG
plots (time and peak memory against N and against V). See docs/BENCHMARKS.md for how to read them.

``--ratio``: logits loss + gradient at 1024 x 32000 fp32 for reverse_kl and skew_forward_kl on the CPU,
kd_kernels[cpu] against torch.compile(dynamic=False, after warm-up) and eager PyTorch (and the torch backend
and the cpu launcher alone), all timed in one process with the repeats interleaved (so a change of load hits
every provider alike), on 2 threads by default, with each provider's peak memory from a process of its own.
Writes ``DIR/ratio.md`` / ``DIR/ratio.csv`` and prints the table.

Each provider runs in a process of its own (forked on CPU, spawned on CUDA), so that peak RSS is that
provider's and nothing it compiled or cached leaks into another provider's numbers. Rows whose provider cannot
run say why ("not available"); rows whose result disagrees with the reference are "wrong" and not timed.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import torch
from _bench_common import (
    BIG_CUDA_CASE,
    DIVERGENCES,
    DTYPES,
    OPS,
    SWEEPS,
    Case,
    check,
    copy_bandwidth,
    counted_bytes,
    counted_flops,
    environment,
    input_bytes,
    is_fused,
    make_inputs,
    malloc_returns_memory,
    peak_memory_bytes,
    quantiles,
    reference_cached,
    time_fn,
)
from _bench_providers import PROVIDERS, Provider, all_providers

# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Settings:
    """Repeat policy: ``warmup`` untimed calls, then timed calls filling ``budget_s`` within the rep bounds."""

    warmup: int
    budget_s: float
    min_reps: int
    max_reps: int
    worker_timeout_s: float


FULL = Settings(warmup=2, budget_s=1.0, min_reps=5, max_reps=100, worker_timeout_s=3600)
FULL_CPU = Settings(warmup=1, budget_s=0.5, min_reps=5, max_reps=50, worker_timeout_s=1200)
QUICK = Settings(warmup=1, budget_s=0.1, min_reps=3, max_reps=20, worker_timeout_s=300)

# On CPU the default plan is smaller still: bf16 only for these divergences, and these ops (the rest with --ops).
CPU_BF16_DIVERGENCES = ("forward_kl", "jsd")
CPU_DEFAULT_OPS = ("kd_logits", "kd_logits_fwd", "fl_kd", "fl_logprobs_fwd")
# (op, divergence) pairs run by default and by --quick. The forward-only and fused-linear ops run the
# divergences people train / evaluate with most (forward KL for KD and SeqKD, JSD for GKD); --divergences adds
# the rest.
FULL_DIVERGENCES = {
    "kd_logits": DIVERGENCES,
    "kd_logits_fwd": ("forward_kl", "jsd"),
    "fl_kd": ("forward_kl", "jsd"),
    "fl_kd_fwd": ("forward_kl",),
    "fl_logprobs": ("",),
    "fl_logprobs_fwd": ("",),
}
QUICK_DIVERGENCES = {
    "kd_logits": ("forward_kl", "jsd"),
    "kd_logits_fwd": ("forward_kl",),
    "fl_kd": ("jsd",),
    "fl_logprobs_fwd": ("",),
}
# Dtypes per device; fused linear on CPU in fp32 only (this CPU has no bf16 GEMM units: a bf16 matmul there
# measures the emulation, not the loss).
DEVICE_DTYPES = {
    ("cuda", False): ("bfloat16", "float32"),
    ("cuda", True): ("bfloat16", "float32"),
    ("cpu", False): ("float32", "bfloat16"),
    ("cpu", True): ("float32",),
}
# In --quick on CPU, torch.compile runs one forward-only case: each new graph costs 5-30 s of compilation there
# (a forward graph about a third of a forward + backward one).
QUICK_COMPILE_CASES = {("kd_logits_fwd", "forward_kl")}


def plan_cases(
    device: str,
    quick: bool,
    ops: list[str],
    divergences: list[str] | None,
    dtypes: list[str] | None,
) -> list[Case]:
    table = QUICK_DIVERGENCES if quick else FULL_DIVERGENCES
    cases = []
    for op in ops:
        divs = table.get(op, ())
        if divergences is not None and not op.startswith("fl_logprobs"):
            divs = tuple(divergences)
        elif op.startswith("fl_logprobs"):
            divs = ("",)
        if not divs:
            continue
        fused = is_fused(op)
        sweep = SWEEPS[(device, "fused" if fused else "logits", quick)]
        dts = dtypes or [
            d
            for d in DEVICE_DTYPES[(device, quick)]
            if not (fused and device == "cpu" and d != "float32")
        ]
        for div in divs:
            for dt in dts:
                if (
                    device == "cpu"
                    and not quick
                    and divergences is None
                    and dt == "bfloat16"
                    and div not in CPU_BF16_DIVERGENCES
                ):
                    continue
                for n, v, tag in sweep.shapes():
                    d_t = sweep.d_t if op.startswith("fl_kd") else 0
                    cases.append(
                        Case(op, div, n, v, sweep.d_s if fused else 0, d_t, dt, device, tag)
                    )
    if (
        device == "cuda"
        and not quick
        and "kd_logits" in ops
        and (divergences is None or "reverse_kl" in divergences)
        and (dtypes is None or "bfloat16" in dtypes)
    ):
        cases.append(
            Case("kd_logits", "reverse_kl", *BIG_CUDA_CASE, 0, 0, "bfloat16", device, "big")
        )
    return cases


# ---------------------------------------------------------------------------------------------- worker


def run_case(p: Provider, case: Case, st: Settings, cache_dir: str, quick: bool) -> dict:
    row = {**case.to_dict(), "provider": p.name, "backend": p.backend, "note": p.note}
    if (
        quick
        and p.name == "torch_compile"
        and case.device == "cpu"
        and (case.op, case.divergence) not in QUICK_COMPILE_CASES
    ):
        return {
            **row,
            "status": "skipped",
            "detail": "--quick on CPU compiles one case only (5-30 s each)",
        }
    if case.sweep == "big" and p.name not in ("kd_kernels", "kd_launcher"):
        return {
            **row,
            "status": "skipped",
            "detail": "the N·V >= 2^31 case runs the kd_kernels providers only",
        }
    reason = p.unavailable(case)
    if reason:
        return {**row, "status": "not available", "detail": reason}
    inputs = make_inputs(case)
    try:
        fn = p.build(case, inputs)
        out = fn()  # first call: compiles / autotunes where the provider does
        ok, detail = check(case, out, reference_cached(case, inputs, cache_dir))
        del out
        if not ok:
            return {
                **row,
                "status": "wrong",
                "detail": f"disagrees with kd_kernels.reference: {detail}",
            }
        times = time_fn(
            fn,
            case.device,
            warmup=st.warmup,
            budget_s=st.budget_s,
            min_reps=st.min_reps,
            max_reps=st.max_reps,
        )
        mem = peak_memory_bytes(fn, case.device, input_bytes(inputs))
    except Exception as e:  # noqa: BLE001  (an out-of-memory or a provider bug becomes a row, not a crash)
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return {**row, "status": "error", "detail": f"{type(e).__name__}: {msg}"}
    finally:
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
    p20, med, p80 = quantiles(times)
    return {
        **row,
        "status": "ok",
        "detail": detail,
        "median_s": med,
        "p20_s": p20,
        "p80_s": p80,
        "reps": len(times),
        "peak_mem_bytes": mem,
    }


def worker(
    p: Provider,
    cases: list[Case],
    st: Settings,
    cache_dir: str,
    out_path: str,
    quick: bool,
    threads: int | None,
) -> None:
    """Runs every case of one provider, appending one JSON line per case to ``out_path``."""
    if cases and cases[0].device == "cpu":
        malloc_returns_memory()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    with open(out_path, "a") as f:
        for case in cases:
            try:
                row = run_case(p, case, st, cache_dir, quick)
            except Exception as e:  # noqa: BLE001
                row = {
                    **case.to_dict(),
                    "provider": p.name,
                    "backend": p.backend,
                    "note": p.note,
                    "status": "error",
                    "detail": f"{type(e).__name__}: {e}"[:200],
                }
                traceback.print_exc()
            f.write(json.dumps(row) + "\n")
            f.flush()


def _read_rows(path: str) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line the worker is still writing
            break
    return rows


def run_provider(
    p: Provider,
    cases: list[Case],
    st: Settings,
    cache_dir: str,
    quick: bool,
    threads: int | None,
    log: bool,
    on_rows=None,
) -> list[dict]:
    """One provider in its own process; cases it never reported (a crash, a timeout) become error rows.

    ``on_rows(rows)``, if given, is called with this provider's rows so far each time the worker reports a
    case, so that the caller can rewrite its CSV row by row (a run killed from outside still leaves a table).
    """
    fd, out_path = tempfile.mkstemp(prefix=f"kdbench-{p.name}-", suffix=".jsonl", dir=cache_dir)
    os.close(fd)
    # fork on CPU: the child inherits the imported torch (seconds saved per provider); CUDA cannot be forked.
    ctx = mp.get_context("spawn" if cases[0].device.startswith("cuda") else "fork")
    proc = ctx.Process(target=worker, args=(p, cases, st, cache_dir, out_path, quick, threads))
    t0 = time.perf_counter()
    proc.start()
    seen = 0
    while proc.is_alive() and time.perf_counter() - t0 < st.worker_timeout_s:
        proc.join(min(1.0, max(0.0, st.worker_timeout_s - (time.perf_counter() - t0))))
        if on_rows is not None and os.path.getsize(out_path) != seen:
            seen = os.path.getsize(out_path)
            on_rows(_read_rows(out_path))
    timed_out = proc.is_alive()
    if timed_out:
        proc.kill()
        proc.join()
    rows = _read_rows(out_path)
    done = {(r["op"], r["divergence"], r["n"], r["v"], r["dtype"]) for r in rows}
    for c in cases:
        if (c.op, c.divergence, c.n, c.v, c.dtype) not in done:
            why = (
                f"timed out after {st.worker_timeout_s:.0f} s"
                if timed_out
                else f"worker exited with code {proc.exitcode}"
            )
            rows.append(
                {
                    **c.to_dict(),
                    "provider": p.name,
                    "backend": p.backend,
                    "note": p.note,
                    "status": "error",
                    "detail": f"{why} before this case finished",
                }
            )
    if log:
        counts = defaultdict(int)
        for r in rows:
            counts[r["status"]] += 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"  {p.label:<20} {time.perf_counter() - t0:6.1f} s  ({summary})", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- results

CSV_COLUMNS = [
    "op",
    "divergence",
    "N",
    "V",
    "D_s",
    "D_t",
    "dtype",
    "provider",
    "backend",
    "status",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "peak_mem_mb",
    "gbps",
    "pct_copy_bw",
    "tflops",
    "speedup_vs_torch",
    "mem_vs_torch",
    "detail",
    "note",
    "sweep",
    "device",
    "device_name",
    "torch",
    "triton",
    "liger_kernel",
    "kd_kernels",
    "kd_kernels_native",
    "commit",
    "threads",
    "loadavg_1m",
    "copy_gbps",
    "date",
]


def finish_rows(raw: list[dict], env: dict[str, str]) -> list[dict]:
    """Raw worker rows -> CSV rows: milliseconds, MB, GB/s or TFLOP/s, ratios to eager PyTorch."""
    rows = []
    for r in raw:
        case = Case(
            r["op"],
            r["divergence"],
            r["n"],
            r["v"],
            r["d_s"],
            r["d_t"],
            r["dtype"],
            r["device"],
            r["sweep"],
        )
        row = {
            "op": case.op,
            "divergence": case.divergence,
            "N": case.n,
            "V": case.v,
            "D_s": case.d_s,
            "D_t": case.d_t,
            "dtype": case.dtype,
            "provider": r["provider"],
            "backend": r["backend"],
            "status": r["status"],
            "detail": r.get("detail", ""),
            "note": r.get("note", ""),
            "sweep": case.sweep,
            "device": case.device,
            **env,
        }
        if r["status"] == "ok":
            med = r["median_s"]
            row.update(
                median_ms=med * 1e3,
                p20_ms=r["p20_s"] * 1e3,
                p80_ms=r["p80_s"] * 1e3,
                reps=r["reps"],
                peak_mem_mb=r["peak_mem_bytes"] / 2**20,
            )
            if is_fused(case.op):
                row["tflops"] = counted_flops(case) / med / 1e12
            else:
                row["gbps"] = counted_bytes(case) / med / 1e9
                if env.get("copy_gbps"):
                    row["pct_copy_bw"] = 100 * row["gbps"] / float(env["copy_gbps"])
        rows.append(row)
    eager = {
        (r["op"], r["divergence"], r["N"], r["V"], r["dtype"]): r
        for r in rows
        if r["provider"] == "torch" and r["status"] == "ok"
    }
    for r in rows:
        base = eager.get((r["op"], r["divergence"], r["N"], r["V"], r["dtype"]))
        if base and r["status"] == "ok":
            r["speedup_vs_torch"] = base["median_ms"] / r["median_ms"]
            r["mem_vs_torch"] = r["peak_mem_mb"] / base["peak_mem_mb"]
    return rows


def _fmt(x: object, spec: str) -> str:
    return "" if x is None or x == "" else format(x, spec)


def write_csv(rows: list[dict], path: Path) -> None:
    """Writes a temporary file and renames it over ``path``: a kill mid-write leaves the previous table."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def _label(r: dict) -> str:
    return f"{r['provider']}[{r['backend']}]" if r["backend"] else r["provider"]


def write_markdown(
    rows: list[dict],
    env: dict[str, str],
    args: argparse.Namespace,
    elapsed: float,
    path: Path,
    plots: list[str],
) -> None:
    lines = [
        "# kd_kernels benchmark results",
        "",
        f"Command: `python benchmarks/run.py {' '.join(sys.argv[1:])}` ({elapsed:.0f} s)",
        "",
        (
            f"Device: {env['device_name']} ({args.device}, {env['threads']} torch threads). "
            f"Commit {env['commit']}, kd_kernels {env['kd_kernels']} ({env['kd_kernels_native']}), "
            f"torch {env['torch']}, triton {env['triton'] or '-'}, "
            f"liger-kernel {env['liger_kernel'] or '-'}. "
            f"{env['date']}, 1-minute load average at start {env['loadavg_1m']}. "
            f"Copy bandwidth (read + write) {env.get('copy_gbps', '-')} GB/s."
        ),
        "",
        (
            "Time: median [p20, p80] over warmed-up repeats. Memory: peak of one call including its inputs "
            "(CPU: peak RSS in the provider's own process; CUDA: allocator peak). GB/s from compulsory bytes "
            "(read student + teacher logits, write the gradient), TFLOP/s from GEMM FLOPs. `x torch`: eager "
            "PyTorch time / this time (> 1 is faster); `mem`: this memory / eager's. "
            "See docs/BENCHMARKS.md."
        ),
        "",
    ]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["divergence"])].append(r)
    for (op, div), grp in groups.items():
        lines += [f"## {op}" + (f" / {div}" if div else ""), "", OPS[op], ""]
        rate = "TFLOP/s" if is_fused(op) else "GB/s (% copy)"
        dims = "N | V | D_s | D_t" if is_fused(op) else "N | V"
        lines += [
            f"| {dims} | dtype | provider | median ms [p20, p80] | {rate} | peak MB | x torch | mem |",
            "|" + "---|" * (len(dims.split("|")) + 7),
        ]
        ok = [r for r in grp if r["status"] == "ok"]
        ok.sort(key=lambda r: (r["dtype"], r["N"], r["V"], r["median_ms"]))
        for r in ok:
            shape = f"{r['N']} | {r['V']}" + (
                f" | {r['D_s']} | {r['D_t'] or '-'}" if is_fused(op) else ""
            )
            rate_v = (
                _fmt(r.get("tflops"), ".3g")
                if is_fused(op)
                else _fmt(r.get("gbps"), ".3g")
                + (f" ({r['pct_copy_bw']:.0f}%)" if r.get("pct_copy_bw") is not None else "")
            )
            lines.append(
                f"| {shape} | {r['dtype']} | {_label(r)} | {r['median_ms']:.3f} [{r['p20_ms']:.3f}, "
                f"{r['p80_ms']:.3f}] | {rate_v} | {r['peak_mem_mb']:.1f} | "
                f"{_fmt(r.get('speedup_vs_torch'), '.2f')} | {_fmt(r.get('mem_vs_torch'), '.2f')} |"
            )
        other = defaultdict(list)
        for r in grp:
            if r["status"] != "ok":
                other[(_label(r), r["status"], r["detail"])].append(
                    f"{r['N']}x{r['V']} {r['dtype']}"
                )
        if other:
            lines += ["", "Not timed:", ""]
            for (label, status, detail), where in other.items():
                lines.append(
                    f"- {label}: **{status}**: {detail} ({len(where)} shape(s): "
                    f"{', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
                )
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path.write_text("\n".join(lines))


def write_plots(rows: list[dict], out: Path) -> list[str]:
    """One PNG per (op, divergence, dtype): time and peak memory against N (at V0) and against V (at N0)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing, no plots: python -m pip install matplotlib", file=sys.stderr)
        return []
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[(r["op"], r["divergence"], r["dtype"])].append(r)
    names = []
    for (op, div, dt), grp in groups.items():
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        for col, (axis, other) in enumerate((("N", "V"), ("V", "N"))):
            pts = [r for r in grp if axis in r["sweep"].split(",")]
            for row_i, (metric, ylabel) in enumerate(
                (("median_ms", "median time (ms)"), ("peak_mem_mb", "peak memory (MB)"))
            ):
                ax = axes[row_i][col]
                by_label: dict[str, list[tuple[int, float]]] = defaultdict(list)
                for r in pts:
                    by_label[_label(r)].append((r[axis], r[metric]))
                for label, xy in sorted(by_label.items()):
                    xy.sort()
                    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
                fixed = sorted({r[other] for r in pts})
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(f"{axis} ({other} = {', '.join(map(str, fixed))})")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{op}{' / ' + div if div else ''}, {dt}, {rows[0]['device_name']}")
        fig.tight_layout()
        name = f"{op}{'_' + div if div else ''}_{dt}.png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- ratio

RATIO_SHAPE = (1024, 32000)
RATIO_DIVERGENCES = ("reverse_kl", "skew_forward_kl")
RATIO_PROVIDERS = (
    Provider("kd_kernels", "cpu"),
    Provider("kd_launcher", "cpu"),
    Provider("kd_kernels", "torch"),
    Provider("torch"),
    Provider("torch_compile", dynamic=False),
)
RATIO_LABELS = {
    "kd_kernels[cpu]": "kd_kernels[cpu]",
    "kd_launcher[cpu]": "cpu launcher alone",
    "kd_kernels[torch]": "kd_kernels[torch]",
    "torch": "eager",
    "torch_compile": "torch.compile(dynamic=False)",
}


def _ratio_memory(p: Provider, case: Case, threads: int, conn) -> None:
    """Child process: the provider's peak memory on the case (after one warm-up / compiling call)."""
    try:
        malloc_returns_memory()
        torch.set_num_threads(threads)
        inputs = make_inputs(case)
        fn = p.build(case, inputs)
        fn()
        conn.send(peak_memory_bytes(fn, "cpu", input_bytes(inputs)))
    except Exception as e:  # noqa: BLE001
        conn.send(f"{type(e).__name__}: {e}"[:200])


def ratio_report(args: argparse.Namespace, out: Path) -> int:
    """kd_kernels[cpu] vs torch.compile(dynamic=False) vs eager at 1024 x 32000 fp32 (module docstring)."""
    threads = args.threads or 2
    n, v = RATIO_SHAPE
    divs = args.divergences or list(RATIO_DIVERGENCES)
    reps, warmup = (3, 1) if args.quick else (7, 2)
    cases = [Case("kd_logits", d, n, v, 0, 0, "float32", "cpu", "ratio") for d in divs]
    print(
        f"ratio report: loss + gradient {n} x {v} fp32, {threads} threads, {reps} interleaved repeats, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    # Memory first, one forked process per provider and case (before this process runs any parallel op).
    mem: dict[tuple[str, str], int | str] = {}
    ctx = mp.get_context("fork")
    for case in cases:
        for p in RATIO_PROVIDERS:
            if p.unavailable(case):
                continue
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_ratio_memory, args=(p, case, threads, child))
            proc.start()
            proc.join(1200)
            mem[(case.divergence, p.label)] = (
                parent.recv()
                if parent.poll()
                else f"memory worker exited with code {proc.exitcode}"
            )
    torch.set_num_threads(threads)
    rows = []
    for case in cases:
        inputs = make_inputs(case)
        ref = reference_cached(case, inputs, None)
        fns = {}
        for p in RATIO_PROVIDERS:
            row = {
                "divergence": case.divergence,
                "provider": RATIO_LABELS[p.label],
                "N": n,
                "V": v,
                "threads": threads,
            }
            reason = p.unavailable(case)
            if reason:
                rows.append({**row, "status": "not available", "detail": reason})
                continue
            try:
                fn = p.build(case, inputs)
                t0 = time.perf_counter()
                ok, detail = check(case, fn(), ref)
                first = time.perf_counter() - t0
                if not ok:
                    rows.append({**row, "status": "wrong", "detail": detail})
                    continue
                for _ in range(warmup):
                    fn()
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "status": "error", "detail": f"{type(e).__name__}: {e}"[:200]})
                continue
            fns[p.label] = (fn, {**row, "status": "ok", "detail": detail, "first_call_s": first})
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for label, (fn, _row) in fns.items():
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
        grad_bytes = n * v * 4
        for label, (_fn, row) in fns.items():
            p20, med, p80 = quantiles(times[label])
            m = mem.get((case.divergence, label))
            row.update(median_ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3)
            if isinstance(m, int):
                row.update(
                    peak_mem_mb=m / 2**20, extra_mem_x_grad=(m - 2 * grad_bytes) / grad_bytes
                )
            else:
                row["detail"] += f"; memory: {m}"
            rows.append(row)
        del inputs, ref, fns
    by = {(r["divergence"], r["provider"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for base, col in (("eager", "x_eager"), ("torch.compile(dynamic=False)", "x_compile")):
            b = by.get((r["divergence"], base))
            if b:
                r[col] = b["median_ms"] / r["median_ms"]
    lines = [
        "# Ratio report: logits loss + gradient on the CPU",
        "",
        (
            f"Command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`. {environment('cpu')['device_name']}, "
            f"{threads} torch threads, N = {n}, V = {v}, fp32, T = 1, α = 0.1; commit "
            f"{environment('cpu')['commit']}; 1-minute load average at the end {os.getloadavg()[0]:.2f}."
        ),
        "",
        (
            f"Median [p20, p80] of {reps} repeats per provider, interleaved (each round calls every provider "
            "once) after the correctness check against the float64 reference and "
            f"{warmup} warm-up call(s) (torch.compile's compilation is in the first call, not timed). "
            "`x eager` / `x compile`: that provider's time / this one's (> 1: this one is faster). Peak "
            "memory: one call in a process of its own, inputs included; `extra` = (peak − inputs) / gradient "
            "size. On a shared machine absolute times stretch with the load; the ratios are the figures."
        ),
        "",
        "| divergence | provider | median ms [p20, p80] | x eager | x compile | peak MB | extra, x grad |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"| {r['divergence']} | {r['provider']} | {r['median_ms']:.1f} [{r['p20_ms']:.1f}, "
                f"{r['p80_ms']:.1f}] | {_fmt(r.get('x_eager'), '.2f')} | {_fmt(r.get('x_compile'), '.2f')} | "
                f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('extra_mem_x_grad'), '.2f')} |"
            )
        else:
            lines.append(
                f"| {r['divergence']} | {r['provider']} | **{r['status']}**: {r['detail']} | | | | |"
            )
    text = "\n".join(lines) + "\n"
    (out / "ratio.md").write_text(text)
    cols = [
        "divergence",
        "provider",
        "N",
        "V",
        "threads",
        "status",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "x_eager",
        "x_compile",
        "peak_mem_mb",
        "extra_mem_x_grad",
        "first_call_s",
        "detail",
    ]
    with open(out / "ratio.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{x:.6g}" if isinstance(x, float) else x) for k, x in r.items()})
    print(text)
    print(f"-> {out / 'ratio.md'}, {out / 'ratio.csv'}")
    return 0 if all(r["status"] in ("ok", "not available") for r in rows) else 1


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="one small shape per op, short repeats (CPU: < 45 s)"
    )
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument(
        "--ops",
        nargs="+",
        choices=list(OPS),
        metavar="OP",
        help=f"ops to run (default: all in the plan): {', '.join(OPS)}",
    )
    ap.add_argument(
        "--divergences",
        nargs="+",
        choices=DIVERGENCES,
        metavar="DIV",
        help="divergences for the KD ops (default: per-op plan, see run.py)",
    )
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), metavar="DTYPE")
    ap.add_argument(
        "--providers", nargs="+", choices=PROVIDERS, metavar="P", default=list(PROVIDERS)
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder (default: .bench_out/<device>)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in every provider process (default: torch's own default, "
        "or 1 when the CPU's load average is at least its number of cores)",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--ratio",
        action="store_true",
        help="only the CPU ratio report: kd_kernels[cpu] vs torch.compile(dynamic=False) vs eager, "
        "1024 x 32000 fp32, reverse_kl and skew_forward_kl, 2 threads (--threads to change)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--sparse" in argv:  # sparse-teacher KD: its own providers and options (bench_sparse.py)
        from bench_sparse import main as sparse_main

        return sparse_main([a for a in argv if a != "--sparse"])
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "TRITON_INTERPRET=1 is set: Triton would run in its interpreter; unset it to benchmark",
            file=sys.stderr,
        )
        return 2
    out = args.out or Path(__file__).resolve().parent.parent / ".bench_out" / args.device
    out.mkdir(parents=True, exist_ok=True)
    if args.ratio:
        if args.device != "cpu":
            print("--ratio is a CPU report; use --device cpu", file=sys.stderr)
            return 2
        return ratio_report(args, out)
    default_ops = QUICK_DIVERGENCES if args.quick else FULL_DIVERGENCES
    ops = args.ops or [
        op for op in default_ops if args.quick or args.device != "cpu" or op in CPU_DEFAULT_OPS
    ]
    cases = plan_cases(args.device, args.quick, ops, args.divergences, args.dtypes)
    settings = QUICK if args.quick else FULL_CPU if args.device == "cpu" else FULL
    providers = [
        p for p in all_providers(liger_compiled=not args.quick) if p.name in args.providers
    ]
    if (
        args.threads is None
        and args.device == "cpu"
        and os.getloadavg()[0] >= (os.cpu_count() or 1)
    ):
        # Two OpenMP threads on an oversubscribed machine spin against each other (eager PyTorch measured
        # 5-7x slower than with one thread at a load average of 10 on 2 cores).
        args.threads = 1
        print(
            f"load average {os.getloadavg()[0]:.1f} >= {os.cpu_count()} CPUs: --threads 1 "
            "(pass --threads to override)",
            flush=True,
        )
    env = environment(args.device)
    if args.threads:
        env["threads"] = str(args.threads)

    print(
        f"{len(cases)} cases x {len(providers)} providers on {env['device_name']} "
        f"(load average {env['loadavg_1m']}) -> {out}",
        flush=True,
    )
    try:  # import once here so forked workers inherit it (it pulls in triton)
        import liger_kernel  # noqa: F401
    except Exception as e:  # noqa: BLE001  (the liger rows record the reason too)
        print(
            f"liger-kernel not importable ({type(e).__name__}); its rows will say why", flush=True
        )
    raw: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kdbench-") as cache_dir:
        for p in providers:
            mine = [c for c in cases if p.applies(c)]
            if mine:
                # rewritten (and closed) after every case a worker reports, so that a run killed from outside
                # (gpu_check.sh's stage timeout) still leaves every finished row in results.csv
                done = list(raw)
                raw += run_provider(
                    p,
                    mine,
                    settings,
                    cache_dir,
                    args.quick,
                    args.threads,
                    log=True,
                    on_rows=lambda rows, done=done: write_csv(
                        finish_rows(done + rows, env), out / "results.csv"
                    ),
                )
                write_csv(finish_rows(raw, env), out / "results.csv")
    try:  # after the workers: the parent runs no parallel region before forking them
        env["copy_gbps"] = f"{copy_bandwidth(args.device) / 1e9:.1f}"
    except Exception as e:  # noqa: BLE001  (no ceiling column rather than no run)
        print(f"copy bandwidth not measured: {type(e).__name__}: {e}", flush=True)
    rows = finish_rows(raw, env)
    write_csv(rows, out / "results.csv")
    plots = [] if args.no_plots else write_plots(rows, out)
    elapsed = time.perf_counter() - t_start
    write_markdown(rows, env, args, elapsed, out / "results.md", plots)
    bad = [r for r in rows if r["status"] in ("wrong", "error")]
    print(
        f"{len(rows)} rows ({sum(r['status'] == 'ok' for r in rows)} timed, {len(bad)} wrong/error) "
        f"in {elapsed:.1f} s -> {out / 'results.md'}"
    )
    for r in bad:
        print(
            f"  {r['status']}: {r['op']} {r['divergence']} {r['N']}x{r['V']} {r['dtype']} {_label(r)}: "
            f"{r['detail']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
