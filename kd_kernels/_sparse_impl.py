"""Sparse-teacher KD: launchers, autograd glue and the fused-linear chunk loop (public functions in
``sparse.py``).

Math: docs/MATH.md, "Sparse teachers". Per row the teacher is K ids ``i_k`` with log-probs
``ℓ_k`` (−inf = padding); the student is dense, ``q = softmax(s/T)``. The divergence D compares
categories: "bucket" the K ids plus the tail (everything else), "renormalize" the K ids
renormalized on both sides, "ignore" (forward KL only) ``Σ_k p_k (ℓ_k − log q_{i_k})``.

With ``a_c = ∂D/∂ log q̄_c`` per category and ``A = Σ_c a_c``, every divergence's gradient is
``∂D/∂s̃_j = a_{k(j)} − q_j A`` on the support and ``q_j (a_tail / q̄_tail − A)`` off it (bucket),
``a_{k(j)} − q̂_{k(j)} A`` on the support and 0 off it (renormalize), ``q_j P − p_j 1[j ∈ S]``
(ignore). Writing ``a_c = q̄_c u_c``, the per-category coefficients u are (α, β as in the dense
losses; m = α p + (1−α) q, m' = (1−α) p + α q, M = β p + (1−β) q):

    forward_kl       a = −p                        (u = −p/q)
    reverse_kl       u = log q − log p + 1
    skew_forward_kl  u = −(1−α) p/m
    skew_reverse_kl  u = log q − log m' + 1 − α q/m'
    jsd              u = (1−β) (log q − log M)
    tvd              u = ½ sign(q − p)
    jeffreys         u = log q − log p − p/q
    alpha_beta       u = (q^(α+β−1) − p^α q^(β−1)) / α
    renyi            u = 1 − r/q,  r = p^α q^(1−α) / Σ_c p^α q^(1−α)

(these are the dense definitions on the categories: the torch path calls the shared torch
definition, ``_torch_terms.TERMS``; the compiled kernels write them as scalar branches,
``category_terms`` / ``_cat_terms``).

The teacher's tail ``1 − P`` is formed as ``−expm1(logsumexp ℓ)`` (exact when P ≈ 1) and clamped to
``TAIL_FLOOR`` (1e−6), then the K+1 teacher categories are renormalized; when the support covers the
whole vocabulary there is no tail category. An all-padding row gives 0 (loss and gradient).

Launcher contract (every backend): ``s`` (N, V) student logits (unit column stride), ``ids`` (N, K)
int64 contiguous (ids of padded entries are never used), ``lp`` (N, K) fp32 contiguous, ``row_weight``
(N,) fp32; rows with weight 0 are skipped (loss 0, gradient row 0); ``grad`` None or (N, V) of the
student's dtype, possibly ``s`` itself; row i of grad receives ``row_weight[i] / T · ∂L_i/∂s̃_i``.
Returns the (N,) fp32 unweighted per-token loss.
"""

from __future__ import annotations

import enum
import math

import torch

from . import _compiled as compiled
from . import _ext
from ._autograd import differentiable_once
from ._backends import BackendUnavailableError
from ._backends._raw import DTYPE_CODES
from ._fused_linear_impl import _Rows, fold_chunk_grad, save_head_grads, scale_head_grads
from ._head import linear as _linear
from ._spec import KDSpec
from ._torch_terms import TERMS

TAIL_FLOOR = 1e-6


class Tail(enum.IntEnum):
    """Tail conventions, numbered as csrc/cpu/kd_sparse.h numbers them."""

    BUCKET = 0
    RENORMALIZE = 1
    IGNORE = 2


# ------------------------------------------------------------------------------------------------
# The "torch" backend: plain ops, a chunk of rows at a time (fp32 temporaries ~8 (rows, V) buffers).
# ------------------------------------------------------------------------------------------------

_CHUNK_BYTES = 64 * 2**20
_LIVE_BUFFERS = 8
_NEG_INF = -math.inf


def _zero_where_not(cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))


