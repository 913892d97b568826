"""Long fuzzing run: the generators of ``tests/_fuzz.py`` with fresh seeds for as long as you allow.

    python benchmarks/fuzz.py --minutes 10                      # every backend usable here
    python benchmarks/fuzz.py --minutes 2 --backends cpu torch --seed 5000

Each random case is a function of (seed, backend): a failure prints the call that reproduces it, e.g.
``logits_case(seed=123, backend='cpu')``, which you can run from ``tests/`` with ``import _fuzz``. Exits 1
when any check failed. The CI suite (``tests/test_fuzz.py``) runs a few hundred fixed seeds of the same
generators.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: Triton's interpreter on a CPU-only machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _fuzz as F

import kd_kernels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="time budget")
    p.add_argument("--seed", type=int, default=10_000, help="first seed (cases use seed, seed+1, ...)")
    p.add_argument("--backends", nargs="*", default=None,
                   help="backends to fuzz (default: every one usable on CPU, plus CUDA's if present)")
    p.add_argument("--max-failures", type=int, default=50, help="stop after this many failed checks")
    args = p.parse_args(argv)
    backends = args.backends or kd_kernels.available_backends()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    deadline = time.time() + 60 * args.minutes
    report = F.Report()
    cases = 0
    seed = args.seed
    while time.time() < deadline and len(report.failures) < args.max_failures:
        for backend in backends:
            slow = backend == "triton" and interpreted
            if slow and seed % 10:  # the interpreter is ~100x slower: one case in ten
                continue
            F.logits_case(seed, backend, report, max_vocab=131 if slow else 1031)
            if seed % 3 == 0:
                F.fused_case(seed, backend, report)
            cases += 1
        if seed % 5 == 0:
            F.logprobs_case(seed, report)
        if seed % 50 == 0:
            F.invalid_cases(seed, report)
        seed += 1
    for failure in report.failures:
        print(failure)
    print(f"fuzz: {cases} cases, {report.checks} checks, {len(report.failures)} failed; seeds "
          f"{args.seed}..{seed - 1}; backends {', '.join(backends)}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
