"""The divergences added as data (tvd, jeffreys, alpha_beta, renyi), TAID interpolation for every divergence, and
the decided NaN semantics: every backend against float64 definitions (autograd through the formula), invariants,
edge cases, validation and the public forms (named functions, modules, fused linear).

Backends as in test_losses.py (``available_backends("cpu")``: cpu, torch and the Triton interpreter). The Triton
interpreter is slow, so it gets smaller matrices (a covering set of reduction × temperature × mask per divergence
and dtype).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _common import CPU_BACKENDS, DIVERGENCES

import kd_kernels
from kd_kernels import reference as R
from kd_kernels._spec import DIVERGENCES as SPEC_TABLE
from kd_kernels._spec import Divergence

NEW = ("tvd", "jeffreys", "alpha_beta", "renyi")
ALL = DIVERGENCES + NEW
# Non-default parameters where there are any: alpha_beta off Amari's line, renyi above 1 (the harder side).
COEF = {
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.3},
    "jsd": {"beta": 0.4},
    "alpha_beta": {"alpha": 0.7, "beta": 0.4},
    "renyi": {"alpha": 1.6},
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def backends(new_option: bool = True):
    """The backends to run (every CPU-usable one, for every divergence and option)."""
    return list(CPU_BACKENDS)


def logits(shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def run(divergence, s, t, *, backend, upstream, coef=None, **kw):
    """(loss, student grad) from kd_kernels and from the float64 reference on the same (rounded) inputs."""
    coef = COEF.get(divergence, {}) if coef is None else coef
    s_k = s.clone().requires_grad_()
    loss = kd_kernels.kd_loss(s_k, t, divergence=divergence, backend=backend, **coef, **kw)
    (g,) = torch.autograd.grad(loss, s_k, upstream.to(loss.dtype).expand_as(loss))
    s64 = s.double().requires_grad_()
    ref = R.kd_loss(divergence, s64, t.double(), **coef, **kw)
    (g_ref,) = torch.autograd.grad(ref, s64, upstream.double().expand_as(ref))
    return loss, g, ref, g_ref


# A covering set of (reduction, temperature, masked) for the interpreter: each value of each option appears.
TRITON_COMBOS = {("mean", 1.0, True), ("sum", 2.5, False), ("none", 2.5, True)}


def _matrix():
    for backend in backends():
        b = backend.values[0] if hasattr(backend, "values") else backend
        for divergence in NEW:
            for dtype in DTYPES:
                for reduction in ("mean", "sum", "none"):
                    for temperature in (1.0, 2.5):
                        for masked in (False, True):
                            if (
                                b == "triton"
                                and (reduction, temperature, masked) not in TRITON_COMBOS
                            ):
                                continue
                            marks = backend.marks if hasattr(backend, "marks") else ()
                            yield pytest.param(
                                b,
                                divergence,
                                dtype,
                                reduction,
                                temperature,
                                masked,
                                marks=marks,
                                id=f"{b}-{divergence}-{str(dtype)[6:]}-{reduction}-T{temperature}"
                                f"-{'mask' if masked else 'all'}",
                            )


@pytest.mark.parametrize(
    "backend, divergence, dtype, reduction, temperature, masked", list(_matrix())
)
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


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ALL)
def test_interpolation_matches_reference(backend, divergence):
    """TAID: teacher logits λ t/T + (1−λ) sg(s/T); every divergence, with temperature, mask and token weights."""
    n, v = 6, 517
    s, t = logits((n, v)), logits((n, v))
    mask = torch.tensor([True, True, False, True, True, True])
    w = torch.rand(n) + 0.5
    for lam in (0.3, 0.85):
        loss, g, ref, g_ref = run(
            divergence,
            s,
            t,
            backend=backend,
            upstream=torch.randn(n),
            temperature=1.7,
            interpolation=lam,
            mask=mask,
            token_weights=w,
            reduction="none",
        )
        assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4
        assert torch.all(g[~mask] == 0) and torch.all(loss[~mask] == 0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW)
def test_odd_shapes_and_leading_dims(backend, divergence):
    shapes = [(1031,), (3, 4099), (2, 3, 257)] + ([] if backend == "triton" else [(2, 32003)])
    for shape in shapes:
        s, t = logits(shape), logits(shape)
        loss, g, ref, g_ref = run(
            divergence, s, t, backend=backend, upstream=torch.randn(shape[:-1]), reduction="none"
        )
        assert loss.shape == shape[:-1]
        assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4, shape


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW)
def test_default_parameters_and_teacher_dtype(backend, divergence):
    """The divergence's default parameters (coef={}), and a bf16 teacher under an fp32 student."""
    s, t = logits((5, 777)), logits((5, 777), torch.bfloat16)
    loss, g, ref, g_ref = run(
        divergence, s, t, backend=backend, upstream=torch.tensor(0.7), coef={}
    )
    assert g.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW)
