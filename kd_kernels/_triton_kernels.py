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

Bytes moved per row (``e_s``, ``e_t``, ``e_g`` bytes per element of s, t, grad; rows with weight 0 only write):
forward / reverse KL read s and t twice and write the gradient once: ``V·(2 e_s + 2 e_t + e_g)``; skew KL and JSD
need a third read (``V·(3 e_s + 3 e_t + e_g)``). Loss only (``HAS_GRAD=False``): one read (KL) or two (skew/JSD).
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


# -------------------------------------------------------------------------------------------------------------
# Forward / reverse KL: one streaming pass for both LSEs and the loss, one pass for the gradient.
#
#   pass 1 (online max, MATH.md "How many passes"):
#     (m_s, Z_s), (m_t, Z_t) and, relative to the max of the weighting distribution,
#     forward  A = Σ e^(b − m_t)(b − a)      FKL = A/Z_t − LSE_t + LSE_s
#     reverse  B = Σ e^(a − m_s)(a − b)      RKL = B/Z_s − LSE_s + LSE_t
#     (the LSE difference is formed as (m_s − m_t) + (log Z_s − log Z_t) so large maxima do not cancel).
#   pass 2: ∂L/∂a_j = q_j − p_j (forward), q_j (ℓq_j − ℓp_j − L) (reverse, 0 where q_j = 0);
#     grad_j = w · (1/T) · ∂L/∂a_j.
# -------------------------------------------------------------------------------------------------------------
@triton.jit
def kl_loss_grad_kernel(
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
    DIV: tl.constexpr,  # FORWARD_KL or REVERSE_KL
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
        m_s = -float("inf")
        z_s = 0.0
        m_t = -float("inf")
        z_t = 0.0
        x = 0.0  # A (forward, relative to m_t) or B (reverse, relative to m_s)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_v = cols < V
            a = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
            b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
            m_s, z_s, e_s, scale_s = _lse_fold(m_s, z_s, a)
            m_t, z_t, e_t, scale_t = _lse_fold(m_t, z_t, b)
            if DIV == FORWARD_KL:
                term = tl.where(e_t == 0.0, 0.0, e_t * (b - a))  # 0·log 0 = 0, also when a = b = −inf
                x = x * scale_t + tl.sum(term, axis=0)
            else:
                term = tl.where(e_s == 0.0, 0.0, e_s * (a - b))
                x = x * scale_s + tl.sum(term, axis=0)
        lz_s = tl.log(z_s)
        lz_t = tl.log(z_t)
        dlse = (m_s - m_t) + (lz_s - lz_t)  # LSE_s − LSE_t
        if DIV == FORWARD_KL:
            loss = x / z_t + dlse
        else:
            loss = x / z_s - dlse
        tl.store(loss_ptr + row, loss)

        if HAS_GRAD:
            gscale = w * inv_temp
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_v = cols < V
                a = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
                b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
                lq = (a - m_s) - lz_s  # see "Precision" at the top
                lp = (b - m_t) - lz_t
                q = tl.exp(lq)
                if DIV == FORWARD_KL:
                    g = q - tl.exp(lp)
                else:
                    g = tl.where(q == 0.0, 0.0, q * ((lq - lp) - loss))
                # Every element of this block was read above before it is overwritten: in place is safe.
                gout = _to_grad_dtype(g * gscale, g_ptr.dtype.element_ty, BF16_BY_BITS)
                tl.store(g_row + cols, gout, mask=in_v)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _zero_row(g_row, V, BLOCK_V)


# -------------------------------------------------------------------------------------------------------------
# Skew forward / reverse KL and JSD: the normalized ℓq, ℓp sit inside a log, so three passes.
#
#   pass 1: LSE_s, LSE_t (online).
#   pass 2: the loss and the centering sum S = Σ_v q_v v_v, with per element (kd_math.h skew_terms)
#     skew_forward_kl  log m  = logaddexp(log α + ℓp, log(1−α) + ℓq)   L += p (ℓp − log m)
#                      v = r = p/m = e^(ℓp − log m)                      k = −(1−α)
#     skew_reverse_kl  log m' = logaddexp(log α + ℓq, log(1−α) + ℓp)   L += q (ℓq − log m')
#                      v = u = ℓq − log m' − α q/m'                      k = 1
#     jsd              log M  = logaddexp(log β + ℓp, log(1−β) + ℓq)
#                      L += β p (ℓp − log M) + (1−β) q (ℓq − log M)
#                      v = w = ℓq − log M                                k = 1 − β
#     (each product 0 where its weight p or q is 0; v likewise).
#   pass 3: ∂L/∂a_j = k q_j (v_j − S), 0 where q_j = 0 (MATH.md gradient table, rewritten as k q (v − S)).
# The row is re-read from memory in passes 2 and 3; on a GPU the per-row footprint decides whether that comes from
# L2 (see benchmarks/run.py and docs/BENCHMARKS.md for the counted bytes).
# -------------------------------------------------------------------------------------------------------------
@triton.jit
def _mix_terms(lq, lp, coef, log_c, log_1mc, DIV: tl.constexpr):
    """(q, v, loss term) of one block for a skew divergence or JSD; see the table above."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == SKEW_FORWARD_KL:
        d = lp - _log_mix(lp, lq, log_c, log_1mc)
        loss = tl.where(p == 0.0, 0.0, p * d)
        v = tl.where(p == 0.0, 0.0, tl.exp(d))
    elif DIV == SKEW_REVERSE_KL:
        d = lq - _log_mix(lq, lp, log_c, log_1mc)
        loss = tl.where(q == 0.0, 0.0, q * d)
        v = tl.where(q == 0.0, 0.0, d - coef * tl.exp(d))
    else:
        lm = _log_mix(lp, lq, log_c, log_1mc)
        dp = lp - lm
        dq = lq - lm
        loss = coef * tl.where(p == 0.0, 0.0, p * dp) + (1.0 - coef) * tl.where(q == 0.0, 0.0, q * dq)
        v = tl.where(q == 0.0, 0.0, dq)
    return q, v, loss


@triton.jit
def mix_loss_grad_kernel(
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
    coef,  # α (skew) or β (JSD), fp32
    log_c,  # log coef
    log_1mc,  # log(1 − coef)
    DIV: tl.constexpr,  # SKEW_FORWARD_KL, SKEW_REVERSE_KL or JSD
    HAS_GRAD: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit so row · stride does not wrap when N·V ≥ 2^31
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    w = tl.load(w_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    if w != 0.0:
        m_s = -float("inf")
        z_s = 0.0
        m_t = -float("inf")
        z_t = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_v = cols < V
            a = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
            b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
            m_s, z_s, _, _ = _lse_fold(m_s, z_s, a)
            m_t, z_t, _, _ = _lse_fold(m_t, z_t, b)
        lz_s = tl.log(z_s)
        lz_t = tl.log(z_t)

        # Per-lane partial sums, reduced once after the loop (one reduction instead of one per block).
        loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        s_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            in_v = cols < V
            a = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
            b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
            q, v, lt = _mix_terms((a - m_s) - lz_s, (b - m_t) - lz_t, coef, log_c, log_1mc, DIV)
            loss_acc += lt
            s_acc += tl.where(q == 0.0, 0.0, q * v)
        loss = tl.sum(loss_acc, axis=0)
        tl.store(loss_ptr + row, loss)

        if HAS_GRAD:
            centre = tl.sum(s_acc, axis=0)
            if DIV == SKEW_FORWARD_KL:
                k = -(1.0 - coef)
            elif DIV == SKEW_REVERSE_KL:
                k = 1.0
            else:
                k = 1.0 - coef
            gscale = k * w * inv_temp
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                in_v = cols < V
                a = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
                b = tl.load(t_row + cols, mask=in_v, other=float("-inf")).to(tl.float32) * inv_temp
                q, v, lt = _mix_terms((a - m_s) - lz_s, (b - m_t) - lz_t, coef, log_c, log_1mc, DIV)
                g = tl.where(q == 0.0, 0.0, q * (v - centre))
                # Every element of this block was read above before it is overwritten: in place is safe.
                gout = _to_grad_dtype(g * gscale, g_ptr.dtype.element_ty, BF16_BY_BITS)
                tl.store(g_row + cols, gout, mask=in_v)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _zero_row(g_row, V, BLOCK_V)
