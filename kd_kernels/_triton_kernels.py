"""Triton kernels for the fused per-row KD loss and student-logit gradient (the "triton" backend).

Imported only by ``kd_kernels/_backends/triton_backend.py`` when that backend runs, so ``import kd_kernels``
never imports triton. One program per row; the vocabulary is walked in blocks of ``BLOCK_V`` columns, so any V
works (262144 and beyond) with a fixed register footprint.

Notation as in ``shared/docs/MATH.md``: ``a = s/T``, ``b = t/T`` (fp32), ``ℓq = a − LSE_s``, ``ℓp = b − LSE_t``,
``q = e^ℓq``, ``p = e^ℓp``, ``0·log 0 = 0``. The per-element formulas mirror ``csrc/include/kd_kernels/kd_math.h``
(same guards, same branch structure) so the three compiled backends agree on every edge case:

- columns past V are loaded as −inf in both tensors, which is exactly "a column −inf in both tensors": it adds 0 to
  every sum and gets gradient 0;
- every weight-times-log product is selected away (``tl.where``) where its weight is 0, so 0·(−inf) never turns
  into a NaN;
- a running max that is still −inf is replaced by 0 before it is subtracted, so −inf − (−inf) never happens.

Precision: log-probabilities are formed as ``ℓq = (a − m_s) − log Z_s``, never as ``a − LSE_s``. With logits of
magnitude ~3e3 the fp32 value of ``LSE_s = m_s + log Z_s`` is off by up to half an ulp of 3e3 (1.2e-4), which
would become a 1e-4 relative error in every q; ``a − m_s`` is exact near the max, as in eager ``log_softmax``.

One kernel, ``kd_loss_grad_kernel``, serves every divergence; its passes come from the divergence's definition
(``kd_kernels/_spec.py`` says which other places define it):

- ``_elem_terms``: per element, the loss term and ``a = ∂L/∂ℓq`` (up to a multiple of q);
- for a streaming ("online", ``_spec.DIVERGENCES[d].online``) divergence, ``_online_fold`` / ``_online_finish``:
  the running sums of the first pass and the row's loss and ``A = Σ a`` from them.
Every divergence's gradient is then ``a_j − q_j A`` (MATH.md "More divergences").

Bytes moved per row (``e_s``, ``e_t``, ``e_g`` bytes per element of s, t, grad; rows with weight 0 only write):
the online divergences (forward / reverse KL, Jeffreys, Rényi) read s and t twice and write the gradient once:
``V·(2 e_s + 2 e_t + e_g)``; the others (skew KL, JSD, TVD, alpha-beta) need a third read
(``V·(3 e_s + 3 e_t + e_g)``). Loss only (``HAS_GRAD=False``): one read (online) or two.

Rows that are not distributions (a NaN, a +inf, all −inf, or overflow after 1/T in either tensor) are found from
the first pass (a log-sum-exp that is not finite) and get loss NaN and an all-NaN gradient row, as on every
backend.
"""

from __future__ import annotations

import triton
import triton.language as tl

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