def test_extreme_logits(backend, divergence):
    """Finite logits up to ±3e3 give finite results as close to float64 as eager fp32 PyTorch gets."""
    n, v = 4, 513
    s = (torch.rand(n, v, dtype=torch.float64) * 6e3 - 3e3).float()
    t = (torch.rand(n, v, dtype=torch.float64) * 6e3 - 3e3).float()
    s[0, 7], t[0, 7] = (
        3e3,
        3e3,
    )  # the two share their top entry in row 0, so that row's loss is small
    loss, g, ref, g_ref = run(
        divergence, s, t, backend=backend, upstream=torch.tensor(1.0), reduction="none"
    )
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    eager = R.kd_loss(
        divergence, s, t, **COEF.get(divergence, {}), reduction="none"
    )  # fp32 reference code
    slack = 1e-4 * ref.abs().max().item() + 1e-3
    assert (loss.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max() + slack
    assert (g.double() - g_ref).abs().max() <= 1e-3


def _far_from_zero(case: str, n: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is ordinary but whose values are not: "shift" adds 1e6 to fp32 logits (one ulp
    is 1/16 there), "fp16_ties" puts fp16 logits at ±6e4 with several columns tied at the maximum (the rest
    of each row's top at 6e4 − 32 and − 64, gaps whose weights e^−32, e^−64 fp32 still holds)."""
    if case == "shift":
        return (torch.randn(n, v, dtype=torch.float64) * 2 + 1e6).float(), (
            torch.randn(n, v, dtype=torch.float64) * 2 + 1e6
        ).float()
    top = torch.tensor([6e4, 6e4 - 32, 6e4 - 64], dtype=torch.float64)
    x = torch.full((2, n, v), -6e4, dtype=torch.float64)
    x[:, :, :24] = top[torch.randint(0, 3, (2, n, 24))]
    x[:, :, :3] = 6e4  # at least three tied maxima on both sides
    return x[0].half(), x[1].half()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ALL)
@pytest.mark.parametrize("case", ["shift", "fp16_ties"])
def test_precision_does_not_depend_on_where_the_logits_sit(backend, divergence, case):
    """A constant shift of the logits leaves the softmax, hence the loss and gradient, unchanged: at +1e6 and
    at ±6e4 in fp16 every backend stays as close to float64 as it does near 0 (the row maximum and the log of
    the scaled sum are kept apart, ℓ = (x − m) − log Z, never x − LSE with LSE rounded at the size of m)."""
    s, t = _far_from_zero(case, 4, 1031)
    loss, g, ref, g_ref = run(
        divergence, s, t, backend=backend, upstream=torch.randn(4), reduction="none"
    )
    assert rel_err(loss, ref) <= LOSS_RTOL[torch.float32], (loss, ref)
    assert rel_err(g, g_ref) <= GRAD_RTOL[s.dtype]
    if (
        divergence == "tvd"
    ):  # maxima tied within each side, disjoint between the sides: 1 (to one rounding)
        s2, t2 = torch.full((2, 64), -6e4, dtype=s.dtype), torch.full((2, 64), -6e4, dtype=s.dtype)
        s2[:, :7], t2[:, 7:13] = 6e4, 6e4
        tvd = kd_kernels.tvd(
            s2 + (1e6 if case == "shift" else 0), t2, reduction="none", backend=backend
        )
        assert torch.all((tvd - 1).abs() <= 2**-23), tvd


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ALL)
def test_low_temperature_as_accurate_as_eager_fp32(backend, divergence):
    """T = 0.5 on logits of scale 10 (tempered logits up to ~80): the gradient is within twice eager fp32
    PyTorch's error against float64 (the cpu kernel's jsd was 14x off when its LSE was one fp32 number; the
    triton renyi 9x, when it formed ρ_j from the loss, a difference of O(100) base-2 numbers here)."""
    s, t = logits((8, 1031), scale=10.0), logits((8, 1031), scale=10.0)
    kw = {"temperature": 0.5, "reduction": "sum", **COEF.get(divergence, {})}
    _, g, _, g_ref = run(
        divergence, s, t, backend=backend, upstream=torch.tensor(1.0), coef={}, **kw
    )
    x = s.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(R.kd_loss(divergence, x, t, **kw), x)
    eager_err = (g_eager.double() - g_ref).abs().max().item()
    assert (g.double() - g_ref).abs().max().item() <= 2 * eager_err + 1e-9


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW)
def test_padded_vocab_equals_unpadded(backend, divergence):
    """A column that is −inf in both tensors is as if absent: same loss, same gradient, 0 gradient there."""
    n, v, pad = 5, 600, 37
    s, t = logits((n, v)), logits((n, v))
    ninf = torch.full((n, pad), -math.inf)
    sp, tp = torch.cat([s, ninf], -1).requires_grad_(), torch.cat([t, ninf], -1)
    s0 = s.clone().requires_grad_()
    kw = {
        "divergence": divergence,
        "reduction": "none",
        "backend": backend,
        **COEF.get(divergence, {}),
    }
    lp, l0 = kd_kernels.kd_loss(sp, tp, **kw), kd_kernels.kd_loss(s0, t, **kw)
    up = torch.randn(n)
    (gp,), (g0,) = torch.autograd.grad(lp, sp, up), torch.autograd.grad(l0, s0, up)
    assert torch.isfinite(lp).all() and torch.isfinite(gp).all()
    torch.testing.assert_close(lp, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp[:, :v], g0, rtol=1e-4, atol=1e-7)
    assert torch.all(gp[:, v:] == 0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(
    "divergence, coef",
    [
        ("tvd", {}),
        ("alpha_beta", {"alpha": 0.7, "beta": 0.4}),
        ("renyi", {"alpha": 0.5}),
        ("renyi", {"alpha": 1.6}),
    ],
)
def test_teacher_zero_columns(backend, divergence, coef):
    """Teacher −inf (p = 0) where the student is finite: these divergences stay finite (p^α = 0 terms vanish,
    also for Rényi with α > 1) and match float64."""
    n, v = 5, 300
    s, t = logits((n, v)), logits((n, v))
    t[:, ::7] = -math.inf
    loss, g, ref, g_ref = run(
        divergence, s, t, backend=backend, upstream=torch.randn(n), coef=coef, reduction="none"
    )
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-4


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW)
def test_nonnegative_and_zero_when_identical(backend, divergence):
    s, t = logits((8, 500)), logits((8, 500))
    kw = {
        "divergence": divergence,
        "reduction": "none",
        "backend": backend,
        **COEF.get(divergence, {}),
    }
    assert torch.all(kd_kernels.kd_loss(s, t, **kw) >= -1e-6)
    same = s.clone().requires_grad_()
    loss = kd_kernels.kd_loss(same, s, **kw)
    assert torch.all(loss.abs() <= 1e-5)
    (g,) = torch.autograd.grad(loss.sum(), same)
    assert g.abs().max() <= 1e-6
    if divergence == "tvd":
        assert torch.all(kd_kernels.tvd(s, t, reduction="none", backend=backend) <= 1 + 1e-6)


