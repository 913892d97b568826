"""Sparse teachers (sparse_kd, fused_linear_sparse_kd, teacher_topk) against the float64 reference."""

import importlib.util
import math

import pytest
import torch

import kd_kernels
from kd_kernels import reference as R
from kd_kernels._sparse_impl import _has_cpu_kernel
from kd_kernels._spec import Divergence

DIVERGENCES = tuple(d.label for d in Divergence)  # every one has a sparse form
DIV_TAILS = [(d, t) for d in DIVERGENCES for t in ("bucket", "renormalize")] + [
    ("forward_kl", "ignore")
]
BACKENDS = ["torch"] + (["cpu"] if _has_cpu_kernel() else [])
# The Triton kernel runs under TRITON_INTERPRET=1 on the CPU (conftest.py), slowly: the whole matrix
# with it is marked slow; test_triton_subset covers every divergence x tail in the default run.
HAS_TRITON = bool(importlib.util.find_spec("triton")) and (
    "triton" in kd_kernels.available_backends("cpu")
)
if HAS_TRITON:
    BACKENDS.append(pytest.param("triton", marks=pytest.mark.slow))
DTYPES = [torch.float32, torch.bfloat16]
# (K, V, reduction, temperature, mask kind): K ∈ {1, 8, 64}, odd V, every reduction.
CONFIGS = [
    (1, 97, "mean", 1.0, None),
    (8, 257, "sum", 2.0, "mask"),
    (64, 257, "none", 0.7, "weights"),
    (8, 131, "mean", 1.0, "padded"),
]
INF = math.inf


def make_teacher(n, v, k, dtype=torch.float32, sharp=2.0, gen=None):
    """Top-k ids and log-probs of a random teacher (float64 before the cast)."""
    t = torch.randn(n, v, dtype=torch.float64, generator=gen) * sharp
    lp, ids = t.log_softmax(-1).topk(k, -1)
    return t, ids, lp.to(dtype)


def make_case(k, v, mask_kind, dtype, n=6):
    s = (torch.randn(n, v, dtype=torch.float64) * 2).to(dtype)
    _, ids, lp = make_teacher(n, v, k, dtype)
    mask = weights = None
    if mask_kind in ("mask", "weights"):
        mask = torch.tensor([True, False, True, True, False, True])[:n]
        ids[1] = -5  # masked rows are never read: garbage ids are fine there
    if mask_kind == "weights":
        weights = torch.rand(n) + 0.5
    if mask_kind == "padded":
        lp[0, k // 2 :] = -INF  # a row with fewer than K entries
        ids[0, k // 2 :] = 10**6  # ids of padding are never read
        lp[2, :] = -INF  # a row with no entries at all
        ids[2, :] = -1
    return s, ids, lp, mask, weights


def tol(dtype):
    return {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 4e-3)}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"K{c[0]}-V{c[1]}-{c[2]}-T{c[3]}-{c[4]}")
@pytest.mark.parametrize("div_tail", DIV_TAILS, ids=lambda x: f"{x[0]}-{x[1]}")
def test_matches_reference(div_tail, config, dtype, backend):
    divergence, tail = div_tail
    k, v, reduction, temperature, mask_kind = config
    s, ids, lp, mask, weights = make_case(k, v, mask_kind, dtype)
    opts = {
        "tail": tail,
        "temperature": temperature,
        "mask": mask,
        "token_weights": weights,
        "reduction": reduction,
    }
    s64 = s.double().requires_grad_()
    ref = R.sparse_kd_loss(divergence, s64, ids, lp.double(), **opts)
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(x, ids, lp, divergence=divergence, backend=backend, **opts)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    up = torch.randn(ref.shape, dtype=torch.float64)  # a random upstream gradient
    (ref * up).sum().backward()
    (out * up.float()).sum().backward()
    rtol, atol = tol(dtype)
    torch.testing.assert_close(
        out.double(), ref.detach(), rtol=1e-4 if dtype != torch.float32 else 2e-5, atol=1e-5
    )
    g, gr = x.grad.double(), s64.grad
    scale = gr.abs().max().item() + 1e-30
    torch.testing.assert_close(g, gr, rtol=rtol, atol=atol * scale)
    if mask is not None:  # masked rows: exactly 0 gradient
        assert (x.grad[~mask] == 0).all()
    if mask_kind == "padded":  # an all-padding row contributes exactly nothing
        assert (x.grad[2] == 0).all()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not usable here")