@triton.jit
def _lse_fold(m, z, x):
    """Fold a block x into a running (max m, z = Σ e^(x − m)).

    Returns the new (m, z), the block's e^(x − m_new) and the factor e^(m_old − m_new) that running sums kept
    relative to the old max must be multiplied by. While the row has seen only −inf, 0 is subtracted instead of
    m_new = −inf, so e^(−inf − 0) = 0 rather than NaN.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - shift)
    scale = tl.exp(m - shift)  # ≤ 1; 0 when m was −inf (then z was 0 as well)
    z = z * scale + tl.sum(e, axis=0)
    return m_new, z, e, scale


@triton.jit
def _log_mix(lx, ly, log_w, log_1mw):
    """log(w·e^lx + (1−w)·e^ly) in log space (MATH.md: never in probability space, which underflows)."""
    xa = lx + log_w
    yb = ly + log_1mw
    hi = tl.maximum(xa, yb)
    lo = tl.minimum(xa, yb)
    # Both −inf: subtract 0 instead of −inf (no NaN), and hi + log(1 + 0) is then −inf as it should be.
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi + tl.log(1.0 + tl.exp(lo - hi_safe))


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
def _load_pair(s_row, t_row, cols, in_v, inv_temp, lam, INTERP: tl.constexpr):
    """Tempered fp32 student a = s/T and teacher b = t/T of one block (columns past V are −inf in both).

    With INTERP (TAID, interpolation λ < 1) the teacher becomes λ b + (1 − λ) a; a column −inf in both stays −inf.
    """
    a = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
    b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
    if INTERP:
        b = lam * b + (1.0 - lam) * a
    return a, b


# -------------------------------------------------------------------------------------------------------------
# The divergence family, one definition each (MATH.md tables; see kd_kernels/_spec.py).
#
# _elem_terms(ℓq, ℓp, L): the per-element loss term (summed by the second pass of a non-online divergence) and
# a = ∂L/∂ℓq (up to a multiple of q); L is the row's loss, known by the time a is needed.
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
# Each product is 0 where its weight p or q is 0 (0·log 0 = 0), selected so 0·(−inf) never becomes NaN.
# -------------------------------------------------------------------------------------------------------------
@triton.jit
def _elem_terms(lq, lp, row_loss, coef, coef2, log_c, log_1mc, DIV: tl.constexpr):
    """(q, loss term, a) of one block for divergence DIV; see the table above."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == FORWARD_KL:
        loss = tl.where(p == 0.0, 0.0, p * (lp - lq))
        a = -p
    elif DIV == REVERSE_KL:
        loss = tl.where(q == 0.0, 0.0, q * (lq - lp))
        a = loss
    elif DIV == SKEW_FORWARD_KL:
        d = lp - _log_mix(lp, lq, log_c, log_1mc)
        loss = tl.where(p == 0.0, 0.0, p * d)
        a = -(1.0 - coef) * q * tl.where(p == 0.0, 0.0, tl.exp(d))
    elif DIV == SKEW_REVERSE_KL:
        d = lq - _log_mix(lq, lp, log_c, log_1mc)
        loss = tl.where(q == 0.0, 0.0, q * d)
        a = q * tl.where(q == 0.0, 0.0, d - coef * tl.exp(d))
    elif DIV == JSD:
        lm = _log_mix(lp, lq, log_c, log_1mc)
        wq = tl.where(q == 0.0, 0.0, lq - lm)
        loss = coef * tl.where(p == 0.0, 0.0, p * (lp - lm)) + (1.0 - coef) * q * wq
        a = (1.0 - coef) * q * wq
    elif DIV == TVD:
        loss = 0.5 * tl.abs(q - p)
        a = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    elif DIV == JEFFREYS:
        rev = tl.where(q == 0.0, 0.0, q * (lq - lp))
        loss = tl.where(p == 0.0, 0.0, p * (lp - lq)) + rev
        a = rev - p
    elif DIV == ALPHA_BETA:
        ab = coef + coef2
        pq = tl.exp(coef * lp + coef2 * lq)  # p^α q^β; exp(−inf) = 0 covers zero probabilities
        qq = tl.exp(ab * lq)
        loss = -(pq - (coef / ab) * tl.exp(ab * lp) - (coef2 / ab) * qq) / (coef * coef2)
        a = (qq - pq) / coef
    else:  # RENYI: r = p^α q^(1−α) / Σ p^α q^(1−α), and log Σ = (α − 1) L
        mix = tl.where(lp == float("-inf"), float("-inf"), coef * lp + (1.0 - coef) * lq)
        loss = tl.zeros_like(lq)  # the loss comes from the streaming pass
        a = -tl.exp(mix - (coef - 1.0) * row_loss)
    return q, loss, a


@triton.jit
def _online_fold(x_t, x_s, m_r, z_r, a, b, e_s, e_t, scale_s, scale_t, coef, DIV: tl.constexpr):
    """Fold one block into an online divergence's running sums (MATH.md "How many passes"):
    x_t = Σ e^(b − m_t)(b − a) (forward KL, Jeffreys), x_s = Σ e^(a − m_s)(a − b) (reverse KL, Jeffreys), and
    for Rényi the running (max, sum) of log(p^α q^(1−α)) + const = α b + (1−α) a (−inf where b is −inf)."""
    if DIV == FORWARD_KL or DIV == JEFFREYS:
        term = tl.where(e_t == 0.0, 0.0, e_t * (b - a))  # 0·log 0 = 0, also when a = b = −inf
        x_t = x_t * scale_t + tl.sum(term, axis=0)
    if DIV == REVERSE_KL or DIV == JEFFREYS:
        term = tl.where(e_s == 0.0, 0.0, e_s * (a - b))
        x_s = x_s * scale_s + tl.sum(term, axis=0)
    if DIV == RENYI:
        mix = tl.where(b == float("-inf"), float("-inf"), coef * b + (1.0 - coef) * a)
        m_r, z_r, _, _ = _lse_fold(m_r, z_r, mix)
    return x_t, x_s, m_r, z_r