def category_terms(
    lq: torch.Tensor, lp: torch.Tensor, spec: KDSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, a, u) for categories with log-probs ``lq`` (student), ``lp`` (teacher), (rows, C), −inf =
    empty category: D (rows,), ``a = ∂D/∂ log q̄`` (up to a multiple of q̄, which cancels in every
    gradient formula above) and ``u = a / q̄`` (rows, C), 0 where empty.

    The divergence itself is the shared torch definition (``_torch_terms.TERMS``), applied to the
    coarse-grained distributions: there is no second copy of the math here. A row without any
    category (all padding) gets D = 0 and a = u = 0.
    """
    q, p = lq.exp(), lp.exp()
    D, a, _ = TERMS[spec.divergence](lq, lp, q, p, spec)
    qpos = q > 0  # a stays as defined where q̄ underflows to 0 (forward-type gradients −p are real)
    u = _zero_where_not(qpos, a / torch.where(qpos, q, 1.0))
    empty = (lq == _NEG_INF).all(-1) & (lp == _NEG_INF).all(-1)
    D = _zero_where_not(~empty, D)
    return D, _zero_where_not(~empty[:, None], a), _zero_where_not(~empty[:, None], u)


def _torch_rows(z, ids, lp, active, spec: KDSpec, tail: Tail, want_grad: bool):
    """Loss (rows,) and ∂L/∂s̃ (rows, V) fp32 (or None) of one chunk of rows from the tempered fp32 student
    logits ``z``; the ids of inactive rows and padded entries are not used (they may be anything)."""
    valid = lp != _NEG_INF
    ids = torch.where(valid & active[:, None], ids, torch.zeros_like(ids))
    z_k = z.gather(1, ids)
    # ℓq = (z − m) − log Z with the max and log Z apart (z − logsumexp(z) would round the LSE at the size of
    # the max: at logits near 1e6, an error of 1/16 in every log-probability)
    z = z - z.amax(-1, keepdim=True)  # NaN throughout a row with a NaN, a +inf or only −inf
    lse = z.logsumexp(-1, keepdim=True)  # log Z
    lq = z - lse
    lq_k = lq.gather(1, ids)
    g = None
    if tail == Tail.IGNORE:
        p = _zero_where_not(valid, lp.exp())
        loss = _zero_where_not(valid, p * (lp - lq_k)).sum(-1)
        if want_grad:
            g = lq.exp_().mul_(p.sum(-1, keepdim=True))  # q_j P ...
            g.scatter_add_(1, ids, -p)  # ... − p_j on S (duplicates add up)
        return loss, g
    lp_v = torch.where(valid, lp, _NEG_INF)
    lq_v = torch.where(valid, lq_k, _NEG_INF)
    n_valid = valid.sum(-1)
    if tail == Tail.RENORMALIZE:
        # an all-padding row stays all −inf (no categories: loss 0, gradient 0), never −inf − −inf
        # log Q̂ from the support's own logits, against their own max: ℓq_k would have lost them where the
        # support sits far below the row's max (underflow, or the rounding of z − m at that distance)
        lp_c = torch.where(valid, _log_normalize(lp_v), _NEG_INF)
        lq_c = torch.where(valid, _log_normalize(torch.where(valid, z_k, _NEG_INF)), _NEG_INF)
        loss, a, _ = category_terms(lq_c, lp_c, spec)
        if want_grad:
            A = a.sum(-1, keepdim=True)
            vals = _zero_where_not(valid, a - lq_c.exp() * A)
            # 0 off the support, but NaN there too when the row is not a distribution (student NaN /
            # ±inf makes lse non-finite, teacher NaN makes A NaN): 0 · x is NaN for such x.
            base = ((lse + A) * 0.0).expand_as(z)
            g = base.contiguous().scatter_add_(1, ids, vals)
        return loss, g
    # bucket: the K ids and the tail; the tail sum taken over the non-support entries directly
    in_support = torch.zeros_like(z).scatter_add_(1, ids, valid.float()) > 0
    lq_tail = torch.where(in_support, _NEG_INF, z).logsumexp(-1) - lse[:, 0]
    has_tail = n_valid < z.shape[1]
    # The teacher's categories in float64 (K + 1 per row): 1 − P from an fp32 log P is off by
    # eps32 / (1 − P) relatively, 5 % of a 1e-6 tail, which the reverse-type gradients then carry.
    lp64 = lp_v.double()
    p_tail = (-torch.expm1(_safe_lse(lp64)[:, 0])).clamp_min(TAIL_FLOOR)
    lp_tail = torch.where(has_tail, p_tail.log(), _NEG_INF)
    lq_tail = torch.where(has_tail, lq_tail, _NEG_INF)
    lp_c = torch.cat([lp64, lp_tail[:, None]], 1)
    lp_c = (lp_c - _safe_lse(lp_c)).float()  # renormalizes only when the floor (or no tail) applied
    lq_c = torch.cat([lq_v, lq_tail[:, None]], 1)
    loss, a, u = category_terms(lq_c, lp_c, spec)
    if want_grad:
        A = a.sum(-1, keepdim=True)
        q = lq.exp_()
        # multiplies q_j, which is 0 wherever the tail is empty (u_tail may then be infinite)
        off = torch.where(lq_c[:, -1:] == _NEG_INF, 0.0, u[:, -1:] - A)
        g = torch.where(in_support, 0.0, q * off)
        vals = _zero_where_not(valid, a[:, :-1] - lq_k.exp() * A)
        g.scatter_add_(1, ids, vals)
    return loss, g


def _log_normalize(x: torch.Tensor) -> torch.Tensor:
    """x − logsumexp(x) over the last dim as (x − m) − log Σ e^(x − m), the max and the log-sum apart (exact
    at the max wherever the row sits); NaN in an all −inf row (the callers select those entries away)."""
    xm = x - x.amax(-1, keepdim=True)
    return xm - xm.exp().sum(-1, keepdim=True).log()


def _safe_lse(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, keepdim; −inf (not NaN) for an all −inf row."""
    m = x.amax(-1, keepdim=True)
    m0 = torch.where(m == _NEG_INF, 0.0, m)
    return m0 + (x - m0).exp().sum(-1, keepdim=True).log()


