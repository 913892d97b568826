"""``kd-train compare``: SFT, KD, SeqKD, MiniLLM, DistiLLM and GKD with one budget, one table, one plot.

Every method runs with the same flags (whatever follows the compare options, ``--config FILE``
included, goes to each run that takes it: ``--steps``, ``--lr`` to all, ``--kd-ratio`` to kd and
seqkd, ``--gkd-beta`` to gkd ...) and the same training seeds, each run in its own
process (so peak memory and wall time are per run). Finished runs (with a ``summary.json``) are kept
and skipped on a re-run, and the table is rewritten after every run, so an interrupted comparison
still leaves a table of what finished.

Outputs in ``--out`` (default ``out/compare``): ``METHOD/seedN/`` (each run's usual outputs),
``results.json`` (one row per run), ``COMPARISON.md`` (the table) and ``compare.png`` (the plot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "sft,kd,seqkd,minillm,distillm,gkd"


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"


def collect(out: Path, methods: list[str], seeds: list[int]) -> list[dict]:
    """One row per finished run: the final metrics, train / wall time and peak memory."""
    rows = []
    for method in methods:
        for seed in seeds:
            path = out / method / f"seed{seed}" / "summary.json"
            if not path.is_file():
                continue
            s = json.loads(path.read_text())
            f = s.get("final", {})
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "steps": s["steps"],
                    "rougeL": f.get("rougeL_student"),
                    "rougeL_std": f.get("rougeL_student_std"),
                    "rougeL_teacher": f.get("rougeL_teacher"),
                    "reverse_kl": f.get("test_reverse_kl"),
                    "forward_kl": f.get("test_forward_kl"),
                    "test_ce": f.get("test_ce"),
                    "train_time_s": s["train_time_s"],
                    "wall_time_s": s["wall_time_s"],
                    "peak_mem_mb": s.get("peak_mem_mb"),
                }
            )
    return rows


def table(rows: list[dict], methods: list[str]) -> str:
    """The Markdown table: means over training seeds, ± the standard deviation across them."""
    head = (
        "| method | runs | Rouge-L ↑ | Rouge-L eval-seed sd | reverse KL ↓ | forward KL ↓ | test CE | "
        "train time s | wall time s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            lines.append(f"| {m} | 0 | not run | | | | | | | |")
            continue

        def col(key: str, rs: list[dict] = rs) -> list[float]:
            return [float(r[key]) for r in rs if r.get(key) is not None]

        lines.append(
            f"| {m} | {len(rs)} | {_fmt(col('rougeL'))} | {_fmt(col('rougeL_std'))} | "
            f"{_fmt(col('reverse_kl'))} | {_fmt(col('forward_kl'))} | {_fmt(col('test_ce'))} | "
            f"{_fmt(col('train_time_s'), 0)} | {_fmt(col('wall_time_s'), 0)} | "
            f"{_fmt(col('peak_mem_mb'), 0)} |"
        )
    teacher = [float(r["rougeL_teacher"]) for r in rows if r.get("rougeL_teacher") is not None]
    note = (
        (
            f"\nTeacher's own samples vs its greedy references (sampling-noise ceiling): Rouge-L "
            f"{_fmt(teacher)}.\n"
        )
        if teacher
        else ""
    )
    return head + "\n".join(lines) + "\n" + note


def plot(rows: list[dict], methods: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in methods if any(r["method"] == m for r in rows)]
    if not present:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(
        axes,
        ("rougeL", "reverse_kl", "train_time_s"),
        ("Rouge-L (higher is better)", "reverse KL to teacher", "train time (s)"),
    ):
        means, sds = [], []
        for m in present:
            vals = [float(r[key]) for r in rows if r["method"] == m and r.get(key) is not None]
            means.append(statistics.fmean(vals) if vals else 0.0)
            sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.bar(present, means, yerr=sds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, methods: list[str], seeds: list[int], header: str) -> list[dict]:
    rows = collect(out, methods, seeds)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "COMPARISON.md").write_text(header + "\n" + table(rows, methods))
    plot(rows, methods, out / "compare.png")
    return rows


def main(argv: list[str]) -> int:
    from .config import method_argv, parse_args, shared_run_values
    from .methods import METHODS

    p = argparse.ArgumentParser(
        prog="kd-train compare",
        allow_abbrev=False,
        description="Run several methods with the same flags and seeds; write one table and plot. "
        "Flags after the compare options go to every run that takes them "
        "(see kd-train METHOD --help).",
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods")
    p.add_argument("--seeds", default="1,2", help="training seeds (comma-separated)")
    p.add_argument("--out", default="out/compare", help="output folder")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table and plot")
    args, rest = p.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(
            f"kd-train compare: error: --methods {unknown or args.methods!r} unknown; use "
            f"{sorted(METHODS)}",
            file=sys.stderr,
        )
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(
            f"kd-train compare: error: --seeds={args.seeds!r} must be comma-separated integers",
            file=sys.stderr,
        )
        return 2
    try:
        values = shared_run_values(rest, methods)
        for name in ("seed", "out", "resume", "overwrite"):
            if name in values:
                raise ValueError(f"--{name} is set per run by compare; use --seeds / --out")
        runs = {m: method_argv(m, values) for m in methods}
        for m in methods:  # fail before the first run on a bad value
            parse_args([m, *runs[m]], [m])
    except ValueError as e:
        print(f"kd-train compare: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "# kd-train compare\n\nmethods: " + ", ".join(methods) + f"; training seeds {seeds}; "
        "flags for every run: `" + " ".join(rest) + "`\n"
    )
    if not args.table_only:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for seed in seeds:  # seed-major: the first seed of every method finishes first
            for method in methods:
                run_dir = out / method / f"seed{seed}"
                if (run_dir / "summary.json").is_file():
                    continue
                # no summary.json: a run that never finished; start it again from scratch
                cmd = [
                    sys.executable,
                    "-m",
                    "kd_kernels.train.cli",
                    method,
                    *runs[method],
                    "--seed",
                    str(seed),
                    "--out",
                    str(run_dir),
                    "--no-progress",
                    "--overwrite",
                ]
                print(f"[compare] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
                t0 = time.time()
                rc = subprocess.run(cmd, env=env, check=False).returncode
                print(
                    f"[compare] {method} seed {seed}: exit {rc} after {time.time() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                write_outputs(out, methods, seeds, header)
                if rc == 130:
                    return 130
    rows = write_outputs(out, methods, seeds, header)
    print(table(rows, methods))
    return 0
