"""MiniLLM in kd-train: every piece against hand-computed values, rollouts against a full forward, the
gradient of a step against materialized float64 logits, and a tiny-preset end-to-end run."""

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

from kd_kernels import reference
from kd_kernels.train import minillm as M
from kd_kernels.train.config import TrainConfig
from kd_kernels.train.losses import Head


def tiny_cfg(tmp: Path, response_cache: Path, **kw) -> TrainConfig:
    kw = {"out": str(tmp / "minillm"), "minillm_rollouts": 4, "minillm_ppo_epochs": 2, **kw}
    return tiny_train_config("minillm", response_cache, **kw)


# --------------------------------------------------------------------------------- sampling pieces


def test_process_logits_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    t = M.process_logits(logits, temperature=2.0)
    torch.testing.assert_close(t, torch.log_softmax(logits / 2.0, -1))
    k = M.process_logits(logits, temperature=1.0, top_k=2)
    z = math.log(math.exp(2.0) + math.exp(1.0))
    torch.testing.assert_close(k[0, :2], torch.tensor([2.0 - z, 1.0 - z]))
    assert torch.isinf(k[0, 2:]).all()
    # probabilities 0.644, 0.237, 0.087, 0.032: top-p 0.8 keeps the first two (0.644 < 0.8 ≤ 0.881)
    p = M.process_logits(logits, temperature=1.0, top_p=0.8)
    torch.testing.assert_close(p[0, :2], torch.tensor([2.0 - z, 1.0 - z]))
    assert torch.isinf(p[0, 2:]).all()
    # top-p smaller than the largest probability still keeps the most likely token
    one = M.process_logits(logits, temperature=1.0, top_p=0.1)
    assert one[0, 0].item() == pytest.approx(0.0) and torch.isinf(one[0, 1:]).all()


def test_mix_distribution_by_hand():
    lq = torch.log(torch.tensor([[0.5, 0.5]]))
    lp = torch.log(torch.tensor([[0.9, 0.1]]))
    mix = M.mix_distribution(lq, lp, 0.2)  # 0.8·q + 0.2·p = [0.58, 0.42]
    torch.testing.assert_close(mix.exp(), torch.tensor([[0.58, 0.42]]))
    torch.testing.assert_close(M.mix_distribution(lq, lp, 0.0), lq)
    torch.testing.assert_close(M.mix_distribution(lq, lp, 1.0), lp)
    # a token the teacher rules out keeps the student's (1 − α) share, no log 0
    lp0 = torch.tensor([[0.0, float("-inf")]])
    torch.testing.assert_close(M.mix_distribution(lq, lp0, 0.2).exp(), torch.tensor([[0.6, 0.4]]))


def test_importance_weights_and_rewards_by_hand():
    mask = torch.tensor([[True, True, False]])
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    mix = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    w = M.importance_log_weights(old, mix, mask).exp()
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0]]))  # masked: log w = 0
    teacher = torch.tensor([[-1.0, 0.0, -5.0]])
    old_lp = torch.tensor([[-2.0, -60.0, -1.0]])
    r = M.token_rewards(teacher, old_lp, mask)
    # (−1 + 2)/0.5 = 2; (0 + 60)/0.5 = 120 → clipped to 100; masked → 0
    torch.testing.assert_close(r, torch.tensor([[2.0, 100.0, 0.0]]))
    assert (
        M.token_rewards(
            torch.tensor([[-80.0]]), torch.tensor([[0.0]]), torch.tensor([[True]])
        ).item()
        == -100.0
    )


def test_normalized_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = M.normalized_returns(rewards, mask, gamma=0.5)
    # row 0: G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75; divided by 3, 2, 1 tokens left
    # row 1: the masked 9 is not a reward: G1 = 1, G0 = 1.5; divided by 2, 1
    want = torch.tensor([[2.75 / 3, 3.5 / 2, 3.0], [1.5 / 2, 1.0, 0.0]])
    torch.testing.assert_close(got, want)
    ones = M.normalized_returns(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), gamma=0.95)
    g = [sum(0.95**k for k in range(n)) / n for n in (4, 3, 2, 1)]
    torch.testing.assert_close(ones, torch.tensor([g]))


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    got = M.whiten(x, mask)
    s = math.sqrt(2.0 / 3.0 + 1e-8)  # population variance of 1, 2, 3
    torch.testing.assert_close(got, torch.tensor([[-1 / s, 0.0, 1 / s, 0.0]]))
    assert M.whiten(x, torch.zeros_like(mask)).abs().sum() == 0