@triton.jit
def _online_finish(m_s, z_s, lz_s, m_t, z_t, lz_t, x_t, x_s, m_r, z_r, coef, DIV: tl.constexpr):
    """(L, A) of an online divergence from the first pass's sums; LSE differences are formed as
    (max difference) + (log-sum difference) so large maxima do not cancel."""
    dlse = (m_s - m_t) + (lz_s - lz_t)  # LSE_s − LSE_t
    if DIV == FORWARD_KL:
        loss = x_t / z_t + dlse
        big_a = -1.0
    elif DIV == REVERSE_KL:
        loss = x_s / z_s - dlse
        big_a = loss
    elif DIV == JEFFREYS:
        rkl = x_s / z_s - dlse
        loss = x_t / z_t + dlse + rkl
        big_a = rkl - 1.0
    else:  # RENYI: log Σ p^α q^(1−α) = LSE_mix − α LSE_t − (1−α) LSE_s
        log_sum = (m_r - coef * m_t - (1.0 - coef) * m_s) + (tl.log(z_r) - coef * lz_t - (1.0 - coef) * lz_s)
        # A +inf term (α > 1, q = 0 where p > 0) is an infinite divergence, as in float64, not a NaN.
        loss = tl.where(m_r == float("inf"), float("inf"), log_sum / (coef - 1.0))
        big_a = -1.0
    return loss, big_a


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

    if w != 0.0:
        # Pass 1: LSE_s, LSE_t (online max) and, for an online divergence, its running sums.
        m_s = -float("inf")
        z_s = 0.0
        m_t = -float("inf")
        z_t = 0.0
        x_t = 0.0
        x_s = 0.0
        m_r = -float("inf")
        z_r = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_v = cols < V
            a, b = _load_pair(s_row, t_row, cols, in_v, inv_temp, lam, INTERP)
            m_s, z_s, e_s, scale_s = _lse_fold(m_s, z_s, a)
            m_t, z_t, e_t, scale_t = _lse_fold(m_t, z_t, b)
            if ONLINE:
                x_t, x_s, m_r, z_r = _online_fold(x_t, x_s, m_r, z_r, a, b, e_s, e_t, scale_s, scale_t, coef,
                                                  DIV)
        lz_s = tl.log(z_s)
        lz_t = tl.log(z_t)
        lse_s = m_s + lz_s
        lse_t = m_t + lz_t
        # A row that is a distribution has finite LSEs; otherwise (NaN, +inf, all −inf, overflow; |NaN| < inf
        # is false) its loss and its whole gradient row are NaN.
        ok = (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))

        if ONLINE:
            loss, big_a = _online_finish(m_s, z_s, lz_s, m_t, z_t, lz_t, x_t, x_s, m_r, z_r, coef, DIV)
        else:
            # Pass 2: the loss and A = Σ a over the normalized ℓq, ℓp. Per-lane partial sums, reduced once after
            # the loop (one reduction instead of one per block).
            loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            a_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_v = cols < V
                a, b = _load_pair(s_row, t_row, cols, in_v, inv_temp, lam, INTERP)
                # ℓ = (x − m) − log Z, never x − LSE: see "Precision" at the top.
                _, lt, ga = _elem_terms((a - m_s) - lz_s, (b - m_t) - lz_t, 0.0, coef, coef2, log_c, log_1mc, DIV)
                loss_acc += lt
                a_acc += ga
            loss = tl.sum(loss_acc, axis=0)
            big_a = tl.sum(a_acc, axis=0)
        loss = tl.where(ok, loss, float("nan"))
        tl.store(loss_ptr + row, loss)

        if HAS_GRAD:
            # Last pass: ∂L/∂a_j = a_j − q_j A; grad_j = w · (1/T) · that.
            gscale = w * inv_temp
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_v = cols < V
                a, b = _load_pair(s_row, t_row, cols, in_v, inv_temp, lam, INTERP)
                q, _, ga = _elem_terms((a - m_s) - lz_s, (b - m_t) - lz_t, loss, coef, coef2, log_c, log_1mc, DIV)
                g = tl.where(ok, ga - q * big_a, float("nan"))
                # Every element of this block was read above before it is overwritten: in place is safe.
                gout = _to_grad_dtype(g * gscale, g_ptr.dtype.element_ty, BF16_BY_BITS)
                tl.store(g_row + cols, gout, mask=in_v)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _zero_row(g_row, V, BLOCK_V)


