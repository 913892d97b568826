"""Chunk loops and autograd glue of the fused-linear losses (public functions in
``fused_linear.py``).

Layers: the backends' fused row kernel (``Backend.loss_grad``, logits level) ← the chunk loops
here (allocate, matmul, call the kernel, accumulate the parameter gradients) ← the
``autograd.Function`` glue here (save what backward needs, scale by the upstream gradient) ← the
validated public functions.

Everything here takes already-validated, flattened tensors: hidden states ``(N, D)``, weights ``(V,
D)``, biases ``(V,)`` or None, per-row fp32 factors ``(N,)``.

Math (docs/MATH.md, "Fused linear"): ``s = h_s W_sᵀ + b_s``, ``t = h_t W_tᵀ + b_t`` per chunk
of rows; the backend writes ``G = ∂loss/∂s`` over the chunk's student logits; then ``∂/∂h_s = G
W_s``, ``∂/∂W_s += Gᵀ h_s``, ``∂/∂b_s += Σ_rows G``. The full ``(N, V)`` logits never exist.
"""

from __future__ import annotations

import math

import torch

from . import _compiled as compiled
from ._autograd import differentiable_once
from ._backends import Backend, get_backend
from ._head import HeadTransform, head_logits
from ._spec import KDSpec

_IDENTITY = HeadTransform()

# Memory budget of one chunk's (rows, V) buffers, per device type. On CPU the chunk's student +
# teacher logits (plus the fp32 CE buffer when labels are given) stay within 64 MiB; GPUs get a
# larger budget so each chunk's GEMM is big enough to run near peak. Override per call with
# ``chunk_size``.
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
_DEFAULT_BUDGET = 64 * 2**20


def chunk_rows(
    n: int, vocab: int, bytes_per_vocab_entry: int, chunk_size: int | None, device: torch.device
) -> int:
    """Rows per chunk: ``chunk_size`` if given, else the device budget / bytes per row (a multiple
    of 8)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n, 1)))
    budget = CHUNK_BUDGET_BYTES.get(device.type, _DEFAULT_BUDGET)
    rows = budget // max(1, vocab * bytes_per_vocab_entry)
    rows = max(8, rows - rows % 8)  # GEMM-friendly multiple of 8, at least 8 rows
    return max(1, min(rows, max(n, 1)))


def _accumulate_wgrad(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32, (V, D)) += gᵀ h.

    fp32 inputs accumulate straight into ``acc``. bf16 / fp16 inputs on a GPU accumulate into ``acc`` inside
    the GEMM as well: ``torch.addmm(..., out_dtype=torch.float32, out=acc)`` (PyTorch ≥ 2.8 on CUDA: half
    inputs, fp32 C and result, beta = 1), so no (V, D) half-precision product is written, read back and added
    (≈ 3 GB of traffic per chunk at V = 128256, D = 4096), and the chunk's product is not rounded to bf16
    before it is summed. Where that overload is missing (CPU kernels, older PyTorch) the chunk's product comes
    out of a half-precision GEMM (fp32 accumulation inside it, one rounding of its result) and the sum over
    chunks is kept in fp32; upcasting ``g`` would cost an fp32 copy of the chunk and a much slower GEMM.
    """
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), h)
        return
    if acc.device.type == "cuda" and _MIXED_ADDMM.get(acc.device.type, True):
        try:
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            # This PyTorch has no fp32-output GEMM for half inputs: remember, and use the fallback from now on.
            _MIXED_ADDMM[acc.device.type] = False
    acc.add_(g.t() @ h)


# device type → whether torch.addmm(..., out_dtype=torch.float32) works there (learnt on first use)
_MIXED_ADDMM: dict[str, bool] = {}


