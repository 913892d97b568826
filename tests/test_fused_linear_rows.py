"""Per-token fused-linear KD (reduction="none") and model-exact logits (logit scale, softcap)
against float64 references on materialized logits, with random upstream gradients."""

from __future__ import annotations

import math

import pytest
import torch
from _common import DIVERGENCES

import kd_kernels
from kd_kernels import reference as R

COEF = {"skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.3}, "jsd": {"beta": 0.4}}
D_S, D_T = 16, 24
FAST_BACKENDS = tuple(b for b in kd_kernels.available_backends("cpu") if b != "triton")
HAS_TRITON = "triton" in kd_kernels.available_backends("cpu")

# (student σ, student c, teacher σ, teacher c)
HEADS = {
    "plain": (1.0, None, 1.0, None),
    "scale": (0.625, None, 1.7, None),
    "softcap": (1.0, 3.0, 1.0, 2.5),
    "scale+softcap": (1.6, 2.0, 0.8, 4.0),
}


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def transform(z, scale, cap):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def make(lead, vocab, dtype=torch.float32, bias=True):
    hs = torch.randn(*lead, D_S).to(dtype)
    ws = (torch.randn(vocab, D_S) / D_S**0.5 * 3).to(dtype)
    ht = torch.randn(*lead, D_T).to(dtype)
    wt = (torch.randn(vocab, D_T) / D_T**0.5 * 3).to(dtype)
    bs = torch.randn(vocab).to(dtype) if bias else None
    bt = torch.randn(vocab).to(dtype) if bias else None
    return hs, ws, bs, ht, wt, bt


def reference(
    div,
    hs,
    ws,
    bs,
    ht,
    wt,
    bt,
    heads,
    *,
    upstream,
    mask=None,
    token_weights=None,
    labels=None,
    ce_weight=0.0,
    temperature=1.0,
    reduction="none",
):
    """float64 materialized logits → (per-token or reduced output, grads of hs, ws, bs) for
    ``(out * upstream).sum()`` (or the reduced loss times ``upstream``)."""
    ss, cs, st, ct = heads
    H = hs.detach().double().requires_grad_()
    W = ws.detach().double().requires_grad_()
    B = bs.detach().double().requires_grad_() if bs is not None else None
    s = transform(H @ W.T + (B if B is not None else 0), ss, cs)
    t = transform(ht.double() @ wt.double().T + (bt.double() if bt is not None else 0), st, ct)
    kd_mask = mask if mask is not None or labels is None else labels != -100
    out = R.kd_loss(
        div,
        s,
        t,
        mask=kd_mask,
        token_weights=token_weights,
        reduction=reduction,
        temperature=temperature,
        **COEF.get(div, {}),
    )
    if labels is not None:
        valid = labels != -100 if mask is None else (labels != -100) & mask
        ce = R.cross_entropy_per_token(s, torch.where(valid, labels, -100))
        if reduction == "sum":
            ce = ce.sum()
        elif reduction == "mean":
            ce = ce.sum() / valid.sum().clamp_min(1)
        out = out + ce_weight * ce
    params = [x for x in (H, W, B) if x is not None]
    grads = torch.autograd.grad((out * upstream).sum(), params)
    return out.detach(), grads


def ours(div, hs, ws, bs, ht, wt, bt, heads, *, upstream, **kw):
    ss, cs, st, ct = heads
    H, W = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    B = bs.clone().requires_grad_() if bs is not None else None
    out = kd_kernels.fused_linear_kd(
        H,
        W,
        ht,
        wt,
        divergence=div,
        student_bias=B,
        teacher_bias=bt,
        student_logit_scale=ss,
        student_softcap=cs,
        teacher_logit_scale=st,
        teacher_softcap=ct,
        **COEF.get(div, {}),
        **kw,
    )
    params = [x for x in (H, W, B) if x is not None]
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), params)
    return out.detach(), grads


