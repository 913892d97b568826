"""The compiled cpu kernel itself (``get_backend("cpu").loss_grad``), every divergence of kd_math.h, against
float64 definitions written out here from docs/MATH.md ("Divergences", "More divergences", the
interpolated teacher), differentiated by autograd; and the decided NaN semantics for non-distributions.

Independent of the public API (validated by kd_kernels.losses): specs are built directly, so these tests pin
the kernel contract (kd_args.h) — per-row unweighted loss, gradient row = row_weight · ∂L/∂s, rows of weight 0
not read — on every x86-64 level this CPU runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from _common import cpu_levels

from kd_kernels import _ext
from kd_kernels._spec import Divergence, KDSpec

pytestmark = pytest.mark.skipif(
    _ext._C is None, reason=f"kd_kernels._C not built: {_ext.load_error}"
)

# (coef, coef2) per divergence: α of skew / renyi / alpha_beta, β of jsd / alpha_beta.
PARAMS = {
    "forward_kl": (0.0, 0.0),
    "reverse_kl": (0.0, 0.0),
    "skew_forward_kl": (0.1, 0.0),
    "skew_reverse_kl": (0.3, 0.0),
    "jsd": (0.4, 0.0),
    "tvd": (0.0, 0.0),
    "jeffreys": (0.0, 0.0),
    "alpha_beta": (0.7, 0.4),
    "renyi": (0.6, 0.0),
}
ALL = tuple(PARAMS)
NEW = ("tvd", "jeffreys", "alpha_beta", "renyi")
# Divergences that are +inf where p = 0 < q: −inf teacher columns only where the student's are −inf too.
INF_WITHOUT_SUPPORT = ("reverse_kl", "jeffreys")


LEVELS = cpu_levels()


@pytest.fixture
def level(request):
    _ext._C._set_cpu_isa(request.param)
    yield request.param
    _ext._C._set_cpu_isa("auto")


# ---------------------------------------------------------------------------------------------------------
# float64 definitions (MATH.md), written independently of kd_kernels.reference
# ---------------------------------------------------------------------------------------------------------


def _xlogy_diff(w: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Σ w (la − lb) with 0 · (anything) = 0 where w = 0 (the 0 · log 0 convention). The difference is masked
    too, so that its NaN at la = lb = −inf never reaches the gradient of w (0 · NaN)."""
    pos = w > 0
    zero = torch.zeros_like(w)
    return torch.where(pos, w * torch.where(pos, la - lb, zero), zero).sum(-1)