def _torch_rows_checked(s, ids, lp, active, spec: KDSpec, tail: Tail, want_grad: bool):
    """_torch_rows, with the lead's semantics made explicit: a row that is not a distribution
    (student NaN, +inf, all −inf; a NaN teacher log-prob) has loss NaN and a NaN gradient row."""
    z = s.float() * (1.0 / spec.temperature)  # tempered: s/T may overflow where s does not
    loss, g = _torch_rows(z, ids, lp, active, spec, tail, want_grad)
    bad = ~torch.isfinite(z.amax(-1)) | torch.isnan(z).any(-1) | torch.isnan(lp).any(-1)
    loss = torch.where(bad, math.nan, loss)
    if g is not None:
        g = torch.where(bad[:, None], math.nan, g)
    return loss, g


def torch_sparse_loss_grad(s, ids, lp, row_weight, spec: KDSpec, tail: Tail, grad):
    n, v = s.shape
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    rows = max(1, _CHUNK_BYTES // (_LIVE_BUFFERS * 4 * max(v, 1)))
    inv_t = 1.0 / spec.temperature
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        w = row_weight[lo:hi]
        active = w != 0
        L, g = _torch_rows_checked(
            s[lo:hi], ids[lo:hi], lp[lo:hi], active, spec, tail, grad is not None
        )
        loss[lo:hi] = _zero_where_not(active, L)
        if grad is not None:
            grad[lo:hi] = _zero_where_not(active[:, None], g * (w * inv_t)[:, None])
    return loss


# ------------------------------------------------------------------------------------------------
# The "cpu" backend: the compiled kernel csrc/cpu/kd_sparse_kernels.cpp.
# ------------------------------------------------------------------------------------------------


def _has_cpu_kernel() -> bool:
    return _ext.has_cpu() and hasattr(_ext._C, "cpu_sparse_loss_grad")


def cpu_sparse_loss_grad(s, ids, lp, row_weight, spec: KDSpec, tail: Tail, grad):
    n, v = s.shape
    loss = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return loss
    if v > 1 and s.stride(1) != 1:
        raise ValueError("student_logits must have a contiguous last dim for the cpu kernel")
    k = ids.shape[1]
    grad_ptr, stride_g = 0, s.stride(0)
    if grad is not None:
        if grad.dtype != s.dtype or (v > 1 and grad.stride(1) != 1):
            raise ValueError("grad must have the student's dtype and a contiguous last dim")
        grad_ptr, stride_g = grad.data_ptr(), grad.stride(0)
    _ext._C.cpu_sparse_loss_grad(
        s.data_ptr(),
        ids.data_ptr(),
        lp.data_ptr(),
        grad_ptr,
        row_weight.data_ptr(),
        loss.data_ptr(),
        n,
        v,
        k,
        max(s.stride(0), v),
        max(stride_g, v),
        DTYPE_CODES[s.dtype],
        int(spec.divergence),
        int(tail),
        float(spec.coef),
        float(spec.coef2),
        float(spec.temperature),
        TAIL_FLOOR,
        torch.get_num_threads(),
    )
    return loss


# ------------------------------------------------------------------------------------------------
# Backend choice. Sparse kernels exist for "torch", "cpu" and "triton"; "cuda" has none (Triton
# serves GPUs), so "auto" on a GPU picks "triton".
# ------------------------------------------------------------------------------------------------

SPARSE_BACKENDS = ("torch", "cpu", "triton")


def _triton_usable(device: torch.device) -> str | None:
    from ._backends import get_backend

    reasons = get_backend("triton").unsupported_reasons(device)
    return "; ".join(reasons) if reasons else None


def check_sparse_backend_name(name: object) -> str:
    """``name`` is "auto" or a sparse launcher (no device needed: ``SparseKDLoss`` checks it when built)."""
    names = ("auto", *SPARSE_BACKENDS)
    if name == "cuda":
        raise BackendUnavailableError(
            "backend='cuda' has no sparse-teacher kernel; on a GPU use backend='triton' (or 'auto')"
        )
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"backend={name!r} is unknown; use one of {', '.join(map(repr, names))}")
    return name


