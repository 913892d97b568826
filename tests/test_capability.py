"""The capability matrix (issue #27), declared in tests/_capability.py: every public entry point ×
every divergence × the options (temperature ≠ 1, interpolation, logit scale + softcap, labels + CE,
mask, token weights, reduction mean / sum / none with a random upstream gradient, bf16) against the
float64 reference, or the typed ``NotImplementedError`` naming the option where it is not supported
yet; and the README's capability table is the one generated from that declaration.

CI runs a pairwise covering set (every pair of values, divergence included, in some case; each
unsupported value with every divergence); ``-m slow`` runs the full product of each entry point.
The parallel entry points run in one spawn of 2 gloo ranks with uneven vocabulary shards.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import _capability as C
import pytest

LOCAL = [e for e in C.SUPPORT if not e.startswith("parallel.")]
PARALLEL = [e for e in C.SUPPORT if e.startswith("parallel.")]


def _failures(cases) -> list[str]:
    report = C.run_cases(cases)
    assert report.checks >= len(cases), "fewer checks than cases"
    return [str(f) for f in report.failures]


def test_covering_set_covers_every_pair():
    """Every (divergence or option value, divergence or option value) pair an entry point
    supports is in one of its CI cases; every unsupported value is tried with every divergence."""
    for entry in C.SUPPORT:
        cases = C.covering_cases(entry)
        supported = [c for c in cases if c.unsupported() is None]
        factors = C._factors(entry, supported=True)
        seen = set().union(
            *(C._pairs({n: getattr(c, n) for n in factors}, list(factors)) for c in supported)
        )
        for (a, xs), (b, ys) in itertools.combinations(factors.items(), 2):
            missing = {(x, y) for x in xs for y in ys} - {
                (p[1], p[3]) for p in seen if (p[0], p[2]) == (a, b)
            }
            assert not missing, f"{entry}: ({a}, {b}) = {sorted(missing, key=repr)[:3]} uncovered"
        refused = {(c.divergence, c.unsupported()) for c in cases if c.unsupported()}
        gaps = C.SUPPORT[entry][1]
        assert refused == set(itertools.product(C.DIVERGENCES, gaps)), entry
        assert len(cases) < 80, f"{entry}: {len(cases)} cases is not a small covering set"


@pytest.mark.parametrize("entry", LOCAL)
def test_capability_ci(entry):
    bad = _failures(C.covering_cases(entry))
    assert not bad, f"{len(bad)} failures:\n" + "\n".join(bad[:20])


def test_capability_ci_parallel():
    """Both vocabulary-parallel entry points in one spawn of 2 gloo ranks (split 15 / 22)."""
    bad = _failures([c for e in PARALLEL for c in C.covering_cases(e)])
    assert not bad, f"{len(bad)} failures:\n" + "\n".join(bad[:20])


@pytest.mark.slow
@pytest.mark.parametrize("entry", LOCAL + ["parallel"])
def test_capability_full_product(entry):
    entries = PARALLEL if entry == "parallel" else [entry]
    bad = _failures([c for e in entries for c in C.full_cases(e)])
    assert not bad, f"{len(bad)} failures:\n" + "\n".join(bad[:20])


def test_readme_table_is_generated():
    """README.md's capability table is ``python tests/_capability.py --markdown`` (run it with
    ``--write`` after changing tests/_capability.py's SUPPORT)."""
    readme = (C.ROOT / "README.md").read_text()
    assert C.readme_table(readme) == C.markdown()
    out = subprocess.run(
        [sys.executable, str(C.ROOT / "tests" / "_capability.py"), "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=C.ROOT,
    ).stdout
    assert out == C.markdown()
