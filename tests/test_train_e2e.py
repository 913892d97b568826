"""End-to-end runs of kd-train on the tiny preset (every method, resume, Ctrl-C, torchrun) and a loading
test of the smollm2 preset (marker ``smollm2``)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _common import tiny_train_config

from kd_kernels.train.config import TrainConfig
from kd_kernels.train.methods import method_plot
from kd_kernels.train.trainer import Interrupted, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp: Path, response_cache: Path, method: str, **kw) -> TrainConfig:
    kw = {"out": str(tmp / method), "batch_size": 4, "ckpt_every": 2, **kw}
    return tiny_train_config(method, response_cache, **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", ["sft", "kd", "seqkd"])
def test_tiny_method_runs_and_writes_outputs(tmp_path, response_cache, method):
    cfg = tiny_cfg(tmp_path, response_cache, method, steps=6, eval_seeds="1,2", eval_every=3)
    summary = train(cfg)
    out = Path(cfg.out)
    for name in ("metrics.jsonl", "summary.json", "loss.png", "ckpt.pt"):
        assert (out / name).is_file(), name
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert (
            math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mem_mb"] > 0 and r["lr"] > 0
        )
    # loss.png draws the terms the method declares, as logged, and the evaluation at step 3
    panels = {p: [(s.key, x) for s, x, _ in c] for p, c in method_plot(rows, method).panels.items()}
    terms = ["loss", "ce"] + ([] if method == "sft" else ["kd"])
    assert panels == {
        "loss": [(k, list(range(1, 7))) for k in terms],
        "eval": [(k, [3]) for k in ("valid_ce", "valid_forward_kl", "valid_reverse_kl")],
    }
    # a fixed tiny batch stream at a high lr: the training loss must fall
    assert rows[-1]["loss"] < rows[0]["loss"]
    if method != "sft":
        assert 0 <= rows[0]["kd"] and rows[0]["loss"] == pytest.approx(
            0.5 * rows[0]["ce"] + 0.5 * rows[0]["kd"], rel=1e-4
        )
    saved = json.loads((out / "summary.json").read_text())
    assert saved["method"] == method and saved["steps"] == 6
    final = saved["final"]
    for k in (
        "test_forward_kl",
        "test_reverse_kl",
        "test_ce",
        "rougeL_student",
        "rougeL_student_std",
        "rougeL_teacher",
    ):
        assert isinstance(final[k], float) and math.isfinite(final[k]), k
    assert final["test_forward_kl"] >= 0 and final["test_reverse_kl"] >= 0
    assert len(final["rougeL_student_per_seed"]) == 2
    assert summary["final"] == final
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 6 and ckpt["config"]["method"] == method


def test_seqkd_trains_on_teacher_samples_not_references(tmp_path, response_cache):
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run

    cfg = tiny_cfg(tmp_path, response_cache, "seqkd")
    run = Run(cfg, 0, 1, torch.device("cpu"))
    refs = run.references("train")
    samples = get_method("seqkd").train_responses(run)
    assert refs.keys() == samples.keys()
    assert refs != samples  # sampled at temperature 1 from a random model: not the greedy answers
    assert get_method("kd").train_responses(run) == refs
    # cached: a second Run reads the same files
    again = Run(cfg, 0, 1, torch.device("cpu"))
    assert get_method("seqkd").train_responses(again) == samples


def test_resume_continues_with_no_lost_steps(tmp_path, response_cache):
    full = train(tiny_cfg(tmp_path / "a", response_cache, "kd", steps=6, skip_eval=True))
    assert full["steps"] == 6
    train(tiny_cfg(tmp_path / "b", response_cache, "kd", steps=3, skip_eval=True))
    resumed_cfg = tiny_cfg(
        tmp_path / "b", response_cache, "kd", steps=6, skip_eval=True, resume=True
    )
    train(resumed_cfg, explicit={"steps"})
    a = _rows(tmp_path / "a" / "kd" / "metrics.jsonl")
    b = _rows(tmp_path / "b" / "kd" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    # same batches, same optimizer state: the resumed run retraces the uninterrupted one
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6), ra["step"]


def test_ctrl_c_checkpoints_then_exits(tmp_path, response_cache, monkeypatch):
    import kd_kernels.train.trainer as T

    cfg = tiny_cfg(tmp_path, response_cache, "sft", steps=50, ckpt_every=1000, skip_eval=True)
    real_lr_at = T.lr_at

    def lr_at(step, c):  # deliver SIGINT to ourselves during step 2, as a user's Ctrl-C would
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return real_lr_at(step, c)

    monkeypatch.setattr(T, "lr_at", lr_at)
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / CI
    with pytest.raises(Interrupted):
        train(cfg)
    ckpt = torch.load(Path(cfg.out) / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3  # the step in flight finishes, then the checkpoint is written
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is restored


def test_torchrun_two_cpu_processes(tmp_path, response_cache):
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kd_kernels.train.cli",
        "kd",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--max-prompts",
        "24",
        "--max-new-tokens",
        "6",
        "--skip-eval",
        "--device",
        "cpu",
        "--cache-dir",
        str(response_cache),
        "--out",
        str(out),
        "--no-progress",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]

    # one process with the double batch takes the same steps (DDP averages the two halves' gradients;
    # the per-rank token means differ from the global mean, so compare loosely)
    single = train(
        tiny_cfg(
            tmp_path,
            response_cache,
            "kd",
            steps=3,
            batch_size=4,
            eval_seeds="1",
            out=str(tmp_path / "single"),
            lr=1e-4,
            warmup_steps=5,
            min_lr=1e-5,
            skip_eval=True,
            gen_batch_size=16,
        )
    )
    assert single["steps"] == 3
    srows = _rows(tmp_path / "single" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(srows[0]["loss"], rel=0.05)


@pytest.mark.smollm2
def test_smollm2_preset_loads_and_derives_student():
    pytest.importorskip("gguf")
    from kd_kernels.hf import lm_head
    from kd_kernels.train.data import prompt_token_ids
    from kd_kernels.train.models import load_models

    cfg = TrainConfig(preset="smollm2")
    m = load_models(cfg, torch.device("cpu"))
    t, s = m.teacher, m.student
    assert t.config.num_hidden_layers == 30 and t.config.hidden_size == 576
    assert t.config.vocab_size == 49152 and len(m.tokenizer) == 49152
    assert s.config.num_hidden_layers == 10 and not t.training and s.training
    assert not any(p.requires_grad for p in t.parameters())
    assert all(p.requires_grad for p in s.parameters())
    w = lm_head(t).weight
    assert w.shape == (49152, 576) and w is t.model.embed_tokens.weight
    ids = prompt_token_ids(m.tokenizer, "What is the capital of France?", 128)
    assert m.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = t.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=m.tokenizer.pad_token_id,
        )
    assert "Paris" in m.tokenizer.decode(out[0, len(ids) :])