@pytest.mark.parametrize("backend", backends())
def test_identities_between_divergences(backend):
    """Jeffreys = forward + reverse KL; Amari's line β = 1 − α of alpha_beta is (1 − e^((α−1) D_α)) / (α(1−α))
    with D_α the Rényi divergence; Rényi is nondecreasing in α and brackets KL(p‖q) around α = 1."""
    s, t = logits((6, 400)), logits((6, 400))
    kw = {"reduction": "none", "backend": backend, "temperature": 1.3}
    fkl, rkl = kd_kernels.forward_kl(s, t, **kw), kd_kernels.reverse_kl(s, t, **kw)
    torch.testing.assert_close(kd_kernels.jeffreys(s, t, **kw), fkl + rkl, rtol=1e-5, atol=1e-6)
    a = 0.3
    amari = kd_kernels.alpha_beta(s, t, alpha=a, beta=1 - a, **kw)
    ren = kd_kernels.renyi(s, t, alpha=a, **kw)
    torch.testing.assert_close(
        amari, (1 - torch.exp((a - 1) * ren)) / (a * (1 - a)), rtol=1e-5, atol=1e-6
    )
    orders = [kd_kernels.renyi(s, t, alpha=x, **kw) for x in (0.25, 0.5, 0.99, 1.01, 2.0)]
    for lo, hi in itertools.pairwise(orders):
        assert torch.all(lo <= hi + 1e-6)
    assert torch.all(orders[2] <= fkl + 1e-5) and torch.all(fkl <= orders[3] + 1e-5)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ALL)