def resolve_sparse_backend(name: object, device: torch.device) -> str:
    """The sparse launcher to run on ``device``: ``name``, or the first usable one for "auto"."""
    check_sparse_backend_name(name)
    if name == "auto":
        if device.type == "cpu" and _has_cpu_kernel():
            return "cpu"
        if device.type == "cuda" and _triton_usable(device) is None:
            return "triton"
        return "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='cpu' takes cpu tensors, these are on {device.type}; use backend='auto'"
            )
        if not _has_cpu_kernel():
            raise BackendUnavailableError(
                "backend='cpu' cannot run: the compiled extension kd_kernels._C has no "
                f"cpu_sparse_loss_grad ({_ext.load_error or 'built from an older source'}); rebuild "
                "it with `pip install .`, or use backend='torch'"
            )
    if name == "triton":
        why = _triton_usable(device)
        if why is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run: {why}; use backend='auto'")
    return name


def sparse_loss_grad(backend: str, s, ids, lp, row_weight, spec, tail, grad):
    if backend == "cpu":
        return cpu_sparse_loss_grad(s, ids, lp, row_weight, spec, tail, grad)
    if backend == "triton":
        from ._triton_sparse import triton_sparse_loss_grad

        return triton_sparse_loss_grad(s, ids, lp, row_weight, spec, tail, grad)
    return torch_sparse_loss_grad(s, ids, lp, row_weight, spec, tail, grad)


@differentiable_once
class SparseKDFunction(torch.autograd.Function):
    """(s, ids, lp, c) ↦ Σ_i c_i L_i (or the vector c_i L_i when ``per_token``); gradient to s only.

    The gradient is computed in forward; backward only scales it.
    """

    @staticmethod
    def forward(ctx, s, ids, lp, row_weight, spec: KDSpec, tail: Tail, backend: str, per_token):
        need_grad = ctx.needs_input_grad[0]
        if torch.compiler.is_compiling():
            options = [*compiled.spec_options(spec), int(tail), need_grad]
            loss, grad = compiled.call("sparse", (s, ids, lp, row_weight), backend, options)
        else:
            loss, grad = _loss_and_grad(backend, s, ids, lp, row_weight, spec, tail, need_grad)
        weighted = torch.where(row_weight != 0, loss * row_weight, 0.0)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.per_token = per_token
        return weighted if per_token else weighted.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scale = (grad_out[:, None] if ctx.per_token else grad_out).to(grad.dtype)
        if torch.compiler.is_compiling():
            return grad * scale, None, None, None, None, None, None, None
        # In place: the saved gradient is used once (a second backward raises a version error).
        return grad.mul_(scale), None, None, None, None, None, None, None


def _loss_and_grad(backend: str, s, ids, lp, row_weight, spec: KDSpec, tail: Tail, need_grad):
    """(per-row loss, gradient or None) of ``SparseKDFunction``."""
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_grad else None
    return sparse_loss_grad(backend, s, ids, lp, row_weight, spec, tail, grad), grad


def _sparse_run(tensors, backend: str, options):
    """``_loss_and_grad`` inside ``kd_kernels::family``; options: spec, tail, need_grad."""
    spec, tail = compiled.spec_from(options[:5]), Tail(int(options[5]))
    return _loss_and_grad(backend, *tensors, spec, tail, bool(options[6]))


def _sparse_fake(tensors, backend, options):
    s = tensors[0]
    grad = s.new_empty(s.shape) if options[6] else None
    return s.new_empty(s.shape[0], dtype=torch.float32), grad


compiled.register_family("sparse", _sparse_run, _sparse_fake)


# ------------------------------------------------------------------------------------------------
# Fused linear: s = h Wᵀ + b per chunk of active rows, the sparse kernel writes G over s, then
# ∂h = G W, ∂W += Gᵀ h, ∂b += Σ G (MATH.md, "Fused linear"); the teacher side is (ids, lp) only.
# ------------------------------------------------------------------------------------------------


