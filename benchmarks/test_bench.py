"""pytest-benchmark entry points for the core ops: ``pytest benchmarks --benchmark-only``.

Each benchmark first checks its provider's result against the float64 reference (a wrong provider fails,
it is not timed), then hands the same call to the ``benchmark`` fixture. The full suite with tables, memory
and plots is ``python benchmarks/run.py``. Outside ``--benchmark-only`` runs (or ``KD_BENCH=1``) these skip,
so a plain ``pytest`` from the repository root never spends minutes here; ``testpaths = ["tests"]`` keeps the
default run out of this folder anyway.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from _bench_common import Case, check, make_inputs, reference
from _bench_providers import Provider, all_providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, V, D_s, D_t, dtype): small enough on CPU for seconds per benchmark, realistic on GPU.
SHAPES = {
    "cpu": {"logits": (128, 32000, 0, 0, "float32"), "fused": (128, 8000, 256, 512, "float32")},
    "cuda": {
        "logits": (4096, 128256, 0, 0, "bfloat16"),
        "fused": (4096, 128256, 2048, 4096, "bfloat16"),
    },
}
DIVS = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    if not (request.config.getoption("benchmark_only", False) or os.environ.get("KD_BENCH") == "1"):
        pytest.skip("benchmarks run with `pytest benchmarks --benchmark-only` (or KD_BENCH=1)")


def _case(op: str, divergence: str) -> Case:
    n, v, d_s, d_t, dtype = SHAPES[DEVICE]["fused" if op.startswith("fl_") else "logits"]
    d_t = d_t if op.startswith("fl_kd") else 0
    return Case(op, divergence, n, v, d_s, d_t, dtype, DEVICE, "")


def _providers() -> list[Provider]:
    return [p for p in all_providers() if p.name != "torch_compile"] + [Provider("torch_compile")]


def _ids(p: Provider) -> str:
    return p.label


def _bench(benchmark, provider: Provider, case: Case) -> None:
    if not provider.applies(case):
        pytest.skip(f"{provider.label} has no {case.op} row")
    reason = provider.unavailable(case)
    if reason:
        pytest.skip(f"{provider.label}: {reason}")
    inputs = make_inputs(case)
    fn = provider.build(case, inputs)
    ok, detail = check(case, fn(), reference(case, inputs))  # also the warm-up / compilation call
    assert ok, f"{provider.label} disagrees with kd_kernels.reference on {case.key}: {detail}"
    if DEVICE == "cuda":

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)
    benchmark.extra_info.update(case=case.key, provider=provider.label)


@pytest.mark.parametrize("provider", _providers(), ids=_ids)
@pytest.mark.parametrize("divergence", DIVS)
def test_kd_logits(benchmark, provider: Provider, divergence: str) -> None:
    """Logits-level loss + gradient."""
    if provider.name == "torch_compile" and divergence != "forward_kl":
        pytest.skip(
            "torch_compile only for forward_kl here (each graph compiles for tens of seconds on CPU)"
        )
    _bench(benchmark, provider, _case("kd_logits", divergence))


@pytest.mark.parametrize("provider", _providers(), ids=_ids)
@pytest.mark.parametrize("divergence", ("forward_kl", "jsd"))
def test_fl_kd(benchmark, provider: Provider, divergence: str) -> None:
    """Fused-linear KD: loss + gradients of the student hidden states and lm_head weight."""
    if provider.name == "torch_compile":
        pytest.skip("torch_compile of the fused-linear graph: see benchmarks/run.py")
    _bench(benchmark, provider, _case("fl_kd", divergence))


@pytest.mark.parametrize("provider", _providers(), ids=_ids)
def test_fl_logprobs_fwd(benchmark, provider: Provider) -> None:
    """Token log-probs from hidden states, forward only (rollout scoring)."""
    if provider.name == "torch_compile":
        pytest.skip("torch_compile of the log-prob graph: see benchmarks/run.py")
    _bench(benchmark, provider, _case("fl_logprobs_fwd", ""))
