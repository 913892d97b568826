"""Long fuzzing run: the generators of ``tests/_fuzz*.py`` with fresh seeds, as long as you allow.

    python benchmarks/fuzz.py --minutes 10                      # every family, every usable backend
    python benchmarks/fuzz.py --minutes 2 --backends cpu torch --seed 5000
    python benchmarks/fuzz.py --family sparse fused_sparse --cases 2000
    python benchmarks/fuzz.py --family parallel --cases 200     # one spawn of 2 gloo ranks
    python benchmarks/fuzz.py --family hf --cases 100

Families: logits, fused, logprobs, invalid (the dense functions); sparse (sparse_kd / SparseKDLoss
and non-distribution rows), fused_sparse, topk, sparse_invalid; parallel (kd_kernels.parallel on
2 gloo ranks: kd_loss, fused_linear_kd, hostile rows, invalid calls); hf (kd_kernels.hf on tiny
random models: distill_loss, trl_chunked_divergence_loss, head_inputs, invalid calls). With
``--minutes`` the families take turns seed by seed (the slower ones on every few seeds); with
``--cases N`` each family runs N seeds from ``--seed`` (per backend where it has backends).

Each random case is a function of (seed, backend): a failure prints the call that reproduces it,
e.g. ``logits_case(seed=123, backend='cpu')``, which you can run from ``tests/`` with
``import _fuzz`` (``_fuzz_sparse``, ``_fuzz_parallel``, ``_fuzz_hf`` for the other families).
Exits 1 when any check failed. The CI suite (``tests/test_fuzz.py``) runs a few hundred fixed seeds
of the same generators.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: Triton's interpreter on a CPU machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _fuzz as F
import _fuzz_parallel as FP
import _fuzz_sparse as FS

import kd_kernels

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PARALLEL_BATCH = 25  # seeds per spawn of the gloo ranks (process start-up dominates)


def _per_backend(fn, sparse: bool = False, **kw):
    """A family run once per backend; Triton's interpreter (~100x slower) on one seed in ten."""

    def run(seed: int, backends: list[str], report: F.Report) -> int:
        done = 0
        for backend in backends:
            slow = backend == "triton" and INTERPRETED
            if (sparse and backend == "cuda") or (slow and seed % 10):
                continue
            fn(seed, backend, report, **({"max_vocab": 131} if slow and kw else {}))
            done += 1
        return done

    return run


def _plain(*fns):
    def run(seed: int, backends: list[str], report: F.Report) -> int:
        for fn in fns:
            fn(seed, report)
        return 1

    return run


def _sparse(seed: int, backend: str, report: F.Report) -> None:
    FS.sparse_case(seed, backend, report)
    FS.sparse_hostile_case(seed, backend, report)


def _hf(seed: int, report: F.Report) -> None:
    import _fuzz_hf as FH

    FH.distill_case(seed, report)
    FH.trl_case(seed, report)
    if seed % 5 == 0:
        FH.head_case(seed, report)
    if seed % 50 == 0:
        FH.invalid_cases(seed, report)


# name -> (runner, run on every n-th seed under --minutes)
FAMILIES = {
    "logits": (_per_backend(F.logits_case, max_vocab=True), 1),
    "fused": (_per_backend(F.fused_case), 3),
    "logprobs": (_plain(F.logprobs_case), 5),
    "invalid": (_plain(F.invalid_cases), 50),
    "sparse": (_per_backend(_sparse, sparse=True), 1),
    "fused_sparse": (_per_backend(FS.fused_sparse_case, sparse=True), 3),
    "topk": (_plain(FS.topk_case), 5),
    "sparse_invalid": (_plain(FS.invalid_sparse_cases), 50),
    "hf": (_plain(_hf), 5),
    "parallel": (None, PARALLEL_BATCH),  # a batch of seeds per spawn, below
}


def _parallel(seeds: list[int], report: F.Report) -> int:
    report.merge(FP.run(seeds, world=2, timeout_s=60 + 20 * len(seeds)))
    return len(seeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="time budget (without --cases)")
    p.add_argument(
        "--cases",
        type=int,
        default=None,
        help="run this many seeds per family instead of a time budget",
    )
    p.add_argument(
        "--family",
        nargs="*",
        default=None,
        choices=sorted(FAMILIES),
        help="families to fuzz (default: all)",
    )
    p.add_argument(
        "--seed", type=int, default=10_000, help="first seed (cases use seed, seed+1, ...)"
    )
    p.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="backends (default: every one usable on CPU, and CUDA's if present)",
    )
    p.add_argument(
        "--max-failures", type=int, default=50, help="stop after this many failed checks"
    )
    args = p.parse_args(argv)
    if args.cases is not None and args.cases < 1:
        p.error(f"--cases {args.cases}: pass a positive number of seeds")
    backends = args.backends or kd_kernels.available_backends()
    families = args.family or list(FAMILIES)
    report = F.Report()
    cases = dict.fromkeys(families, 0)
    deadline = time.time() + 60 * args.minutes
    seed = args.seed
    while len(report.failures) < args.max_failures:
        if args.cases is not None and seed >= args.seed + args.cases:
            break
        if args.cases is None and time.time() >= deadline:
            break
        for name in families:
            runner, every = FAMILIES[name]
            if name == "parallel":
                if (seed - args.seed) % PARALLEL_BATCH == 0:
                    n = (
                        PARALLEL_BATCH
                        if args.cases is None
                        else min(PARALLEL_BATCH, args.seed + args.cases - seed)
                    )
                    cases[name] += _parallel(list(range(seed, seed + n)), report)
            elif args.cases is not None or seed % every == 0:
                cases[name] += runner(seed, backends, report)
        seed += 1
    for failure in report.failures:
        print(failure)
    counts = ", ".join(f"{name} {n}" for name, n in cases.items())
    print(
        f"fuzz: {sum(cases.values())} cases ({counts}), {report.checks} checks, "
        f"{len(report.failures)} failed; seeds {args.seed}..{seed - 1}; "
        f"backends {', '.join(backends)}"
    )
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
