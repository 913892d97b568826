"""A missing optional library (tqdm, rouge-score, matplotlib) or a failing evaluation never loses a run's
results: summary.json and metrics.jsonl are written, and the missing extra is named."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
# transformers imports tqdm lazily (it depends on it): load what the tiny preset uses before hiding it
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _common import tiny_train_config

from kd_kernels.train import trainer
from kd_kernels.train._optional import available
from kd_kernels.train.cli import format_summary

HIDDEN = (
    "tqdm",
    "tqdm.auto",
    "rouge_score",
    "rouge_score.rouge_scorer",
    "matplotlib",
    "matplotlib.pyplot",
)


def _cfg(tmp_path: Path, response_cache: Path, **kw):
    return tiny_train_config("kd", response_cache, out=str(tmp_path / "run"), steps=2, **kw)


def test_missing_optional_libraries_keep_every_result(
    tmp_path, response_cache, monkeypatch, capsys
):
    for name in HIDDEN:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    assert not available("tqdm") and not available("rouge_score") and not available("matplotlib")
    cfg = _cfg(tmp_path, response_cache, progress=True)
    summary = trainer.train(cfg)
    out = Path(cfg.out)
    err = capsys.readouterr().err
    assert (out / "summary.json").is_file() and (out / "metrics.jsonl").is_file()
    assert not (out / "loss.png").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["evaluated"]
    final = saved["final"]
    for k in ("test_forward_kl", "test_reverse_kl", "test_ce"):
        assert math.isfinite(final[k]), k
    assert "rougeL_student" not in final
    assert (
        "rouge-score" in final["rougeL_skipped"] and "kd_kernels[train]" in final["rougeL_skipped"]
    )
    for dist in ("tqdm", "rouge-score", "matplotlib"):
        assert f"{dist} is not installed" in err, dist
    assert "no loss.png" in err and 'pip install "kd_kernels[train]"' in err
    assert set(saved["phases"]) >= {"load", "teacher_references", "train", "evaluation"}
    table = format_summary(saved)
    assert "Rouge-L not computed" in table and f"outputs in {out.resolve()}" in table
    assert "loss.png" not in table


def test_summary_is_on_disk_before_evaluation(tmp_path, response_cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate", broken)
    cfg = _cfg(tmp_path, response_cache, eval_teacher=False)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.train(cfg)
    saved = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert saved["steps"] == 2 and saved["evaluated"] is False and saved["final"] == {}
    assert saved["phases"]["train"]["tokens"] > 0 and (Path(cfg.out) / "ckpt.pt").is_file()


def test_summary_table_names_the_numbers_and_files(tmp_path, response_cache):
    pytest.importorskip("rouge_score")
    cfg = _cfg(tmp_path, response_cache)
    table = format_summary(trainer.train(cfg))
    for text in (
        "Rouge-L F",
        "forward KL",
        "reverse KL",
        "tokens/s",
        "peak memory (MB)",
        "summary.json",
        "metrics.jsonl",
    ):
        assert text in table, text
    student_rouge = table.split("Rouge-L F")[1].splitlines()[0]
    assert "±" in student_rouge


def test_minillm_command_line_default_steps():
    """`kd-train minillm` (make demo) defaults to 40 steps; an explicit --steps always wins."""
    from kd_kernels.train.config import METHOD_DEFAULTS, parse_args

    cfg, explicit = parse_args(["minillm"], ["kd", "minillm"])
    assert cfg.steps == METHOD_DEFAULTS["minillm"]["steps"] == 40 and "steps" not in explicit
    cfg, explicit = parse_args(["minillm", "--steps", "60"], ["kd", "minillm"])
    assert cfg.steps == 60 and "steps" in explicit
    cfg, _ = parse_args(["kd"], ["kd", "minillm"])
    assert cfg.steps == 60