def test_whiten_block_on_a_padded_block_by_hand():
    # (B = 2) × (W = 3) response block inside (B, L = 5) rows with prompt positions and right padding:
    # row 0 holds R = 1, 2 and one padding slot, row 1 holds R = 3 and two padding slots (R = 0 each).
    # Block [1, 2, 0, 3, 0, 0]: mean 1, population variance (0 + 1 + 1 + 4 + 1 + 1) / 6 = 4/3.
    x = torch.tensor([[9.0, 1.0, 2.0, 7.0, 7.0], [9.0, 9.0, 3.0, 7.0, 7.0]])
    mask = torch.tensor([[False, True, True, False, False], [False, False, True, False, False]])
    got = M.whiten_block(x, mask, width=3)
    s = math.sqrt(4.0 / 3.0 + 1e-8)
    torch.testing.assert_close(
        got, torch.tensor([[0.0, 0.0, 1 / s, 0.0, 0.0], [0.0, 0.0, 2 / s, 0.0, 0.0]])
    )
    # valid tokens only (the option): [1, 2, 3] has mean 2 and variance 2/3 — another answer
    v = math.sqrt(2.0 / 3.0 + 1e-8)
    torch.testing.assert_close(
        M.whiten(x, mask), torch.tensor([[0.0, -1 / v, 0.0, 0.0, 0.0], [0.0, 0.0, 1 / v, 0.0, 0.0]])
    )
    # a wider padded width counts more zeros: W = 4 → [1, 2, 0, 0, 3, 0, 0, 0], mean 0.75,
    # variance (1 + 4 + 9) / 8 − 0.75² = 1.1875
    w4 = M.whiten_block(x, mask, width=4)
    s4 = math.sqrt(1.1875 + 1e-8)
    torch.testing.assert_close(w4[mask], torch.tensor([0.25 / s4, 1.25 / s4, 2.25 / s4]))
    with pytest.raises(ValueError, match="response width"):
        M.whiten_block(x, mask, width=1)


def test_whiten_block_sums_moments_over_ranks():
    # two "ranks": the moments of rank 1's block are added by the reduce, as an all_reduce would;
    # the result equals whitening the two blocks stacked as one
    g = torch.Generator().manual_seed(2)
    xa, xb = torch.randn(2, 6, generator=g), torch.randn(3, 6, generator=g)
    ma = torch.tensor([[True] * 4 + [False] * 2, [True, True] + [False] * 4])
    mb = torch.rand(3, 6, generator=g) > 0.4
    other = M.block_moments(xb, mb, 5)
    got = M.whiten_block(xa, ma, 5, reduce=lambda m: m + other)
    both = M.whiten_block(torch.cat([xa, xb]), torch.cat([ma, mb]), 5)
    torch.testing.assert_close(got, both[:2])
    assert not torch.allclose(got, M.whiten_block(xa, ma, 5))  # the other rank matters


def test_ppo_clipped_objective_by_hand():
    old = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    log_w = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]]))  # ratio = w at θ = θ_old
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    logp = torch.zeros(1, 4, requires_grad=True)
    loss, info = M.ppo_clipped_loss(logp, old, log_w, adv, mask, clip=0.2)
    # token 0: max(−1.5, −1.2) = −1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: max(−2.2, −2.2) = −2.2 (inside the clip range); token 3 masked
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-6)
    assert info["clip_frac"] == pytest.approx(2 / 3) and info["ratio"] == pytest.approx(3.1 / 3)
    loss.backward()
    # clipped tokens get no gradient; token 2: ∂/∂log q (−A·ratio)/3 = −2.2/3
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.2 / 3, 0.0]]))


# ------------------------------------------------------------------------------ rollouts on tiny