def test_interpolation_limits(backend, divergence):
    """λ = 1 is the plain teacher; λ → 0 makes the teacher the student, so the loss and gradient go to 0 (for
    TVD only the loss: |p − q| has a gradient of size q whatever the sign, it does not shrink near p = q)."""
    s, t = logits((4, 300)), logits((4, 300))
    kw = {
        "divergence": divergence,
        "reduction": "none",
        "backend": backend,
        **COEF.get(divergence, {}),
    }
    torch.testing.assert_close(
        kd_kernels.kd_loss(s, t, interpolation=1.0, **kw), kd_kernels.kd_loss(s, t, **kw)
    )
    x = s.clone().requires_grad_()
    near = kd_kernels.kd_loss(x, t, interpolation=1e-6, **kw)
    (g,) = torch.autograd.grad(near.sum(), x)
    assert near.abs().max() <= 1e-4
    assert divergence == "tvd" or g.abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------- NaN / inf semantics


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ALL)
def test_rows_that_are_not_distributions_give_nan(backend, divergence):
    """A NaN, a +inf, an all −inf row or fp32 overflow after 1/T in a counted row: loss NaN and the whole
    gradient row NaN; other rows exact; a masked NaN row 0."""
    n, v, temp = 8, 200, 0.5
    s, t = logits((n, v)), logits((n, v))
    s[1, 5] = math.nan
    t[2, 9] = math.nan
    s[3] = -math.inf
    t[4] = -math.inf
    t[5, 0] = math.inf
    s[6, 3] = 3e38  # finite in fp32, inf after dividing by T = 0.5
    s[7], t[7] = math.nan, math.nan  # masked
    mask = torch.ones(n, dtype=torch.bool)
    mask[7] = False
    x = s.clone().requires_grad_()
    kw = {
        "divergence": divergence,
        "temperature": temp,
        "backend": backend,
        **COEF.get(divergence, {}),
    }
    loss = kd_kernels.kd_loss(x, t, mask=mask, reduction="none", **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    bad = [1, 2, 3, 4, 5, 6]
    assert torch.isnan(loss[bad]).all(), loss
    assert torch.isnan(g[bad]).all()
    assert loss[7] == 0 and torch.all(g[7] == 0)
    ref = kd_kernels.kd_loss(s[:1].clone(), t[:1], reduction="none", **kw)
    torch.testing.assert_close(loss[:1], ref)
    assert torch.isfinite(g[0]).all()
    mean = kd_kernels.kd_loss(s, t, mask=mask, **kw)
    assert torch.isnan(mean)


# ------------------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("divergence", ALL)
def test_reference_gradcheck(divergence):
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    coef = COEF.get(divergence, {})
    # interpolation < 1 is left out: its teacher holds a detached copy of x, which finite differences do see.
    f = lambda x: R.kd_loss(divergence, x, t, temperature=1.3, **coef)
    assert torch.autograd.gradcheck(f, (s,))


def test_reference_definitions():
    """The reference's new divergences against their textbook forms and limits."""
    s, t = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64)
    p, q = t.softmax(-1), s.softmax(-1)
    close = torch.testing.assert_close
    close(R.tvd_per_token(s, t), 0.5 * (p - q).abs().sum(-1))
    close(R.jeffreys_per_token(s, t), ((p - q) * (p.log() - q.log())).sum(-1))
    close(R.alpha_beta_per_token(s, t, 0.5, 0.5), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))
    close(R.renyi_per_token(s, t, 0.5), -2 * (p * q).sqrt().sum(-1).log())
    close(R.renyi_per_token(s, t, 2.0), (p**2 / q).sum(-1).log())
    fkl, rkl = R.forward_kl_per_token(s, t), R.reverse_kl_per_token(s, t)
    close(R.alpha_beta_per_token(s, t, 1.0, 1e-7), fkl, rtol=1e-5, atol=1e-6)
    close(R.alpha_beta_per_token(s, t, 1e-7, 1.0), rkl, rtol=1e-5, atol=1e-6)
    close(R.renyi_per_token(s, t, 1 + 1e-7), fkl, rtol=1e-5, atol=1e-6)
    lam = 0.3
    close(
        R.kd_loss("forward_kl", s, t, interpolation=lam, reduction="none"),
        R.forward_kl_per_token(s, lam * t + (1 - lam) * s),
    )