def definition(div: str, ss: torch.Tensor, tt: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Per-token L from tempered logits s̃ (with grad) and the teacher's t̃ (no grad)."""
    lq, lp = ss.log_softmax(-1), tt.log_softmax(-1)
    q, p = lq.exp(), lp.exp()

    def lmix(lx, ly, w):  # log(w x + (1−w) y)
        return torch.logaddexp(math.log(w) + lx, math.log1p(-w) + ly)

    if div == "forward_kl":
        return _xlogy_diff(p, lp, lq)
    if div == "reverse_kl":
        return _xlogy_diff(q, lq, lp)
    if div == "skew_forward_kl":
        return _xlogy_diff(p, lp, lmix(lp, lq, a))
    if div == "skew_reverse_kl":
        return _xlogy_diff(q, lq, lmix(lq, lp, a))
    if div == "jsd":
        lm = lmix(lp, lq, a)
        return a * _xlogy_diff(p, lp, lm) + (1 - a) * _xlogy_diff(q, lq, lm)
    if div == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if div == "jeffreys":  # Σ (p − q)(ℓp − ℓq), 0 where p = q = 0
        return _xlogy_diff(p, lp, lq) + _xlogy_diff(q, lq, lp)
    if div == "alpha_beta":
        pa, qb = (a * lp).exp(), (b * lq).exp()
        pab, qab = ((a + b) * lp).exp(), ((a + b) * lq).exp()
        return -(pa * qb - a / (a + b) * pab - b / (a + b) * qab).sum(-1) / (a * b)
    if div == "renyi":
        r = torch.where(lp > -math.inf, a * lp + (1 - a) * lq, torch.full_like(lq, -math.inf))
        return r.logsumexp(-1) / (a - 1)
    raise AssertionError(div)


def reference(div, s, t, w, *, temperature, lam, coef=None):
    """(per-row L_i for counted rows (0 for w = 0), gradient of Σ w_i L_i w.r.t. s), all float64."""
    a, b = PARAMS[div] if coef is None else coef
    s64 = s.detach().double().requires_grad_()
    ss = s64 / temperature
    tt = t.detach().double() / temperature
    if lam != 1.0:
        tt = lam * tt + (1 - lam) * ss.detach()  # TAID: no gradient through the student part
    counted = w != 0
    L = torch.zeros(s.shape[0], dtype=torch.float64)
    grad = torch.zeros_like(s64)
    if counted.any():
        Lc = definition(div, ss[counted], tt[counted], a, b)
        (g,) = torch.autograd.grad((w[counted].double() * Lc).sum(), s64)
        L[counted] = Lc.detach()
        grad = g
    return L, grad


def run_kernel(div, s, t, w, *, temperature, lam, inplace=False, coef=None):
    from kd_kernels._backends import get_backend

    a, b = PARAMS[div] if coef is None else coef
    spec = KDSpec(Divergence[div.upper()], a, b, temperature=temperature, interpolation=lam)
    if inplace:
        s = s.clone()
        grad = s
    else:
        grad = torch.empty_like(s)
    loss = get_backend("cpu").loss_grad(s, t, w, spec, grad)
    return loss, grad


LOSS_RTOL = 5e-5
GRAD_TOL = {torch.float32: 3e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def check(
    div,
    s,
    t,
    w,
    *,
    temperature=1.0,
    lam=1.0,
    inplace=False,
    coef=None,
    loss_atol=1e-6,
    grad_atol=1e-7,
    grad_rtol=None,
):
    loss, grad = run_kernel(
        div, s, t, w, temperature=temperature, lam=lam, inplace=inplace, coef=coef
    )
    L, gref = reference(div, s, t, w, temperature=temperature, lam=lam, coef=coef)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    err = (loss.double() - L).abs()
    assert (err <= LOSS_RTOL * L.abs().clamp_min(1.0) + loss_atol).all(), (err.max(), L)
    assert (loss[w == 0] == 0).all() and (grad[w == 0] == 0).all()
    gerr = (grad.double() - gref).abs().max().item()
    rtol = GRAD_TOL[s.dtype] if grad_rtol is None else grad_rtol
    assert gerr <= rtol * gref.abs().max().item() + grad_atol, (gerr, gref.abs().max().item())
    return loss, grad


def _inputs(n, v, s_dtype=torch.float32, t_dtype=torch.float32, scale=3.0):
    s = (torch.randn(n, v) * scale).to(s_dtype)
    t = (torch.randn(n, v) * scale).to(t_dtype)
    w = torch.rand(n) + 0.5
    w[1::3] = 0.0  # masked rows
    return s, t, w


# ---------------------------------------------------------------------------------------------------------
# Every divergence × dtype × temperature × interpolation, with masked rows, V odd
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("div", ALL)
@pytest.mark.parametrize(
    "s_dtype, t_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_matches_definition(div, s_dtype, t_dtype, temperature, lam):
    s, t, w = _inputs(7, 1031, s_dtype, t_dtype)
    check(div, s, t, w, temperature=temperature, lam=lam)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("div", ALL)
def test_every_isa_level_long_rows_in_place(level, div):
    # V = 4099: several 512-entry blocks, a short last one, a vector tail; the gradient overwrites s.
    s, t, w = _inputs(5, 4099, scale=4.0)
    check(div, s, t, w, temperature=1.3, lam=0.8, inplace=True)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("div", NEW)
def test_every_isa_level_bf16(level, div):
    s, t, w = _inputs(6, 1031, torch.bfloat16, torch.bfloat16)
    check(div, s, t, w, temperature=1.0, lam=1.0)


@pytest.mark.parametrize("coef", [(0.5, 0.5), (0.2, 1.5), (2.0, 0.3)])
def test_alpha_beta_parameters(coef):
    s, t, w = _inputs(5, 1031)
    check("alpha_beta", s, t, w, coef=coef, lam=0.7)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0, 5.0])
def test_renyi_orders(alpha):
    s, t, w = _inputs(5, 1031)
    check("renyi", s, t, w, coef=(alpha, 0.0), temperature=1.5)


# ---------------------------------------------------------------------------------------------------------
# Extreme values
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("div", ALL)
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_large_logits(div, lam):
    # ±3e3 logits: near one-hot distributions, e^(−thousands) underflow everywhere else. The inputs' fp32
    # rounding after 1/T is ~2^-24 · 3e3 / T ≈ 2.6e-4 per logit, so loss and gradient get absolute
    # tolerances of a few times that, and the gradient a relative one (q = e^(s̃ − LSE) inherits the logit's
    # absolute error as a relative one).
    s = (torch.rand(6, 1031) * 2 - 1) * 3e3
    t = (torch.rand(6, 1031) * 2 - 1) * 3e3
    w = torch.ones(6)
    w[2] = 0.0
    check(div, s, t, w, temperature=0.7, lam=lam, loss_atol=3e-3, grad_atol=2e-3, grad_rtol=1e-3)


@pytest.mark.parametrize("div", ALL)
def test_minus_inf_columns(div):
    s, t, w = _inputs(5, 1031)
    t[:, 1000:] = -math.inf  # padded teacher vocabulary: p = 0 there
    t[0, :600] = -math.inf  # a whole first block and more
    if div in INF_WITHOUT_SUPPORT:  # finite only where q = 0 too
        s[:, 1000:] = -math.inf
        s[0, :600] = -math.inf
    check(div, s, t, w, temperature=1.0, lam=1.0)
    check(div, s, t, w, temperature=2.0, lam=0.6)


@pytest.mark.parametrize("div", ALL)
def test_invariants_nonnegative_and_zero_at_equality(div):
    s, t, w = _inputs(6, 1031)
    loss, _ = run_kernel(div, s, t, w, temperature=1.0, lam=1.0)
    assert (loss >= -1e-6).all()
    assert (loss[w != 0] > 1e-3).all()
    loss, grad = run_kernel(div, s, s.clone(), w, temperature=1.7, lam=0.5)
    assert loss.abs().max().item() < 1e-5
    assert grad.abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------------------
# The decided NaN semantics (HELPERS.md): a counted row that is not a pair of distributions → loss NaN and a
# NaN gradient row; other rows exact; masked rows untouched (loss 0, gradient 0, not read).
# ---------------------------------------------------------------------------------------------------------


def _poison(kind: str, s: torch.Tensor, t: torch.Tensor, row: int) -> float:
    """Makes row `row` a non-distribution; returns the temperature to run with."""
    if kind == "nan_student":
        s[row, 17] = math.nan
    elif kind == "nan_teacher":
        t[row, 1030] = math.nan
    elif kind == "inf_student":
        s[row, 3] = math.inf
    elif kind == "inf_teacher":
        t[row, 600] = math.inf
    elif kind == "all_minus_inf_student":
        s[row] = -math.inf
    elif kind == "all_minus_inf_teacher":
        t[row] = -math.inf
    elif kind == "overflow_after_temperature":
        s[row, 5] = 3e38  # finite, but 3e38 / 0.5 overflows fp32 to +inf
        return 0.5
    else:
        raise AssertionError(kind)
    return 1.0


KINDS = (
    "nan_student",
    "nan_teacher",
    "inf_student",
    "inf_teacher",
    "all_minus_inf_student",
    "all_minus_inf_teacher",
    "overflow_after_temperature",
)


@pytest.mark.parametrize("div", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_non_distribution_row_is_nan(div, kind):
    s, t, w = _inputs(6, 1031)
    w[:] = 1.0
    w[4] = 0.0
    T = _poison(kind, s, t, 2)
    _poison(kind, s, t, 4)  # the same in a masked row: never read
    lam = 0.7 if kind.endswith("teacher") else 1.0
    loss, grad = run_kernel(div, s, t, w, temperature=T, lam=lam)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert loss[4] == 0 and (grad[4] == 0).all()
    # Other rows exact: bit for bit what they give without the bad row (rows are independent).
    good = torch.tensor([0, 1, 3, 5])
    alone_loss, alone_grad = run_kernel(div, s[good], t[good], w[good], temperature=T, lam=lam)
    assert torch.equal(loss[good], alone_loss) and torch.equal(grad[good], alone_grad)
    assert torch.isfinite(alone_loss).all() and torch.isfinite(alone_grad).all()


@pytest.mark.parametrize("div", ["reverse_kl", "skew_forward_kl", "renyi", "tvd"])
def test_nan_row_bf16_and_loss_only(div):
    from kd_kernels._backends import get_backend

    s, t, w = _inputs(4, 1031, torch.bfloat16, torch.bfloat16)
    w[:] = 1.0
    s[1, 100] = math.nan
    a, b = PARAMS[div]
    spec = KDSpec(Divergence[div.upper()], a, b)
    loss = get_backend("cpu").loss_grad(s, t, w, spec, None)  # loss only
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    _, grad = run_kernel(div, s, t, w, temperature=1.0, lam=1.0)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2, 3]]).all()


