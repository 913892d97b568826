"""The pre-training CE term (``--minillm-lm-coef`` / ``--distillm-lm-coef`` on ``--lm-data``): flag
validation, the packing of the text into blocks, and a step's loss = the method's loss + coef × CE
on this step's blocks (tiny preset, against float64 logits)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kd_kernels.train import config as C
from kd_kernels.train.data import DEFAULT_PROMPTS, lm_blocks


def _text(n: int = 30) -> str:
    """Plain text from the shipped prompts, one document each (blank lines between them)."""
    rows = [json.loads(x) for x in DEFAULT_PROMPTS.read_text().splitlines()[:n]]
    return "\n\n".join(r["prompt"] for r in rows) + "\n"


@pytest.fixture
def lm_file(tmp_path) -> Path:
    path = tmp_path / "pretrain.txt"
    path.write_text(_text())
    return path


# ------------------------------------------------------------------------------------ validation


def _check(method: str, tmp_path, **kw):
    C.validate(C.TrainConfig(method=method, preset="tiny", **kw))


@pytest.mark.parametrize(
    "method, coef", [("minillm", "minillm_lm_coef"), ("distillm", "distillm_lm_coef")]
)
def test_lm_coef_needs_lm_data(method, coef, tmp_path, lm_file):
    flag = "--" + coef.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} 1.0 needs --lm-data PATH"):
        _check(method, tmp_path, **{coef: 1.0})
    with pytest.raises(ValueError, match=r"--lm-data '.*nope.txt' does not exist.*" + flag):
        _check(method, tmp_path, **{coef: 1.0, "lm_data": str(tmp_path / "nope.txt")})
    with pytest.raises(ValueError, match="is a directory"):
        _check(method, tmp_path, **{coef: 1.0, "lm_data": str(tmp_path)})
    _check(method, tmp_path, **{coef: 1.0, "lm_data": str(lm_file)})
    _check(method, tmp_path, **{coef: 0.0})  # off: no file needed


@pytest.mark.parametrize(
    "content, match",
    [(b"", "is empty"), (b" \n\n\t\n", "is empty"), (b"caf\xe9 au lait\n", "not UTF-8 text")],
)
def test_lm_data_must_hold_text(content, match, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"--lm-data .*{match}"):
        _check("distillm", tmp_path, distillm_lm_coef=0.5, lm_data=str(path))


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_lm_coef_domain(value, tmp_path):
    with pytest.raises(ValueError, match="--minillm-lm-coef=.* must be a finite number >= 0"):
        _check("minillm", tmp_path, minillm_lm_coef=value)


def test_cli_reports_a_missing_lm_data_in_one_line(capsys):
    from kd_kernels.train import cli

    assert cli.main(["distillm", "--preset", "tiny", "--distillm-lm-coef", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--distillm-lm-coef 1.0 needs --lm-data PATH" in err


def test_lm_flags_belong_to_minillm_and_distillm():
    assert "lm_data" in C.method_fields("minillm") and "lm_data" in C.method_fields("distillm")
    assert "lm_data" not in C.method_fields("kd") and "minillm_lm_coef" not in C.method_fields(
        "gkd"
    )


# --------------------------------------------------------------------------------------- packing


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": [ord(c) for c in text]}


def test_lm_blocks_pack_documents_with_eos():
    blocks = lm_blocks(CharTokenizer(), "ab\n\n\n\ncde\n\n  \n\nf", 3, eos_id=0)
    stream = [97, 98, 0, 99, 100, 101, 0, 102, 0]
    assert [b.input_ids for b in blocks] == [stream[0:3], stream[3:6], stream[6:9]]
    assert all(b.labels == b.input_ids for b in blocks)
    # a last block of one token has no target: dropped; a shorter one with a target is kept
    assert [b.input_ids for b in lm_blocks(CharTokenizer(), "abc", 3, 0)] == [[97, 98, 99]]
    assert [b.input_ids for b in lm_blocks(CharTokenizer(), "abcd", 3, 0)] == [
        [97, 98, 99],
        [100, 0],
    ]
    with pytest.raises(ValueError, match="block_len=1 must be >= 2"):
        lm_blocks(CharTokenizer(), "abc", 1, 0)


# ----------------------------------------------------------------------------------- tiny preset

pytest.importorskip("transformers")


def _tiny(tmp_path, response_cache, method, lm_file, **kw):
    from _common import tiny_train_config

    kw = {
        "out": str(tmp_path / method),
        f"{method}_lm_coef": 0.7,
        "lm_data": str(lm_file),
        "max_prompt_tokens": 12,
        "max_new_tokens": 6,
        "minillm_rollouts": 2,
        "minillm_ppo_epochs": 1,
        **kw,
    }
    return tiny_train_config(method, response_cache, **kw)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["distillm", "minillm"])
def test_step_loss_is_method_loss_plus_coef_times_ce(method, tmp_path, response_cache, lm_file):
    from kd_kernels import reference
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run

    cfg = _tiny(tmp_path, response_cache, method, lm_file)
    run = Run(cfg, 0, 1, torch.device("cpu"))
    m = get_method(method)
    run.train_examples = run.examples("train", m.train_responses(run))
    student, teacher = run.models.student.eval(), run.models.teacher
    batch = m.step_batch(run, 1)
    # the step's blocks, built by hand: the packed text cut at prompt + response + EOS = 19 tokens
    stream: list[int] = []
    for doc in _text().split("\n\n"):
        stream += run.tokenizer(doc.strip(), add_special_tokens=False)["input_ids"] + [run.eos_id]
    blocks = [stream[i : i + 19] for i in range(0, len(stream), 19)]
    from kd_kernels.train.data import batch_indices

    idx = batch_indices(len(blocks), 1, cfg.batch_size, cfg.seed)
    assert batch["lm_input_ids"].tolist() == [blocks[i] for i in idx]
    assert batch["lm_labels"].tolist() == batch["lm_input_ids"].tolist()  # every token a target

    loss, parts = m.step_loss(student, teacher, batch, run)
    method_loss, _ = m.loss(student, teacher, batch, run)
    with torch.no_grad():
        logits = student(
            input_ids=batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"]
        ).logits[:, :-1]
    targets = batch["lm_labels"][:, 1:]  # -100 on the padding of a shorter last block
    ce = reference.cross_entropy_per_token(logits.double(), targets).sum() / (targets != -100).sum()
    assert parts["lm"] == pytest.approx(float(ce), rel=1e-5)
    assert loss.item() == pytest.approx(method_loss.item() + 0.7 * float(ce), rel=1e-5)
    loss.backward()  # the term trains the student
    assert student.get_input_embeddings().weight.grad is not None


@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_distillm_run_logs_and_plots_the_lm_term(tmp_path, response_cache, lm_file):
    from kd_kernels.train.methods import method_plot
    from kd_kernels.train.plots import LOSS
    from kd_kernels.train.trainer import train

    cfg = _tiny(tmp_path, response_cache, "distillm", lm_file, steps=2, skip_eval=True)
    train(cfg)
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["lm"] > 0 and r["loss"] == pytest.approx(r["kd"] + 0.7 * r["lm"], rel=1e-4)
    assert "lm" in [s.key for s, _, _ in method_plot(rows, "distillm").panels[LOSS]]
