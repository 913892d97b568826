"""The "torch" backend over several chunks per call: padded (−inf) columns, NaN in masked rows, a NaN counted
row leaving the others exact, in-place gradients; every case against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from _common import CPU_BACKENDS, DIVERGENCES

import kd_kernels
from kd_kernels import reference as R
from kd_kernels._backends import torch_backend as TB
from kd_kernels._spec import Divergence

COEF = {"skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.3}, "jsd": {"beta": 0.4}}


def _inputs(n: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3


def _reference(divergence, s, t, mask, temperature):
    # −inf → −1e4: the same distributions in float64 (e^−1e4 = 0), and an autograd gradient without the
    # NaN that differentiating through −inf gives
    s64 = s.double().clamp_min(-1e4).requires_grad_()
    ref = R.kd_loss(
        divergence,
        s64,
        t.double().clamp_min(-1e4),
        mask=mask,
        reduction="none",
        temperature=temperature,
        **COEF.get(divergence, {}),
    )
    up = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (g,) = torch.autograd.grad(ref, s64, up)
    return ref, g, up


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", (1.0, 1.7))
def test_several_chunks_with_padded_columns_and_masked_nan_rows(
    divergence, temperature, monkeypatch
):
    """Chunks of a few rows: one with a padded (−inf in both) column; masked rows hold NaN. Values and
    gradients match the float64 reference."""
    monkeypatch.setattr(TB, "_CHUNK_BYTES", 6 * 4 * 4 * 257)  # a few rows per chunk
    n, v = 24, 257
    s, t = _inputs(n, v)
    s[5, 7] = t[5, 7] = -math.inf
    mask = torch.ones(n, dtype=torch.bool)
    mask[[2, 13, 14]] = False
    s[13], t[14] = math.nan, math.nan  # masked rows are never counted
    ref, g_ref, up = _reference(divergence, s, t, mask, temperature)
    s_k = s.clone().requires_grad_()
    loss = kd_kernels.kd_loss(
        s_k,
        t,
        divergence=divergence,
        mask=mask,
        reduction="none",
        temperature=temperature,
        backend="torch",
        **COEF.get(divergence, {}),
    )
    (g,) = torch.autograd.grad(loss, s_k, up.float())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[mask].double(), g_ref[mask], rtol=1e-4, atol=1e-6)
    assert torch.all(g[~mask] == 0) and torch.all(loss[~mask] == 0)
    assert torch.all(g[5, 7] == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inplace_gradient_over_several_chunks(divergence, monkeypatch):
    """With inplace_grad the gradient overwrites the student logits chunk by chunk; every chunk still reads
    the original logits."""
    monkeypatch.setattr(TB, "_CHUNK_BYTES", 6 * 4 * 4 * 129)
    n, v = 12, 129
    s, t = _inputs(n, v, seed=1)
    s[6, :3] = t[6, :3] = -math.inf  # three absent tokens in one row
    ref, g_ref, up = _reference(divergence, s, t, None, 1.0)
    x = s.clone().requires_grad_()
    y = x * 1.0  # a non-leaf the gradient may overwrite
    loss = kd_kernels.kd_loss(
        y,
        t,
        divergence=divergence,
        reduction="none",
        backend="torch",
        inplace_grad=True,
        **COEF.get(divergence, {}),
    )
    (g,) = torch.autograd.grad(loss, x, up.float())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_row_leaves_other_rows_exact(divergence):
    """A NaN in one counted row leaves the other rows exact (the NaN row itself: tests/test_fuzz.py)."""
    n, v = 6, 300
    s, t = _inputs(n, v, seed=2)
    s[3, 10] = math.nan
    s_k = s.clone().requires_grad_()
    loss = kd_kernels.kd_loss(
        s_k, t, divergence=divergence, reduction="none", backend="torch", **COEF.get(divergence, {})
    )
    keep = torch.arange(n) != 3
    ref, g_ref, up = _reference(divergence, s[keep], t[keep], None, 1.0)
    up_all = torch.ones(n)
    up_all[keep] = up.float()
    (g,) = torch.autograd.grad(loss, s_k, up_all)
    torch.testing.assert_close(loss[keep].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[keep].double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_unguarded_first_pass_with_guarded_redo_equals_the_guarded_rows(divergence):
    """The CPU runs every row unguarded and redoes the rows whose loss is not finite: −inf columns in the
    teacher, the student or both, an infinite divergence (q = 0 where p > 0), a NaN row, next to plain rows.
    Each row must come out exactly as the guarded definition gives it, the loss alone too."""
    from kd_kernels._spec import KDSpec

    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(7, 13, generator=gen) * 3, torch.randn(7, 13, generator=gen) * 3
    t[1, :4] = -math.inf
    s[2, 5:7] = -math.inf
    s[3, :3] = t[3, :3] = -math.inf
    s[4, 0] = math.nan
    s[5, 8] = -1e4  # q underflows to 0 without being −inf
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    spec = KDSpec.make(divergence)
    for want_grad in (True, False):
        ref_loss, ref_g = TB.rows_loss_and_dlogits(lq, lp, spec, want_grad, redo_rows=False)
        loss, g = TB.rows_loss_and_dlogits(lq, lp, spec, want_grad, redo_rows=True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0, equal_nan=True)
        assert torch.isnan(loss[4]) and torch.isfinite(loss[[0, 5, 6]]).all()
        if want_grad:
            torch.testing.assert_close(g, ref_g, rtol=1e-6, atol=1e-7, equal_nan=True)
            assert torch.isnan(g[4]).all() and not torch.isnan(g[torch.isfinite(loss)]).any()
        else:
            assert g is None and ref_g is None


@pytest.mark.parametrize("divergence", [d.label for d in Divergence])
@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_without_grad_equals_the_grad_path_without_an_autograd_node(
    divergence, reduction, weighted, backend, monkeypatch
):
    """Nothing to differentiate (no_grad, or a student that does not require grad): the launcher runs
    directly, without the autograd Function, and the loss equals the differentiable call's (to an ulp on the cpu kernel; and the
    float64 reference)."""
    from kd_kernels import losses

    s, t = _inputs(9, 131, seed=4)
    s[2, :5] = t[2, :5] = -math.inf
    kw = dict(
        divergence=divergence,
        reduction=reduction,
        backend=backend,
        temperature=1.3,
        **COEF.get(divergence, {}),
    )
    if weighted:
        kw["mask"] = torch.arange(9) % 4 != 1
        kw["token_weights"] = torch.linspace(0.5, 2.0, 9)
    with_grad = kd_kernels.kd_loss(s.clone().requires_grad_(), t, **kw)
    assert with_grad.grad_fn is not None
    mask = kw.get("mask")
    ref = R.kd_loss(
        divergence,
        s.double().clamp_min(-1e4),
        t.double().clamp_min(-1e4),
        mask=mask,
        token_weights=kw.get("token_weights"),
        reduction=reduction,
        temperature=1.3,
        **COEF.get(divergence, {}),
    )
    torch.testing.assert_close(with_grad.detach().double(), ref, rtol=1e-5, atol=1e-6)

    def no_function(*args):
        raise AssertionError("KDLossFunction.apply ran although nothing needs a gradient")

    monkeypatch.setattr(losses.KDLossFunction, "apply", no_function)
    with torch.no_grad():
        under_no_grad = kd_kernels.kd_loss(s.clone().requires_grad_(), t, **kw)
    plain = kd_kernels.kd_loss(s, t, **kw)
    for out in (under_no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        # The compiled cpu kernel's loss-only and loss + gradient loops may contract the mixtures' terms into
        # FMAs differently (an ulp apart); the torch backend's paths are the same ops.
        torch.testing.assert_close(out, with_grad.detach(), rtol=2e-6, atol=1e-7)
