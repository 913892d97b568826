"""The trainer's optional libraries: a missing one costs a feature, never a run's results.

- ``tqdm``: progress bars (without it, no bars);
- ``rouge-score``: the Rouge-L metrics (without it, the token KLs and CE are still computed and saved);
- ``matplotlib``: ``loss.png`` (without it, ``metrics.jsonl`` and ``summary.json`` are still written).

All three are in the ``train`` extra: ``pip install "kd_kernels[train]"``.
"""

from __future__ import annotations

import importlib.util
import sys

EXTRA_HINT = 'pip install "kd_kernels[train]"'
OPTIONAL = {
    "tqdm": ("tqdm", "no progress bars"),
    "rouge_score": ("rouge-score", "no Rouge-L metrics"),
    "matplotlib": ("matplotlib", "no loss.png plot"),
}


def available(module: str) -> bool:
    """Whether ``module`` can be imported (``sys.modules[module] = None`` counts as missing)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_message(module: str) -> str:
    dist, what = OPTIONAL[module]
    return f"{dist} is not installed: {what} ({EXTRA_HINT}, or pip install {dist})"


def warn_missing(modules: tuple[str, ...] = tuple(OPTIONAL)) -> list[str]:
    """Prints one line per missing optional library; returns the missing module names."""
    gone = [m for m in modules if not available(m)]
    for m in gone:
        print(f"[kd-train] note: {missing_message(m)}", file=sys.stderr)
    return gone


class _NoBar:
    """What ``progress_bar`` returns without tqdm: iterates, and ignores the bar calls."""

    def __init__(self, iterable=None, **_: object):
        self._it = iterable

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: object, **kwargs: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, or a silent stand-in when tqdm is not installed."""
    if kwargs.get("disable") or not available("tqdm"):
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