# ------------------------------------------------------------------------------- validation and public API


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (
            kd_kernels.renyi,
            {"alpha": 1.0},
            r"alpha=1.0 is outside .* without 1 for renyi; .*kd_kernels\.forward_kl",
        ),
        (kd_kernels.renyi, {"alpha": 0}, r"alpha=0 is outside the open interval \(0, ∞\)"),
        (kd_kernels.renyi, {"alpha": -2.0}, r"alpha=-2.0 is outside"),
        (kd_kernels.renyi, {"alpha": math.inf}, r"alpha=inf is outside"),
        (kd_kernels.alpha_beta, {"alpha": 0.0}, r"alpha=0.0 .*alpha_beta.*kd_kernels\.reverse_kl"),
        (kd_kernels.alpha_beta, {"beta": 0.0}, r"beta=0.0 .*alpha_beta.*kd_kernels\.forward_kl"),
        (kd_kernels.alpha_beta, {"beta": -1.0}, r"beta=-1.0 is outside the open interval \(0, ∞\)"),
        (
            kd_kernels.tvd,
            {"interpolation": 0.0},
            r"interpolation=0.0 is outside \(0, 1\].*identically 0",
        ),
        (kd_kernels.jsd, {"interpolation": 1.5}, r"interpolation=1.5 is outside \(0, 1\]"),
    ],
)
def test_parameters_outside_their_domain(fn, kwargs, match):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match=match):
        fn(s, t, **kwargs)


def test_parameter_types():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(TypeError, match="alpha must be a float"):
        kd_kernels.renyi(s, t, alpha="2")
    with pytest.raises(TypeError, match="interpolation must be a float"):
        kd_kernels.forward_kl(s, t, interpolation=None)
    with pytest.raises(ValueError, match="divergence='hellinger' is unknown.*'renyi'"):
        kd_kernels.kd_loss(s, t, divergence="hellinger")
    with pytest.raises(ValueError, match="alpha"):
        kd_kernels.KDLoss("renyi", alpha=1)
    with pytest.raises(ValueError, match="interpolation"):
        kd_kernels.FusedLinearKDLoss("tvd", interpolation=2.0)


def test_spec_table_matches_the_numbering():
    """Every divergence has an entry; the numbering is the compiled kernels' (HELPERS / kd_math.h)."""
    assert set(SPEC_TABLE) == set(Divergence)
    assert [d.label for d in sorted(Divergence)] == list(ALL)
    assert {d.label: SPEC_TABLE[d].row_passes for d in Divergence if SPEC_TABLE[d].online} == {
        "forward_kl": 2,
        "reverse_kl": 2,
        "jeffreys": 2,
        "renyi": 2,
    }


