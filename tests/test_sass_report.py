"""benchmarks/sass_report.py on one small case: the JSON schema and values a real SASS count can have.

Skips where nvcc / nvdisasm / cuobjdump (or triton's NVIDIA backend) are missing; needs no GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "sass_report.py"
KEYS = {
    "kernel",
    "divergence",
    "path",
    "dtype",
    "registers",
    "spills",
    "instr_per_elem",
    "mufu_per_elem",
}

sys.path.insert(0, str(REPO / "benchmarks"))
import sass_report  # noqa: E402


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--loops", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _check(rows, path):
    assert rows, "no rows"
    for r in rows:
        assert KEYS <= set(r), r
        assert r["path"] == path and r["dtype"] == "bf16" and r["divergence"] == "forward_kl"
        assert 16 <= r["registers"] <= 255 and r["spills"] >= 0
        # forward_kl needs at least the exponentials of q and p in the gradient pass and of s, t in the
        # statistics pass: >= 2 MUFU an element, and more than one instruction per MUFU.
        assert 2 <= r["mufu_per_elem"] < 20, r
        assert r["mufu_per_elem"] < r["instr_per_elem"] < 500, r
        # a pass over the row per loop: the statistics pass and the gradient pass
        assert len(r["loops"]) == 2, r["loops"]
        for lp in r["loops"]:
            assert lp["elems_per_trip"] >= 1 and float(lp["elems_per_trip"]).is_integer(), lp
        assert r["issue_ms"] > 0 and r["hbm_ms"] > 0


@pytest.mark.skipif(
    any(sass_report.find_tool(n) is None for n in ("nvcc", "nvdisasm", "cuobjdump")),
    reason="nvcc / nvdisasm / cuobjdump not found",
)
def test_sass_report_cuda_one_kernel():
    _check(
        _run(
            "--cuda-only", "--divergences", "forward_kl", "--dtypes", "bf16", "--paths", "resident"
        ),
        "resident",
    )


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or any(sass_report.find_tool(n) is None for n in ("nvdisasm", "cuobjdump")),
    reason="triton or nvdisasm / cuobjdump not found",
)
def test_sass_report_triton_one_kernel():
    _check(_run("--triton-only", "--divergences", "forward_kl", "--dtypes", "bf16"), "triton")


def test_loop_finder_on_a_hand_written_cfg():
    """The control-flow analysis on a small SASS listing: one loop with an unaligned (element) and a vector
    load path; the hot path takes the vector load and the MUFU block."""
    sass = """
.text.k:
        /*0000*/                   MOV R1, R2 ;
.L_x_1:
        /*0010*/               @P0 BRA `(.L_x_2) ;
        /*0020*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.U16 R5, desc[UR4][R2.64+0x2] ;
        /*0040*/                   PRMT R4, R4, 0x5410, R5 ;
        /*0050*/                   BRA `(.L_x_3) ;
.L_x_2:
        /*0060*/                   LDG.E R4, desc[UR4][R2.64] ;
.L_x_3:
        /*0070*/                   MUFU.EX2 R6, R4 ;
        /*0080*/                   FADD R7, R7, R6 ;
        /*0090*/              @!P1 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
"""
    ins, labels = sass_report.parse_sass(sass)["k"]
    loops = sass_report.vocab_loops(ins, labels, lambda *a: True)
    assert len(loops) == 1
    lp = loops[0]
    assert (lp.instrs, lp.mufu) == (5, 1)  # BRA, LDG.E, MUFU, FADD, BRA
    assert sass_report.elems_per_trip(lp.ops, 2, 2) == 1.0
