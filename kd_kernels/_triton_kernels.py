"""Triton kernels for the fused per-row KD loss and student-logit gradient (the "triton" backend).

Imported only by ``kd_kernels/_backends/triton_backend.py`` when that backend runs, so ``import kd_kernels``
never imports triton. One program per row; the vocabulary is walked in blocks of ``BLOCK_V`` columns, so any V
works (262144 and beyond) with a fixed register footprint.

Notation as in ``docs/MATH.md``: ``a = s/T``, ``b = t/T`` (fp32), ``ℓq = a − LSE_s``, ``ℓp = b − LSE_t``,
``q = e^ℓq``, ``p = e^ℓp``, ``0·log 0 = 0``. The per-element formulas mirror ``csrc/include/kd_kernels/kd_math.h``
(same edge cases) so the compiled backends agree on every edge case:

- columns past V are loaded as −inf in both tensors, which is exactly "a column −inf in both tensors": it adds 0 to
  every sum and gets gradient 0;
- every weight-times-log product is selected away (``tl.where``) or clamped where its weight is 0, so 0·(−inf)
  never turns into a NaN;
- running maxima start at −FLT_MAX (``NEG_BIG``), so −inf − (−inf) never happens and the first pass needs no
  −inf guard per element; a row that is not a distribution is detected once per row (below).

Base 2 (the hardware's exponential and logarithm): every exponential is ``2^((x − m)·scale2)`` with
``scale2 = log2(e)/T`` one scalar, every log a log2; the kernel works with base-2 log-probabilities
``λ = ℓ / ln 2`` and converts losses and gradient coefficients to natural units with scalar factors ``ln 2``.
Compiled, ``tl.exp2`` is ``ex2.approx.ftz.f32`` (MUFU.EX2), ``_lg2`` is ``lg2.approx.ftz.f32`` (MUFU.LG2) and
``_fast_div`` is ``div.approx.f32`` (MUFU.RCP and a multiply); under the interpreter they are numpy's (see
``HW_MUFU``). Counts per element: docs/BENCHMARKS.md "Triton instruction counts".

Precision: log-probabilities are formed as ``λq = (x − m_s)·scale2 − log2 Z_s``, never as ``x̃ − LSE_s``, and
the scale is applied to the difference ``x − m``, never to a logit. With logits of magnitude ~3e3 the fp32 value
of ``LSE_s`` (or of a scaled logit ``x·log2(e)/T``) is off by up to half an ulp of 3e3 (1.2e-4), which would become
a 1e-4 relative error in every q; ``x − m`` is exact near the max, as in eager ``log_softmax``.

One kernel, ``kd_loss_grad_kernel``, serves every divergence; its passes come from the divergence's definition
(``kd_kernels/_spec.py`` says which other places define it):

- ``_elem_terms`` / ``_sums_finish``: per element, two terms whose row sums give the loss and ``A = Σ a``
  (``a = ∂L/∂ℓq``, up to a multiple of q), for the second pass of a non-online divergence;
- ``_elem_grad``: per element, the last pass's ``a_j − q_j A``;
- for a streaming ("online", ``_spec.DIVERGENCES[d].online``) divergence, ``_online_fold`` / ``_online_finish``:
  the running sums of the first pass and the row's loss and ``A = Σ a`` from them.
The first pass keeps per-group running sums (a group = the columns of one 16-byte load, held by one thread) and
reduces them once after the loop, so its loop has no cross-thread reduction; the second pass of a non-online
divergence keeps per-lane partial sums, also reduced once.
Every divergence's gradient is then ``a_j − q_j A`` (MATH.md "More divergences").

Bytes moved per row (``e_s``, ``e_t``, ``e_g`` bytes per element of s, t, grad; rows with weight 0 only write):
the online divergences (forward / reverse KL, Jeffreys, Rényi) read s and t twice and write the gradient once:
``V·(2 e_s + 2 e_t + e_g)``; the others (skew KL, JSD, TVD, alpha-beta) need a third read
(``V·(3 e_s + 3 e_t + e_g)``). Loss only (``HAS_GRAD=False``): one read (online) or two.

Rows that are not distributions (a NaN, a +inf, all −inf, or overflow after 1/T in either tensor) are found from
the first pass (a log-sum-exp that is not finite; one test per row) and get loss NaN and an all-NaN gradient row
(their own loop: the loss and gradient passes carry no per-element select for them), as on every backend.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Divergence numbering of kd_kernels._spec.Divergence / kd_math.h.
FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
SKEW_FORWARD_KL: tl.constexpr = tl.constexpr(2)
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(3)
JSD: tl.constexpr = tl.constexpr(4)
TVD: tl.constexpr = tl.constexpr(5)
JEFFREYS: tl.constexpr = tl.constexpr(6)
ALPHA_BETA: tl.constexpr = tl.constexpr(7)
RENYI: tl.constexpr = tl.constexpr(8)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)
# The per-lane running max starts at −FLT_MAX, not −inf: x − m is then never −inf − (−inf), so the fold needs
# no −inf guard per element (a column −inf in a lane that has seen nothing else gets weight 2^(−inf) = 0).
NEG_BIG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)
# The floor of a base-2 log ratio whose weight may be 0 (a mixture's log(p/m), log(q/m'), ...): where the weight
# is not 0 the ratio is above −2^10 (a nonzero fp32 weight is above 2^−150), and the floor stays finite when the
# last pass multiplies it by a row constant (ln 2·w/T) before its weight; −FLT_MAX would overflow there.
LOG_FLOOR: tl.constexpr = tl.constexpr(-18446744073709551616.0)  # −2^64
# Workaround: the interpreter (TRITON_INTERPRET=1) cannot run libdevice calls (nor inline PTX), so it takes
# numpy's log2 and division. Compiled kernels take lg2.approx.ftz.f32 (one MUFU.LG2; tl.log2 would lower to the
# libdevice polynomial, about 20 instructions) and div.approx.f32 (MUFU.RCP and a multiply; `/` is the IEEE
# division, a Newton sequence with a slow-path branch). Chosen when the kernel is traced.
HW_MUFU: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _lg2(x):
    """log2 x: MUFU.LG2 when compiled, numpy's log2 under the interpreter (see HW_MUFU)."""
    if HW_MUFU:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _fast_div(x, y):
    """x / y to ~2 ulp for |y| < 2^126 (0 beyond, +inf included): MUFU.RCP and a multiply when compiled, the
    exact division under the interpreter (see HW_MUFU)."""
    if HW_MUFU:
        return libdevice.fast_dividef(x, y)
    else:
        return x / y