@pytest.mark.parametrize("div_tail", DIV_TAILS, ids=lambda x: f"{x[0]}-{x[1]}")
def test_triton_subset(div_tail):
    """The Triton kernel on every divergence x tail (padded rows, a mask, bf16 for one), quickly."""
    test_matches_reference(div_tail, CONFIGS[3], torch.float32, "triton")
    if div_tail == ("forward_kl", "bucket"):
        test_matches_reference(div_tail, CONFIGS[1], torch.bfloat16, "triton")
        test_support_holds_almost_all_student_mass(div_tail, "triton")
        for tail in ("bucket", "renormalize", "ignore"):
            test_nan_and_non_distribution_rows(tail, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_student_and_int32_ids(backend):
    s = torch.randn(5, 301, dtype=torch.float64)
    _, ids, lp = make_teacher(5, 301, 16, torch.float16)
    x = s.half().requires_grad_()
    out = kd_kernels.sparse_kd(x, ids.int(), lp, divergence="jsd", backend=backend)
    s64 = s.half().double().requires_grad_()
    ref = R.sparse_kd_loss("jsd", s64, ids, lp.double())
    out.backward()
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        x.grad.double(), s64.grad, rtol=1e-2, atol=1e-3 * s64.grad.abs().max()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_module(backend):
    s = torch.randn(2, 3, 211)
    _, ids, lp = make_teacher(6, 211, 8)
    ids, lp = ids.reshape(2, 3, 8), lp.reshape(2, 3, 8)
    loss = kd_kernels.SparseKDLoss("reverse_kl", tail="bucket", reduction="none", backend=backend)
    out = loss(s, ids, lp)
    assert out.shape == (2, 3)
    ref = R.sparse_kd_loss("reverse_kl", s.double(), ids, lp.double(), reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-6)
    assert "reverse_kl" in repr(loss) and "bucket" in repr(loss)


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "divergence", ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"]
)
def test_bucket_never_above_dense_and_zero_when_equal(divergence, backend):
    n, v = 16, 503
    s = torch.randn(n, v) * 2
    t, ids, lp = make_teacher(n, v, 8)
    sparse = kd_kernels.sparse_kd(
        s, ids, lp, divergence=divergence, reduction="none", backend=backend
    )
    dense = kd_kernels.kd_loss(
        s, t.float(), divergence=divergence, reduction="none", backend="torch"
    )
    assert (sparse >= -1e-6).all()
    assert (sparse <= dense + 1e-5).all()  # data-processing inequality
    # The student equal to the teacher: every coarse-graining agrees, the divergence is 0.
    for tail in ("bucket", "renormalize"):
        x = t.float().clone().requires_grad_()
        out = kd_kernels.sparse_kd(x, ids, lp, divergence=divergence, tail=tail, backend=backend)
        out.backward()
        assert abs(out.item()) < 1e-6
        assert x.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_is_the_sampled_token_estimator_with_duplicates(backend):
    n, v, k = 4, 97, 32
    s = torch.randn(n, v)
    t = torch.randn(n, v, dtype=torch.float64)
    ids = torch.multinomial(t.softmax(-1), k, replacement=True)  # duplicates expected
    assert any(len(set(r.tolist())) < k for r in ids)
    lp = torch.full((n, k), math.log(1.0 / k))
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(x, ids, lp, tail="ignore", reduction="sum", backend=backend)
    out.backward()
    lq = s.double().log_softmax(-1)
    want = (lp.double() - lq.gather(1, ids)).mean(-1).sum()  # (1/K) Σ (log 1/K − log q)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    q = s.double().softmax(-1)
    g = q - torch.zeros(n, v, dtype=torch.float64).scatter_add_(
        1, ids, torch.full((n, k), 1 / k, dtype=torch.float64)
    )
    torch.testing.assert_close(x.grad.double(), g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Extremes and the semantics of rows that are not distributions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div_tail", DIV_TAILS, ids=lambda x: f"{x[0]}-{x[1]}")
def test_support_holds_almost_all_student_mass(div_tail, backend):
    divergence, tail = div_tail
    n, v, k = 3, 1031, 8
    _, ids, lp = make_teacher(n, v, k)
    # The student puts 1 − 1e−6 of its mass on the support: the tail must not cancel to 0 or < 0.
    s = torch.full((n, v), 0.0, dtype=torch.float64)
    s.scatter_(1, ids, torch.randn(n, k, dtype=torch.float64))
    z_s = s.gather(1, ids).exp().sum(-1, keepdim=True)
    off = math.log(1e-6 / (v - k)) + z_s.log() - math.log1p(-1e-6)
    s = torch.where(torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True), s, off).float()
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(x, ids, lp, divergence=divergence, tail=tail, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    s64 = s.double().requires_grad_()
    ref = R.sparse_kd_loss(divergence, s64, ids, lp.double(), tail=tail)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        x.grad.double(), s64.grad, rtol=1e-3, atol=1e-4 * s64.grad.abs().max()
    )