def save_head_grads(ctx, grads, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Forward side of every fused-linear autograd Function: keep the (∂h, ∂W, ∂b) computed in forward."""
    ctx.save_for_backward(*grads)
    ctx.param_dtypes = (w.dtype, b.dtype if b is not None else None)


def scale_head_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """Backward side: the saved (∂h, ∂W, ∂b) times the upstream scalar, in the parameters' dtypes. In place:
    each saved gradient is used once; a second backward (retain_graph=True) makes autograd raise a version
    error rather than return a doubly scaled gradient."""
    grad_h, grad_w, grad_b = ctx.saved_tensors
    w_dtype, b_dtype = ctx.param_dtypes
    if torch.compiler.is_compiling():  # a traced graph: out of place
        return (
            grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None,
            (grad_b * grad_loss).to(b_dtype) if grad_b is not None else None,
        )
    if grad_h is not None:
        grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
    if grad_w is not None:
        grad_w = grad_w.mul_(grad_loss).to(w_dtype)
    if grad_b is not None:
        grad_b = grad_b.mul_(grad_loss).to(b_dtype)
    return grad_h, grad_w, grad_b


def fold_chunk_grad(
    plan: _Rows, sel, g: torch.Tensor, w: torch.Tensor, hc: torch.Tensor, grads: tuple
) -> None:
    """One chunk's logit gradient ``g`` folded into the head's (∂h, ∂W, ∂b) (None = not needed):
    ∂h[sel] = g W, ∂W += gᵀ h, ∂b += Σ_rows g."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        plan.put(grad_h, sel, g @ w)
    if grad_w is not None:
        _accumulate_wgrad(grad_w, g, hc)
    if grad_b is not None:
        grad_b += g.sum(0, dtype=torch.float32)


class _Rows:
    """The rows a loop visits: all of them (plain slices, no copies) or a compacted index of active
    rows."""

    def __init__(self, active: torch.Tensor | None, n: int):
        if active is None:
            self.idx = None
        else:
            # Host sync (nonzero): acceptable here, it lets masked rows skip both matmuls and the
            # kernel.
            idx = active.nonzero().squeeze(1)
            self.idx = None if idx.numel() == n else idx
        self.count = n if self.idx is None else self.idx.numel()

    def chunks(self, rows: int):
        """Each chunk's selection: None for a single chunk of every row (the tensors themselves), else a
        slice, or an index of active rows."""
        if self.idx is None and self.count <= rows:
            yield None
            return
        for lo in range(0, self.count, rows):
            hi = min(self.count, lo + rows)
            yield (slice(lo, hi) if self.idx is None else self.idx[lo:hi])

    @staticmethod
    def take(x: torch.Tensor | None, sel) -> torch.Tensor | None:
        if x is None or sel is None:
            return x
        return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)

    @staticmethod
    def put(dst: torch.Tensor, sel, value: torch.Tensor) -> None:
        if sel is None:
            dst.copy_(value)
        elif isinstance(sel, slice):
            dst[sel] = value
        else:
            dst.index_copy_(0, sel, value)

    @staticmethod
    def store(dst: torch.Tensor | None, sel, value: torch.Tensor) -> torch.Tensor:
        """``put`` for a per-row output: ``dst`` holding ``value`` in its selected rows, or, for the single
        chunk (``sel`` None), ``value`` itself (no buffer, no copy)."""
        if sel is None:
            return value
        _Rows.put(dst, sel, value)
        return dst


