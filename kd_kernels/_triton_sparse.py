"""Triton kernel and launcher of sparse-teacher KD (the "triton" sparse backend; GPU, or CPU tensors under
TRITON_INTERPRET=1). Math: docs/MATH.md "Sparse teachers"; the same formulas as
``_sparse_impl.py`` (torch) and ``csrc/cpu/kd_sparse_kernels.cpp``, in fp32.

One program per row. The launcher sorts each row's valid ids ascending (padding last), so the kernel meets
them in column order while it walks the vocabulary in blocks: a block's support columns are the next
few sorted ids, found with a short data-dependent loop (about K · BLOCK_V / V per block) instead of a
BLOCK_V × K comparison.

  pass A   the row max m (and whether the row is a distribution: NaN / +inf / all −inf → NaN row);
  pass B   bucket: Z_tail = Σ_{j∉S} e^(s̃_j − m) summed over the off-support columns directly (no Z − Z_S
           cancellation); ignore: Z over all; renormalize: no pass B;
  O(K)     the teacher's log P, the categories, D, a_c, A (vectors of BLOCK_K);
  pass C   grad_j = w/T · (q_j · c_off), with the support columns replaced by a_k − q_k A (bucket,
           renormalize; c_off = 0 there) or shifted by −p_k (ignore: duplicates add up).

Bytes per row: V·(2·e_s + e_g) for bucket / ignore (s read in passes A, B and C: three reads, the later
two usually from L2), V·(e_s + e_g) plus the K support reads for renormalize; no teacher row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_kernels import LN2, LOG2E, _to_grad_dtype, _zero_row
from ._triton_kernels import _log_mix as _log_mix2

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
SKEW_FORWARD_KL: tl.constexpr = tl.constexpr(2)
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(3)
JSD: tl.constexpr = tl.constexpr(4)
TVD: tl.constexpr = tl.constexpr(5)
JEFFREYS: tl.constexpr = tl.constexpr(6)
ALPHA_BETA: tl.constexpr = tl.constexpr(7)
RENYI: tl.constexpr = tl.constexpr(8)
BUCKET: tl.constexpr = tl.constexpr(0)
RENORMALIZE: tl.constexpr = tl.constexpr(1)
IGNORE: tl.constexpr = tl.constexpr(2)
_BIG_ID = 1 << 62  # sorts after every id; also the "no more ids" value of the column walk
# the same value for the kernels (a compiled kernel may only read constexpr globals; the interpreter
# reads any, which is how a plain int here went unnoticed)
BIG_ID: tl.constexpr = tl.constexpr(_BIG_ID)


@triton.jit
def _log_mix(lx, ly, log_w, log_1mw):
    """Natural-log form of the dense kernel's base-2 ``_log_mix`` (O(K) work per row, so the two scalings
    cost nothing that matters); NaN where both are −inf, selected away by every caller."""
    return _log_mix2(lx * LOG2E, ly * LOG2E, log_w * LOG2E, log_1mw * LOG2E) * LN2


@triton.jit
def _cat_terms(lq, lp, coef, coef2, log_c, log_1mc, DIV: tl.constexpr):
    """Per category (elementwise): the divergence term d, a = ∂D/∂ log q̄ and u = a / q̄ (0 where empty).

    Rényi is not a sum of per-category terms: for it d = p^α q^(1−α) (R = Σ d), a = −d and u = −d/q̄,
    all still to be divided by R (``_renyi_finish``); the multiple of q̄ dropped from a cancels."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == FORWARD_KL:
        d = tl.where(p > 0.0, p * (lp - lq), 0.0)
        u = tl.where(p > 0.0, -tl.exp(lp - lq), 0.0)
        a = -p
    elif DIV == REVERSE_KL:
        d = tl.where(q > 0.0, q * (lq - lp), 0.0)
        u = tl.where(q > 0.0, lq - lp + 1.0, 0.0)
        a = tl.where(q > 0.0, q * u, 0.0)
    elif DIV == SKEW_FORWARD_KL:  # m = α p + (1−α) q
        lm = _log_mix(lp, lq, log_c, log_1mc)
        d = tl.where(p > 0.0, p * (lp - lm), 0.0)
        u = tl.where(p > 0.0, -(1.0 - coef) * tl.exp(lp - lm), 0.0)
        a = tl.where(q > 0.0, q * u, 0.0)
    elif DIV == SKEW_REVERSE_KL:  # m' = α q + (1−α) p
        lm = _log_mix(lq, lp, log_c, log_1mc)
        d = tl.where(q > 0.0, q * (lq - lm), 0.0)
        u = tl.where(q > 0.0, lq - lm + 1.0 - coef * tl.exp(lq - lm), 0.0)
        a = tl.where(q > 0.0, q * u, 0.0)
    elif DIV == TVD:  # ½ Σ |q − p|
        d = 0.5 * tl.abs(q - p)
        u = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        a = q * u
    elif DIV == JEFFREYS:  # KL(p‖q) + KL(q‖p): a = q (log q − log p) − p
        rev = tl.where(q > 0.0, q * (lq - lp), 0.0)
        d = tl.where(p > 0.0, p * (lp - lq), 0.0) + rev
        u = tl.where(q > 0.0, (lq - lp) - tl.exp(lp - lq), 0.0)
        a = rev - p
    elif DIV == ALPHA_BETA:  # α = coef, β = coef2; d still to be divided by −αβ
        ab = coef + coef2
        pq = tl.exp(coef * lp + coef2 * lq)
        qq = tl.exp(ab * lq)
        d = (pq - (coef / ab) * tl.exp(ab * lp) - (coef2 / ab) * qq) / -(coef * coef2)
        a = (qq - pq) / coef
        u = tl.where(
            q > 0.0, (tl.exp((ab - 1.0) * lq) - tl.exp(coef * lp + (coef2 - 1.0) * lq)) / coef, 0.0
        )
    elif DIV == RENYI:
        mix = tl.where(lp == float("-inf"), float("-inf"), coef * lp + (1.0 - coef) * lq)
        d = tl.exp(mix)
        a = -d
        u = tl.where(q > 0.0, -tl.exp(mix - lq), 0.0)
    else:  # JSD, M = β p + (1−β) q
        lm = _log_mix(lp, lq, log_c, log_1mc)
        d = coef * tl.where(p > 0.0, p * (lp - lm), 0.0) + (1.0 - coef) * tl.where(
            q > 0.0, q * (lq - lm), 0.0
        )
        u = tl.where(q > 0.0, (1.0 - coef) * (lq - lm), 0.0)
        a = tl.where(q > 0.0, q * u, 0.0)
    return d, a, u


