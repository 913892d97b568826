"""DistiLLM in kd-train: the adaptive schedule and replay buffer by hand, the skew loss against the
float64 reference, and tiny-preset end-to-end runs (forced threshold rises, resume with the buffer)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _common import tiny_train_config

from kd_kernels import reference
from kd_kernels.train import distillm as D
from kd_kernels.train.config import TrainConfig


def tiny_cfg(tmp: Path, response_cache: Path, **kw) -> TrainConfig:
    kw = {
        "out": str(tmp / "distillm"),
        "steps": 6,
        "distillm_check_every": 1,
        "skip_eval": True,
        **kw,
    }
    return tiny_train_config("distillm", response_cache, **kw)


# --------------------------------------------------------------------------------------- schedule


def test_choose_source_by_hand():
    # τ = 0: always the ground truth
    assert D.choose_source(0.0, 0.0, 0, 10, buffer_full=False) == D.GROUND_TRUTH
    # steps count from 1 inside: trainer step 0 is global_step 1, so s = 0.5 · (1 − 1/10) = 0.45
    assert D.choose_source(0.44, 0.5, 0, 10, buffer_full=True) == D.GENERATE
    assert D.choose_source(0.47, 0.5, 0, 10, buffer_full=True) == D.REPLAY  # 0-based would generate
    # trainer step 7 of 10 = global step 8: s = 0.5 · 0.2 = 0.1; r = 0.3 ∈ [s, τ): replay when full,
    # generate when not
    assert D.choose_source(0.3, 0.5, 7, 10, buffer_full=True) == D.REPLAY
    assert D.choose_source(0.3, 0.5, 7, 10, buffer_full=False) == D.GENERATE
    assert D.choose_source(0.09, 0.5, 7, 10, buffer_full=True) == D.GENERATE
    assert D.choose_source(0.6, 0.5, 7, 10, buffer_full=True) == D.GROUND_TRUTH
    # the last step (global 10 of 10): s = 0, so a full buffer always replays below τ
    assert D.choose_source(0.001, 1.0, 9, 10, buffer_full=True) == D.REPLAY
    assert D.choose_source(0.99, 1.0, 9, 10, buffer_full=True) == D.REPLAY
    with pytest.raises(ValueError, match="total"):
        D.choose_source(0.1, 0.5, 0, 0, buffer_full=True)


def _trajectory(values):
    s = D.ThresholdSchedule()
    out = [(s.update(v), s.threshold, s.reference) for v in values]
    return out, s


def test_threshold_official_rule_examples():
    # the examples: 2.0 → 2.05 → 2.10 raises τ once (2.10 ≥ L_ref + 0.1 with L_ref still 2.0)
    steps, _ = _trajectory([2.0, 2.05, 2.10])
    assert steps == [(False, 0.0, 2.0), (False, 0.0, 2.0), (True, pytest.approx(0.1), 2.10)]
    # 2.0 → 1.5 → 1.65: a fall does not move the reference, so +0.15 from 1.5 is still below 2.1
    steps, _ = _trajectory([2.0, 1.5, 1.65])
    assert steps == [(False, 0.0, 2.0), (False, 0.0, 2.0), (False, 0.0, 2.0)]


def test_threshold_moves_reference_only_when_it_rises():
    # by hand: L_ref 2.0; 2.15 ≥ 2.1 → τ 0.1, L_ref 2.15; 2.2 < 2.25 → nothing; 2.3 ≥ 2.25 → τ 0.2,
    # L_ref 2.3; 2.35 < 2.4 → nothing; 2.0 → nothing (τ never falls)
    steps, s = _trajectory([2.0, 2.15, 2.2, 2.3, 2.35, 2.0])
    assert [t for _, t, _ in steps] == pytest.approx([0.0, 0.1, 0.1, 0.2, 0.2, 0.2])
    assert [r for _, _, r in steps] == [2.0, 2.15, 2.15, 2.3, 2.3, 2.3]
    assert [f for f, _, _ in steps] == [False, True, False, True, False, False]
    for k in range(12):
        s.update(3.0 + 0.2 * k)
    assert s.threshold == 1.0  # capped at 1
    t = D.ThresholdSchedule()
    t.load_state_dict(s.state_dict())
    assert (t.threshold, t.reference) == (s.threshold, s.reference)


def test_replay_buffer_fifo_sampling_and_state():
    b = D.ReplayBuffer(capacity=3)
    assert len(b) == 0 and not b.full
    with pytest.raises(ValueError, match="empty buffer"):
        b.sample(1, random.Random(0))
    b.push([1, 2])
    assert not b.full
    b.push([3, 4, 5])
    assert list(b.items) == [3, 4, 5] and b.full  # the oldest fell out
    two = b.sample(2, random.Random(0))
    assert len(set(two)) == 2 and set(two) <= {3, 4, 5}  # distinct when the buffer has enough
    five = b.sample(5, random.Random(0))
    assert len(five) == 5 and set(five) <= {3, 4, 5}  # with replacement otherwise
    assert b.sample(2, random.Random(7)) == b.sample(2, random.Random(7))
    c = D.ReplayBuffer(capacity=1)
    c.load_state_dict(b.state_dict())
    assert list(c.items) == [3, 4, 5] and c.capacity == 3
    with pytest.raises(ValueError, match="capacity"):
        D.ReplayBuffer(capacity=0)


def test_distillm_flags_are_validated():
    from kd_kernels.train.config import parse_args

    cfg, _ = parse_args(["distillm", "--distillm-loss", "skl"], ["distillm"])
    assert cfg.distillm_loss == "skl" and cfg.distillm_alpha == 0.1
    with pytest.raises(ValueError, match="--distillm-loss"):
        parse_args(["distillm", "--distillm-loss", "xx"], ["distillm"])
    with pytest.raises(ValueError, match="--distillm-alpha"):
        parse_args(["distillm", "--distillm-alpha", "1.0"], ["distillm"])
    with pytest.raises(ValueError, match="--minillm-rollouts"):
        parse_args(["minillm", "--minillm-rollouts", "0"], ["minillm"])


@pytest.mark.parametrize("kind", ["srkl", "skl"])
def test_skew_loss_with_ce_mix_against_reference(kind):
    from kd_kernels.train.losses import Head, kd_mix_loss

    g = torch.Generator().manual_seed(1)
    hs, ws = (
        torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(13, 8, generator=g, dtype=torch.float64),
    )
    ht, wt = (
        torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
        torch.randn(13, 6, generator=g, dtype=torch.float64),
    )
    targets = torch.randint(0, 13, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    mask[0, 0] = True
    s, t = hs @ ws.T, ht @ wt.T
    fn = (
        reference.skew_reverse_kl_per_token
        if kind == "srkl"
        else reference.skew_forward_kl_per_token
    )
    div = "skew_reverse_kl" if kind == "srkl" else "skew_forward_kl"
    skew = fn(s, t, alpha=0.1)[mask].mean()
    ce = reference.cross_entropy_per_token(s, torch.where(mask, targets, -100))[mask].mean()
    for c in (0.0, 0.3):
        got, _ = kd_mix_loss(
            Head(hs.float(), ws.float()),
            Head(ht.float(), wt.float()),
            targets,
            mask,
            ratio=1.0 - c,
            divergence=div,
            alpha=0.1,
            backend="torch",
        )
        assert got.item() == pytest.approx(((1 - c) * skew + c * ce).item(), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------- tiny e2e


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture
def rising_valid_ce(monkeypatch):
    """Validation CE that rises by 0.2 at every check: τ goes 0 → 0.1 → 0.2 …"""
    from kd_kernels.train import methods

    calls = {"n": 0}

    def fake(run):
        calls["n"] += 1
        return 1.0 + 0.2 * calls["n"]

    monkeypatch.setattr(methods, "valid_ce", fake)
    return calls


def test_tiny_distillm_follows_the_schedule(tmp_path, response_cache, rising_valid_ce):
    from kd_kernels.train.methods import _stream_seed
    from kd_kernels.train.trainer import train

    cfg = tiny_cfg(
        tmp_path, response_cache, steps=8, seed=3, distillm_capacity=3
    )  # full after 2 generations
    train(cfg)
    rows = _rows(Path(cfg.out) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rising_valid_ce["n"] == 8  # one check per step (--distillm-check-every 1)
    buffer = 0
    for step, r in enumerate(rows):
        tau = round(0.1 * step, 10)  # the check at `step` raised τ `step` times
        assert r["threshold"] == pytest.approx(tau)
        u = random.Random(_stream_seed(cfg.seed, step)).random()
        want = D.choose_source(u, tau, step, cfg.steps, buffer_full=buffer >= cfg.distillm_capacity)
        assert D.SOURCES[int(r["source"])] == want, step
        buffer = min(cfg.distillm_capacity, buffer + (cfg.batch_size if want == D.GENERATE else 0))
        assert r["buffer"] == buffer
        assert math.isfinite(r["loss"]) and r["kd"] >= 0
    assert {D.SOURCES[int(r["source"])] for r in rows} == set(D.SOURCES)  # every branch ran
    from kd_kernels.train.methods import method_plot

    panels = {p: [s.key for s, _, _ in c] for p, c in method_plot(rows, "distillm").panels.items()}
    assert panels == {
        "loss": ["loss", "ce", "kd"],
        "eval": ["valid_ce_check"],
        "state": ["source", "threshold"],
    }


def test_tiny_distillm_resume_restores_buffer_and_threshold(
    tmp_path, response_cache, rising_valid_ce
):
    from kd_kernels.train.trainer import train

    train(tiny_cfg(tmp_path / "a", response_cache, steps=6, seed=3, distillm_capacity=3))
    rising_valid_ce["n"] = 0
    train(tiny_cfg(tmp_path / "b", response_cache, steps=3, seed=3, distillm_capacity=3))
    ckpt = torch.load(tmp_path / "b" / "distillm" / "ckpt.pt", weights_only=False)
    state = ckpt["method_state"]
    assert state["schedule"]["threshold"] == pytest.approx(0.2) and state["checked_step"] == 2
    train(
        tiny_cfg(tmp_path / "b", response_cache, steps=6, seed=3, resume=True), explicit={"steps"}
    )
    a = _rows(tmp_path / "a" / "distillm" / "metrics.jsonl")
    b = _rows(tmp_path / "b" / "distillm" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("source", "threshold", "buffer"):
            assert ra[k] == rb[k], (ra["step"], k)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6), ra["step"]


def test_tiny_distillm_with_real_validation(tmp_path, response_cache):
    from kd_kernels.train.trainer import train

    summary = train(
        tiny_cfg(
            tmp_path,
            response_cache,
            steps=3,
            distillm_check_every=0,
            skip_eval=False,
            distillm_loss="skl",
        )
    )
    rows = _rows(tmp_path / "distillm" / "metrics.jsonl")
    assert rows[0]["threshold"] == 0.0 and D.SOURCES[int(rows[0]["source"])] == D.GROUND_TRUTH
    assert math.isfinite(rows[0]["valid_ce_check"]) and rows[0]["valid_ce_check"] > 0
    assert summary["final"]["test_forward_kl"] >= 0


def test_check_interval_is_the_official_floor():
    """D1: the official check interval is train_iters_per_epoch = int(N / (batch · world)) (its
    loader drops the last partial batch), at least 1."""
    from types import SimpleNamespace

    from kd_kernels.train.methods import DistiLLM

    def every(n, batch, world):
        cfg = TrainConfig(method="distillm", batch_size=batch)
        return DistiLLM().check_every(SimpleNamespace(cfg=cfg, world=world, train_examples=[0] * n))

    assert [every(10, 4, 1), every(10, 2, 2), every(11, 3, 1), every(3, 4, 1)] == [2, 2, 3, 1]
    cfg = TrainConfig(method="distillm", batch_size=4, distillm_check_every=5)
    run = SimpleNamespace(cfg=cfg, world=1, train_examples=[0] * 10)
    assert DistiLLM().check_every(run) == 5  # an explicit interval wins


def test_valid_batches_follow_the_official_distributed_sampler():
    """D2: the official evaluation loader (DistributedSampler, no shuffle, no drop_last: padded by
    wrapping round to a multiple of the world size, rank r takes every world-th index from r) in
    batches of the evaluation batch size; one entry per step, one list per rank."""
    assert D.VALID_BATCH_SIZE == 32  # the official --eval-batch-size default
    assert D.valid_batches(5, 1, 32) == [[[0, 1, 2, 3, 4]]]
    assert D.valid_batches(5, 2, 2) == [[[0, 2], [1, 3]], [[4], [0]]]
    assert D.valid_batches(4, 3, 1) == [[[0], [1], [2]], [[3], [0], [1]]]
    with pytest.raises(ValueError, match="validation"):
        D.valid_batches(0, 1, 32)


def test_valid_ce_is_the_mean_of_per_batch_token_means(tmp_path, response_cache, monkeypatch):
    """D2: batches of the evaluation batch size (not --batch-size); per step the mean over ranks of
    each rank's batch token mean, then the mean over steps."""
    from kd_kernels.train.data import build_example, collate, shift_targets
    from kd_kernels.train.methods import valid_ce
    from kd_kernels.train.run import Run

    monkeypatch.setattr(D, "VALID_BATCH_SIZE", 2)
    cfg = tiny_cfg(tmp_path, response_cache, batch_size=3, max_prompts=40)
    run = Run(cfg, 0, 1, torch.device("cpu"))
    # the tiny teacher's references all have the same length; cut them to different lengths so the
    # per-batch mean and the pooled token mean differ
    refs = run.references("valid")
    examples = [
        build_example(run.prompt_ids[p.id], refs[p.id][: 1 + 2 * i], run.eos_id)
        for i, p in enumerate(run.split_prompts("valid"))
    ]
    assert len(examples) >= 3
    run._examples["valid"] = examples

    def batch_ce(chosen):
        b = collate([examples[i] for i in chosen], run.pad_id)
        with torch.no_grad():
            logits = (
                run.models.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                .logits[:, :-1]
                .double()
            )
        targets, mask = shift_targets(b["labels"])
        ce = reference.cross_entropy_per_token(logits, torch.where(mask, targets, -100))[mask]
        return ce.mean().item(), ce.sum().item(), int(mask.sum())

    n = len(examples)
    parts = [batch_ce(range(start, min(n, start + 2))) for start in range(0, n, 2)]
    want = sum(m for m, _, _ in parts) / len(parts)
    assert valid_ce(run) == pytest.approx(want, rel=1e-5)
    pooled = sum(s for _, s, _ in parts) / sum(t for _, _, t in parts)
    assert abs(want - pooled) > 1e-4  # the pooled token mean differs: the test can tell
    three = [batch_ce(range(start, min(n, start + 3))) for start in range(0, n, 3)]
    assert abs(want - sum(m for m, _, _ in three) / len(three)) > 1e-4  # nor is it --batch-size's
    # two ranks: step j averages rank 0's and rank 1's j-th batch (indices 0, 2, 4 … and 1, 3, 5 …)
    run.world = 2
    steps = D.valid_batches(n, 2, 2)
    want2 = sum(sum(batch_ce(b)[0] for b in ranks) / 2 for ranks in steps) / len(steps)
    assert valid_ce(run) == pytest.approx(want2, rel=1e-5)