# ---------------------------------------------------------------------------------------------------------
# Parameters outside their domain: the kernels' own guard (the public functions check first)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "div, coef, coef2, lam, match",
    [
        ("alpha_beta", 0.5, 0.0, 1.0, "coef2"),
        ("alpha_beta", -1.0, 0.5, 1.0, "coef2"),
        ("renyi", 1.0, 0.0, 1.0, "renyi"),
        ("renyi", 0.0, 0.0, 1.0, "renyi"),
        ("renyi", math.inf, 0.0, 1.0, "renyi"),
        ("tvd", 0.0, 0.0, 0.0, "interpolation"),
        ("jeffreys", 0.0, 0.0, 1.5, "interpolation"),
        ("forward_kl", 0.0, 0.0, math.nan, "interpolation"),
    ],
)
def test_out_of_domain_parameters_raise(div, coef, coef2, lam, match):
    s, t, w = _inputs(3, 33)
    with pytest.raises(ValueError, match=match):
        run_kernel(div, s, t, w, temperature=1.0, lam=lam, coef=(coef, coef2))


def test_threads_agree_bitwise():
    s, t, w = _inputs(64, 3001)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [run_kernel(d, s, t, w, temperature=1.0, lam=0.9) for d in NEW]
        torch.set_num_threads(2)
        two = [run_kernel(d, s, t, w, temperature=1.0, lam=0.9) for d in NEW]
    finally:
        torch.set_num_threads(old)
    for (l1, g1), (l2, g2) in zip(one, two):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