@pytest.mark.parametrize("divergence", NEW)
def test_named_functions_and_module_equal_generic(divergence):
    s, t = torch.randn(3, 40), torch.randn(3, 40)
    coef = COEF.get(divergence, {})
    kw = {"temperature": 1.5, "interpolation": 0.7, "backend": "torch"}
    generic = kd_kernels.kd_loss(s, t, divergence=divergence, **kw, **coef)
    named = getattr(kd_kernels, divergence)(s, t, **kw, **coef)
    module = kd_kernels.KDLoss(divergence, **kw, **coef)
    torch.testing.assert_close(named, generic)
    torch.testing.assert_close(module(s, t), generic)
    assert divergence in repr(module) and "interpolation=0.7" in repr(module)
    for k, v in coef.items():
        assert f"{k}={v}" in repr(module)
    defaults = {p.keyword: p.default for p in Divergence.parse(divergence).info.params}
    torch.testing.assert_close(
        getattr(kd_kernels, divergence)(s, t, backend="torch"),
        kd_kernels.kd_loss(s, t, divergence=divergence, backend="torch", **defaults),
    )


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW + ("jsd",))
def test_fused_linear_equals_logits_level(backend, divergence):
    """fused_linear_kd (and its named form, and the module) with the new divergences and interpolation equals
    kd_loss on materialized logits, gradients included."""
    if backend == "triton" and divergence not in ("renyi", "tvd"):
        pytest.skip("the interpreter is slow: one online and one three-pass divergence")
    n, d_s, d_t, v = 10, 16, 24, 131
    hs = torch.randn(n, d_s, requires_grad=True)
    ws = (torch.randn(v, d_s) * 0.3).requires_grad_()
    ht, wt = torch.randn(n, d_t), torch.randn(v, d_t) * 0.3
    mask = torch.rand(n) > 0.3
    coef = COEF.get(divergence, {})
    kw = {"temperature": 1.4, "interpolation": 0.6, "mask": mask, "backend": backend, **coef}
    loss = getattr(kd_kernels, f"fused_linear_{divergence}")(hs, ws, ht, wt, chunk_size=4, **kw)
    gh, gw = torch.autograd.grad(loss, (hs, ws))
    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    ref = kd_kernels.kd_loss(hs2 @ ws2.T, ht @ wt.T, divergence=divergence, **kw)
    rh, rw = torch.autograd.grad(ref, (hs2, ws2))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
    module = kd_kernels.FusedLinearKDLoss(
        divergence, temperature=1.4, interpolation=0.6, backend=backend, **coef
    )
    torch.testing.assert_close(module(hs, ws, ht, wt, mask=mask), loss, rtol=1e-6, atol=1e-7)
    assert "interpolation=0.6" in repr(module)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", NEW)
def test_inplace_grad_matches(backend, divergence):
    s0, t = logits((5, 321)), logits((5, 321))
    kw = {
        "divergence": divergence,
        "backend": backend,
        "interpolation": 0.8,
        **COEF.get(divergence, {}),
    }
    leaf = s0.clone().requires_grad_()
    ref = kd_kernels.kd_loss(leaf, t, **kw)
    ref.backward()
    leaf2 = s0.clone().requires_grad_()
    loss = kd_kernels.kd_loss(
        leaf2 * 1.0, t, inplace_grad=True, **kw
    )  # a non-leaf, as lm_head output would be
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(leaf2.grad, leaf.grad)


def test_custom_op_carries_the_new_options():
    """The custom op that torch.compile graphs call takes coef2 and interpolation: its schema and fake
    implementation check out, and it gives the backend's own result."""
    from kd_kernels._autograd import _loss_grad_op
    from kd_kernels._backends import get_backend
    from kd_kernels._spec import KDSpec

    s, t, w = torch.randn(6, 300), torch.randn(6, 300), torch.rand(6)
    spec = KDSpec.make("alpha_beta", alpha=0.7, beta=0.4, temperature=2.0, interpolation=0.6)
    args = (
        s,
        t,
        w,
        int(spec.divergence),
        spec.coef,
        spec.coef2,
        spec.temperature,
        spec.interpolation,
        "torch",
        True,
    )
    torch.library.opcheck(_loss_grad_op, args, test_utils=("test_schema", "test_faketensor"))
    loss, grad = _loss_grad_op(*args)
    g_ref = torch.empty_like(s)
    loss_ref = get_backend("torch").loss_grad(s, t, w, spec, g_ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, g_ref)
