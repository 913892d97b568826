"""GKD in kd-train: the β mapping against TRL's generalized JSD (when installed) and a float64 formula,
the sampled-token estimator by hand and in expectation, flags, tiny-preset runs with resume, and a
smollm2 run (marker ``smollm2``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _common import tiny_train_config

from kd_kernels.train import gkd as G
from kd_kernels.train.config import TrainConfig
from kd_kernels.train.losses import Head


def tiny_cfg(tmp: Path, response_cache: Path, **kw) -> TrainConfig:
    kw = {"out": str(tmp / "gkd"), "steps": 6, "skip_eval": True, **kw}
    return tiny_train_config("gkd", response_cache, **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _generalized_jsd_float64(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's definition written out in float64 probability space (small, well-conditioned rows):
    β = 0 → KL(p‖q); β = 1 → KL(q‖p); else β KL(p‖M) + (1 − β) KL(q‖M), M = β p + (1 − β) q."""
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    if beta == 0.0:
        return (p * (p.log() - q.log())).sum(-1)
    if beta == 1.0:
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


def _heads(seed: int, n: int = 2, t: int = 5, v: int = 1031):
    g = torch.Generator().manual_seed(seed)
    hs, ws = torch.randn(n, t, 16, generator=g), 0.3 * torch.randn(v, 16, generator=g)
    ht, wt = torch.randn(n, t, 12, generator=g), 0.3 * torch.randn(v, 12, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[0, 0] = True
    return hs, ws, ht, wt, mask


# ------------------------------------------------------------------------------------ the β mapping


def test_beta_maps_onto_kd_kernels_divergences():
    assert G.gkd_divergence(0.0) == ("forward_kl", 0.5)
    assert G.gkd_divergence(1.0) == ("reverse_kl", 0.5)
    assert G.gkd_divergence(0.3) == ("jsd", 0.3)
    with pytest.raises(ValueError, match="--gkd-beta"):
        G.gkd_divergence(1.5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_loss_is_trls_generalized_jsd(beta, temperature):
    hs, ws, ht, wt, mask = _heads(3)
    hs.requires_grad_(True)
    got = G.full_loss(
        Head(hs, ws), Head(ht, wt), mask, beta=beta, temperature=temperature, backend="torch"
    )
    s, t = (hs.double() @ ws.double().T) / temperature, (ht.double() @ wt.double().T) / temperature
    want = _generalized_jsd_float64(s, t, beta)[mask].mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    # gradient against the float64 formula's
    (g_got,) = torch.autograd.grad(got, hs)
    hs64 = hs.detach().double().requires_grad_(True)
    w = _generalized_jsd_float64((hs64 @ ws.double().T) / temperature, t, beta)[mask].mean()
    (g_want,) = torch.autograd.grad(w, hs64)
    torch.testing.assert_close(g_got.double(), g_want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_full_loss_matches_trl_gkd_trainer(beta, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    hs, ws, ht, wt, mask = _heads(4)
    got = G.full_loss(Head(hs, ws), Head(ht, wt), mask, beta=beta, backend="torch")
    s, t = hs.double() @ ws.double().T, ht.double() @ wt.double().T
    labels = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), -100)
    want = gkd_trainer.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------- the sampled-token estimator


def test_sampled_token_loss_by_hand():
    # one position, V = 3: q_θ = softmax(s), q_s = softmax(s / 0.5), p = softmax(t); token y = 1
    w_s, w_t = torch.eye(3), torch.eye(3)
    s_logits = torch.tensor([[[0.5, -0.2, 0.1]]])
    t_logits = torch.tensor([[[0.1, 0.7, -0.4]]])
    hs = s_logits.clone().requires_grad_(True)
    y, mask = torch.tensor([[1]]), torch.tensor([[True]])
    loss, info = G.sampled_token_loss(
        Head(hs, w_s), Head(t_logits, w_t), y, mask, temperature=1.0, sample_temperature=0.5
    )
    lq = torch.log_softmax(s_logits[0, 0].double(), -1)[1]
    lqs = torch.log_softmax(s_logits[0, 0].double() / 0.5, -1)[1]
    lp = torch.log_softmax(t_logits[0, 0].double(), -1)[1]
    ratio = math.exp(lq - lqs)
    assert loss.item() == pytest.approx(ratio * float(lq - lp), rel=1e-5)  # −A · ratio
    assert info["kl_sampled"] == pytest.approx(float(lq - lp), rel=1e-5)
    assert info["ratio"] == pytest.approx(ratio, rel=1e-5)
    loss.backward()
    # ∂/∂s_j = (log q − log p) · ratio · (1[j = y] − q_j): A and q_s are constants
    q = torch.softmax(s_logits[0, 0].double(), -1)
    want = float(lq - lp) * ratio * (torch.eye(3, dtype=torch.float64)[1] - q)
    torch.testing.assert_close(hs.grad[0, 0].double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sample_temperature", [1.0, 0.7])
def test_sampled_token_gradient_is_unbiased_for_reverse_kl(sample_temperature):
    # E_{y ~ q_s}[∇ loss(y)] = ∇ KL(q_θ‖p) exactly: enumerate the V tokens of one position
    g = torch.Generator().manual_seed(5)
    v, d = 7, 4
    ws, wt = torch.randn(v, d, generator=g), torch.randn(v, d, generator=g)
    h = torch.randn(1, 1, d, generator=g)
    ht = torch.randn(1, 1, d, generator=g)
    mask = torch.tensor([[True]])
    q_s = torch.softmax((h[0, 0] @ ws.T).double() / sample_temperature, -1)
    expected = torch.zeros(d, dtype=torch.float64)
    for y in range(v):
        hy = h.clone().requires_grad_(True)
        loss, _ = G.sampled_token_loss(
            Head(hy, ws),
            Head(ht, wt),
            torch.tensor([[y]]),
            mask,
            sample_temperature=sample_temperature,
        )
        (grad,) = torch.autograd.grad(loss, hy)
        expected += q_s[y] * grad[0, 0].double()
    h64 = h.double().requires_grad_(True)
    lq = torch.log_softmax(h64[0, 0] @ ws.double().T, -1)
    lp = torch.log_softmax(ht[0, 0].double() @ wt.double().T, -1)
    (want,) = torch.autograd.grad((lq.exp() * (lq - lp)).sum(), h64)
    torch.testing.assert_close(expected, want[0, 0], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ TRL's semantics


def _tiny_gkd(**cfg_kw):
    """The gkd method, a run stand-in and the tiny teacher / student (no references generated)."""
    from types import SimpleNamespace

    from kd_kernels.train.methods import get_method
    from kd_kernels.train.models import load_tiny, make_student

    teacher, tok, _ = load_tiny(0)
    student = make_student(teacher, [0, 2])
    cfg = TrainConfig(method="gkd", preset="tiny", backend="torch", **cfg_kw)
    run = SimpleNamespace(cfg=cfg, rank=0, world=1, device=torch.device("cpu"))
    return get_method("gkd"), run, teacher.eval(), student, tok


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_gkd_loss_is_at_temperature_one_whatever_temperature(estimator):
    """G1: TRL's GKD trainer calls generalized_jsd_loss without a temperature (T = 1); --temperature
    (the KD temperature of other methods) does not enter GKD's loss."""
    from kd_kernels.train.data import build_example, collate

    beta = 1.0 if estimator == "sampled" else 0.5
    method, run, teacher, student, tok = _tiny_gkd(
        temperature=2.5, gkd_beta=beta, gkd_estimator=estimator
    )
    method._info = {"on_policy": 1.0}
    batch = collate(
        [
            build_example([5, 6, 7], [20, 21, 22], tok.eos_token_id),
            build_example([8], [30], tok.eos_token_id),
        ],
        tok.pad_token_id,
    )
    loss, _ = method.loss(student, teacher, batch, run)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    s, t = s[:, :-1].double(), t[:, :-1].double()
    if estimator == "full":
        want = _generalized_jsd_float64(s, t, beta)[mask].mean()
    else:  # mean of (log q − log p)(y) · q(y) / q_s(y), q and p at T = 1, q_s at --gkd-temperature

        def logp(x, temp=1.0):
            safe = targets.clamp_min(0)[..., None]
            return torch.log_softmax(x / temp, -1).gather(-1, safe)[..., 0]

        lq, lp, lqs = logp(s), logp(t), logp(s, run.cfg.gkd_temperature)
        want = ((lq - lp) * (lq - lqs).exp())[mask].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_a_response_cut_at_max_new_tokens_has_no_eos_target(tmp_path, response_cache, estimator):
    """G3: TRL trains on the sampled completion tokens only; a response cut at --max-new-tokens
    never sampled an EOS, so the EOS appended after it is no target (in either estimator)."""
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run

    beta = 1.0 if estimator == "sampled" else 0.5
    cfg = tiny_cfg(
        tmp_path,
        response_cache,
        gkd_lambda=1.0,
        max_new_tokens=3,
        batch_size=4,
        gkd_beta=beta,
        gkd_estimator=estimator,
    )
    run = Run(cfg, 0, 1, torch.device("cpu"))
    method = get_method("gkd")
    run.train_examples = run.examples("train", method.train_responses(run))
    batch = method.batch(run, 0)
    targets = batch["labels"][:, 1:]
    n_targets = (targets != -100).sum(1)
    assert (n_targets <= cfg.max_new_tokens).all(), n_targets
    cut = n_targets == cfg.max_new_tokens
    assert cut.any()  # the tiny random student rarely samples EOS: its responses are cut
    for row in (~cut).nonzero().flatten().tolist():  # an EOS it sampled stays a target
        assert targets[row][targets[row] != -100][-1] == run.eos_id


# --------------------------------------------------------------------------------------------- flags


def test_compare_runs_gkd_by_default():
    from kd_kernels.train import compare

    assert compare.DEFAULT_METHODS.split(",")[-1] == "gkd"


def test_gkd_flags_are_validated():
    from kd_kernels.train.config import parse_args

    cfg, _ = parse_args(["gkd"], ["gkd"])
    assert (
        cfg.gkd_lambda,
        cfg.gkd_beta,
        cfg.gkd_temperature,
        cfg.gkd_seq_kd,
        cfg.gkd_estimator,
    ) == (0.5, 0.5, 0.9, False, "full")
    for argv, flag in (
        (["--gkd-lambda", "1.5"], "--gkd-lambda"),
        (["--gkd-beta", "-1"], "--gkd-beta"),
        (["--gkd-temperature", "0"], "--gkd-temperature"),
        (["--gkd-estimator", "x"], "--gkd-estimator"),
        (["--gkd-estimator", "sampled"], "--gkd-beta 1"),
    ):
        with pytest.raises(ValueError, match=flag):
            parse_args(["gkd", *argv], ["gkd"])
    cfg, _ = parse_args(["gkd", "--gkd-estimator", "sampled", "--gkd-beta", "1"], ["gkd"])
    assert cfg.gkd_estimator == "sampled"


# ----------------------------------------------------------------------------------------- tiny runs


def test_tiny_gkd_mixes_on_and_off_policy_and_resumes_exactly(tmp_path, response_cache):
    import random

    from kd_kernels.train.methods import _stream_seed
    from kd_kernels.train.trainer import train

    seed = 3
    on = [random.Random(_stream_seed(seed, k, 11)).random() < 0.5 for k in range(6)]
    assert any(on) and not all(on)  # this seed exercises both branches
    train(tiny_cfg(tmp_path / "a", response_cache, seed=seed))
    train(tiny_cfg(tmp_path / "b", response_cache, seed=seed, steps=3))
    train(tiny_cfg(tmp_path / "b", response_cache, seed=seed, resume=True), explicit={"steps"})
    a, b = (
        _rows(tmp_path / "a" / "gkd" / "metrics.jsonl"),
        _rows(tmp_path / "b" / "gkd" / "metrics.jsonl"),
    )
    assert [r["on_policy"] for r in a] == [float(x) for x in on]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert math.isfinite(ra["loss"]) and ra["kd"] >= 0 and ra["loss"] == ra["kd"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6), ra["step"]
        assert rb["on_policy"] == ra["on_policy"]
    from kd_kernels.train.methods import method_plot

    panels = {p: [s.key for s, _, _ in c] for p, c in method_plot(a, "gkd").panels.items()}
    assert panels == {"loss": ["loss", "kd"], "state": ["on_policy"]}


def test_tiny_gkd_trains_on_student_samples(tmp_path, response_cache):
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run

    cfg = tiny_cfg(tmp_path, response_cache, gkd_lambda=1.0)
    run = Run(cfg, 0, 1, torch.device("cpu"))
    method = get_method("gkd")
    run.train_examples = run.examples("train", method.train_responses(run))
    batch = method.batch(run, 0)
    off = run.offline_batch(0)
    assert not torch.equal(batch["labels"], off["labels"])  # the student's samples, not references
    assert torch.equal(batch["input_ids"], method.batch(run, 0)["input_ids"])  # seeded by the step
    loss, parts = method.loss(run.models.student, run.models.teacher, batch, run)
    loss.backward()
    assert parts["on_policy"] == 1.0 and math.isfinite(parts["kd"])
    assert all(p.grad is not None for p in run.models.student.parameters())


def test_tiny_gkd_sampled_estimator_and_seq_kd(tmp_path, response_cache):
    from kd_kernels.train.trainer import train

    summary = train(
        tiny_cfg(
            tmp_path,
            response_cache,
            steps=3,
            gkd_lambda=1.0,
            gkd_beta=1.0,
            gkd_estimator="sampled",
            gkd_seq_kd=True,
            skip_eval=False,
        )
    )
    rows = _rows(tmp_path / "gkd" / "metrics.jsonl")
    for r in rows:
        assert r["on_policy"] == 1.0 and math.isfinite(r["loss"]) and r["ratio"] > 0
        assert math.isfinite(r["kl_sampled"])
    assert summary["final"]["test_reverse_kl"] >= 0


@pytest.mark.smollm2
def test_smollm2_gkd_two_steps(tmp_path):
    pytest.importorskip("gguf")
    from kd_kernels.train.trainer import train

    cfg = TrainConfig(
        method="gkd",
        preset="smollm2",
        steps=2,
        batch_size=2,
        max_prompts=10,
        max_new_tokens=4,
        gen_batch_size=8,
        gkd_lambda=1.0,
        skip_eval=True,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "gkd"),
        progress=False,
        ckpt_every=100,
    )
    summary = train(cfg)
    rows = _rows(tmp_path / "gkd" / "metrics.jsonl")
    assert summary["steps"] == 2 and [r["on_policy"] for r in rows] == [1.0, 1.0]
    assert all(math.isfinite(r["loss"]) and r["kd"] >= 0 for r in rows)
