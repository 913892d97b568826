"""Offline teacher caches: kd-train cache-teacher, then kd / distillm from the cache (tiny preset)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _common import tiny_train_config

from kd_kernels.train import cli
from kd_kernels.train.trainer import train

TINY = [
    "--preset",
    "tiny",
    "--max-prompts",
    "24",
    "--max-new-tokens",
    "6",
    "--gen-batch-size",
    "32",
    "--no-progress",
]


def _cache(tmp_path: Path, response_cache: Path, k: int = 8, *extra: str) -> Path:
    out = tmp_path / f"cache-k{k}"
    rc = cli.main(
        [
            "cache-teacher",
            "--top-k",
            str(k),
            "--out",
            str(out),
            "--cache-dir",
            str(response_cache),
            *TINY,
            *extra,
        ]
    )
    assert rc == 0
    return out


def test_cache_round_trip_and_kd_from_cache(tmp_path, response_cache, capsys):
    out = _cache(tmp_path, response_cache)
    m = json.loads((out / "manifest.json").read_text())
    assert m["top_k"] == 8 and m["counts"]["examples"] > 0 and m["shards"]
    from safetensors.torch import load_file

    shard = load_file(str(out / m["shards"][0]["file"]))
    assert shard["ids"].dtype == torch.int32 and shard["logprobs"].dtype == torch.float16
    assert shard["ids"].shape == (m["counts"]["positions"], 8)
    # the cached log-probs are the teacher's: sorted, ≤ 0, summing to ≤ 1 (+ fp16 rounding)
    lp = shard["logprobs"].float()
    assert (lp[:, :-1] >= lp[:, 1:]).all() and (lp <= 0).all()
    assert (lp.exp().sum(-1) <= 1 + 1e-2).all()

    cfg = tiny_train_config(
        "kd",
        response_cache,
        out=str(tmp_path / "kd"),
        steps=3,
        skip_eval=True,
        teacher_cache=str(out),
        sparse_top_k=4,
    )
    # the teacher's forward pass must not run during the steps: break it and train anyway
    from kd_kernels.train import methods

    real_head = methods.head
    calls = []

    def spy(model, batch):
        calls.append(model)
        return real_head(model, batch)

    methods.head = spy
    try:
        summary = train(cfg)
    finally:
        methods.head = real_head
    assert summary["steps"] == 3
    assert summary["teacher_cache"]["top_k"] == 4 and summary["teacher_cache"]["cache_top_k"] == 8
    assert summary["config"]["teacher_cache"] == str(out)
    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["kd"] >= 0 for r in rows)
    assert len(calls) == 3  # the student only, once per step


def test_cache_kd_loss_matches_fused_sparse_on_teacher_topk(tmp_path, response_cache):
    """The trainer's cached loss equals fused_linear_sparse_kd on the teacher's top-k directly."""
    import kd_kernels
    from kd_kernels.train.data import shift_targets
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run, head
    from kd_kernels.train.teacher_cache import cache_for

    out = _cache(tmp_path, response_cache, 16)
    cfg = tiny_train_config("kd", response_cache, teacher_cache=str(out), sparse_tail="renormalize")
    run = Run(cfg, 0, 1, torch.device("cpu"))
    run.train_examples = run.examples("train", get_method("kd").train_responses(run))
    batch = run.offline_batch(0)
    targets, mask = shift_targets(batch["labels"])
    _, lps = cache_for(run).lookup(batch["example_index"], targets, mask)
    with torch.no_grad():
        t = head(run.models.teacher, batch)
        s = head(run.models.student, batch)
    want_ids, want_lp = kd_kernels.teacher_topk(t.hidden, t.weight, 16)
    torch.testing.assert_close(lps[mask].float(), want_lp[mask], atol=2e-3, rtol=1e-3)
    loss, _ = get_method("kd").loss(run.models.student, run.models.teacher, batch, run)
    labels = torch.where(mask, targets, torch.full_like(targets, -100))
    direct = (
        kd_kernels.fused_linear_sparse_kd(
            s.hidden,
            s.weight,
            want_ids,
            want_lp.half().float(),
            tail="renormalize",
            mask=mask,
            labels=labels,
            ce_weight=1.0,
        )
        * 0.5
    )
    torch.testing.assert_close(loss.detach(), direct, atol=2e-3, rtol=2e-3)


def test_cache_mismatches_are_clear_errors(tmp_path, response_cache, capsys):
    out = _cache(tmp_path, response_cache, 4)
    base = [
        "kd",
        *TINY,
        "--cache-dir",
        str(response_cache),
        "--steps",
        "1",
        "--skip-eval",
        "--teacher-cache",
        str(out),
        "--out",
        str(tmp_path / "run"),
    ]
    cases = [
        (["--sparse-top-k", "8"], "asks for more than the 4 ids"),
        (["--max-new-tokens", "5"], "other training responses"),
        (["--temperature", "2.0"], "temperature 1.0"),
    ]
    for extra, msg in cases:
        rc = cli.main([*base, *extra])  # the later flag wins
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (extra, err)
    with pytest.raises(SystemExit) as e:  # a flag of other methods: argparse's usage error
        cli.main(["minillm", *TINY, "--teacher-cache", str(out)])
    assert e.value.code == 2
    assert (
        "--teacher-cache is a flag of kd, seqkd, distillm, not of minillm"
        in capsys.readouterr().err
    )
    rc = cli.main(["kd", *TINY, "--teacher-cache", str(tmp_path / "nothing")])
    assert rc == 2 and "no manifest.json" in capsys.readouterr().err
    rc = cli.main(["distillm", *TINY, "--teacher-cache", str(out), "--sparse-tail", "ignore"])
    assert rc == 2 and "forward KL only" in capsys.readouterr().err


def test_distillm_from_cache(tmp_path, response_cache):
    out = _cache(tmp_path, response_cache, 8, "--for-method", "distillm")
    cfg = tiny_train_config(
        "distillm",
        response_cache,
        out=str(tmp_path / "d"),
        steps=3,
        skip_eval=True,
        teacher_cache=str(out),
    )
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["teacher_cache"]["top_k"] == 8