def sparse_chunk_loop(
    h, w, b, ids, lp, kd_weight, labels, ce_scale, ce_weight, spec, tail, backend, rows, need
):
    """Forward of the fused-linear sparse KD (+ CE) with every gradient. Returns
    (Σ c_i KD_i, Σ ce_scale_i CE_i, (grad_h, grad_w, grad_b)) as ``kd_chunk_loop`` does."""
    need_h, need_w, need_b = need
    need_grad = any(need)
    n, dev = h.shape[0], h.device
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=dev) if need_b else None
    kd_total = torch.zeros((), dtype=torch.float32, device=dev)
    ce_total = torch.zeros((), dtype=torch.float32, device=dev)
    active = kd_weight != 0
    if ce_scale is not None:
        active = active | (ce_scale != 0)
    plan = _Rows(active, n)
    ce_grad_wanted = need_grad and ce_scale is not None and ce_weight != 0.0
    for sel in plan.chunks(rows):
        hc = plan.take(h, sel)
        c = plan.take(kd_weight, sel)
        s = _linear(hc, w, b)
        ce_grad = None
        if ce_scale is not None:  # CE from softmax(s) before the kernel overwrites s
            y = plan.take(labels, sel)[:, None]
            sc = plan.take(ce_scale, sel)
            logp = s.float().log_softmax(-1)
            nll = -logp.gather(1, y).squeeze(1)
            ce_total += torch.where(sc != 0, sc * nll, torch.zeros_like(nll)).sum()
            if ce_grad_wanted:
                coef = (sc * ce_weight)[:, None]
                ce_grad = logp.exp_().mul_(coef)
                ce_grad.scatter_add_(1, y, -coef)
            del logp
        loss_rows = sparse_loss_grad(
            backend,
            s,
            plan.take(ids, sel),
            plan.take(lp, sel),
            c,
            spec,
            tail,
            s if need_grad else None,
        )
        kd_total += torch.where(c != 0, loss_rows * c, 0.0).sum()
        if not need_grad:
            continue
        g = s
        if ce_grad is not None:
            g.add_(ce_grad)
            del ce_grad
        fold_chunk_grad(plan, sel, g, w, hc, (grad_h, grad_w, grad_b))
    return kd_total, ce_total, (grad_h, grad_w, grad_b)


@differentiable_once
class FusedLinearSparseKDFunction(torch.autograd.Function):
    """(h, W, b) ↦ (loss, kd, ce); gradients computed in forward, backward only scales them."""

    @staticmethod
    def forward(
        ctx, h, w, b, ids, lp, kd_weight, labels, ce_scale, ce_weight, spec, tail, backend, rows
    ):
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        kd, ce, grads = sparse_head_grads(
            (h, w, b, ids, lp, kd_weight, labels, ce_scale),
            (ce_weight, spec, tail, backend, rows),
            need,
        )
        loss = kd + ce_weight * ce if ce_scale is not None else kd.clone()
        save_head_grads(ctx, grads, w, b)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        return scale_head_grads(ctx, grad_loss) + (None,) * 10


def sparse_head_grads(tensors: tuple, options: tuple, need: tuple[bool, bool, bool]):
    """``sparse_chunk_loop(*tensors, *options, need)``: (kd, ce, (∂h, ∂W, ∂b)); ``tensors`` (h,
    W, b, ids, lp, kd_weight, labels, ce_scale), ``options`` (ce_weight, spec, tail, backend, rows).
    Under torch.compile through the custom op ``kd_kernels::family``."""
    if not torch.compiler.is_compiling():
        return sparse_chunk_loop(*tensors, *options, need)
    ce_weight, spec, tail, backend, rows = options
    floats = [*compiled.spec_options(spec), ce_weight, int(tail), rows, *need]
    kd, ce, *grads = compiled.call("fused_sparse", tensors, backend, floats)
    return kd, ce, tuple(g if n else None for g, n in zip(grads, need))


def _fused_sparse_run(tensors, backend: str, o):
    options = (o[5], compiled.spec_from(o[:5]), Tail(int(o[6])), backend, int(o[7]))
    kd, ce, grads = sparse_chunk_loop(*tensors, *options, tuple(bool(x) for x in o[8:11]))
    return [kd, ce, *grads]


def _fused_sparse_fake(tensors, backend, o):
    return compiled.head_grads_fake(tensors[0], tensors[1], o[8:11])


compiled.register_family("fused_sparse", _fused_sparse_run, _fused_sparse_fake)
