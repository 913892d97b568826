"""kd-train on Hugging Face models whose logits are transformed after the lm_head (issue 30, item 1):
a tiny Gemma 2 pair (``final_logit_softcapping``) and a Cohere pair (``logit_scale``) given with
``--teacher PATH --student PATH`` train on the objective their own ``.logits`` define: the first step's
loss equals ``kd_kernels.kd_loss`` (and the CE) on the models' logits, with the trainer's mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

import kd_kernels
from kd_kernels import hf
from kd_kernels.train import cli

RUN_FLAGS = [
    "--max-prompts",
    "12",
    "--max-new-tokens",
    "5",
    "--gen-batch-size",
    "32",
    "--batch-size",
    "3",
    "--steps",
    "2",
    "--skip-eval",
    "--no-progress",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "1",
    "--min-lr",
    "3e-3",
    "--ckpt-every",
    "100",
    "--device",
    "cpu",
]


def _tiny_model(family: str, vocab: int, tok, *, layers: int, seed: int):
    kw = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "initializer_range": 0.2,
    }  # logits of a few units: the softcap and the scale matter
    if family == "gemma2":
        cfg = transformers.Gemma2Config(
            **kw, head_dim=8, final_logit_softcapping=2.0, tie_word_embeddings=True
        )
    else:
        cfg = transformers.CohereConfig(**kw, logit_scale=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float()


def _pair(tmp_path: Path, family: str) -> tuple[str, str]:
    """A 2-layer teacher and a 1-layer student of ``family``, saved with the tiny byte tokenizer."""
    from kd_kernels.train.models import tiny_tokenizer

    tok = tiny_tokenizer()
    paths = []
    for name, layers, seed in (("teacher", 2, 0), ("student", 1, 1)):
        path = tmp_path / f"{family}-{name}"
        _tiny_model(family, len(tok), tok, layers=layers, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def _first_batch(out: Path):
    """The run of ``out`` (its saved config) rebuilt: the models as loaded (before any step), the
    first step's batch, and the targets / mask the trainer builds from it."""
    from kd_kernels.train.config import TrainConfig
    from kd_kernels.train.data import shift_targets
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run

    saved = json.loads((out / "summary.json").read_text())["config"]
    cfg = TrainConfig(**saved)
    run = Run(cfg, 0, 1, torch.device("cpu"))
    run.train_examples = run.examples("train", get_method(cfg.method).train_responses(run))
    batch = run.offline_batch(0)
    targets, mask = shift_targets(batch["labels"])
    return cfg, run.models, batch, targets, mask


def _first_row(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _kd_on_logits(s: torch.Tensor, t: torch.Tensor, mask, cfg) -> torch.Tensor:
    return kd_kernels.kd_loss(
        s[:, :-1], t[:, :-1], divergence="forward_kl", temperature=cfg.temperature, mask=mask
    )


def _untransformed(model, batch) -> torch.Tensor:
    x = hf.head_inputs(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return torch.nn.functional.linear(x.hidden, x.weight, x.bias)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_kd_first_step_equals_kd_loss_on_the_models_logits(tmp_path, response_cache, family):
    teacher, student = _pair(tmp_path, family)
    out = tmp_path / "run"
    rc = cli.main(
        [
            "kd",
            "--teacher",
            teacher,
            "--student",
            student,
            "--kd-ratio",
            "0.7",
            "--temperature",
            "1.5",
            "--cache-dir",
            str(response_cache),
            "--out",
            str(out),
            *RUN_FLAGS,
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    cfg, models, batch, targets, mask = _first_batch(out)
    transform = hf.lm_head(models.student)
    assert (transform.softcap, transform.logit_scale) == (
        (2.0, 1.0) if family == "gemma2" else (None, 0.5)
    )
    s, t = _logits(models.student, batch), _logits(models.teacher, batch)
    kd = _kd_on_logits(s, t, mask, cfg)
    ce = torch.nn.functional.cross_entropy(s[:, :-1][mask], targets[mask])
    row = _first_row(out)
    assert row["kd"] == pytest.approx(float(kd), rel=1e-4, abs=1e-6)
    assert row["ce"] == pytest.approx(float(ce), rel=1e-4)
    assert row["loss"] == pytest.approx(float(0.7 * kd + 0.3 * ce), rel=1e-4)
    # the transform matters here: the loss on the untransformed h Wᵀ is far from it
    with torch.no_grad():
        t_raw, s_raw = (_untransformed(m, batch) for m in (models.teacher, models.student))
    assert abs(float(_kd_on_logits(s_raw, t_raw, mask, cfg)) - row["kd"]) > 1e-2 * row["kd"]


def test_teacher_cache_of_a_scaled_pair_equals_kd_loss_on_the_logits(tmp_path, response_cache):
    """Cohere's logit scale reaches the sparse path too (folded into the hidden states, as
    ``teacher_topk`` / ``fused_linear_sparse_kd`` take none): a cache of the full vocabulary gives
    the dense loss on the models' logits, up to the cache's float16 log-probs."""
    teacher, student = _pair(tmp_path, "cohere")
    models = ["--teacher", teacher, "--student", student, "--cache-dir", str(response_cache)]
    cache = tmp_path / "cache"
    common = [*models, *RUN_FLAGS]
    assert cli.main(["cache-teacher", "--top-k", "259", "--out", str(cache), *common]) == 0
    out = tmp_path / "run"
    assert (
        cli.main(
            ["kd", "--kd-ratio", "1", "--teacher-cache", str(cache), "--out", str(out), *common]
        )
        == 0
    )
    cfg, models, batch, _, mask = _first_batch(out)
    s, t = _logits(models.student, batch), _logits(models.teacher, batch)
    kd = float(_kd_on_logits(s, t, mask, cfg))
    assert _first_row(out)["kd"] == pytest.approx(kd, rel=2e-3)
    with torch.no_grad():
        t_raw, s_raw = (_untransformed(m, batch) for m in (models.teacher, models.student))
    assert abs(float(_kd_on_logits(s_raw, t_raw, mask, cfg)) - kd) > 1e-2 * kd


def test_teacher_cache_of_a_softcapped_teacher_is_a_clear_error(tmp_path, response_cache, capsys):
    teacher, student = _pair(tmp_path, "gemma2")
    rc = cli.main(
        [
            "cache-teacher",
            "--top-k",
            "8",
            "--out",
            str(tmp_path / "cache"),
            "--teacher",
            teacher,
            "--student",
            student,
            "--cache-dir",
            str(response_cache),
            *RUN_FLAGS,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "error: --teacher-cache" in err and "final_logit_softcapping=2.0" in err
