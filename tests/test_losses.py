"""Every backend against the float64 reference: values, gradients, invariants, masks, odd shapes."""

from __future__ import annotations

import math

import pytest
import torch
from _common import CPU_BACKENDS, DIVERGENCES

import kd_kernels
from kd_kernels import reference as R

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Norm-wise relative tolerances against the float64 reference evaluated on the same (rounded) inputs.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
COEF = {"skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.3}, "jsd": {"beta": 0.4}}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def logits(shape, dtype, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def run(divergence, s, t, *, backend, upstream, **kw):
    """(loss, grad of student) from kd_kernels and from the float64 reference on the same inputs."""
    s_k = s.clone().requires_grad_()
    loss = kd_kernels.kd_loss(
        s_k, t, divergence=divergence, backend=backend, **COEF.get(divergence, {}), **kw
    )
    (g,) = torch.autograd.grad(loss, s_k, upstream.to(loss.dtype).expand_as(loss))
    s64 = s.double().requires_grad_()
    ref = R.kd_loss(divergence, s64, t.double(), **COEF.get(divergence, {}), **kw)
    (g_ref,) = torch.autograd.grad(ref, s64, upstream.double().expand_as(ref))
    return loss, g, ref, g_ref


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("temperature", (1.0, 2.5))
@pytest.mark.parametrize("masked", (False, True))
def test_matches_reference(backend, divergence, dtype, reduction, temperature, masked):
    n, v = 9, 1031
    s, t = logits((n, v), dtype), logits((n, v), dtype)
    mask = torch.rand(n) > 0.4 if masked else None
    upstream = torch.randn(n if reduction == "none" else ())
    loss, g, ref, g_ref = run(
        divergence,
        s,
        t,
        backend=backend,
        upstream=upstream,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
    )
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert rel_err(loss, ref) <= LOSS_RTOL[dtype]
    assert rel_err(g, g_ref) <= GRAD_RTOL[dtype]
    if masked:
        assert torch.all(g[~mask] == 0)
        if reduction == "none":
            assert torch.all(loss[~mask] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "shape", [(1031,), (3, 4099), (2, 3, 257), (2, 2, 2, 513), (2, 32003)], ids=str
)
def test_odd_shapes_and_leading_dims(backend, divergence, shape):
    s, t = logits(shape, torch.float32), logits(shape, torch.float32)
    upstream = torch.randn(shape[:-1])
    loss, g, ref, g_ref = run(
        divergence, s, t, backend=backend, upstream=upstream, reduction="none"
    )
    assert loss.shape == shape[:-1]
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_token_weights(backend, divergence):
    n, v = 6, 300
    s, t = logits((n, v), torch.float32), logits((n, v), torch.float32)
    w = torch.rand(n) * 2
    mask = torch.tensor([True, False, True, True, False, True])
    loss, g, ref, g_ref = run(
        divergence,
        s,
        t,
        backend=backend,
        upstream=torch.tensor(1.3),
        mask=mask,
        token_weights=w,
        reduction="mean",
    )
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_and_teacher_dtypes_may_differ(backend, divergence):
    s, t = logits((5, 777), torch.float32), logits((5, 777), torch.bfloat16)
    loss, g, ref, g_ref = run(divergence, s, t, backend=backend, upstream=torch.tensor(0.7))
    assert g.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nonnegative_and_zero_when_identical(backend, divergence):
    s, t = logits((8, 500), torch.float32), logits((8, 500), torch.float32)
    per_token = kd_kernels.kd_loss(s, t, divergence=divergence, reduction="none", backend=backend)
    assert torch.all(per_token >= -1e-6)
    same = s.clone().requires_grad_()
    loss = kd_kernels.kd_loss(same, s, divergence=divergence, reduction="none", backend=backend)
    assert torch.all(loss.abs() <= 1e-5)
    (g,) = torch.autograd.grad(loss.sum(), same)
    assert g.abs().max() <= 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_vocab_equals_unpadded(backend, divergence):
    """A column that is −inf in both tensors is as if absent: same loss, same gradient, 0 gradient there."""
    n, v, pad = 5, 600, 37
    s, t = logits((n, v), torch.float32), logits((n, v), torch.float32)
    ninf = torch.full((n, pad), -math.inf)
    sp, tp = torch.cat([s, ninf], -1).requires_grad_(), torch.cat([t, ninf], -1)
    s0 = s.clone().requires_grad_()
    kw = {"divergence": divergence, "reduction": "none", "backend": backend}
    lp, l0 = kd_kernels.kd_loss(sp, tp, **kw), kd_kernels.kd_loss(s0, t, **kw)
    up = torch.randn(n)
    (gp,), (g0,) = torch.autograd.grad(lp, sp, up), torch.autograd.grad(l0, s0, up)
    assert torch.isfinite(lp).all() and torch.isfinite(gp).all()
    torch.testing.assert_close(lp, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp[:, :v], g0, rtol=1e-4, atol=1e-7)
    assert torch.all(gp[:, v:] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_rows_are_not_read(backend, divergence):
    """NaN in masked rows must not leak: those rows give exactly 0 loss and 0 gradient."""
    n, v = 6, 400
    s, t = logits((n, v), torch.float32), logits((n, v), torch.float32)
    mask = torch.tensor([True, False, True, False, True, True])
    s[~mask] = math.nan
    t[~mask] = math.nan
    s.requires_grad_()
    loss = kd_kernels.kd_loss(
        s, t, divergence=divergence, mask=mask, reduction="none", backend=backend
    )
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert torch.all(loss[~mask] == 0) and torch.isfinite(loss).all()
    assert torch.all(g[~mask] == 0) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(backend, divergence):
    """Finite logits up to ±3e3 give finite results as close to float64 as eager fp32 PyTorch gets."""
    n, v = 4, 513
    s = (torch.rand(n, v, dtype=torch.float64) * 6e3 - 3e3).float()
    t = (torch.rand(n, v, dtype=torch.float64) * 6e3 - 3e3).float()
    s[0, 7], t[0, 7] = (
        3e3,
        3e3,
    )  # the two share their top entry in row 0, so that row's loss is finite and small
    up = torch.tensor(1.0)
    loss, g, ref, g_ref = run(divergence, s, t, backend=backend, upstream=up, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    eager = R.kd_loss(
        divergence, s, t, **COEF.get(divergence, {}), reduction="none"
    )  # fp32 reference code
    slack = 1e-4 * ref.abs().max().item() + 1e-3
    assert (loss.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max() + slack
    assert (g.double() - g_ref).abs().max() <= 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_empty_batch(backend, reduction):
    s = torch.randn(0, 50, requires_grad=True)
    loss = kd_kernels.reverse_kl(s, torch.randn(0, 50), reduction=reduction, backend=backend)
    assert not torch.isnan(loss).any()
    if reduction != "none":
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad.shape == s.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_masked_mean_is_zero(backend):
    s = torch.randn(3, 40, requires_grad=True)
    loss = kd_kernels.forward_kl(
        s, torch.randn(3, 40), mask=torch.zeros(3, dtype=torch.bool), backend=backend
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inplace_grad_matches(backend, divergence):
    s0, t = logits((5, 321), torch.float32), logits((5, 321), torch.float32)
    leaf = s0.clone().requires_grad_()
    ref = kd_kernels.kd_loss(leaf, t, divergence=divergence, backend=backend)
    ref.backward()
    leaf2 = s0.clone().requires_grad_()
    s = leaf2 * 1.0  # a non-leaf, as lm_head output would be
    loss = kd_kernels.kd_loss(s, t, divergence=divergence, backend=backend, inplace_grad=True)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(leaf2.grad, leaf.grad)


def test_inplace_grad_rejects_leaf():
    s = torch.randn(2, 10, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_grad"):
        kd_kernels.reverse_kl(s, torch.randn(2, 10), inplace_grad=True)


def test_second_backward_raises_instead_of_double_scaling():
    s = torch.randn(2, 10, requires_grad=True)
    loss = kd_kernels.reverse_kl(s * 1.0, torch.randn(2, 10), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_teacher_gets_no_gradient():
    s = torch.randn(3, 20, requires_grad=True)
    t = torch.randn(3, 20, requires_grad=True)
    kd_kernels.forward_kl(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_no_grad_needed_gives_loss_only():
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    with torch.no_grad():
        loss = kd_kernels.jsd(s, t)
    ref = R.kd_loss("jsd", s.double(), t.double(), beta=0.5)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_module_wrapper():
    s, t = torch.randn(2, 3, 50, requires_grad=True), torch.randn(2, 3, 50)
    mask = torch.rand(2, 3) > 0.3
    m = kd_kernels.KDLoss("skew_reverse_kl", alpha=0.2, temperature=2.0, reduction="sum")
    out = m(s, t, mask=mask)
    ref = kd_kernels.skew_reverse_kl(s, t, alpha=0.2, temperature=2.0, reduction="sum", mask=mask)
    torch.testing.assert_close(out, ref)
    assert "skew_reverse_kl" in repr(m)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_named_functions_equal_generic(divergence):
    s, t = torch.randn(3, 40), torch.randn(3, 40)
    named = getattr(kd_kernels, divergence)(s, t, temperature=1.5)
    generic = kd_kernels.kd_loss(
        s,
        t,
        divergence=divergence,
        temperature=1.5,
        **{
            "skew_forward_kl": {"alpha": 0.1},
            "skew_reverse_kl": {"alpha": 0.1},
            "jsd": {"beta": 0.5},
        }.get(divergence, {}),
    )
    torch.testing.assert_close(named, generic)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence):
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    f = lambda x: R.kd_loss(divergence, x, t, alpha=0.2, beta=0.3, temperature=1.3)
    assert torch.autograd.gradcheck(f, (s,))


def test_reference_matches_torch_kl_div():
    """The reference's forward/reverse KL equal PyTorch's own F.kl_div expressions (the docstrings' claim)."""
    s, t = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64)
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    kl = torch.nn.functional.kl_div
    torch.testing.assert_close(
        R.forward_kl_per_token(s, t), kl(lq, lp, log_target=True, reduction="none").sum(-1)
    )
    torch.testing.assert_close(
        R.reverse_kl_per_token(s, t), kl(lp, lq, log_target=True, reduction="none").sum(-1)
    )


def test_auto_prefers_compiled_cpu_backend():
    from kd_kernels._backends import resolve_backend

    expected = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    assert resolve_backend("auto", torch.device("cpu")).name == expected


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in CPU_BACKENDS])
def test_torch_compile(backend):
    """The raw-pointer kernel call sits behind a custom op, so a compiled training step works and matches eager."""
    torch._dynamo.reset()

    def step(s, t, mask):
        return kd_kernels.reverse_kl(s, t, mask=mask, temperature=2.0, backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True)
    s0, t = torch.randn(6, 300), torch.randn(6, 300)
    mask = torch.tensor([True, True, False, True, False, True])
    a, b = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    le, lc = step(a, t, mask), compiled(b, t, mask)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(b.grad, a.grad)