@triton.jit
def _group_fold(m, z, x, scale2):
    """Fold one block x (raw fp32 logits, shape [G, R]: R neighbouring columns per group, all held by one
    thread) into per-group running (max m, z = Σ 2^((x − m)·scale2)), shape [G], scale2 = log2(e)/T.

    The group max and sum stay inside a thread (no shuffle, no barrier in the loop); per element one subtract,
    one multiply, one ex2 and one add. m starts at NEG_BIG, so m − m_new is never −inf − (−inf) and a −inf
    column gets 2^(−inf) = 0 without a guard; a NaN column makes z NaN, a +inf column makes the LSE +inf (both a
    NaN row). Returns the new (m, z), the factor f = 2^((m_old − m_new)·scale2) for running sums kept relative
    to the same max, and the elements' weights e = 2^((x − m_new)·scale2).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    f = tl.exp2((m - m_new) * scale2)
    e = tl.exp2((x - m_new[:, None]) * scale2)
    return m_new, z * f + tl.sum(e, axis=1), f, e


@triton.jit
def _groups_lse(m, z, scale2):
    """(max, Σ 2^((x − max)·scale2)) of the row from the per-group (m, z), and each group's factor
    2^((m − max)·scale2) (1 in an all −inf row, whose z are 0)."""
    mx = tl.max(m, axis=0)
    f = tl.exp2((m - mx) * scale2)
    return mx, tl.sum(z * f, axis=0), f


@triton.jit
def _log_mix(lx, ly, log_w, log_1mw):
    """log2(w·2^lx + (1−w)·2^ly) in log space (MATH.md: never in probability space, which underflows); all
    base 2. Where both are −inf the result is NaN: every caller selects it away by its weight p or q (0 there),
    so the per-element guard of hi = −inf is not needed."""
    xa = lx + log_w
    yb = ly + log_1mw
    # lo − hi = −|xa − yb|: the sign and the absolute value are free operand modifiers of MUFU.EX2.
    return tl.maximum(xa, yb) + _lg2(1.0 + tl.exp2(-tl.abs(xa - yb)))


@triton.jit
def _to_grad_dtype(g, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """fp32 → the gradient's storage dtype, rounding to nearest even.

    Workaround: Triton's interpreter (TRITON_INTERPRET=1) truncates fp32 → bf16 instead of rounding, doubling the
    bf16 rounding error of the CPU runs. With BF16_BY_BITS (set by the launcher only when interpreting) the
    rounding is done on the bits, as the GPU's cvt.rn.bf16.f32 does it; on a GPU the native cast is used.
    """
    if BF16_BY_BITS and dtype == tl.bfloat16:
        u = g.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return g.to(dtype)


@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(g_row + cols, zero, mask=cols < V)


@triton.jit
def _fill_row(g_row, V, value, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    fill = tl.full([BLOCK_V], value, dtype=tl.float32).to(g_row.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(g_row + cols, fill, mask=cols < V)


@triton.jit
def _load_pair(s_row, t_row, cols, V, lam, INTERP: tl.constexpr, MASKED: tl.constexpr):
    """Untempered fp32 student s and teacher t of one block; with MASKED, columns past V are −inf in both.
    Without it (a block wholly inside the row) the loads carry no predicate and no −inf fill: two to four fewer
    instructions a column in every pass (8 bf16 or 4 fp32 columns per register fill of a 16-byte load).

    The temperature and the change to base 2 are applied to differences, never to a logit: every exponential
    is 2^((x − m)·scale2) with scale2 = log2(e)/T, one multiply and one ex2, and x − m is exact near the max
    (scaling x first would round it to an ulp of |x|·log2(e)/T, ~2e-4 at logits of 3e3, which p and q would
    inherit as a relative error).
    With INTERP (TAID, interpolation λ < 1) the teacher becomes λ t + (1 − λ) s; a column −inf in both stays −inf.
    """
    if MASKED:
        a = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        b = tl.load(t_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    else:
        a = tl.load(s_row + cols).to(tl.float32)
        b = tl.load(t_row + cols).to(tl.float32)
    if INTERP:
        b = lam * b + (1.0 - lam) * a
    return a, b


# -------------------------------------------------------------------------------------------------------------
# The divergence family, one definition each (MATH.md tables; see kd_kernels/_spec.py).
#
# Per element, in natural units, the loss term and a = ∂L/∂ℓq (up to a multiple of q); L is the row's loss:
#   forward_kl       p (ℓp − ℓq)                                  a = −p                       A = −1
#   reverse_kl       q (ℓq − ℓp)                                  a = q (ℓq − ℓp)              A = L
#   skew_forward_kl  p (ℓp − log m),  m  = α p + (1−α) q          a = −(1−α) q p/m             A = Σ a
#   skew_reverse_kl  q (ℓq − log m'), m' = α q + (1−α) p          a = q (ℓq − log m' − α q/m') A = Σ a
#   jsd              β p (ℓp − log M) + (1−β) q (ℓq − log M)      a = (1−β) q (ℓq − log M)     A = Σ a
#   tvd              ½ |p − q|                                    a = ½ q sign(q − p)          A = Σ a
#   jeffreys         (p − q)(ℓp − ℓq)                             a = q (ℓq − ℓp) − p          A = KL(q‖p) − 1
#   alpha_beta       −[p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]/(αβ)
#                                                                 a = (q^(α+β) − p^α q^β)/α    A = Σ a
#   renyi            (row only: 1/(α−1) log Σ p^α q^(1−α))        a = −p^α q^(1−α)/e^((α−1)L)  A = −1
# written twice, once per pass, from base-2 log-probabilities λ = ℓ / ln 2 (q = 2^λq, p = 2^λp):
# - _elem_terms: two terms x, y whose row sums X, Y give (L, A) = _sums_finish(X, Y) (the second pass of a
#   non-online divergence); the row's constant factors (ln 2, α, β) are applied once there, not per element;
# - _elem_grad: the last pass's gscale·(a_j − q_j A), with the row's constants folded into it.
# Each product is 0 where its weight p or q is 0 (0·log 0 = 0). For the mixtures the log ratio is raised to
# LOG_FLOOR (max ignores NaN: a −inf or NaN ratio appears only where its weight is 0), so the product is
# 0·(−2^64) = 0 with one max and no select; the other divergences select.
# -------------------------------------------------------------------------------------------------------------
@triton.jit
def _elem_terms(lq, lp, lr, coef, coef2, log_c, log_1mc, DIV: tl.constexpr):
    """(q, x, y) of one block for divergence DIV from base-2 log-probs (see the table above and _sums_finish);
    x, y are the loss term and a, except for the mixtures. log_c, log_1mc are log2 coef and log2(1 − coef).
    lr: Rényi's log2 ρ_j (_renyi_lr; unused otherwise)."""
    q = tl.exp2(lq)
    p = tl.exp2(lp)
    if DIV == FORWARD_KL:
        x = tl.where(p == 0.0, 0.0, p * (lp - lq)) * LN2
        y = -p
    elif DIV == REVERSE_KL:
        x = tl.where(q == 0.0, 0.0, q * (lq - lp)) * LN2
        y = x
    elif (
        DIV == SKEW_FORWARD_KL
    ):  # x = p log2(p/m), y = a = −p (1−α)q/m = −p 2^(λq + log2(1−α) − λm)
        lm = _log_mix(lp, lq, log_c, log_1mc)
        x = p * tl.maximum(lp - lm, LOG_FLOOR)
        y = -p * tl.exp2(tl.maximum(lq + log_1mc - lm, LOG_FLOOR))
    elif DIV == SKEW_REVERSE_KL:  # x = q log2(q/m'), y = q q/m'
        d = tl.maximum(lq - _log_mix(lq, lp, log_c, log_1mc), LOG_FLOOR)
        x = q * d
        y = q * tl.exp2(d)
    elif DIV == JSD:  # x = p log2(p/M), y = q log2(q/M)
        lm = _log_mix(lp, lq, log_c, log_1mc)
        x = p * tl.maximum(lp - lm, LOG_FLOOR)
        y = q * tl.maximum(lq - lm, LOG_FLOOR)
    elif DIV == TVD:
        x = 0.5 * tl.abs(q - p)
        y = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    elif DIV == JEFFREYS:
        rev = tl.where(q == 0.0, 0.0, q * (lq - lp)) * LN2
        x = tl.where(p == 0.0, 0.0, p * (lp - lq)) * LN2 + rev
        y = rev - p
    elif DIV == ALPHA_BETA:
        ab = coef + coef2
        pq = tl.exp2(coef * lp + coef2 * lq)  # p^α q^β; 2^(−inf) = 0 covers zero probabilities
        qq = tl.exp2(ab * lq)
        x = -(pq - (coef / ab) * tl.exp2(ab * lp) - (coef2 / ab) * qq) / (coef * coef2)
        y = (qq - pq) / coef
    else:  # RENYI: a = −ρ_j = −p^α q^(1−α) / Σ p^α q^(1−α), from the mixed logits' own max and log Z (lr)
        x = tl.zeros_like(lq)  # the loss comes from the streaming pass
        y = -tl.exp2(lr)
    return q, x, y


