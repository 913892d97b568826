"""benchmarks/gpu_check.sh --dry-run: the GPU session check's plan and every Python part of it, on the CPU.

The real run needs a lent GPU machine; this keeps its plan within one device call (stage budgets and estimates),
its test selection collectable, its benchmark and sanitizer case runnable and its output within 8 files.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("preflight", "build", "tests", "bench", "memcheck", "racecheck", "synccheck")


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils timeout",
)
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop(
        "TRITON_INTERPRET", None
    )  # as on a fresh machine: the script's children decide for themselves
    for k in [k for k in env if k.startswith("GC_BUDGET_")]:
        del env[k]  # the default budgets are the ones under test
    p = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    plan = (out / "plan.txt").read_text()
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s", plan, re.M)
    }
    assert set(rows) == {*STAGES, "total"}, plan
    budgets = sum(rows[s][0] for s in STAGES)
    estimates = sum(rows[s][1] for s in STAGES)
    assert rows["total"] == (budgets, estimates)
    assert budgets <= 540 and estimates <= 480, plan
    assert all(rows[s][1] <= rows[s][0] for s in STAGES), plan
    assert (
        'pytest -q -rs -k "not slow"' in plan
        and "--device cuda" in plan
        and "compute-sanitizer" in plan
    )

    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8, files
    assert {
        "plan.txt",
        "summary.txt",
        "bench.csv",
        "bench.md",
        "tests.log",
        "sanitizer.log",
    } <= set(files)
    summary = (out / "summary.txt").read_text()
    for s in STAGES:
        assert f"stage {s}: ok" in summary, summary

    csv_lines = (out / "bench.csv").read_text().splitlines()
    assert csv_lines[0].startswith("op,divergence,") and len(csv_lines) >= 2, csv_lines
    assert re.search(
        r"\d+/\d+ tests collected|\d+ tests collected", (out / "tests.log").read_text()
    )
    assert (out / "sanitizer.log").read_text().count("sanitize case done") == 3