def check(out, grads, ref_out, ref_grads, tol):
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < tol, ("loss", rel_err(out, ref_out))
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_per_token_matches_reference(backend, head, divergence):
    lead, vocab = (3, 5), 1031
    hs, ws, bs, ht, wt, bt = make(lead, vocab)
    mask = torch.rand(lead) > 0.3
    token_weights = torch.rand(lead) + 0.5
    labels = torch.randint(0, vocab, lead)
    labels[0, 1] = -100
    upstream = torch.randn(lead)
    upstream[~mask] = float("nan")  # never read where the token does not count
    kw = {
        "mask": mask,
        "token_weights": token_weights,
        "labels": labels,
        "ce_weight": 0.7,
        "temperature": 1.5,
    }
    ref_out, ref_grads = reference(
        divergence, hs, ws, bs, ht, wt, bt, HEADS[head], upstream=torch.nan_to_num(upstream), **kw
    )
    out, grads = ours(
        divergence,
        hs,
        ws,
        bs,
        ht,
        wt,
        bt,
        HEADS[head],
        upstream=upstream,
        reduction="none",
        backend=backend,
        chunk_size=4,
        **kw,
    )
    assert out.shape == lead
    assert torch.all(out[~mask] == 0)
    check(out, grads, ref_out, ref_grads, 2e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_per_token_triton(divergence):
    lead, vocab = (7,), 131
    hs, ws, bs, ht, wt, bt = make(lead, vocab)
    upstream = torch.randn(lead)
    ref_out, ref_grads = reference(
        divergence, hs, ws, bs, ht, wt, bt, HEADS["scale+softcap"], upstream=upstream
    )
    out, grads = ours(
        divergence,
        hs,
        ws,
        bs,
        ht,
        wt,
        bt,
        HEADS["scale+softcap"],
        upstream=upstream,
        reduction="none",
        backend="triton",
    )
    check(out, grads, ref_out, ref_grads, 2e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("head", ["scale", "softcap", "scale+softcap"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reduced_with_scale_and_softcap(reduction, head, divergence):
    lead, vocab = (2, 9), 257
    hs, ws, bs, ht, wt, bt = make(lead, vocab)
    labels = torch.randint(0, vocab, lead)
    labels[1, :3] = -100
    up = torch.tensor(1.7)
    kw = {"labels": labels, "ce_weight": 0.4, "reduction": reduction}
    ref_out, ref_grads = reference(
        divergence, hs, ws, bs, ht, wt, bt, HEADS[head], upstream=up, **kw
    )
    out, grads = ours(
        divergence, hs, ws, bs, ht, wt, bt, HEADS[head], upstream=up, chunk_size=5, **kw
    )
    assert out.dim() == 0
    check(out, grads, ref_out, ref_grads, 2e-5)


def test_bf16_softcap_no_worse_than_eager():
    lead, vocab = (4, 6), 257
    hs, ws, bs, ht, wt, bt = make(lead, vocab, torch.bfloat16)
    heads = HEADS["scale+softcap"]
    up = torch.randn(lead)
    ref_out, ref_grads = reference("forward_kl", hs, ws, bs, ht, wt, bt, heads, upstream=up)
    out, grads = ours("forward_kl", hs, ws, bs, ht, wt, bt, heads, upstream=up, reduction="none")
    # eager PyTorch in bf16: the same formula on materialized bf16 logits
    H, W, B = (x.clone().requires_grad_() for x in (hs, ws, bs))
    s = transform(H @ W.T + B, heads[0], heads[1])
    t = transform(ht @ wt.T + bt, heads[2], heads[3])
    e_out = R.kd_loss("forward_kl", s, t, reduction="none")
    e_grads = torch.autograd.grad((e_out * up.to(e_out.dtype)).sum(), (H, W, B))
    assert rel_err(out, ref_out) <= 2 * rel_err(e_out, ref_out) + 1e-2
    for g, e, r in zip(grads, e_grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, r) <= 2 * rel_err(e, r) + 1e-2


def test_none_is_consistent_with_sum_and_chunking():
    hs, ws, bs, ht, wt, bt = make((5, 3), 257)
    labels = torch.randint(0, 257, (5, 3))
    kw = {
        "divergence": "skew_reverse_kl",
        "alpha": 0.2,
        "student_bias": bs,
        "teacher_bias": bt,
        "labels": labels,
        "ce_weight": 0.3,
        "student_softcap": 4.0,
    }
    H = hs.clone().requires_grad_()
    per_tok = kd_kernels.fused_linear_kd(H, ws, ht, wt, reduction="none", chunk_size=2, **kw)
    (g_none,) = torch.autograd.grad(per_tok.sum(), H)
    total = kd_kernels.fused_linear_kd(H, ws, ht, wt, reduction="sum", **kw)
    (g_sum,) = torch.autograd.grad(total, H)
    torch.testing.assert_close(per_tok.sum(), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_none, g_sum, rtol=1e-5, atol=1e-6)


def test_none_saves_no_logits_and_components():
    n, vocab = 40, 1031  # n > D_s, D_t: an (N, V) buffer is larger than either weight
    hs, ws, _bs, ht, wt, _bt = make((n,), vocab)
    labels = torch.randint(0, vocab, (n,))
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    H, W = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, parts = kd_kernels.fused_linear_kd(
            H,
            W,
            ht,
            wt,
            divergence="jsd",
            labels=labels,
            ce_weight=0.5,
            reduction="none",
            return_components=True,
            chunk_size=8,
        )
    # the inputs and (N,) factors only: no (N, V) logits
    assert saved and max(saved) == max(ws.numel(), wt.numel()) < n * vocab
    torch.testing.assert_close(loss, parts.kd + 0.5 * parts.ce)
    assert parts.kd.shape == parts.ce.shape == (n,)
    with torch.no_grad():  # evaluation path: no autograd, the same values
        again = kd_kernels.fused_linear_kd(
            H, W, ht, wt, divergence="jsd", labels=labels, ce_weight=0.5, reduction="none"
        )
    torch.testing.assert_close(again, loss.detach())


def test_module_and_named_forms_take_the_head_options():
    hs, ws, _, ht, wt, _ = make((3, 4), 257)
    kw = {"student_logit_scale": 0.5, "student_softcap": 7.0, "teacher_softcap": 3.0}
    module = kd_kernels.FusedLinearKDLoss("forward_kl", reduction="none", **kw)
    assert "student_softcap=7.0" in repr(module)
    ref = kd_kernels.fused_linear_kd(
        hs, ws, ht, wt, divergence="forward_kl", reduction="none", **kw
    )
    torch.testing.assert_close(module(hs, ws, ht, wt), ref)
    torch.testing.assert_close(
        kd_kernels.fused_linear_forward_kl(hs, ws, ht, wt, reduction="none", **kw), ref
    )
    plain = kd_kernels.fused_linear_kd(hs, ws, ht, wt, divergence="forward_kl", reduction="none")
    assert not torch.allclose(plain, ref)  # the options change the objective


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("head", ["scale", "softcap", "scale+softcap"])
def test_logprobs_with_scale_and_softcap(head, entropy):
    lead, vocab, temperature = (3, 7), 1031, 1.3
    sigma, cap = HEADS[head][:2]
    h = torch.randn(*lead, D_S)
    w = torch.randn(vocab, D_S) / D_S**0.5 * 3
    b = torch.randn(vocab)
    tokens = torch.randint(0, vocab, lead)
    mask = torch.rand(lead) > 0.2
    g1, g2 = torch.randn(lead), torch.randn(lead)
    H, W, B = (x.double().requires_grad_() for x in (h, w, b))
    lq = (transform(H @ W.T + B, sigma, cap) / temperature).log_softmax(-1)
    ref = torch.where(mask, lq.gather(-1, tokens[..., None]).squeeze(-1), 0.0)
    ref_ent = torch.where(mask, -(lq.exp() * lq).sum(-1), 0.0)
    obj = (ref * g1).sum() + ((ref_ent * g2).sum() if entropy else 0)
    ref_grads = torch.autograd.grad(obj, (H, W, B))
    h2, w2, b2 = (x.clone().requires_grad_() for x in (h, w, b))
    out = kd_kernels.fused_linear_logprobs(
        h2,
        w2,
        tokens,
        bias=b2,
        temperature=temperature,
        mask=mask,
        return_entropy=entropy,
        chunk_size=5,
        logit_scale=sigma,
        softcap=cap,
    )
    lp, ent = out if entropy else (out, None)
    obj = (lp * g1).sum() + ((ent * g2).sum() if entropy else 0)
    grads = torch.autograd.grad(obj, (h2, w2, b2))
    assert rel_err(lp, ref) < 2e-6
    if entropy:
        assert rel_err(ent, ref_ent) < 2e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-5


def test_sampled_token_log_ratio_recipe():
    """The documented on-policy recipe: log q(y) − log p(y) from two logprobs calls."""
    lead, vocab = (2, 6), 257
    hs, ws, bs, ht, wt, bt = make(lead, vocab)
    y = torch.randint(0, vocab, lead)
    ratio = kd_kernels.fused_linear_logprobs(hs, ws, y, bias=bs) - kd_kernels.fused_linear_logprobs(
        ht, wt, y, bias=bt
    )
    s, t = hs.double() @ ws.double().T + bs.double(), ht.double() @ wt.double().T + bt.double()
    ref = (s.log_softmax(-1) - t.log_softmax(-1)).gather(-1, y[..., None]).squeeze(-1)
    assert rel_err(ratio, ref) < 1e-5


BAD_HEAD = [
    (
        {"student_logit_scale": 0.0},
        ValueError,
        "student_logit_scale=0.0 must be a finite number > 0",
    ),
    ({"student_logit_scale": -2.0}, ValueError, "student_logit_scale"),
    ({"teacher_logit_scale": math.nan}, ValueError, "teacher_logit_scale=nan"),
    ({"teacher_logit_scale": math.inf}, ValueError, "teacher_logit_scale=inf"),
    ({"student_softcap": 0.0}, ValueError, "student_softcap=0.0 must be a finite number > 0"),
    ({"student_softcap": -30.0}, ValueError, "or None"),
    ({"teacher_softcap": math.nan}, ValueError, "teacher_softcap=nan"),
    ({"student_softcap": "30"}, TypeError, "student_softcap must be a positive float"),
    ({"teacher_logit_scale": True}, TypeError, "teacher_logit_scale must be a positive float"),
    ({"student_logit_scale": torch.tensor(1.0)}, TypeError, "got Tensor"),
]


@pytest.mark.parametrize("change,exc,match", BAD_HEAD)
def test_bad_head_options_raise(change, exc, match):
    hs, ws, _, ht, wt, _ = make((2, 3), 257)
    with pytest.raises(exc, match=match.replace("(", r"\(")):
        kd_kernels.fused_linear_kd(hs, ws, ht, wt, **change)
    with pytest.raises(exc, match=match.replace("(", r"\(")):
        kd_kernels.FusedLinearKDLoss(**change)


def test_logprobs_bad_head_options():
    h, w = torch.randn(3, D_S), torch.randn(257, D_S)
    tokens = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="logit_scale=0.0"):
        kd_kernels.fused_linear_logprobs(h, w, tokens, logit_scale=0.0)
    with pytest.raises(ValueError, match="softcap=-1.0"):
        kd_kernels.fused_linear_logprobs(h, w, tokens, softcap=-1.0)
    with pytest.raises(TypeError, match="softcap must be a positive float"):
        kd_kernels.fused_linear_logprobs(h, w, tokens, softcap="off")
