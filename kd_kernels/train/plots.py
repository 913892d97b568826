"""``loss.png``: each method's own loss terms, its per-step state and the evaluation metrics over steps.

What is drawn comes from declarations, not per-method plot code: every method class lists the
``metrics.jsonl`` keys it logs as :class:`Series` (``Method.terms``; ``methods.method_plot`` adds the
common curves), and :func:`plot_data` picks the ones present in a run's rows. Panels: the loss terms (the total loss first), the evaluation metrics
(``--eval-every``, and e.g. DistiLLM's schedule checks) and the method's per-step state (DistiLLM's
batch source, GKD's on-policy draw, MiniLLM's round reward); a panel without data is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOSS, EVAL, STATE = "loss", "eval", "state"
PANEL_TITLES = {LOSS: "loss terms", EVAL: "evaluation", STATE: "per-step state"}


@dataclass(frozen=True)
class Series:
    """One curve of ``loss.png``: the ``metrics.jsonl`` key, its legend label, the panel it goes in, and
    whether it is drawn as points only (a categorical value such as DistiLLM's ``source``)."""

    key: str
    label: str
    panel: str = LOSS
    points: bool = False


TOTAL = Series("loss", "total loss")
LM_TERM = Series("lm", "pre-training CE (--lm-data)")
EVAL_SERIES = (
    Series("valid_ce", "valid CE (--eval-every)", EVAL),
    Series("valid_forward_kl", "valid forward KL", EVAL),
    Series("valid_reverse_kl", "valid reverse KL", EVAL),
)


@dataclass
class PlotData:
    """What ``loss.png`` shows: its title and, per panel (in drawing order), the series with points."""

    title: str
    panels: dict[str, list[tuple[Series, list[int], list[float]]]] = field(default_factory=dict)


def plot_data(rows: list[dict], method: str, series: tuple[Series, ...]) -> PlotData:
    """The ``series`` of a run of ``method`` that ``rows`` (metrics.jsonl rows) hold numbers for (a
    null, i.e. a non-finite value, is skipped), grouped into panels in the order loss, evaluation,
    state."""
    data = PlotData(f"kd-train {method}")
    for panel in PANEL_TITLES:
        for s in series:
            if s.panel != panel:
                continue
            pts = [
                (r["step"], r[s.key])
                for r in rows
                if isinstance(r.get(s.key), (int, float)) and not isinstance(r[s.key], bool)
            ]
            if pts:
                steps, values = zip(*pts)
                data.panels.setdefault(panel, []).append((s, list(steps), list(values)))
    return data


def draw_losses(data: PlotData, png_path: Path) -> None:
    """``loss.png`` showing ``data`` (:func:`plot_data`). Needs matplotlib (ImportError without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(data.panels.items()) or [(LOSS, [])]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.2 + 2.3 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (panel, curves) in zip(axes[:, 0], panels):
        for s, steps, values in curves:
            ax.plot(
                steps,
                values,
                "o" if s.points else ("o-" if panel == EVAL else "-"),
                label=s.label,
                markersize=3,
            )
        ax.set_title(PANEL_TITLES[panel], fontsize=9)
        if curves:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(data.title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