@triton.jit
def _sums_finish(x_sum, y_sum, coef, DIV: tl.constexpr):
    """(L, A) from the row sums of _elem_terms' x and y. Linear in them, so the shards of a vocabulary-parallel
    row may be finished before they are added."""
    if DIV == SKEW_FORWARD_KL:
        return x_sum * LN2, y_sum
    elif DIV == SKEW_REVERSE_KL:  # A = Σ q (ℓq − log m') − α Σ q q/m'
        return x_sum * LN2, x_sum * LN2 - coef * y_sum
    elif DIV == JSD:
        return (coef * x_sum + (1.0 - coef) * y_sum) * LN2, ((1.0 - coef) * LN2) * y_sum
    else:
        return x_sum, y_sum


@triton.jit
def _elem_grad(lq, lp, lr, big_a, gscale, coef, coef2, log_c, log_1mc, DIV: tl.constexpr):
    """gscale · (a_j − q_j A) of one block (see the table above); the mixtures fold the row's constants into
    it, the other divergences take a from _elem_terms."""
    if DIV == SKEW_FORWARD_KL:
        # (1−α)q/m = 1/(1 + 2^δ), δ = λp − λq + log2(α/(1−α)): no log needed. δ is −inf or NaN only where p = 0
        # (raised to LOG_FLOOR: the quotient is then finite); +inf (q = 0) gives p/(1 + inf) = 0.
        q = tl.exp2(lq)
        p = tl.exp2(lp)
        delta = tl.maximum(lp - lq + (log_c - log_1mc), LOG_FLOOR)
        g = -(_fast_div(p, 1.0 + tl.exp2(delta)) + q * big_a) * gscale
    elif DIV == SKEW_REVERSE_KL:
        q = tl.exp2(lq)
        d = tl.maximum(lq - _log_mix(lq, lp, log_c, log_1mc), LOG_FLOOR)  # log2(q/m')
        g = q * ((d * (LN2 * gscale) - big_a * gscale) - (coef * gscale) * tl.exp2(d))
    elif DIV == JSD:
        q = tl.exp2(lq)
        dq = tl.maximum(lq - _log_mix(lp, lq, log_c, log_1mc), LOG_FLOOR)  # log2(q/M)
        g = q * (dq * ((1.0 - coef) * LN2 * gscale) - big_a * gscale)
    else:
        q, _, a = _elem_terms(lq, lp, lr, coef, coef2, log_c, log_1mc, DIV)
        g = (a - q * big_a) * gscale
    return g