def kd_chunk_loop(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    kd_weight: torch.Tensor,
    labels: torch.Tensor | None,
    ce_scale: torch.Tensor | None,
    ce_weight: float,
    spec: KDSpec,
    backend: Backend,
    rows: int,
    need: tuple[bool, bool, bool],
    s_tr: HeadTransform = _IDENTITY,
    t_tr: HeadTransform = _IDENTITY,
    rows_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Forward of the fused-linear KD (+ CE) loss with every gradient, one chunk of active rows at a
    time.

    ``kd_weight`` (N,): the KD row factor c_i (mask · token weight / count for "mean"); ``ce_scale``
    (N,): the CE row factor (valid label / count for "mean"); ``labels`` (N,) int64 with ignored
    rows set to 0. Returns (Σ c_i KD_i, Σ ce_scale_i CE_i, (grad_h, grad_w, grad_b)) with the
    gradients of ``Σ c_i KD_i + ce_weight · Σ ce_scale_i CE_i``, None where ``need`` says not
    needed. ``s_tr`` / ``t_tr``: the models' logit transforms (MATH.md, "Model-exact logits"): the
    loss is taken on the transformed logits and the student's gradient chained through ``∂y/∂z``.
    ``rows_out``: optional (N,) fp32 buffers that receive the per-row terms ``c_i KD_i`` and
    ``ce_scale_i CE_i`` (0 on rows not visited).
    """
    need_h, need_w, need_b = need
    need_grad = any(need)
    n, dev = h_s.shape[0], h_s.device
    grad_h = torch.zeros_like(h_s) if need_h else None
    grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
    grad_b = torch.zeros(w_s.shape[0], dtype=torch.float32, device=dev) if need_b else None
    kd_total = torch.zeros((), dtype=torch.float32, device=dev)
    ce_total = torch.zeros((), dtype=torch.float32, device=dev)

    active = kd_weight != 0
    if ce_scale is not None:
        active = active | (ce_scale != 0)
    plan = _Rows(active, n)
    ce_grad_wanted = need_grad and ce_scale is not None and ce_weight != 0.0

    for sel in plan.chunks(rows):
        hs, ht = plan.take(h_s, sel), plan.take(h_t, sel)
        c = plan.take(kd_weight, sel)
        s, ds = head_logits(hs, w_s, b_s, s_tr, want_deriv=need_grad)
        t, _ = head_logits(ht, w_t, b_t, t_tr, want_deriv=False)
        ce_grad = None
        if ce_scale is not None:
            # CE needs softmax(s) before the kernel overwrites s with its gradient: one fp32 chunk
            # buffer.
            y = plan.take(labels, sel)[:, None]
            sc = plan.take(ce_scale, sel)
            logp = s.float().log_softmax(-1)
            nll = -logp.gather(1, y).squeeze(1)
            ce_rows = torch.where(sc != 0, sc * nll, torch.zeros_like(nll))
            ce_total += ce_rows.sum()
            if rows_out is not None:
                plan.put(rows_out[1], sel, ce_rows)
            if ce_grad_wanted:
                coef = (sc * ce_weight)[:, None]
                ce_grad = logp.exp_().mul_(coef)  # ce_weight · scale · (softmax(s) − onehot(y))
                ce_grad.scatter_add_(1, y, -coef)
            del logp
        loss_rows = backend.loss_grad(s, t, c, spec, s if need_grad else None)
        kd_rows = torch.where(c != 0, loss_rows * c, torch.zeros_like(loss_rows))
        kd_total += kd_rows.sum()
        if rows_out is not None:
            plan.put(rows_out[0], sel, kd_rows)
        del t
        if not need_grad:
            continue
        g = s  # now G = ∂(KD part)/∂s, in the student's dtype
        if ce_grad is not None:
            g.add_(ce_grad)
            del ce_grad
        if ds is not None:
            g.mul_(ds)  # ∂/∂z = ∂/∂y · σ (1 − tanh²)
            del ds
        fold_chunk_grad(plan, sel, g, w_s, hs, (grad_h, grad_w, grad_b))
    return kd_total, ce_total, (grad_h, grad_w, grad_b)


def kd_ce_loss_only(
    h_s,
    w_s,
    b_s,
    h_t,
    w_t,
    b_t,
    kd_weight,
    labels,
    ce_scale,
    ce_weight: float,
    spec: KDSpec,
    backend: Backend,
    rows: int,
    s_tr: HeadTransform = _IDENTITY,
    t_tr: HeadTransform = _IDENTITY,
):
    """(loss, kd, ce) without any gradient work (no_grad, or nothing requires grad)."""
    with torch.no_grad():
        kd, ce, _ = kd_head_grads(
            (
                h_s.detach(),
                w_s.detach(),
                b_s.detach() if b_s is not None else None,
                h_t,
                w_t,
                b_t,
                kd_weight,
                labels,
                ce_scale,
            ),
            (ce_weight, spec, backend, rows, s_tr, t_tr),
            (False, False, False),
        )
    return (kd + ce_weight * ce if ce_scale is not None else kd.clone()), kd, ce


# ``torch.compile``: the chunk loops run inside ``kd_kernels::family`` (``_compiled.py``). The KD
# families' scalar options travel as floats: spec (5), ce_weight, rows, need (3), s_tr (2),
# t_tr (2).


def _kd_options(options: tuple, need: tuple[bool, bool, bool]) -> list[float]:
    ce_weight, spec, _, rows, s_tr, t_tr = options
    return [
        *compiled.spec_options(spec),
        ce_weight,
        rows,
        *need,
        *compiled.head_options(s_tr),
        *compiled.head_options(t_tr),
    ]


def _kd_decode(backend: str, o) -> tuple[tuple, tuple[bool, ...]]:
    """(ce_weight, spec, backend, rows, s_tr, t_tr), need: the inverse of ``_kd_options``."""
    options = (
        o[5],
        compiled.spec_from(o[:5]),
        get_backend(backend),
        int(o[6]),
        compiled.head_from(o[10:12]),
        compiled.head_from(o[12:14]),
    )
    return options, tuple(bool(x) for x in o[7:10])


def kd_head_grads(tensors: tuple, options: tuple, need: tuple[bool, bool, bool]):
    """``kd_chunk_loop(*tensors, ce_weight, spec, backend, rows, need, s_tr, t_tr)``: (kd, ce,
    (∂h, ∂W, ∂b)); ``tensors`` its first nine arguments, ``options`` (ce_weight, spec, backend,
    rows, s_tr, t_tr). Under torch.compile through the custom op."""
    ce_weight, spec, backend, rows, s_tr, t_tr = options
    if not torch.compiler.is_compiling():
        return kd_chunk_loop(*tensors, ce_weight, spec, backend, rows, need, s_tr, t_tr)
    kd, ce, *grads = compiled.call("fused_kd", tensors, backend.name, _kd_options(options, need))
    return kd, ce, tuple(g if n else None for g, n in zip(grads, need))


def _fused_kd_run(tensors, backend: str, o):
    options, need = _kd_decode(backend, o)
    kd, ce, grads = kd_head_grads(tuple(tensors), options, need)
    return [kd, ce, *grads]


def _fused_kd_fake(tensors, backend, o):
    return compiled.head_grads_fake(tensors[0], tensors[1], o[7:10])


compiled.register_family("fused_kd", _fused_kd_run, _fused_kd_fake)


@differentiable_once
class FusedLinearKDFunction(torch.autograd.Function):
    """(h_s, W_s, b_s, h_t, W_t, b_t) ↦ (loss, kd, ce); gradients only to the student's three
    tensors.

    All gradients are computed in forward (kd_chunk_loop); backward only scales them by the upstream
    gradient. ``kd`` and ``ce`` are detached logging values.
    """

    @staticmethod
    def forward(
        ctx,
        h_s,
        w_s,
        b_s,
        h_t,
        w_t,
        b_t,
        kd_weight,
        labels,
        ce_scale,
        ce_weight: float,
        spec: KDSpec,
        backend: Backend,
        rows: int,
        s_tr: HeadTransform,
        t_tr: HeadTransform,
    ):
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        kd, ce, grads = kd_head_grads(
            (h_s, w_s, b_s, h_t, w_t, b_t, kd_weight, labels, ce_scale),
            (ce_weight, spec, backend, rows, s_tr, t_tr),
            need,
        )
        loss = kd + ce_weight * ce if ce_scale is not None else kd.clone()
        save_head_grads(ctx, grads, w_s, b_s)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        return scale_head_grads(ctx, grad_loss) + (None,) * 12


# ------------------------------------------------------------------------------------------------
# Per-token KD (reduction="none"; MATH.md, "Fused linear, per-token").
#
# The upstream gradient g_i is only known in backward, so forward computes the per-row values
# c_i KD_i + ce_weight · v_i CE_i without gradient work (c_i = k_i w_i, v_i = valid label) and
# saves only its inputs; backward recomputes each chunk's logits (both heads) and runs the same
# chunk loop with the row weights g_i c_i and CE factors g_i v_i, which yields the gradient of
# Σ_i g_i out_i. One extra pass of logits, no (N, V) tensor saved.
# ------------------------------------------------------------------------------------------------


def kd_ce_rows(
    h_s,
    w_s,
    b_s,
    h_t,
    w_t,
    b_t,
    kd_weight,
    labels,
    ce_valid,
    ce_weight: float,
    spec: KDSpec,
    backend: Backend,
    rows: int,
    s_tr: HeadTransform = _IDENTITY,
    t_tr: HeadTransform = _IDENTITY,
):
    """Per-row (loss, kd, ce), each (N,) fp32, without gradient work: ``kd_i = c_i KD_i`` (0 where
    c_i = 0), ``ce_i = v_i CE_i``, ``loss_i = kd_i + ce_weight · ce_i``. Under torch.compile through
    the custom op."""
    if torch.compiler.is_compiling():
        tensors = (h_s, w_s, b_s, h_t, w_t, b_t, kd_weight, labels, ce_valid)
        options = _kd_options((ce_weight, spec, backend, rows, s_tr, t_tr), (False,) * 3)
        return tuple(compiled.call("fused_kd_rows", tensors, backend.name, options))
    n, dev = h_s.shape[0], h_s.device
    kd = torch.zeros(n, dtype=torch.float32, device=dev)
    ce = torch.zeros(n, dtype=torch.float32, device=dev)
    with torch.no_grad():
        kd_chunk_loop(
            h_s.detach(),
            w_s.detach(),
            b_s.detach() if b_s is not None else None,
            h_t,
            w_t,
            b_t,
            kd_weight,
            labels,
            ce_valid,
            ce_weight,
            spec,
            backend,
            rows,
            (False, False, False),
            s_tr,
            t_tr,
            rows_out=(kd, ce),
        )
    loss = kd + ce_weight * ce if ce_valid is not None else kd.clone()
    return loss, kd, ce


@differentiable_once
class FusedLinearKDRowsFunction(torch.autograd.Function):
    """(h_s, W_s, b_s, h_t, W_t, b_t) ↦ per-row (loss, kd, ce), each (N,); any upstream gradient
    on ``loss`` (``kd`` and ``ce`` are detached logging values)."""

    @staticmethod
    def forward(
        ctx,
        h_s,
        w_s,
        b_s,
        h_t,
        w_t,
        b_t,
        kd_weight,
        labels,
        ce_valid,
        ce_weight: float,
        spec: KDSpec,
        backend: Backend,
        rows: int,
        s_tr: HeadTransform,
        t_tr: HeadTransform,
    ):
        args = (h_s, w_s, b_s, h_t, w_t, b_t, kd_weight, labels, ce_valid)
        loss, kd, ce = kd_ce_rows(*args, ce_weight, spec, backend, rows, s_tr, t_tr)
        ctx.save_for_backward(*args)
        ctx.options = (ce_weight, spec, backend, rows, s_tr, t_tr)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        none = (None,) * 12
        if grad_loss is None:
            return (None, None, None) + none
        h_s, w_s, b_s, h_t, w_t, b_t, kd_weight, labels, ce_valid = ctx.saved_tensors
        ce_weight, spec, backend, rows, s_tr, t_tr = ctx.options
        g = grad_loss.float()
        zero = torch.zeros_like(g)
        # select, not multiply: a NaN / inf upstream value on a row that does not count stays out
        kd_w = torch.where(kd_weight != 0, kd_weight * g, zero).contiguous()
        ce_s = None
        if ce_valid is not None and ce_weight != 0.0:
            ce_s = torch.where(ce_valid != 0, ce_valid * g, zero)
        else:
            labels = None
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        with torch.no_grad():
            _, _, (grad_h, grad_w, grad_b) = kd_head_grads(
                (h_s, w_s, b_s, h_t, w_t, b_t, kd_w, labels, ce_s),
                (ce_weight, spec, backend, rows, s_tr, t_tr),
                need,
            )
        if grad_w is not None:
            grad_w = grad_w.to(w_s.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(b_s.dtype)
        return (grad_h, grad_w, grad_b) + none


def _rows_run(tensors, backend: str, o):
    options, _ = _kd_decode(backend, o)
    return list(kd_ce_rows(*tensors, *options))


def _rows_fake(tensors, backend, o):
    return [tensors[0].new_empty(tensors[0].shape[0], dtype=torch.float32) for _ in range(3)]


compiled.register_family("fused_kd_rows", _rows_run, _rows_fake)


# ------------------------------------------------------------------------------------------------
# Token log-probabilities: log softmax(h Wᵀ/T)[y] and the entropy of softmax(h Wᵀ/T), per token.
#
# The upstream gradient is per token, so gradients cannot be finished in forward. Forward keeps, per
# active row, only the log-sum-exp and the entropy (two fp32 numbers); backward recomputes each
# chunk's logits (one extra GEMM) and forms, with z = s/T, q = softmax(z), log q = z − LSE,
# H = −Σ q log q:
#   ∂ log q_y / ∂z_j = 1[j = y] − q_j,    ∂H/∂z_j = −q_j (log q_j + H),    ∂/∂s = (1/T) ∂/∂z.
# --------------------------------------------------------------------------------------------------


def _logits_fp32(h, w, b, inv_t: float, tr: HeadTransform = _IDENTITY, *, want_deriv=False):
    """fp32 ``y / T`` for one chunk (``y`` the model-exact logits); with ``want_deriv`` also
    ``∂y/∂z`` (see ``head_logits``)."""
    y, d = head_logits(h, w, b, tr, want_deriv=want_deriv)
    z = y.float()  # a new fp32 buffer (or the fp32 GEMM output itself): safe to scale in place
    z = z.mul_(inv_t) if inv_t != 1.0 else z
    return (z, d) if want_deriv else z


def logprobs_pass(
    h,
    w,
    b,
    tokens,
    active,
    inv_t: float,
    rows: int,
    want_entropy: bool,
    tr: HeadTransform,
    want_lse: bool,
):
    """The chunked forward of ``fused_linear_logprobs``: ``(logp, ent, lse, plan)``; ``logp``, ``ent``,
    ``lse`` fp32, ``ent`` empty unless ``want_entropy``, ``lse`` (per active row, for backward) empty unless
    ``want_lse``; ``plan`` the rows visited. Without gradients it is called directly (``want_lse=False``):
    no autograd node, no log-sum-exp kept."""
    n, dev = h.shape[0], h.device
    plan = _Rows(active, n)
    single = (
        plan.idx is None and plan.count <= rows
    )  # one chunk of every row: its results are the outputs
    # every row is written when none is masked (zeros otherwise); no entropy buffer unless asked
    logp = (
        None
        if single
        else (torch.empty if plan.idx is None else torch.zeros)(n, dtype=torch.float32, device=dev)
    )
    ent = (
        torch.zeros(n, dtype=torch.float32, device=dev)
        if want_entropy and not single
        else torch.zeros(0, dtype=torch.float32, device=dev)
    )
    lse_all = torch.empty(
        plan.count if want_lse and not single else 0, dtype=torch.float32, device=dev
    )
    # Without a log-sum-exp to keep, z is not read after log_softmax: on the CPU it writes its output over z
    # (the same values bit for bit: its kernel reads a row fully before writing it), one (rows, V) buffer fewer.
    over_z = not want_lse and dev.type == "cpu"
    pos = 0
    for sel in plan.chunks(rows):
        z = _logits_fp32(plan.take(h, sel), w, b, inv_t, tr)
        y = plan.take(tokens, sel)[:, None]
        # log_softmax is one fused pass (logsumexp is four: max, subtract, exp-sum, log); the
        # log-sum-exp for backward is then z[y] − log q(y)
        logq = torch.log_softmax(z, -1, out=z) if over_z else torch.log_softmax(z, -1)
        lp = logq.gather(1, y).squeeze(1)
        if want_lse:
            lse = z.gather(1, y).squeeze(1) - lp
            if not math.isfinite(float(lse.sum())):  # z[y] = ±inf / NaN: those rows the long way
                lse = torch.where(torch.isfinite(lse), lse, torch.logsumexp(z, -1))
            lse_all = plan.store(
                lse_all, None if sel is None else slice(pos, pos + z.shape[0]), lse
            )
        pos += z.shape[0]
        logp = plan.store(logp, sel, lp)
        if want_entropy:
            q = logq.exp_()  # logq is dead after this: reuse it for q
            ent = plan.store(ent, sel, torch.special.entr(q).sum(-1))  # entr(0) = 0: no 0·log 0 NaN
    return logp, ent, lse_all, plan


@differentiable_once
class FusedLinearLogprobsFunction(torch.autograd.Function):
    """(h, W, b) ↦ (log q(y) per token, entropy per token), both (N,) fp32, 0 on inactive rows."""

    @staticmethod
    def forward(
        ctx,
        h,
        w,
        b,
        tokens,
        active,
        temperature: float,
        rows: int,
        want_entropy: bool,
        tr: HeadTransform = _IDENTITY,
    ):
        inv_t = 1.0 / temperature
        if torch.compiler.is_compiling():
            options = [inv_t, rows, want_entropy, *compiled.head_options(tr)]
            logp, ent, lse = compiled.call("logprobs", (h, w, b, tokens, active), "", options)
            ctx.save_for_backward(h, w, b, tokens, active, lse, ent)
        else:
            logp, ent, lse, plan = logprobs_pass(
                h, w, b, tokens, active, inv_t, rows, want_entropy, tr, True
            )
            ctx.save_for_backward(h, w, b, tokens, plan.idx, lse, ent)
            ctx.count = plan.count
        ctx.rows, ctx.inv_t, ctx.tr, ctx.want_entropy = rows, inv_t, tr, want_entropy
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        if not ctx.want_entropy:
            g_ent = None  # a compiled graph passes zeros for the non-differentiable output
        if g_logp is None and g_ent is None:
            return (None,) * 9
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        h, w, b, tokens, rows_or_idx, lse, ent = ctx.saved_tensors
        if torch.compiler.is_compiling():
            options = [ctx.inv_t, ctx.rows, *need, *compiled.head_options(ctx.tr)]
            tensors = (h, w, b, tokens, rows_or_idx, lse, ent, g_logp, g_ent)
            grads = compiled.call("logprobs_grad", tensors, "", options)
            grads = [g if n else None for g, n in zip(grads, need)]
        else:
            plan = _Rows(None, ctx.count)
            plan.idx = rows_or_idx  # the same compacted rows as forward, without a second sync
            grads = logprobs_grads(
                h, w, b, tokens, plan, lse, ent, g_logp, g_ent, ctx.rows, ctx.inv_t, ctx.tr, need
            )
        return (*grads, None, None, None, None, None, None)


def logprobs_grads(
    h,
    w,
    b,
    tokens,
    plan: _Rows,
    lse_all,
    ent,
    g_logp,
    g_ent,
    rows: int,
    inv_t: float,
    tr: HeadTransform,
    need,
) -> list:
    """(∂h, ∂W, ∂b) of ``Σ g_logp · logp + g_ent · ent`` (None where not in ``need``), recomputing
    each chunk's logits; ``lse_all`` the log-sum-exp of each row ``plan`` visits, in its order."""
    need_h, need_w, need_b = need
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
    pos = 0
    for sel in plan.chunks(rows):
        hc = plan.take(h, sel)
        z, dydz = _logits_fp32(hc, w, b, inv_t, tr, want_deriv=True)
        r = z.shape[0]
        lse = lse_all[pos : pos + r, None]
        pos += r
        logq = z.sub_(lse)
        q = logq.exp()
        g = torch.zeros_like(q)
        if g_ent is not None:
            ge = plan.take(g_ent, sel)[:, None].float()
            he = plan.take(ent, sel)[:, None]
            # −g_H q (log q + H); where q = 0 the term is 0 (log q may be −inf)
            g = torch.where(q > 0, q * (logq + he), g).mul_(-ge)
        if g_logp is not None:
            gl = plan.take(g_logp, sel)[:, None].float()
            g.sub_(q * gl)
            g.scatter_add_(1, plan.take(tokens, sel)[:, None], gl)
        del z, q
        g = g.mul_(inv_t)
        if dydz is not None:
            g = g.mul_(dydz)  # through the logit scale / softcap: ∂/∂z = ∂/∂y · ∂y/∂z
        del dydz
        g = g.to(h.dtype)
        fold_chunk_grad(plan, sel, g, w, hc, (grad_h, grad_w, grad_b))
    if grad_w is not None:
        grad_w = grad_w.to(w.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(b.dtype)
    return [grad_h, grad_w, grad_b]


# Under torch.compile: forward returns the log-sum-exp of every row (0 where inactive) instead of
# the active rows' only (their number is data dependent); backward compacts it again.


def _logprobs_run(tensors, backend, o):
    h, w, b, tokens, active = tensors
    logp, ent, lse, plan = logprobs_pass(
        h, w, b, tokens, active, o[0], int(o[1]), bool(o[2]), compiled.head_from(o[3:5]), True
    )
    full = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    plan.put(full, plan.idx if plan.idx is not None else slice(0, plan.count), lse)
    return [logp, ent, full]


def _logprobs_fake(tensors, backend, o):
    h = tensors[0]
    row = h.new_empty(h.shape[0], dtype=torch.float32)
    return [row, row.clone() if o[2] else row.new_empty(0), row.clone()]


def _logprobs_grad_run(tensors, backend, o):
    h, w, b, tokens, active, lse, ent, g_logp, g_ent = tensors
    plan = _Rows(active, h.shape[0])
    lse = lse if plan.idx is None else lse.index_select(0, plan.idx)
    need = tuple(bool(x) for x in o[2:5])
    return logprobs_grads(
        h,
        w,
        b,
        tokens,
        plan,
        lse,
        ent,
        g_logp,
        g_ent,
        int(o[1]),
        o[0],
        compiled.head_from(o[5:7]),
        need,
    )


def _logprobs_grad_fake(tensors, backend, o):
    h, w, b = tensors[:3]
    need = [bool(x) for x in o[2:5]]
    return [
        h.new_empty(h.shape) if need[0] else None,
        w.new_empty(w.shape) if need[1] else None,
        b.new_empty(b.shape) if need[2] and b is not None else None,
    ]


compiled.register_family("logprobs", _logprobs_run, _logprobs_fake)
compiled.register_family("logprobs_grad", _logprobs_grad_run, _logprobs_grad_fake)