# -------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel shard passes (kd_kernels/_backends/_vocab_parallel.py; kd_kernels.parallel exchanges the
# results between ranks). The divergence math above, split at the row-statistics boundary: MODE 0 is the first
# pass of kd_loss_grad_kernel on the shard (_lse_fold, _online_fold), MODES 1 and 2 are its second and last
# passes (_elem_terms) with ℓq = (a − M_s) − log Z_s, ℓp = (b − M_t) − log Z_t from the global statistics.
# Global statistics columns: [LSE_s, LSE_t, L, C, M_s, log Z_s, M_t, log Z_t, M_u]; C = A = Σ_v a_v for the
# divergences with row sums (every one but forward / reverse KL and Rényi, whose A is −1, L and −1).
# -------------------------------------------------------------------------------------------------------------
VP_STATS: tl.constexpr = tl.constexpr(0)
VP_SUMS: tl.constexpr = tl.constexpr(1)
VP_GRAD: tl.constexpr = tl.constexpr(2)


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
    log_c,  # log coef (skew, JSD)
    log_1mc,  # log(1 − coef) (skew, JSD)
    DIV: tl.constexpr,
    MODE: tl.constexpr,  # VP_STATS, VP_SUMS or VP_GRAD
    K: tl.constexpr,  # local statistics per row (MODE 0): 5 forward / reverse KL, 6 Rényi, else 4
    BF16_BY_BITS: tl.constexpr,  # round bf16 gradients on the bits (interpreter only, see _to_grad_dtype)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    if MODE == VP_STATS:
        # [m_s, Z_s, m_t, Z_t, (X_t | X_s | m_r, Z_r)], maxima 0 where the shard row is all −inf (as the
        # running shift of _lse_fold), so that the sums kept relative to them are 0 and no −inf − (−inf) appears.
        m_s = -float("inf")
        z_s = 0.0
        m_t = -float("inf")
        z_t = 0.0
        x_t = 0.0
        x_s = 0.0
        m_r = -float("inf")
        z_r = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_v = cols < V
            a, b = _load_pair(s_row, t_row, cols, in_v, inv_temp, 1.0, False)
            m_s, z_s, e_s, scale_s = _lse_fold(m_s, z_s, a)
            m_t, z_t, e_t, scale_t = _lse_fold(m_t, z_t, b)
            if DIV == FORWARD_KL or DIV == REVERSE_KL or DIV == RENYI:
                x_t, x_s, m_r, z_r = _online_fold(x_t, x_s, m_r, z_r, a, b, e_s, e_t, scale_s, scale_t, coef,
                                                  DIV)
        o = out_ptr + row * K
        tl.store(o, tl.where(m_s == -float("inf"), 0.0, m_s))
        tl.store(o + 1, z_s)
        tl.store(o + 2, tl.where(m_t == -float("inf"), 0.0, m_t))
        tl.store(o + 3, z_t)
        if DIV == FORWARD_KL:
            tl.store(o + 4, x_t)
        if DIV == REVERSE_KL:
            tl.store(o + 4, x_s)
        if DIV == RENYI:
            tl.store(o + 4, tl.where(m_r == -float("inf"), 0.0, m_r))
            tl.store(o + 5, z_r)
    else:
        st = st_ptr + row * 9
        lse_s = tl.load(st)
        lse_t = tl.load(st + 1)
        row_loss = tl.load(st + 2)
        center = tl.load(st + 3)
        m_s = tl.load(st + 4)
        lz_s = tl.load(st + 5)
        m_t = tl.load(st + 6)
        lz_t = tl.load(st + 7)
        # Global LSEs that are not finite (a NaN, a +inf, an all −inf row on some rank): NaN sums / gradient.
        ok = (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))
        if MODE == VP_SUMS:
            loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            a_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_v = cols < V
                a, b = _load_pair(s_row, t_row, cols, in_v, inv_temp, 1.0, False)
                _, lt, ga = _elem_terms((a - m_s) - lz_s, (b - m_t) - lz_t, 0.0, coef, coef2, log_c, log_1mc, DIV)
                loss_acc += lt
                a_acc += ga
            tl.store(out_ptr + row * 2, tl.where(ok, tl.sum(loss_acc, axis=0), float("nan")))
            tl.store(out_ptr + row * 2 + 1, tl.where(ok, tl.sum(a_acc, axis=0), float("nan")))
        else:
            g_row = g_ptr + row * stride_g
            w = tl.load(w_ptr + row)
            if w != 0.0:
                if DIV == FORWARD_KL or DIV == RENYI:
                    big_a = -1.0
                elif DIV == REVERSE_KL:
                    big_a = row_loss
                else:
                    big_a = center
                gscale = w * inv_temp
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    in_v = cols < V
                    a, b = _load_pair(s_row, t_row, cols, in_v, inv_temp, 1.0, False)
                    q, _, ga = _elem_terms((a - m_s) - lz_s, (b - m_t) - lz_t, row_loss, coef, coef2, log_c,
                                           log_1mc, DIV)
                    g = tl.where(ok, ga - q * big_a, float("nan"))
                    # Every element of this block was read above before it is overwritten: in place is safe.
                    gout = _to_grad_dtype(g * gscale, g_ptr.dtype.element_ty, BF16_BY_BITS)
                    tl.store(g_row + cols, gout, mask=in_v)
            else:
                _zero_row(g_row, V, BLOCK_V)