@triton.jit
def _online_fold(
    x_t, x_s, m_r, z_r, a, b, f_s, e_s, f_t, e_t, coef, scale2, a0, b0, DIV: tl.constexpr
):
    """Fold one [G, R] block into an online divergence's per-group running sums (MATH.md "How many passes"),
    kept relative to the groups' running maxima (f, e from _group_fold); raw logits a = s, b = t, weights base 2:
    x_t = Σ 2^((b − m_t)·scale2)(b − a) (forward KL, Jeffreys), x_s = Σ 2^((a − m_s)·scale2)(a − b) (reverse KL,
    Jeffreys), and for Rényi the running (max, sum) of α (b − b0) + (1−α) (a − a0) (−inf where b is −inf): from
    differences to a point (a0, b0) of the row, not α b + (1−α) a, which rounds at the size of the logits.
    A difference that is −inf or NaN (a −inf column) has weight 0: it is raised to NEG_BIG (max ignores NaN), so
    the product is 0 without a select; a +inf difference (p > 0 where q = 0) stays +inf, an infinite divergence."""
    if DIV == FORWARD_KL or DIV == JEFFREYS:
        x_t = x_t * f_t + tl.sum(e_t * tl.maximum(b - a, NEG_BIG), axis=1)
    if DIV == REVERSE_KL or DIV == JEFFREYS:
        x_s = x_s * f_s + tl.sum(e_s * tl.maximum(a - b, NEG_BIG), axis=1)
    if DIV == RENYI:
        m_r, z_r, _, _ = _group_fold(m_r, z_r, _renyi_mix(a, b, a0, b0, coef), scale2)
    return x_t, x_s, m_r, z_r


@triton.jit
def _renyi_rebase(m_r, m_s, m_t, a0, b0, coef):
    """Rényi's mixed max relative to the point (a0, b0) (_online_fold) → relative to the row's maxima (m_s, m_t):
    m_r − α (m_t − b0) − (1−α) (m_s − a0), raw units; differences of logits only, so it is rounded at the size
    of the row's spread, not of the logits. An infinite m_r stays so."""
    return m_r - coef * (m_t - b0) - (1.0 - coef) * (m_s - a0)


@triton.jit
def _renyi_mix(a, b, a0, b0, coef):
    """Rényi's mixed logit α (b − b0) + (1−α) (a − a0), −inf where b is: from differences to a point (a0, b0) of
    the row, not α b + (1−α) a, which rounds at the size of the logits (_online_fold, _renyi_lr)."""
    return tl.where(b == float("-inf"), float("-inf"), coef * (b - b0) + (1.0 - coef) * (a - a0))


@triton.jit
def _renyi_lr(a, b, a0, b0, m_r, lz_r, coef, k):
    """Rényi's log2 ρ_j = (u_j − m_r)·k − log2 Z_r, u_j = _renyi_mix(a, b, a0, b0), from the mixed logits' own max
    m_r (relative to the same point) and log2 Z_r, k the factor to base 2: formed as the first pass formed the
    terms of Z_r (so Σ ρ = 1 to rounding), not from the loss, whose rounding at the size of the LSEs (O(100) bits
    at low T) every ρ_j would inherit. Per element, one instruction more than α λp + (1−α) λq − (α − 1) L."""
    return (_renyi_mix(a, b, a0, b0, coef) - m_r) * k - lz_r


@triton.jit
def _online_finish(
    m_s, lz_s, z_s, m_t, lz_t, z_t, x_t, x_s, m_r, lz_r, coef, scale2, DIV: tl.constexpr
):
    """(L, A) of an online divergence from the first pass's reduced sums (raw maxima and x sums, base-2 log
    sums in; natural units out); LSE differences are formed as (max difference) + (log-sum difference) so large
    maxima do not cancel. Rényi: m_r relative to (m_s, m_t) (_renyi_rebase), lz_r = log2 Z_r."""
    dlse = (m_s - m_t) * scale2 + (lz_s - lz_t)  # (LSE_s − LSE_t) / ln 2
    if DIV == FORWARD_KL:
        loss = (scale2 * x_t / z_t + dlse) * LN2
        big_a = -1.0
    elif DIV == REVERSE_KL:
        loss = (scale2 * x_s / z_s - dlse) * LN2
        big_a = loss
    elif DIV == JEFFREYS:
        rkl = (scale2 * x_s / z_s - dlse) * LN2
        loss = (scale2 * x_t / z_t + dlse) * LN2 + rkl
        big_a = rkl - 1.0
    else:  # RENYI: log Σ p^α q^(1−α) = LSE_mix − α LSE_t − (1−α) LSE_s
        log_sum = m_r * scale2 + (lz_r - coef * lz_t - (1.0 - coef) * lz_s)
        # A +inf term (α > 1, q = 0 where p > 0) is an infinite divergence, as in float64, not a NaN.
        loss = tl.where(m_r == float("inf"), float("inf"), log_sum * LN2 / (coef - 1.0))
        big_a = -1.0
    return loss, big_a