def test_single_step_term_is_at_the_rollout_temperature_for_both_models():
    """M1: LMOps divides both models' logits by its one ``--temperature`` (the rollout temperature)
    before the single-step reverse KL; ``--temperature`` (the KD one) does not enter it."""
    g = torch.Generator().manual_seed(5)
    b, t, d, v = 2, 3, 8, 37
    s_h, t_h = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    s_w, t_w = torch.randn(v, d, generator=g), torch.randn(v, d, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    targets = torch.randint(0, v, (b, t), generator=g)
    zeros = torch.zeros(b, t)
    _, parts = M.minillm_loss(
        Head(s_h, s_w),
        Head(t_h, t_w),
        targets,
        mask,
        zeros,
        zeros,
        zeros,
        clip=0.2,
        rollout_temperature=2.0,
        backend="torch",
    )
    s_logits, t_logits = (s_h @ s_w.T).double() / 2.0, (t_h @ t_w.T).double() / 2.0
    want = reference.reverse_kl_per_token(s_logits, t_logits)[mask].mean()
    assert parts["pg"] == 0.0  # zero advantages: the single-step term alone
    assert parts["single_step"] == pytest.approx(float(want), rel=1e-5)


def test_the_last_partial_ppo_minibatch_is_dropped():
    """M3: LMOps cuts each PPO epoch's shuffled rollouts with ``drop_last=True``."""
    from kd_kernels.train.methods import MiniLLM

    cfg = TrainConfig(method="minillm", minillm_rollouts=7, batch_size=3, minillm_ppo_epochs=2)
    assert MiniLLM.steps_per_round(cfg) == 4  # 2 epochs × floor(7 / 3)
    assert MiniLLM.epoch_minibatches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="--minillm-rollouts"):
        MiniLLM.steps_per_round(TrainConfig(method="minillm", minillm_rollouts=2, batch_size=3))


@pytest.fixture(scope="module")
def tiny_models():
    from kd_kernels.train.models import load_tiny, make_student

    teacher, tok, _ = load_tiny(seed=5)
    student = make_student(teacher, [0, 2])
    with torch.no_grad():  # make the student differ from the teacher beyond dropping layers
        student.model.norm.weight.mul_(1.5)
    teacher.eval()
    return student, teacher, tok


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_rollouts_record_the_mixture_of_full_forward_distributions(tiny_models, alpha):
    student, teacher, tok = tiny_models
    prompts = [[1, 40, 41, 42, 2], [1, 50, 51]]

    def rollouts():
        return M.mixed_rollouts(
            student,
            teacher,
            prompts,
            alpha=alpha,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            max_new_tokens=5,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
        )

    rolls, again = rollouts(), rollouts()
    assert [r.tokens for r in rolls] == [r.tokens for r in again]  # seeded
    for p, r in zip(prompts, rolls):
        assert 1 <= len(r.tokens) <= 5 and len(r.mix_logp) == len(r.tokens)
        assert tok.eos_token_id not in r.tokens[:-1]  # stops at EOS
        ids = torch.tensor([p + r.tokens])
        with torch.no_grad():  # the KV-cached left-padded steps agree with one full forward
            lq = torch.log_softmax(student(ids).logits[0].double() / 0.7, -1)
            lp = torch.log_softmax(teacher(ids).logits[0].double() / 0.7, -1)
        pos = torch.arange(len(p) - 1, len(p) + len(r.tokens) - 1)
        y = torch.tensor(r.tokens)
        want = (
            torch.logaddexp(lq[pos, y] + math.log1p(-alpha), lp[pos, y] + math.log(alpha))
            if alpha > 0
            else lq[pos, y]
        )
        torch.testing.assert_close(
            torch.tensor(r.mix_logp, dtype=torch.float64), want, rtol=1e-4, atol=1e-4
        )


