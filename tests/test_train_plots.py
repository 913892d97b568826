"""loss.png shows the method: its title and each method's own terms, state and evaluation curves
(the data selection, ``plots.plot_data``, on synthetic metrics.jsonl rows; the tiny end-to-end runs
check the declared keys against what each method really logs)."""

from __future__ import annotations

import pytest

from kd_kernels.train.methods import method_plot
from kd_kernels.train.plots import EVAL, LOSS, STATE

COMMON = {"lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 10.0, "step_s": 0.1, "mem_mb": 100.0}
# what each method's rows hold (the keys of its loss parts and state), a stray key among them
LOGGED = {
    "sft": {"ce": 2.0},
    "kd": {"ce": 2.0, "kd": 1.0},
    "seqkd": {"ce": 2.0, "kd": 1.0},
    "minillm": {
        "pg": 0.1,
        "single_step": 0.5,
        "pt": 2.0,
        "pt_ce": 3.0,
        "pt_kd": 1.0,
        "lm": 4.0,
        "ratio": 1.0,
        "clip_frac": 0.1,
        "reward": -2.0,
        "response_len": 5.0,
        "round_s": 1.0,
    },
    "distillm": {
        "ce": 2.0,
        "kd": 1.0,
        "lm": 4.0,
        "threshold": 0.1,
        "source": 2.0,
        "buffer": 0.0,
        "valid_ce_check": 3.0,
    },
    "gkd": {"kd": 1.0, "on_policy": 1.0, "response_len": 4.0},
}
WANT = {
    "sft": {LOSS: ["loss", "ce"]},
    "kd": {LOSS: ["loss", "ce", "kd"]},
    "seqkd": {LOSS: ["loss", "ce", "kd"]},
    "minillm": {LOSS: ["loss", "pg", "single_step", "pt", "lm"], STATE: ["reward", "clip_frac"]},
    "distillm": {
        LOSS: ["loss", "ce", "kd", "lm"],
        EVAL: ["valid_ce_check"],
        STATE: ["source", "threshold"],
    },
    "gkd": {LOSS: ["loss", "kd"], STATE: ["on_policy"]},
}


def _rows(method: str, n: int = 3, **extra) -> list[dict]:
    return [
        {"step": k, "loss": 1.0 / k, **COMMON, **LOGGED[method], **extra} for k in range(1, n + 1)
    ]


def _keys(data) -> dict[str, list[str]]:
    return {panel: [s.key for s, _, _ in curves] for panel, curves in data.panels.items()}


@pytest.mark.parametrize("method", sorted(LOGGED))
def test_plot_shows_each_methods_own_terms(method):
    data = method_plot(_rows(method), method)
    assert data.title == f"kd-train {method}"
    assert _keys(data) == WANT[method]
    assert list(data.panels) == [p for p in (LOSS, EVAL, STATE) if p in WANT[method]]
    s, steps, values = data.panels[LOSS][0]
    assert (s.label, steps, values) == ("total loss", [1, 2, 3], [1.0, 0.5, 1.0 / 3])


def test_minillm_labels_name_its_terms():
    labels = [s.label for s, _, _ in method_plot(_rows("minillm"), "minillm").panels[LOSS]]
    assert labels[1:4] == [
        "policy gradient (PPO-clipped)",
        "single-step reverse KL",
        "pre-training term 0.5 CE + 0.5 KD (--minillm-pt)",
    ]
    assert labels[4] == "pre-training CE (--lm-data)"


def test_distillm_source_is_drawn_as_points_per_step():
    rows = _rows("distillm", n=4)
    for r, src in zip(rows, (0.0, 2.0, 1.0, 2.0)):
        r["source"] = src
    (source, steps, values), _ = method_plot(rows, "distillm").panels[STATE]
    assert source.points and steps == [1, 2, 3, 4] and values == [0.0, 2.0, 1.0, 2.0]


def test_evaluation_curves_only_on_eval_steps():
    rows = _rows("kd", n=4)
    for r in rows[1::2]:  # --eval-every 2
        r |= {"valid_ce": 3.0 - r["step"] / 10, "valid_forward_kl": 1.0, "valid_reverse_kl": 2.0}
    data = method_plot(rows, "kd")
    assert _keys(data)[EVAL] == ["valid_ce", "valid_forward_kl", "valid_reverse_kl"]
    _, steps, values = data.panels[EVAL][0]
    assert steps == [2, 4] and values == pytest.approx([2.8, 2.6])


def test_missing_and_null_values_are_left_out():
    rows = _rows("kd", n=3)
    rows[0]["kd"] = None  # a non-finite value is written as null
    del rows[1]["kd"]
    for r in rows:  # --kd-ratio 0 with no pt term: no kd at all
        r.pop("ce")
    data = method_plot(rows, "kd")
    assert _keys(data) == {LOSS: ["loss", "kd"]}
    assert data.panels[LOSS][1][1] == [3]


def test_unregistered_method_gets_the_common_curves():
    rows = [{"step": 1, "loss": 2.0, "mystery": 1.0, "valid_ce": 3.0}]
    assert _keys(method_plot(rows, "custom")) == {LOSS: ["loss"], EVAL: ["valid_ce"]}


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from kd_kernels.train.plots import draw_losses

    draw_losses(method_plot(_rows("distillm", n=5), "distillm"), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