@triton.jit
def _stats_block(
    m_s,
    z_s,
    m_t,
    z_t,
    x_t,
    x_s,
    m_r,
    z_r,
    s_row,
    t_row,
    cols,
    V,
    lam,
    coef,
    scale2,
    a0,
    b0,
    DIV: tl.constexpr,
    ONLINE: tl.constexpr,
    INTERP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of _row_stats: its running sums with the [G, R] columns cols folded in."""
    a, b = _load_pair(s_row, t_row, cols, V, lam, INTERP, MASKED)
    m_s, z_s, f_s, e_s = _group_fold(m_s, z_s, a, scale2)
    m_t, z_t, f_t, e_t = _group_fold(m_t, z_t, b, scale2)
    if ONLINE:
        x_t, x_s, m_r, z_r = _online_fold(
            x_t, x_s, m_r, z_r, a, b, f_s, e_s, f_t, e_t, coef, scale2, a0, b0, DIV
        )
    return m_s, z_s, m_t, z_t, x_t, x_s, m_r, z_r


@triton.jit
def _sums_block(
    x_acc,
    y_acc,
    s_row,
    t_row,
    cols,
    V,
    lam,
    ms,
    mt,
    lz_s,
    lz_t,
    scale2,
    coef,
    coef2,
    log2_c,
    log2_1mc,
    DIV: tl.constexpr,
    INTERP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of the second pass: the per-lane sums of _elem_terms' x, y with the columns cols added."""
    a, b = _load_pair(s_row, t_row, cols, V, lam, INTERP, MASKED)
    # λ = (x − m)·log2(e)/T − log2 Z, never x̃ − LSE: see "Precision" at the top.
    _, x, y = _elem_terms(
        (a - ms) * scale2 - lz_s, (b - mt) * scale2 - lz_t, 0.0, coef, coef2, log2_c, log2_1mc, DIV
    )
    return x_acc + x, y_acc + y


@triton.jit
def _grad_block(
    g_row,
    s_row,
    t_row,
    cols,
    V,
    lam,
    ms,
    mt,
    lz_s,
    lz_t,
    scale2,
    a0,
    b0,
    mr,
    lz_r,
    big_a,
    gscale,
    coef,
    coef2,
    log2_c,
    log2_1mc,
    DIV: tl.constexpr,
    INTERP: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of the last pass: the gradient of the columns cols, written to g_row (a0, b0, mr, lz_r: Rényi's,
    see _renyi_lr)."""
    a, b = _load_pair(s_row, t_row, cols, V, lam, INTERP, MASKED)
    lr = 0.0
    if DIV == RENYI:
        lr = _renyi_lr(a, b, a0, b0, mr, lz_r, coef, scale2)
    g = _elem_grad(
        (a - ms) * scale2 - lz_s,
        (b - mt) * scale2 - lz_t,
        lr,
        big_a,
        gscale,
        coef,
        coef2,
        log2_c,
        log2_1mc,
        DIV,
    )
    # Every element of this block was read above before it is overwritten: in place is safe.
    gout = _to_grad_dtype(g, g_row.dtype.element_ty, BF16_BY_BITS)
    if MASKED:
        tl.store(g_row + cols, gout, mask=cols < V)
    else:
        tl.store(g_row + cols, gout)


@triton.jit
def _renyi_point(s_row, t_row, lam, INTERP: tl.constexpr, DIV: tl.constexpr):
    """Rényi's point (a0, b0) of the row (_online_fold): its first column (as _load_pair forms it), each 0 where
    not finite (such a row is not valid anyway); (0, 0) for the other divergences."""
    a0 = 0.0
    b0 = 0.0
    if DIV == RENYI:
        a = tl.load(s_row).to(tl.float32)
        b = tl.load(t_row).to(tl.float32)
        if INTERP:
            b = lam * b + (1.0 - lam) * a
        a0 = tl.where(tl.abs(a) < float("inf"), a, 0.0)
        b0 = tl.where(tl.abs(b) < float("inf"), b, 0.0)
    return a0, b0


@triton.jit
def _row_stats(
    s_row,
    t_row,
    V,
    lam,
    coef,
    scale2,
    a0,
    b0,
    DIV: tl.constexpr,
    ONLINE: tl.constexpr,
    INTERP: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 1 over one row (kd_loss_grad_kernel, and kd_vp_rows_kernel on a shard): the max and
    Z = Σ 2^((x − max)·scale2) of s (ms, zs) and of t (mt, zt), and with ONLINE the divergence's running sums
    (_online_fold) still per group: x_t, x_s relative to the row's maxima (to be summed) and Rényi's (max, sum)
    m_r, z_r (to be reduced by _groups_lse; relative to the point (a0, b0), see _online_fold). The caller reduces those where it uses them: reduced here, before
    the row's branch, they cost the loops of forward KL 0.6 instructions an element (fp32 SASS).

    Per-group running sums: a group is GROUP neighbouring columns (one 16-byte load) held by one thread, so the
    loop has no cross-thread reduction (no shuffle, no barrier); the groups are reduced once after it."""
    m_s = tl.full([BLOCK_V // GROUP], NEG_BIG, tl.float32)
    z_s = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
    m_t = tl.full([BLOCK_V // GROUP], NEG_BIG, tl.float32)
    z_t = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
    x_t = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
    x_s = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
    m_r = tl.full([BLOCK_V // GROUP], NEG_BIG, tl.float32)
    z_r = tl.zeros([BLOCK_V // GROUP], dtype=tl.float32)
    offs2 = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    v_full = V - V % BLOCK_V  # whole blocks unmasked, then the partial one masked (see _load_pair)
    for start in range(0, v_full, BLOCK_V):
        m_s, z_s, m_t, z_t, x_t, x_s, m_r, z_r = _stats_block(
            m_s,
            z_s,
            m_t,
            z_t,
            x_t,
            x_s,
            m_r,
            z_r,
            s_row,
            t_row,
            start + offs2,
            V,
            lam,
            coef,
            scale2,
            a0,
            b0,
            DIV,
            ONLINE,
            INTERP,
            False,
        )
    if v_full < V:
        m_s, z_s, m_t, z_t, x_t, x_s, m_r, z_r = _stats_block(
            m_s,
            z_s,
            m_t,
            z_t,
            x_t,
            x_s,
            m_r,
            z_r,
            s_row,
            t_row,
            v_full + offs2,
            V,
            lam,
            coef,
            scale2,
            a0,
            b0,
            DIV,
            ONLINE,
            INTERP,
            True,
        )
    ms, zs, ls = _groups_lse(m_s, z_s, scale2)
    mt, zt, lt = _groups_lse(m_t, z_t, scale2)
    return ms, zs, mt, zt, x_t * lt, x_s * ls, m_r, z_r


@triton.jit
def kd_loss_grad_kernel(
    s_ptr,  # (N, V) student logits, fp32/bf16/fp16, unit column stride, row stride stride_s
    t_ptr,  # (N, V) teacher logits, fp32/bf16/fp16, unit column stride, row stride stride_t
    w_ptr,  # (N,) fp32 row weights; a row with weight 0 is not read (loss 0, gradient row 0)
    loss_ptr,  # (N,) fp32 out: the unweighted per-token divergence
    g_ptr,  # (N, V) out: w_i ∂L_i/∂s_i in the student dtype, row stride stride_g; may alias s_ptr
    stride_s,
    stride_t,
    stride_g,
    V,
    inv_temp,  # 1/T, fp32
    lam,  # interpolation λ (used only with INTERP)
    coef,  # α (skew, alpha_beta, renyi) or β (JSD), fp32; unused otherwise
    coef2,  # β of alpha_beta
    log_c,  # log coef (skew, JSD)
    log_1mc,  # log(1 − coef) (skew, JSD)
    DIV: tl.constexpr,  # the divergence, numbered as kd_kernels._spec.Divergence
    ONLINE: tl.constexpr,  # loss and A from the first pass (2 reads of a row), else a second pass (3 reads)
    INTERP: tl.constexpr,  # interpolation λ < 1 (TAID)
    HAS_GRAD: tl.constexpr,  # False: loss only, g_ptr is not touched
    BF16_BY_BITS: tl.constexpr,  # round bf16 gradients on the bits (interpreter only, see _to_grad_dtype)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit so row · stride does not wrap when N·V ≥ 2^31
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    w = tl.load(w_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    GROUP: tl.constexpr = (
        128 // s_ptr.dtype.element_ty.primitive_bitwidth
    )  # columns in 16 bytes of s
    scale2 = inv_temp * LOG2E  # 2^((x − m)·scale2) = e^((x − m)/T): one multiply per element
    log2_c = log_c * LOG2E
    log2_1mc = log_1mc * LOG2E
    v_full = (
        V - V % BLOCK_V
    )  # the passes take whole blocks unmasked, then the partial one masked (_load_pair)

    if w != 0.0:
        # Pass 1: the row's maxima and sums and, for an online divergence, its running sums.
        a0, b0 = _renyi_point(s_row, t_row, lam, INTERP, DIV)
        ms, zs, mt, zt, x_t, x_s, m_r, z_r = _row_stats(
            s_row, t_row, V, lam, coef, scale2, a0, b0, DIV, ONLINE, INTERP, GROUP, BLOCK_V
        )
        lz_s = _lg2(zs)
        lz_t = _lg2(zt)
        # A row that is a distribution has finite LSEs; otherwise (NaN, +inf, all −inf, overflow; |NaN| < inf
        # is false) its loss and its whole gradient row are NaN. One test per row: the passes below need no
        # per-element guard for such rows. The max is tested after 1/T ("overflow after 1/T").
        ok = (
            (tl.abs(ms * inv_temp) < float("inf"))
            & (tl.abs(lz_s) < float("inf"))
            & (tl.abs(mt * inv_temp) < float("inf"))
            & (tl.abs(lz_t) < float("inf"))
        )
        if ok:
            mr = 0.0  # Rényi: the max of its mixed logits relative to (a0, b0), and log2 of their sum
            lz_r = 0.0
            if ONLINE:
                if DIV == RENYI:
                    mr, zr, _fr = _groups_lse(m_r, z_r, scale2)
                    lz_r = _lg2(zr)
                loss, big_a = _online_finish(
                    ms,
                    lz_s,
                    zs,
                    mt,
                    lz_t,
                    zt,
                    tl.sum(x_t, axis=0),
                    tl.sum(x_s, axis=0),
                    _renyi_rebase(mr, ms, mt, a0, b0, coef),
                    lz_r,
                    coef,
                    scale2,
                    DIV,
                )
            else:
                # Pass 2: the loss and A = Σ a over the normalized λq, λp. Per-lane partial sums, reduced once
                # after the loop.
                x_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
                y_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
                for start in range(0, v_full, BLOCK_V):
                    x_acc, y_acc = _sums_block(
                        x_acc,
                        y_acc,
                        s_row,
                        t_row,
                        start + offs,
                        V,
                        lam,
                        ms,
                        mt,
                        lz_s,
                        lz_t,
                        scale2,
                        coef,
                        coef2,
                        log2_c,
                        log2_1mc,
                        DIV,
                        INTERP,
                        False,
                    )
                if v_full < V:
                    x_acc, y_acc = _sums_block(
                        x_acc,
                        y_acc,
                        s_row,
                        t_row,
                        v_full + offs,
                        V,
                        lam,
                        ms,
                        mt,
                        lz_s,
                        lz_t,
                        scale2,
                        coef,
                        coef2,
                        log2_c,
                        log2_1mc,
                        DIV,
                        INTERP,
                        True,
                    )
                loss, big_a = _sums_finish(tl.sum(x_acc, axis=0), tl.sum(y_acc, axis=0), coef, DIV)
            tl.store(loss_ptr + row, loss)

            if HAS_GRAD:
                # Last pass: ∂L/∂a_j = a_j − q_j A; grad_j = w · (1/T) · that.
                gscale = w * inv_temp
                for start in range(0, v_full, BLOCK_V):
                    _grad_block(
                        g_row,
                        s_row,
                        t_row,
                        start + offs,
                        V,
                        lam,
                        ms,
                        mt,
                        lz_s,
                        lz_t,
                        scale2,
                        a0,
                        b0,
                        mr,
                        lz_r,
                        big_a,
                        gscale,
                        coef,
                        coef2,
                        log2_c,
                        log2_1mc,
                        DIV,
                        INTERP,
                        BF16_BY_BITS,
                        False,
                    )
                if v_full < V:
                    _grad_block(
                        g_row,
                        s_row,
                        t_row,
                        v_full + offs,
                        V,
                        lam,
                        ms,
                        mt,
                        lz_s,
                        lz_t,
                        scale2,
                        a0,
                        b0,
                        mr,
                        lz_r,
                        big_a,
                        gscale,
                        coef,
                        coef2,
                        log2_c,
                        log2_1mc,
                        DIV,
                        INTERP,
                        BF16_BY_BITS,
                        True,
                    )
        else:
            tl.store(loss_ptr + row, float("nan"))
            if HAS_GRAD:
                _fill_row(g_row, V, float("nan"), BLOCK_V)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _zero_row(g_row, V, BLOCK_V)


@triton.jit
def scale_by_device_scalar_kernel(
    g_ptr,  # (n,) contiguous gradient, fp32/bf16/fp16, scaled in place
    c_ptr,  # () the upstream gradient of a reduced loss, on the device (any float dtype)
    n,  # number of elements of g
    BF16_BY_BITS: tl.constexpr,  # round bf16 on the bits (interpreter only, see _to_grad_dtype)
    BLOCK: tl.constexpr,
):
    """g *= c, with c read on the device: no host synchronisation, and when c is exactly 1 (``loss.backward()``
    on a reduced loss, the common case) every program returns after one scalar load, so the saved gradient is
    not read or written (x·1 = x exactly, so skipping is the same result). The product is formed in fp32 and
    rounded once to g's dtype. A persistent grid walks the array with a grid-sized stride; offsets are 64-bit.
    """
    c = tl.load(c_ptr).to(tl.float32)
    if c != 1.0:
        offs = tl.arange(0, BLOCK)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            idx = start + offs
            m = idx < n
            x = tl.load(g_ptr + idx, mask=m)
            tl.store(
                g_ptr + idx,
                _to_grad_dtype(x.to(tl.float32) * c, g_ptr.dtype.element_ty, BF16_BY_BITS),
                mask=m,
            )


def scale_by_device_scalar(g, c) -> None:
    """Launcher of :func:`scale_by_device_scalar_kernel`: ``g`` contiguous, ``c`` a one-element tensor on g's
    device. Under TRITON_INTERPRET=1 it runs on CPU tensors (tests)."""
    n = g.numel()
    if n == 0:
        return
    block = 4096
    programs = triton.cdiv(n, block)
    if g.device.type == "cuda":
        import torch

        with torch.cuda.device(g.device):
            sms = torch.cuda.get_device_properties(g.device).multi_processor_count
            scale_by_device_scalar_kernel[(min(programs, 8 * sms),)](
                g, c, n, BF16_BY_BITS=False, BLOCK=block, num_warps=8
            )
    else:
        import numpy as np

        with np.errstate(invalid="ignore", over="ignore"):
            scale_by_device_scalar_kernel[(min(programs, 4),)](
                g, c, n, BF16_BY_BITS=True, BLOCK=block, num_warps=8
            )


# -------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel shard passes (kd_kernels/_backends/_vocab_parallel.py; kd_kernels.parallel exchanges the
# results between ranks). The divergence math above, split at the row-statistics boundary: MODE 0 is the first
# pass of kd_loss_grad_kernel on the shard (_row_stats), MODES 1 and 2 are its
# second and last passes (_elem_terms / _sums_finish, _elem_grad) with the global statistics in place of the
# row's own.
# The exchanged values are in natural units of the tempered logits (the layout _vocab_parallel.py documents, the
# same for every backend): the helpers' raw maxima and raw logit differences are scaled by 1/T on the way out
# (their sums Σ 2^((x − m)·scale2) = Σ e^(x̃ − m̃) need no conversion), and the global max and log Z are turned
# into base-2 log-probabilities λ = ((x̃ − M)·log2 e − log Z·log2 e) on the way in.
# Global statistics columns: [LSE_s, LSE_t, L, C, M_s, log Z_s, M_t, log Z_t, M_u]; C = A = Σ_v a_v for the
# divergences with row sums (every one but forward / reverse KL and Rényi, whose A is −1, L and −1).
# -------------------------------------------------------------------------------------------------------------
VP_STATS: tl.constexpr = tl.constexpr(0)
VP_SUMS: tl.constexpr = tl.constexpr(1)
VP_GRAD: tl.constexpr = tl.constexpr(2)


@triton.jit
def _vp_shift(m, inv_temp):
    """A shard's raw max → the tempered max of the local statistics, 0 where the shard row is all −inf (the
    fold's max stayed NEG_BIG), so that the sums kept relative to it are 0 and no −inf − (−inf) appears."""
    return tl.where(m == NEG_BIG, 0.0, m * inv_temp)


@triton.jit
def kd_vp_rows_kernel(
    s_ptr,  # (N, V) student shard logits, fp32/bf16/fp16, unit column stride, row stride stride_s
    t_ptr,  # (N, V) teacher shard logits, unit column stride, row stride stride_t
    st_ptr,  # (N, 9) fp32 global statistics, contiguous (MODE 1, 2)
    out_ptr,  # MODE 0: (N, K) fp32 local statistics; MODE 1: (N, 2) fp32 row sums; contiguous
    w_ptr,  # (N,) fp32 row weights (MODE 2): a row with weight 0 is not read, its gradient row is 0
    g_ptr,  # (N, V) out (MODE 2): w_i ∂L_i/∂s_i in the student dtype, row stride stride_g; may alias s_ptr
    stride_s,
    stride_t,
    stride_g,
    V,
    inv_temp,  # 1/T, fp32
    coef,  # α (skew, alpha_beta, renyi) or β (JSD), fp32; unused otherwise
    coef2,  # β of alpha_beta
    log_c,  # ln coef (skew, JSD)
    log_1mc,  # ln(1 − coef) (skew, JSD)
    DIV: tl.constexpr,
    MODE: tl.constexpr,  # VP_STATS, VP_SUMS or VP_GRAD
    K: tl.constexpr,  # local statistics per row (MODE 0): 5 forward / reverse KL, 6 Rényi, else 4
    BF16_BY_BITS: tl.constexpr,  # round bf16 gradients on the bits (interpreter only, see _to_grad_dtype)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    scale2 = inv_temp * LOG2E
    if MODE == VP_STATS:
        # [m_s, Z_s, m_t, Z_t, (X_t | X_s | m_u, Z_u)]: pass 1 of kd_loss_grad_kernel on the shard (the
        # divergences whose loss comes from it: forward / reverse KL, Rényi); a NaN or +inf column leaves a NaN Z
        # (or an infinite max), which combine_row_stats turns into a NaN row on every rank.
        GROUP: tl.constexpr = 128 // s_ptr.dtype.element_ty.primitive_bitwidth
        a0, b0 = _renyi_point(s_row, t_row, 1.0, False, DIV)
        ms, zs, mt, zt, x_t, x_s, m_r, z_r = _row_stats(
            s_row,
            t_row,
            V,
            1.0,
            coef,
            scale2,
            a0,
            b0,
            DIV,
            DIV == FORWARD_KL or DIV == REVERSE_KL or DIV == RENYI,
            False,
            GROUP,
            BLOCK_V,
        )
        o = out_ptr + row * K
        tl.store(o, _vp_shift(ms, inv_temp))
        tl.store(o + 1, zs)
        tl.store(o + 2, _vp_shift(mt, inv_temp))
        tl.store(o + 3, zt)
        # X sums of raw differences → of tempered ones (Σ e^(t̃ − m̃_t)(t̃ − s̃) = (1/T) Σ e^(...)(t − s)).
        if DIV == FORWARD_KL:
            tl.store(o + 4, tl.sum(x_t, axis=0) * inv_temp)
        if DIV == REVERSE_KL:
            tl.store(o + 4, tl.sum(x_s, axis=0) * inv_temp)
        if DIV == RENYI:
            # m_u relative to the shard's maxima (a finite max moved from the point (a0, b0), _renyi_rebase;
            # −inf as 0, +inf as is): each rank has its own point, combine_row_stats moves them to the global.
            mr, zr, _fr = _groups_lse(m_r, z_r, scale2)
            fin = tl.abs(mr) < float("inf")
            mu = tl.where(
                fin & (mr != NEG_BIG),
                _renyi_rebase(mr, ms, mt, a0, b0, coef) * inv_temp,
                _vp_shift(mr, inv_temp),
            )
            tl.store(o + 4, mu)
            tl.store(o + 5, zr)
    else:
        offs = tl.arange(0, BLOCK_V)
        st = st_ptr + row * 9
        lse_s = tl.load(st)
        lse_t = tl.load(st + 1)
        row_loss = tl.load(st + 2)
        center = tl.load(st + 3)
        m_s = tl.load(st + 4)
        lz2_s = tl.load(st + 5) * LOG2E
        m_t = tl.load(st + 6)
        lz2_t = tl.load(st + 7) * LOG2E
        log2_c = log_c * LOG2E
        log2_1mc = log_1mc * LOG2E
        # Global LSEs that are not finite (a NaN, a +inf, an all −inf row on some rank): NaN sums / gradient.
        ok = (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))
        if MODE == VP_SUMS:
            x_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            y_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_v = cols < V
                a, b = _load_pair(s_row, t_row, cols, V, 1.0, False, True)
                # λ = (x̃ − M)·log2 e − log2 Z with the global M, log Z (tempered x̃ = x/T, as the torch
                # implementation forms it, so the max column is exactly 0 before the log Z).
                lq = (a * inv_temp - m_s) * LOG2E - lz2_s
                lp = (b * inv_temp - m_t) * LOG2E - lz2_t
                _, x, y = _elem_terms(lq, lp, 0.0, coef, coef2, log2_c, log2_1mc, DIV)
                x_acc += x
                y_acc += y
            # _sums_finish is linear: the shard's (L, A) parts add up to the row's across ranks.
            loss, big_a = _sums_finish(tl.sum(x_acc, axis=0), tl.sum(y_acc, axis=0), coef, DIV)
            tl.store(out_ptr + row * 2, tl.where(ok, loss, float("nan")))
            tl.store(out_ptr + row * 2 + 1, tl.where(ok, big_a, float("nan")))
        else:
            g_row = g_ptr + row * stride_g
            w = tl.load(w_ptr + row)
            if w != 0.0:
                mu = 0.0
                if DIV == FORWARD_KL or DIV == RENYI:
                    big_a = -1.0
                    mu = tl.load(st + 8)  # Rényi: M_u; its log Z_u is in `center`
                elif DIV == REVERSE_KL:
                    big_a = row_loss
                else:
                    big_a = center
                gscale = w * inv_temp
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    in_v = cols < V
                    a, b = _load_pair(s_row, t_row, cols, V, 1.0, False, True)
                    lq = (a * inv_temp - m_s) * LOG2E - lz2_s
                    lp = (b * inv_temp - m_t) * LOG2E - lz2_t
                    lr = 0.0
                    if (
                        DIV == RENYI
                    ):  # u = α (t̃ − M_t) + (1−α) (s̃ − M_s): the point (M_s, M_t), natural units
                        lr = _renyi_lr(
                            a * inv_temp, b * inv_temp, m_s, m_t, mu, center * LOG2E, coef, LOG2E
                        )
                    g = _elem_grad(lq, lp, lr, big_a, gscale, coef, coef2, log2_c, log2_1mc, DIV)
                    # Every element of this block was read above before it is overwritten: in place is safe.
                    gout = _to_grad_dtype(
                        tl.where(ok, g, float("nan")), g_ptr.dtype.element_ty, BF16_BY_BITS
                    )
                    tl.store(g_row + cols, gout, mask=in_v)
            else:
                _zero_row(g_row, V, BLOCK_V)