def test_alpha_one_samples_the_teacher(tiny_models):
    student, teacher, tok = tiny_models
    g = torch.Generator().manual_seed(3)
    # temperature → small and α = 1: the teacher's argmax path (greedy), whatever the student says
    rolls = M.mixed_rollouts(
        student,
        teacher,
        [[1, 60, 61]],
        alpha=1.0,
        temperature=1e-4,
        top_k=0,
        top_p=1.0,
        max_new_tokens=4,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        generator=g,
    )
    with torch.no_grad():
        greedy = teacher.generate(
            torch.tensor([[1, 60, 61]]),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    want = greedy[0, 3:].tolist()
    assert rolls[0].tokens == want[: len(rolls[0].tokens)]


# ---------------------------------------------------------------- a step against materialized logits


def _materialized_loss(student, teacher, batch, pt, cfg) -> torch.Tensor:
    """The MiniLLM loss of one minibatch from full float64 logits (no kd_kernels)."""

    def logits(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]

    s = logits(student, batch).double()
    with torch.no_grad():
        t = logits(teacher, batch).double()
    mask, targets = batch["mask"], batch["targets"]
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logq = torch.log_softmax(s / cfg.minillm_temperature, -1).gather(-1, safe[..., None])[..., 0]
    ratio = torch.exp(logq - batch["old_logp"].double() + batch["log_w"].double())
    adv = batch["adv"].double()
    per = torch.maximum(
        -adv * ratio, -adv * ratio.clamp(1 - cfg.minillm_clip, 1 + cfg.minillm_clip)
    )
    n = mask.sum()
    pg = per[mask].sum() / n
    temp = cfg.minillm_temperature  # both models at the rollout temperature (LMOps)
    single = reference.reverse_kl_per_token(s / temp, t / temp)[mask].sum() / n
    ps = logits(student, pt).double()
    with torch.no_grad():
        pt_t = logits(teacher, pt).double()
    pt_targets = pt["labels"][:, 1:]
    pm = pt_targets != -100
    ce = reference.cross_entropy_per_token(ps, pt_targets)[pm].mean()
    fkl = reference.forward_kl_per_token(ps, pt_t)[pm].mean()
    return pg + single + 0.5 * ce + 0.5 * fkl


def test_minillm_step_gradient_matches_materialized_logits(tmp_path, response_cache):
    from kd_kernels.train.methods import get_method
    from kd_kernels.train.run import Run

    cfg = tiny_cfg(
        tmp_path,
        response_cache,
        minillm_rollouts=4,
        batch_size=2,
        minillm_ppo_epochs=2,
        minillm_clip=0.05,
        backend="torch",
        minillm_temperature=0.8,
    )
    run = Run(cfg, 0, 1, torch.device("cpu"))
    method = get_method("minillm")
    run.train_examples = run.examples("train", method.train_responses(run))
    student, teacher = run.models.student, run.models.teacher
    # step 3 = the second minibatch of the second epoch: q_θ ≠ q_old only if we move the student
    with torch.no_grad():
        for prm in student.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    batch = method.batch(run, 3)
    pt = {k[3:]: v for k, v in batch.items() if k.startswith("pt_")}
    assert batch["mask"].any() and (batch["adv"] != 0).any()

    loss, parts = method.loss(student, teacher, batch, run)
    student.zero_grad()
    loss.backward()
    fused = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
    assert {"pg", "single_step", "pt", "ratio", "clip_frac", "reward"} <= parts.keys()

    student.zero_grad()
    want = _materialized_loss(student, teacher, batch, pt, cfg)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    assert 0 < parts["clip_frac"] < 1  # both branches of the clipped objective are exercised
    for n, p in student.named_parameters():
        torch.testing.assert_close(
            fused[n].double(), p.grad.double(), rtol=2e-3, atol=2e-5, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_round_scores_rollouts_with_the_round_start_student(tmp_path, response_cache):
    from kd_kernels.train.methods import MiniLLM
    from kd_kernels.train.run import Run

    cfg = tiny_cfg(tmp_path, response_cache, minillm_pt=False)
    run = Run(cfg, 0, 1, torch.device("cpu"))
    method = MiniLLM()
    for layer in run.models.student.model.layers:
        layer.self_attn.attention_dropout = 0.3
    minibatches, stats = method.make_round(run, 0)
    # no dropout in the MiniLLM student
    assert all(
        layer.self_attn.attention_dropout == 0.0 for layer in run.models.student.model.layers
    )
    assert len(minibatches) == MiniLLM.steps_per_round(cfg) == 4  # 2 epochs × 4 rollouts / 2
    seen = [
        tuple(
            tuple(ids[: int(m.sum())])
            for ids, m in zip(mb["input_ids"].tolist(), mb["attention_mask"])
        )
        for mb in minibatches
    ]
    assert sorted(seen[0] + seen[1]) == sorted(seen[2] + seen[3])  # each epoch covers every rollout
    for mb in minibatches:
        # at θ = θ_old the ratio is the importance weight q_old / p̃ ∈ (0, 1/(1 − α)]
        w = mb["log_w"][mb["mask"]].exp()
        assert (w > 0).all() and (w <= 1 / (1 - cfg.minillm_alpha) + 1e-5).all()
        assert (mb["log_w"][~mb["mask"]] == 0).all() and (mb["adv"][~mb["mask"]] == 0).all()
    from kd_kernels.train.run import head

    for mb in minibatches[:2]:  # the cached teacher states are a fresh forward's on the minibatch
        with torch.no_grad():
            fresh = head(run.models.teacher, mb).hidden
        torch.testing.assert_close(
            mb["teacher_hidden"][mb["mask"]], fresh[mb["mask"]], rtol=1e-4, atol=1e-5
        )
    width = cfg.max_new_tokens
    for mb in minibatches:
        # official whitening: over each minibatch's padded (B × W) block the advantages have mean 0
        # and population variance 1, the padded slots holding A_pad = (0 − μ) / σ
        a, n = mb["adv"][mb["mask"]].double(), int(mb["mask"].sum())
        pad = mb["mask"].shape[0] * width - n
        a_pad = -a.sum() / pad if pad else torch.tensor(0.0, dtype=torch.float64)
        assert (a.sum() + pad * a_pad).abs() < 1e-4
        var = ((a * a).sum() + pad * a_pad**2) / (n + pad)
        assert var.item() == pytest.approx(1.0, rel=1e-4)
    assert math.isfinite(stats["reward"]) and stats["response_len"] > 0


def test_valid_whitening_option_whitens_the_round(tmp_path, response_cache):
    from kd_kernels.train.methods import MiniLLM
    from kd_kernels.train.run import Run

    cfg = tiny_cfg(tmp_path, response_cache, minillm_pt=False, minillm_whiten="valid")
    run = Run(cfg, 0, 1, torch.device("cpu"))
    minibatches, _ = MiniLLM().make_round(run, 0)
    adv = torch.cat([mb["adv"][mb["mask"]] for mb in minibatches[:2]])  # epoch 0: the whole round
    assert adv.mean().abs() < 1e-5 and adv.std(unbiased=False) == pytest.approx(1.0, rel=1e-3)


def test_teacher_reward_uses_temperature_one(tmp_path, response_cache):
    from kd_kernels.train.methods import MiniLLM, _logprobs
    from kd_kernels.train.run import Run, head

    cfg = tiny_cfg(
        tmp_path,
        response_cache,
        minillm_pt=False,
        minillm_temperature=0.7,
        minillm_rollouts=2,
        batch_size=2,
        minillm_ppo_epochs=1,
    )
    run = Run(cfg, 0, 1, torch.device("cpu"))
    (mb,), stats = MiniLLM().make_round(run, 0)
    m, tg = mb["mask"], mb["targets"]
    with torch.no_grad():
        h = head(run.models.teacher, mb)
        lp1 = _logprobs(h, torch.where(m, tg, 0), m, cfg, 1.0)
        lp07 = _logprobs(h, torch.where(m, tg, 0), m, cfg, 0.7)
    want = M.token_rewards(lp1, mb["old_logp"], m)[m].mean()
    assert stats["reward"] == pytest.approx(float(want), rel=1e-5)
    assert abs(float(M.token_rewards(lp07, mb["old_logp"], m)[m].mean()) - stats["reward"]) > 1e-3


def test_tiny_minillm_resume_mid_round_is_exact(tmp_path, response_cache):
    from kd_kernels.train.trainer import train

    # 2 epochs × 4 rollouts / 2 = 4 steps a round; stop at step 3 (mid-round) and resume to 6
    kw = {"skip_eval": True, "ckpt_every": 100}
    train(tiny_cfg(tmp_path / "a", response_cache, steps=6, **kw))
    train(tiny_cfg(tmp_path / "b", response_cache, steps=3, **kw))
    train(tiny_cfg(tmp_path / "b", response_cache, steps=6, resume=True, **kw), explicit={"steps"})
    a = [
        json.loads(x)
        for x in (tmp_path / "a" / "minillm" / "metrics.jsonl").read_text().splitlines()
    ]
    b = [
        json.loads(x)
        for x in (tmp_path / "b" / "minillm" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("loss", "pg", "ratio", "reward"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)


def test_tiny_minillm_end_to_end(tmp_path, response_cache):
    from kd_kernels.train.trainer import train

    cfg = tiny_cfg(tmp_path, response_cache)
    summary = train(cfg)
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss", "pg", "single_step", "pt", "ratio", "reward"):
            assert math.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["pg"] + r["single_step"] + r["pt"], rel=1e-4, abs=1e-5)
        assert r["single_step"] >= 0
    from kd_kernels.train.methods import method_plot

    panels = {p: [s.key for s, _, _ in c] for p, c in method_plot(rows, "minillm").panels.items()}
    assert panels == {"loss": ["loss", "pg", "single_step", "pt"], "state": ["reward", "clip_frac"]}
    final = summary["final"]
    assert math.isfinite(final["rougeL_student"]) and final["test_reverse_kl"] >= 0
    assert summary["method"] == "minillm" and summary["peak_mem_mb"] > 0