@pytest.mark.parametrize(
    "backend", BACKENDS[:2] + (["triton"] if HAS_TRITON else [])
)  # triton: small, fast
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_small_teacher_tail_as_accurate_as_float64(divergence, backend):
    """A top-14-of-17 teacher whose tails 1 − P are around 1e-6 (some below 0 by rounding: the floor): the
    bucket's gradient within 1e-6 (relative, norm-wise) of float64. 1 − P from an fp32 log P is off by
    eps32 / (1 − P), 5 % of such a tail; the triton kernel's reverse_kl was 7e-4 off, jeffreys 5e-4."""
    g = torch.Generator().manual_seed(0)
    lp, ids = (torch.randn(64, 17, generator=g) * 5).log_softmax(-1).topk(14)
    s = torch.randn(64, 17, generator=g)
    x = s.clone().requires_grad_()
    kd_kernels.sparse_kd(
        x, ids, lp, divergence=divergence, backend=backend, reduction="sum"
    ).backward()
    s64 = s.double().requires_grad_()
    R.sparse_kd_loss(divergence, s64, ids, lp.double(), reduction="sum").backward()
    assert ((x.grad.double() - s64.grad).norm() / s64.grad.norm()).item() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "skew_reverse_kl", "jsd"])
def test_teacher_mass_above_one_by_rounding(divergence, backend):
    n, v = 3, 257
    s = torch.randn(n, v)
    # A near-deterministic teacher in bf16: its top-k log-probs sum to ≥ 1 after rounding.
    ids = torch.stack([torch.randperm(v)[:4] for _ in range(n)])
    lp = torch.tensor([[-1e-4, -12.0, -13.0, -14.0]] * n).bfloat16()
    lp[0, 0] = -0.0  # p = 1 exactly, plus the others
    assert (lp.double().exp().sum(-1) >= 1).any()
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(x, ids, lp, divergence=divergence, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    s64 = s.double().requires_grad_()
    ref = R.sparse_kd_loss(divergence, s64, ids, lp.double())
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        x.grad.double(), s64.grad, rtol=1e-3, atol=1e-4 * s64.grad.abs().max()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_support_covering_the_vocabulary_has_no_tail(backend):
    v = 37
    t = torch.randn(2, v, dtype=torch.float64)
    lp, ids = t.log_softmax(-1).topk(v, -1)
    s = torch.randn(2, v)
    for divergence in ("forward_kl", "reverse_kl"):
        out = kd_kernels.sparse_kd(
            s, ids, lp.float(), divergence=divergence, reduction="none", backend=backend
        )
        dense = kd_kernels.kd_loss(
            s, t.float(), divergence=divergence, reduction="none", backend="torch"
        )
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_nan_and_non_distribution_rows(tail, backend):
    n, v, temp = 6, 131, 0.5
    s = torch.randn(n, v)
    _, ids, lp = make_teacher(n, v, 4)
    s[1, 7] = math.nan  # NaN in a counted row
    s[2] = -INF  # student all −inf
    s[3, 0] = INF  # +inf logit
    lp[4, 1] = math.nan  # NaN teacher log-prob
    s[5, 3] = 3e38  # finite in fp32, +inf after dividing by T = 0.5
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(
        x, ids, lp, tail=tail, temperature=temp, reduction="none", backend=backend
    )
    out.sum().backward()
    assert torch.isfinite(out[0]) and torch.isfinite(x.grad[0]).all()
    for r in (1, 2, 3, 4, 5):
        assert torch.isnan(out[r]), r
        assert torch.isnan(x.grad[r]).all(), r
    ref = R.sparse_kd_loss(
        "forward_kl", s[:1].double(), ids[:1], lp[:1].double(), tail=tail, temperature=temp
    )
    torch.testing.assert_close(out[0].double(), ref, rtol=2e-5, atol=1e-6)
    # The same rows masked: exactly 0, never read.
    mask = torch.tensor([True, False, False, False, False, False])
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(
        x, ids, lp, tail=tail, mask=mask, reduction="sum", temperature=temp, backend=backend
    )
    out.backward()
    assert torch.isfinite(out) and (x.grad[1:] == 0).all()


def _check_against_reference(s, ids, lp, divergence, backend, grad_atol=1e-5, **opts):
    """Loss and gradient of sparse_kd against float64, at test_matches_reference's fp32 tolerances
    (``grad_atol``: relative to the largest gradient entry)."""
    x = s.clone().requires_grad_()
    out = kd_kernels.sparse_kd(
        x, ids, lp, divergence=divergence, backend=backend, reduction="none", **opts
    )
    s64 = s.double().requires_grad_()
    ref = R.sparse_kd_loss(divergence, s64, ids, lp.double(), reduction="none", **opts)
    up = torch.randn(ref.shape, dtype=torch.float64)
    (ref * up).sum().backward()
    (out * up.float()).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(
        out.double(), ref.detach(), rtol=2e-5, atol=1e-5 * ref.abs().max().item()
    )
    scale = s64.grad.abs().max().item() + 1e-30
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-4, atol=grad_atol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["T=1e-4", "logits ±1e4"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_renormalize_support_far_below_the_row_max(divergence, case, backend):
    """tail="renormalize": the student's mass on the K ids underflows against the row's max (the ids are
    not the student's top): log Q̂ is formed against the support's own max, finite and exact."""
    n, v, k = 4, 257, 8
    _, ids, lp = make_teacher(n, v, k)
    if case == "T=1e-4":  # multiples of 2^-10, so that s/T = s · 1e4 is exact in fp32 as in float64
        temp, s = 1e-4, (torch.randn(n, v, dtype=torch.float64) * 1024).round() / 1024
        sup = -5 + torch.randint(0, 4, (n, k), dtype=torch.float64) / 1024  # gaps of ~10 after 1/T
    else:
        temp, s = 1.0, torch.randn(n, v, dtype=torch.float64) * 1e4
        sup = s.amax(-1, keepdim=True) - 1e3 + torch.randn(n, k, dtype=torch.float64) * 2
    s = s.scatter(1, ids, sup).float()  # the ids e^-1000 or further below the row's max
    # gradient: a − q̂ A cancels where q̂ ≈ 1 (fp32 categories on torch / triton), an error of ~1e-7 / T
    _check_against_reference(
        s, ids, lp, divergence, backend, grad_atol=1e-3, tail="renormalize", temperature=temp
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div_tail", DIV_TAILS, ids=lambda x: f"{x[0]}-{x[1]}")
def test_precision_does_not_depend_on_where_the_logits_sit(div_tail, backend):
    """Student logits shifted by 1e6 (fp32, an ulp of 1/16): the softmax is unchanged, and so is the
    accuracy against float64 (ℓq = (s̃ − m) − log Z, the max and log Z apart)."""
    divergence, tail = div_tail
    _, ids, lp = make_teacher(4, 257, 8)
    s = (torch.randn(4, 257, dtype=torch.float64) * 2 + 1e6).float()
    _check_against_reference(s, ids, lp, divergence, backend, tail=tail)


# ---------------------------------------------------------------------------------------------
# Fused linear against the logits level
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "div_tail",
    [
        ("forward_kl", "bucket"),
        ("jsd", "renormalize"),
        ("forward_kl", "ignore"),
        ("skew_reverse_kl", "bucket"),
    ],
    ids=lambda x: f"{x[0]}-{x[1]}",
)
def test_fused_linear_matches_logits_level(div_tail, backend):
    divergence, tail = div_tail
    b_, t_, d, v, k = 2, 7, 24, 211, 8
    h = torch.randn(b_, t_, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, dtype=torch.float64) * 0.1
    _, ids, lp = make_teacher(b_ * t_, v, k)
    ids, lp = ids.reshape(b_, t_, k), lp.reshape(b_, t_, k)
    labels = torch.randint(0, v, (b_, t_))
    labels[0, :2] = -100
    weights = torch.rand(b_, t_) + 0.5
    for reduction in ("mean", "sum"):
        hs, ws, bs = (x.float().clone().requires_grad_() for x in (h, w, bias))
        loss, comp = kd_kernels.fused_linear_sparse_kd(
            hs,
            ws,
            ids,
            lp,
            divergence=divergence,
            tail=tail,
            student_bias=bs,
            labels=labels,
            ce_weight=0.3,
            token_weights=weights,
            reduction=reduction,
            chunk_size=5,  # ragged
            temperature=1.3,
            backend=backend,
            return_components=True,
        )
        loss.backward()
        h64, w64, b64 = (x.clone().requires_grad_() for x in (h, w, bias))
        logits = h64 @ w64.t() + b64
        mask = labels != -100
        kd = R.sparse_kd_loss(
            divergence,
            logits,
            ids,
            lp.double(),
            tail=tail,
            temperature=1.3,
            mask=mask,
            token_weights=weights,
            reduction=reduction,
        )
        ce = R.cross_entropy_per_token(logits, labels).sum()
        if reduction == "mean":
            ce = ce / mask.sum()
        (kd + 0.3 * ce).backward()
        torch.testing.assert_close(loss.double(), (kd + 0.3 * ce).detach(), rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(comp.kd.double(), kd.detach(), rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(comp.ce.double(), ce.detach(), rtol=2e-5, atol=1e-5)
        for got, want in ((hs.grad, h64.grad), (ws.grad, w64.grad), (bs.grad, b64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_fused_linear_no_grad_and_bf16():
    h = torch.randn(9, 16).bfloat16()
    w = (torch.randn(101, 16) / 4).bfloat16()
    _, ids, lp = make_teacher(9, 101, 4)
    with torch.no_grad():
        a = kd_kernels.fused_linear_sparse_kd(h, w, ids, lp, chunk_size=4)
    b = kd_kernels.sparse_kd((h @ w.t()), ids, lp)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fused_linear_reduction_none_points_to_logits_level():
    h, w = torch.randn(3, 8), torch.randn(11, 8)
    ids, lp = torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1)
    with pytest.raises(NotImplementedError, match=r"sparse_kd\(\.\.\., reduction='none'\)"):
        kd_kernels.fused_linear_sparse_kd(h, w, ids, lp, reduction="none")


# ---------------------------------------------------------------------------------------------
# teacher_topk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_teacher_topk_matches_full_logits(dtype):
    h = torch.randn(3, 5, 32).to(dtype)
    w = (torch.randn(307, 32) / 6).to(dtype)
    b = (torch.randn(307) * 0.1).to(dtype)
    ids, lps = kd_kernels.teacher_topk(h, w, 10, teacher_bias=b, temperature=1.7, chunk_size=4)
    assert ids.shape == (3, 5, 10) and ids.dtype == torch.int64 and lps.dtype == torch.float32
    full = ((h @ w.t() + b).float() / 1.7).log_softmax(-1)
    want_lp, want_ids = full.topk(10, -1)
    atol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the logits' own rounding (addmm)
    torch.testing.assert_close(lps, want_lp, rtol=1e-5, atol=atol)
    assert (lps[..., :-1] >= lps[..., 1:]).all()  # sorted, descending
    torch.testing.assert_close(full.gather(-1, ids), lps, rtol=1e-5, atol=atol)
    if dtype == torch.float32:
        assert torch.equal(ids, want_ids)


def test_teacher_topk_bad_k():
    h, w = torch.randn(2, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match=r"k=10 must be in \[1, V\]"):
        kd_kernels.teacher_topk(h, w, 10)
    with pytest.raises(TypeError, match="k must be an int"):
        kd_kernels.teacher_topk(h, w, 2.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _good(n=3, v=17, k=4):
    s = torch.randn(n, v)
    _, ids, lp = make_teacher(n, v, k)
    return s, ids, lp


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("ids_float", TypeError, "teacher_ids has dtype torch.float32"),
        ("lp_int", TypeError, "teacher_logprobs has dtype torch.int64"),
        ("lp_f64", TypeError, "teacher_logprobs has dtype torch.float64"),
        ("ids_shape", ValueError, "teacher_ids has shape"),
        ("lp_shape", ValueError, "teacher_logprobs has shape"),
        ("k0", ValueError, "K=0"),
        ("id_range", ValueError, r"teacher_ids row 1 holds 17, outside \[0, 17\)"),
        ("id_negative", ValueError, r"teacher_ids row 0 holds -2"),
        ("duplicate", ValueError, "row 2 holds the same id twice.*tail='ignore'"),
        ("positive_lp", ValueError, r"teacher_logprobs row 1 holds 0.5 > 0.*not logits"),
        ("tail", ValueError, "tail='top' is unknown"),
        ("tail_ignore_rkl", ValueError, "tail='ignore' is defined for forward_kl only"),
        ("backend_cuda", kd_kernels.BackendUnavailableError, "backend='triton'"),
        ("backend_bad", ValueError, "backend='gpu' is unknown"),
        ("student_int", TypeError, "student_logits has dtype torch.int64"),
        ("temperature", ValueError, "temperature=0"),
        ("mask_shape", ValueError, "mask has shape"),
    ],
)
def test_bad_input(case, exc, match):
    s, ids, lp = _good()
    kw = {}
    if case == "ids_float":
        ids = ids.float()
    elif case == "lp_int":
        lp = ids.clone()
    elif case == "lp_f64":
        lp = lp.double()
    elif case == "ids_shape":
        ids = ids[:2]
    elif case == "lp_shape":
        lp = lp[:, :3]
    elif case == "k0":
        ids, lp = ids[:, :0], lp[:, :0]
    elif case == "id_range":
        ids[1, 2] = 17
    elif case == "id_negative":
        ids[0, 0] = -2
    elif case == "duplicate":
        ids[2, 3] = ids[2, 1]
    elif case == "positive_lp":
        lp[1, 0] = 0.5
    elif case == "tail":
        kw["tail"] = "top"
    elif case == "tail_ignore_rkl":
        kw.update(tail="ignore", divergence="reverse_kl")
    elif case == "backend_cuda":
        kw["backend"] = "cuda"
    elif case == "backend_bad":
        kw["backend"] = "gpu"
    elif case == "student_int":
        s = s.long()
    elif case == "temperature":
        kw["temperature"] = 0
    elif case == "mask_shape":
        kw["mask"] = torch.ones(2, dtype=torch.bool)
    with pytest.raises(exc, match=match):
        kd_kernels.sparse_kd(s, ids, lp, **kw)


def test_padding_and_masked_rows_are_not_checked():
    s, ids, lp = _good()
    lp[0, 2:] = -INF
    ids[0, 2:] = 99  # out of range, but padding
    ids[1, :] = 0  # duplicates and range do not matter on a masked row
    lp[1, :] = 3.0
    mask = torch.tensor([True, False, True])
    out = kd_kernels.sparse_kd(s, ids, lp, mask=mask)
    assert torch.isfinite(out)
    # duplicates are fine with tail="ignore"
    ids[2, 3] = ids[2, 1]
    kd_kernels.sparse_kd(s, ids, lp, mask=mask, tail="ignore")


def test_bad_input_fused_linear():
    h, w = torch.randn(3, 8), torch.randn(17, 8)
    _, ids, lp = make_teacher(3, 17, 4)
    with pytest.raises(ValueError, match=r"teacher_ids has shape \(2, 4\)"):
        kd_kernels.fused_linear_sparse_kd(h, w, ids[:2], lp[:2])
    with pytest.raises(ValueError, match="needs labels"):
        kd_kernels.fused_linear_sparse_kd(h, w, ids, lp, ce_weight=0.5)
    with pytest.raises(ValueError, match="student_weight has shape"):
        kd_kernels.fused_linear_sparse_kd(h, w.t(), ids, lp)
    ids[0, 0] = 17
    with pytest.raises(ValueError, match="outside"):
        kd_kernels.fused_linear_sparse_kd(h, w, ids, lp)


@pytest.mark.skipif(not _has_cpu_kernel(), reason="compiled cpu kernel not built")
@pytest.mark.parametrize("level", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_cpu_kernel_every_isa_level(level):
    from kd_kernels import _ext

    try:
        _ext._C._set_cpu_isa(level)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        for divergence, tail in DIV_TAILS:
            test_matches_reference((divergence, tail), CONFIGS[3], torch.float32, "cpu")
        test_support_holds_almost_all_student_mass(("reverse_kl", "bucket"), "cpu")
    finally:
        _ext._C._set_cpu_isa("auto")


@pytest.mark.parametrize("divergence", ["tvd", "jeffreys", "alpha_beta", "renyi"])
def test_new_divergences_sparse_fused_and_module(divergence):
    """fused_linear_sparse_kd and SparseKDLoss take every divergence (parameters included) and equal
    sparse_kd on the materialized logits."""
    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(5, 8, generator=gen), torch.randn(40, 8, generator=gen)
    ids = torch.stack([torch.randperm(40, generator=gen)[:6] for _ in range(5)])
    lp = torch.randn(5, 6, generator=gen).log_softmax(-1) - 0.1
    kw = (
        {"alpha": 0.7, "beta": 0.4}
        if divergence == "alpha_beta"
        else ({"alpha": 1.5} if divergence == "renyi" else {})
    )
    hh = h.clone().requires_grad_()
    fused = kd_kernels.fused_linear_sparse_kd(hh, w, ids, lp, divergence=divergence, **kw)
    hr = h.clone().requires_grad_()
    ref = R.sparse_kd_loss(divergence, (hr @ w.T).double(), ids, lp.double(), **kw)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(fused.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-4, atol=1e-6)
    mod = kd_kernels.SparseKDLoss(divergence, **kw)
    torch.testing.assert_close(mod(h @ w.T, ids, lp).double(), ref.detach(), rtol=2e-5, atol=1e-6)


def test_second_derivative_raises():
    """Like the dense losses: the gradient is computed in forward, so create_graph=True must not silently drop
    the second-order term."""
    s = torch.randn(3, 40, requires_grad=True)
    ids = torch.stack([torch.randperm(40)[:4] for _ in range(3)])
    lp = torch.full((3, 4), -2.0)
    (g,) = torch.autograd.grad(
        kd_kernels.sparse_kd(s, ids, lp, backend="torch"), s, create_graph=True
    )
    with pytest.raises(RuntimeError):
        (g.square().sum() + (s**3).sum()).backward()
    h = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(
        kd_kernels.fused_linear_sparse_kd(h, torch.randn(40, 8), ids, lp), h, create_graph=True
    )
    with pytest.raises(RuntimeError):
        (g.square().sum() + (h**3).sum()).backward()


_SPARSE_COMPILE = r"""
import json, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:  # pragma: no cover - triton without its NVIDIA backend
    print(json.dumps({"skip": str(e)[:300]}))
    sys.exit(0)
from kd_kernels import _triton_sparse as S

done = []
cases = [(d, 0) for d in range(9)] + [(0, 2), (8, 1), (4, 1)]
for div, tail in cases:
    sig = {"s_ptr": "*bf16", "ids_ptr": "*i64", "lp_ptr": "*fp32", "nv_ptr": "*i32", "w_ptr": "*fp32",
           "loss_ptr": "*fp32", "g_ptr": "*bf16", "stride_s": "i64", "stride_g": "i64", "V": "i32",
           "K": "i32", "inv_t": "fp32", "coef": "fp32", "coef2": "fp32", "log_c": "fp32",
           "log_1mc": "fp32", "floor_": "fp32"}
    consts = {"DIV": div, "TAIL": tail, "HAS_GRAD": True, "BF16_BY_BITS": False, "BLOCK_V": 4096,
              "BLOCK_K": 64}
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    src = ASTSource(fn=S.sparse_loss_grad_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "ptx" in k.asm
    done.append([div, tail])
print(json.dumps({"compiled": done}))
"""


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="triton is not installed")
def test_triton_sparse_kernel_compiles_for_sm90():
    """The interpreter accepts things the compiler does not (a plain-int global read in a kernel did
    not compile before this test): compile every divergence (bucket) and the other tails for sm_90."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _SPARSE_COMPILE],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert len(res["compiled"]) == 12


def test_torch_terms_do_not_write_their_inputs():
    """The sparse categories (and the vocabulary-parallel shards) call the dense torch definitions and
    use q, p afterwards: no TERMS entry may write ℓq, ℓp, q or p."""
    from kd_kernels._spec import KDSpec
    from kd_kernels._torch_terms import TERMS

    gen = torch.Generator().manual_seed(0)
    lq = torch.randn(3, 11, generator=gen).log_softmax(-1)
    lp = torch.randn(3, 11, generator=gen).log_softmax(-1)
    for d in DIVERGENCES:
        args = [lq.clone(), lp.clone(), lq.exp(), lp.exp()]
        before = [a.clone() for a in args]
        TERMS[KDSpec.make(d).divergence](*args, KDSpec.make(d))
        for name, a, b in zip(("lq", "lp", "q", "p"), args, before):
            assert torch.equal(a, b), f"{d} wrote {name}"