@triton.jit
def _renyi_finish(r_sum, coef, empty):
    """Rényi's loss 1/(α−1) log R and the factor 1/R for a, A and u (0 and 0 for a row without
    categories)."""
    loss = tl.where(empty, 0.0, tl.log(r_sum) / (coef - 1.0))
    return loss, tl.where(empty, 0.0, 1.0 / r_sum)


@triton.jit
def _support_in_block(ids_row, kp, nv, start, cols, BLOCK_V: tl.constexpr):
    """The block's support mask (columns among the sorted ids), advancing the id cursor kp."""
    sup = cols < 0  # all False
    nxt = tl.load(ids_row + kp, mask=kp < nv, other=BIG_ID)
    while nxt < start + BLOCK_V:
        sup = sup | (cols == nxt)
        kp += 1
        nxt = tl.load(ids_row + kp, mask=kp < nv, other=BIG_ID)
    return sup, kp


@triton.jit
def sparse_loss_grad_kernel(
    s_ptr,  # (N, V) student logits, fp32/bf16/fp16, unit column stride, row stride stride_s
    ids_ptr,  # (N, K) int64 teacher ids of each row, valid ones first and ascending
    lp_ptr,  # (N, K) fp32 their log-probs (padding after the nv valid ones)
    nv_ptr,  # (N,) int32 number of valid entries per row
    w_ptr,  # (N,) fp32 row weights; 0: row not read, loss 0, gradient row 0
    loss_ptr,  # (N,) fp32 out: unweighted per-token divergence
    g_ptr,  # (N, V) out: w/T · ∂L/∂s̃ in the student dtype, row stride stride_g; may alias s_ptr
    stride_s,
    stride_g,
    V,
    K,
    inv_t,
    coef,
    coef2,
    log_c,
    log_1mc,
    floor_,  # the teacher tail's floor
    DIV: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    g_row = g_ptr + row * stride_g
    ids_row = ids_ptr + row * K
    w = tl.load(w_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    if w != 0.0:
        nv = tl.load(nv_ptr + row)
        ok = tl.arange(0, BLOCK_K)
        valid = ok < nv
        idk = tl.load(ids_row + ok, mask=valid, other=0)
        lpk = tl.load(lp_ptr + row * K + ok, mask=valid, other=float("-inf"))
        sk = tl.load(s_row + idk, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        # pass A: max, and NaN anywhere (student, or a teacher log-prob)
        # Per-lane max and NaN count, reduced once after the loop (no cross-thread reduction per block). The
        # max is taken of the raw logits and scaled after: fl(x·(1/T)) is monotone in x, so it is the same m.
        m_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        bad_lane = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_lane = tl.maximum(m_lane, x)
            bad_lane += (x != x).to(tl.int32)  # noqa: PLR0124  (x != x: NaN)
        m = tl.max(m_lane, axis=0) * inv_t
        bad = tl.sum(bad_lane, axis=0) + tl.sum((lpk != lpk).to(tl.int32), axis=0)  # noqa: PLR0124
        if (bad > 0) | (m == float("inf")) | (m == float("-inf")):
            tl.store(loss_ptr + row, float("nan"))
            if HAS_GRAD:
                nan = tl.full([BLOCK_V], float("nan"), tl.float32)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    tl.store(g_row + cols, nan.to(g_ptr.dtype.element_ty), mask=cols < V)
        else:
            es = tl.where(valid, tl.exp(sk - m), 0.0)
            zs = tl.sum(es, axis=0)
            # The teacher's mass P = Σ_k p_k in float64: K terms a row, cheap even where float64 is slow. The
            # bucket's tail 1 − P from an fp32 log P is off by eps32 / (1 − P) relatively, 5 % of a 1e-6 tail,
            # which the reverse-type gradients carry (as _sparse_impl.py forms it).
            p64 = tl.sum(tl.where(valid, tl.exp(lpk.to(tl.float64)), 0.0), axis=0)
            log_p = tl.log(p64).to(tl.float32)
            zero_k = tl.zeros([BLOCK_K], dtype=tl.float32)
            c_off = 0.0
            if TAIL == RENORMALIZE:
                # log Q̂ against the support's own max: e^(s̃_k − m) underflows where the ids sit far below
                # the row's max (low T, large logits), which made log Σ = −inf
                sk_v = tl.where(valid, sk, float("-inf"))
                m_k = tl.max(sk_v, axis=0)
                lz_k = tl.log(tl.sum(tl.where(valid, tl.exp(sk_v - m_k), 0.0), axis=0))
                lq_c = tl.where(valid, (sk - m_k) - lz_k, float("-inf"))
                lp_c = tl.where(valid, lpk - log_p, float("-inf"))
                d, a, _ = _cat_terms(lq_c, lp_c, coef, coef2, log_c, log_1mc, DIV)
                loss = tl.sum(d, axis=0)
                big_a = tl.sum(a, axis=0)
                if DIV == RENYI:
                    loss, inv_r = _renyi_finish(loss, coef, nv == 0)
                    a = a * inv_r
                    big_a = big_a * inv_r
                gk = tl.where(valid, a - tl.exp(lq_c) * big_a, 0.0)
                c_off = 0.0 * big_a  # 0 off the support (NaN only if A is)
                inv_z = 0.0
            else:
                # pass B: Z over all (ignore) or over the columns off the support (bucket)
                z_lane = tl.zeros(
                    [BLOCK_V], dtype=tl.float32
                )  # per-lane partial sums, reduced once
                kp = 0
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    x = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    e = tl.exp2(
                        (x * inv_t - m) * LOG2E
                    )  # one MUFU.EX2 (tl.exp adds denormal fix-ups)
                    if TAIL == BUCKET:
                        sup, kp = _support_in_block(ids_row, kp, nv, start, cols, BLOCK_V)
                        e = tl.where(sup, 0.0, e)
                    z_lane += e
                z = tl.sum(z_lane, axis=0)
                if TAIL == IGNORE:
                    log_z = tl.log(z)
                    lq_k = sk - m - log_z
                    p = tl.where(valid, tl.exp(lpk), 0.0)
                    loss = tl.sum(tl.where(valid, p * (lpk - lq_k), 0.0), axis=0)
                    c_off = tl.sum(p, axis=0)  # q_j P
                    inv_z = 1.0 / z
                    gk = -p
                else:
                    has_tail = nv < V
                    log_zt = tl.log(z)
                    if has_tail & (z == 0.0):
                        # every off-support e^(s̃ − m) underflowed (gaps > 87): sum them again against
                        # their own max so the tail keeps its log-mass (rare)
                        mt = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
                        kp = 0
                        for start in range(0, V, BLOCK_V):
                            cols = start + offs
                            x = tl.load(s_row + cols, mask=cols < V, other=float("-inf"))
                            sup, kp = _support_in_block(ids_row, kp, nv, start, cols, BLOCK_V)
                            x = tl.where(sup, float("-inf"), x.to(tl.float32) * inv_t)
                            mt = tl.maximum(mt, tl.max(x, axis=0))
                        zt = 0.0
                        kp = 0
                        for start in range(0, V, BLOCK_V):
                            cols = start + offs
                            x = tl.load(s_row + cols, mask=cols < V, other=float("-inf"))
                            sup, kp = _support_in_block(ids_row, kp, nv, start, cols, BLOCK_V)
                            x = tl.where(sup, float("-inf"), x.to(tl.float32) * inv_t)
                            zt += tl.sum(tl.exp(x - mt), axis=0)
                        log_zt = (mt - m) + tl.log(zt)
                    big_z = z + zs
                    log_z = tl.log(big_z)
                    p_tail = tl.maximum(1.0 - p64, floor_)  # float64, so is its log
                    log_zp64 = tl.where(has_tail, tl.log(p64 + p_tail), tl.log(p64))
                    log_zp = log_zp64.to(tl.float32)
                    lq_c = tl.where(valid, sk - m - log_z, float("-inf"))
                    lp_c = tl.where(valid, lpk - log_zp, float("-inf"))
                    lq_t = tl.where(has_tail, log_zt - log_z, float("-inf"))
                    lp_t = tl.where(
                        has_tail, (tl.log(p_tail) - log_zp64).to(tl.float32), float("-inf")
                    )
                    d, a, _ = _cat_terms(lq_c, lp_c, coef, coef2, log_c, log_1mc, DIV)
                    # the tail as a one-element category (a BLOCK_K vector, entry 0)
                    tail0 = ok == 0
                    d_t, a_t, u_t = _cat_terms(
                        tl.where(tail0, lq_t, float("-inf")) + zero_k,
                        tl.where(tail0, lp_t, float("-inf")) + zero_k,
                        coef,
                        coef2,
                        log_c,
                        log_1mc,
                        DIV,
                    )
                    d_t = tl.where(tail0, d_t, 0.0)
                    a_t = tl.where(tail0, a_t, 0.0)
                    loss = tl.sum(d, axis=0) + tl.sum(d_t, axis=0)
                    big_a = tl.sum(a, axis=0) + tl.sum(a_t, axis=0)
                    u_tail = tl.sum(tl.where(tail0, u_t, 0.0), axis=0)
                    if DIV == RENYI:
                        loss, inv_r = _renyi_finish(loss, coef, nv < 0)
                        a = a * inv_r
                        big_a = big_a * inv_r
                        u_tail = u_tail * inv_r
                    c_off = tl.where(lq_t == float("-inf"), 0.0, u_tail - big_a)
                    inv_z = 1.0 / big_z
                    gk = tl.where(valid, a - tl.exp(lq_c) * big_a, 0.0)
            tl.store(loss_ptr + row, loss)
            if HAS_GRAD:
                # pass C: the dense part q_j · c_off, then the support columns (read before written:
                # in place is safe, every read of this block happens first)
                gscale = w * inv_t
                kp = 0
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    in_v = cols < V
                    x = tl.load(s_row + cols, mask=in_v, other=float("-inf")).to(tl.float32)
                    if TAIL == RENORMALIZE:
                        g = tl.zeros([BLOCK_V], dtype=tl.float32) + c_off
                    else:
                        g = tl.exp2((x * inv_t - m) * LOG2E) * (inv_z * c_off)
                    nxt = tl.load(ids_row + kp, mask=kp < nv, other=BIG_ID)
                    while nxt < start + BLOCK_V:
                        val = tl.sum(tl.where(ok == kp, gk, 0.0), axis=0)
                        if TAIL == IGNORE:
                            g = tl.where(cols == nxt, g + val, g)  # duplicates add up
                        else:
                            g = tl.where(cols == nxt, val, g)
                        kp += 1
                        nxt = tl.load(ids_row + kp, mask=kp < nv, other=BIG_ID)
                    gout = _to_grad_dtype(g * gscale, g_ptr.dtype.element_ty, BF16_BY_BITS)
                    tl.store(g_row + cols, gout, mask=in_v)
    else:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _zero_row(g_row, V, BLOCK_V)


INTERPRET_BLOCK_V = 2048


def triton_sparse_loss_grad(
    s, ids, lp, row_weight, spec, tail, grad, *, block_v: int | None = None
):
    """The sparse launcher contract of ``_sparse_impl`` on the Triton kernel."""
    import os

    n, v = s.shape
    k = ids.shape[1]
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    if n == 0:
        return loss
    if v > 1 and (s.stride(1) != 1 or (grad is not None and grad.stride(1) != 1)):
        raise ValueError("triton sparse kernel: student logits and grad need a unit stride along V")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # Sort each row's valid ids ascending, padding (and every entry of a skipped row) last.
    valid = (lp != -math.inf) & (row_weight != 0)[:, None]
    key = torch.where(valid, ids, torch.full_like(ids, _BIG_ID))
    key, order = key.sort(-1)
    lp_sorted = lp.gather(1, order).contiguous()
    nv = valid.sum(-1).to(torch.int32)
    key = key.contiguous()
    c = float(spec.coef) if 0.0 < spec.coef < 1.0 else 0.5
    g = grad if grad is not None else s
    block_k = max(16, triton.next_power_of_2(k))
    if block_v is None:
        block_v = (
            INTERPRET_BLOCK_V if interpreting else max(128, min(4096, triton.next_power_of_2(v)))
        )
    args = (
        s,
        key,
        lp_sorted,
        nv,
        row_weight,
        loss,
        g,
        s.stride(0),
        g.stride(0),
        v,
        k,
        1.0 / spec.temperature,
        float(spec.coef),
        float(spec.coef2),
        math.log(c),
        math.log1p(-c),
        1e-6,
    )
    meta = {
        "DIV": int(spec.divergence),
        "TAIL": int(tail),
        "HAS_GRAD": grad is not None,
        "BF16_BY_BITS": interpreting,
        "BLOCK_V": block_v,
        "BLOCK_K": block_k,
        "num_warps": 8 if block_v >= 2048 else 4,
    }
    if s.device.type == "cuda":
        with torch.cuda.device(s.device):
            sparse_loss_grad_kernel[(n,)](*args, **meta)
    else:
        import numpy as np

        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            sparse_loss_grad_kernel[(n,)](*args, **meta)
    return loss
