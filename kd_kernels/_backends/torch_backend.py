"""The "torch" backend: the fused loss + gradient in plain PyTorch ops, any device, a chunk of rows at a time.

It never holds more than the gradient plus one chunk's fp32 temporaries (about ten (rows, V) buffers), instead of
the five full-size fp32 copies that autograd through log_softmax keeps. Masked rows are computed and then zeroed
(skipping them would need a host sync to compact the rows); the compiled backends do not read them at all.
"""

from __future__ import annotations

import math

import torch

from .._spec import Divergence, KDSpec
from . import Backend, register

# fp32 temporaries per chunk; ~10 live (rows, V) buffers, so this bounds the chunk at ~64 MiB of scratch.
_CHUNK_BYTES = 64 * 2**20
_LIVE_BUFFERS = 10


def _where_pos(cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where cond else 0: the 0·log 0 = 0 convention, without letting 0·(−inf) = NaN through."""
    return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 − w) b), a new tensor (written over its first term: one (rows, V) buffer fewer)."""
    x = log_a + math.log(w)
    return torch.logaddexp(x, log_b + math.log1p(-w), out=x)


# ----------------------------------------------------------------------------------------------------------------
# The divergence family, one definition each (MATH.md tables; kd_kernels/_spec.py lists the other places).
# Each maps fp32 (rows, V) log-probabilities ℓq, ℓp and q = e^ℓq, p = e^ℓp (None: formed here if needed; read
# only: the sparse categories and the vocabulary-parallel shards call the same functions and use q, p afterwards)
# to
#   L  (rows,)    the per-token loss,
#   a  (rows, V)  ∂L/∂ℓq_v, up to any multiple of q (it cancels below); a new tensor (it is overwritten),
#   A             Σ_v a_v as a (rows,) tensor, or 0.0 when a multiple of q was added to make it 0 (then a is the
#                 gradient itself, and must be NaN wherever ℓq or ℓp is),
# and rows_loss_and_dlogits forms the gradient ∂L/∂s̃_j = a_j − q_j A for all of them. want_grad=False: (L, None,
# None), the loss alone.
#
# guard: the 0·log 0 = 0 convention where q or p is 0 (a −inf log-probability), through `pos`. guard=False leaves
# those products as they come (0·(−inf) = NaN): rows_loss_and_dlogits runs that cheaper form first and redoes,
# guarded, only the rows whose loss is not finite; a row with a zero probability always has one (the NaN product
# sits in L's sum), and every other row is the same either way.
# ----------------------------------------------------------------------------------------------------------------
Terms = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | float | None"]


def _pos(guard: bool, prob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where prob > 0 else 0 (guard), or x itself."""
    return _where_pos(prob > 0, x) if guard else x


def _exp(lx: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    return lx.exp() if x is None else x


def _xlog(prob: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """prob · (log_a − log_b), a new tensor (0·(−inf) = NaN where prob = 0: the callers guard it)."""
    return torch.sub(log_a, log_b).mul_(prob)


def _forward_kl(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    p_ = _exp(lp, p)
    d = _xlog(p_, lp, lq)
    loss = _pos(guard, p_, d).sum(-1)
    if not want_grad:
        return loss, None, None
    # a = −p + q, into d's buffer (dead once summed; the inputs are shared and never written)
    return loss, torch.sub(_exp(lq, q), p_, out=d), 0.0


def _reverse_kl(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    q_ = _exp(lq, q)
    a = _pos(guard, q_, _xlog(q_, lq, lp))
    loss = a.sum(-1)
    return (loss, a, loss) if want_grad else (loss, None, None)


def _skew_forward_kl(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    m = _log_mix(lp, lq, spec.coef)
    d = torch.sub(lp, m, out=m)  # log(p / m), m = α p + (1−α) q
    p_ = _exp(lp, p)
    loss = _pos(guard, p_, p_ * d).sum(-1)
    if not want_grad:
        return loss, None, None
    a = _pos(guard, p_, d.exp_()).mul_(_exp(lq, q)).mul_(-(1 - spec.coef))  # −(1−α) q p / m
    return loss, a, a.sum(-1)


def _skew_reverse_kl(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    m = _log_mix(lq, lp, spec.coef)
    d = torch.sub(lq, m, out=m)  # log(q / m'), m' = α q + (1−α) p
    q_ = _exp(lq, q)
    loss = _pos(guard, q_, q_ * d).sum(-1)
    if not want_grad:
        return loss, None, None
    a = q_ * _pos(guard, q_, d - spec.coef * d.exp())
    return loss, a, a.sum(-1)


def _jsd(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    b = spec.coef
    lm = _log_mix(lp, lq, b)  # M = β p + (1−β) q
    q_, p_ = _exp(lq, q), _exp(lp, p)
    wq = _pos(guard, q_, lq - lm).mul_(q_)  # q log(q / M)
    lpm = _pos(guard, p_, torch.sub(lp, lm, out=lm).mul_(p_))  # p log(p / M), over lm (dead now)
    loss = b * lpm.sum(-1) + (1 - b) * wq.sum(-1)
    if not want_grad:
        return loss, None, None
    a = wq.mul_(1 - b)
    return loss, a, a.sum(-1)


def _tvd(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    diff = lq.exp().sub_(_exp(lp, p)) if q is None else q - _exp(lp, p)  # q − p, a new tensor
    if not want_grad:
        return 0.5 * diff.abs_().sum(-1), None, None
    loss = 0.5 * diff.abs().sum(-1)
    a = diff.sign_().mul_(_exp(lq, q)).mul_(0.5)
    return loss, a, a.sum(-1)


def _jeffreys(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    q_, p_ = _exp(lq, q), _exp(lp, p)
    rev = _pos(guard, q_, _xlog(q_, lq, lp))
    rkl = rev.sum(-1)
    loss = _pos(guard, p_, _xlog(p_, lp, lq)).sum(-1) + rkl
    if not want_grad:
        return loss, None, None
    return loss, rev.sub_(p_), rkl - 1.0  # a = rev − p, Σ (−p) = −1


def _alpha_beta(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    al, be = spec.coef, spec.coef2
    ab = al + be
    pq = (al * lp + be * lq).exp()  # p^α q^β; exp of −inf is 0, so zero probabilities need no guard
    qq = (ab * lq).exp()
    terms = pq - (al / ab) * (ab * lp).exp() - (be / ab) * qq
    loss = terms.sum(-1) / -(al * be)
    if not want_grad:
        return loss, None, None
    a = qq.sub_(pq).div_(al)  # (1/α) q^β (q^α − p^α)
    return loss, a, a.sum(-1)


def _renyi(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    al = spec.coef
    mix = al * lp + (1 - al) * lq  # log(p^α q^(1−α)); a p = 0 term is 0 even when α > 1 and q = 0
    mix = torch.where(lp == -math.inf, -math.inf, mix)
    lse = torch.logsumexp(mix, -1, keepdim=True)
    if not want_grad:
        return lse[:, 0] / (al - 1), None, None
    return lse[:, 0] / (al - 1), _exp(lq, q) - (mix - lse).exp(), 0.0  # a = −r + q


# The divergences whose terms use q (besides the gradient, which always does) and those that use p.
_USES_Q = frozenset(
    {Divergence.REVERSE_KL, Divergence.SKEW_REVERSE_KL, Divergence.JSD, Divergence.TVD, Divergence.JEFFREYS}
)
_USES_P = frozenset(
    {Divergence.FORWARD_KL, Divergence.SKEW_FORWARD_KL, Divergence.JSD, Divergence.TVD, Divergence.JEFFREYS}
)

_TERMS = {
    Divergence.FORWARD_KL: _forward_kl,
    Divergence.REVERSE_KL: _reverse_kl,
    Divergence.SKEW_FORWARD_KL: _skew_forward_kl,
    Divergence.SKEW_REVERSE_KL: _skew_reverse_kl,
    Divergence.JSD: _jsd,
    Divergence.TVD: _tvd,
    Divergence.JEFFREYS: _jeffreys,
    Divergence.ALPHA_BETA: _alpha_beta,
    Divergence.RENYI: _renyi,
}


def _guarded_rows(
    lq: torch.Tensor, lp: torch.Tensor, spec: KDSpec, want_grad: bool, q: torch.Tensor | None, p: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row L and ∂L/∂s̃ with every 0·log 0 guarded and the NaN-row rule applied (see below)."""
    q = lq.exp() if q is None else q
    loss, a, big_a = _TERMS[spec.divergence](lq, lp, q, p, spec, guard=True, want_grad=want_grad)
    bad = lq[:, 0].isnan() | lp[:, 0].isnan()
    loss = torch.where(bad, math.nan, loss)
    g = None
    if want_grad:
        if isinstance(big_a, float):  # 0.0: a is the gradient, NaN in bad rows already
            g = a
        else:
            # a − q A in place; a NaN A makes a bad row's whole gradient NaN (q · NaN = NaN, also for q = 0).
            big_a = torch.where(bad, math.nan, big_a)
            g = a.addcmul_(q, big_a[:, None], value=-1.0)
    return loss, g


def rows_loss_and_dlogits(
    lq: torch.Tensor,
    lp: torch.Tensor,
    spec: KDSpec,
    want_grad: bool,
    *,
    redo_rows: bool = False,
    q: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss L and ∂L/∂s̃ = a − q A from fp32 log-probabilities (MATH.md, the two tables); ``q``, ``p``:
    the probabilities e^ℓq, e^ℓp where the caller has them (None: formed here where needed).

    A row that is not a distribution (a NaN, a +inf, all −inf, or overflow after 1/T) reaches here as a row of
    NaN: log_softmax's sum of exponentials is NaN for it (NaN − max, inf − inf, −inf − (−inf)). Such a row gets
    loss NaN and an all-NaN gradient row (the decided semantics, the same on every backend); checking column 0
    finds it. Valid rows never hold a NaN log-probability.

    ``redo_rows``: compute every row unguarded first, then redo the rows whose loss is not finite (zero
    probabilities, the NaN rows above, an infinite divergence) guarded. It needs to know on the host whether
    there are such rows, so the caller sets it where that costs no device synchronisation (the CPU).
    """
    if not redo_rows:
        return _guarded_rows(lq, lp, spec, want_grad, q, p)
    if q is None and want_grad:
        q = lq.exp()  # every gradient needs q; the loss alone mostly does not
    loss, a, big_a = _TERMS[spec.divergence](lq, lp, q, p, spec, guard=False, want_grad=want_grad)
    g = None
    if want_grad:
        g = a if isinstance(big_a, float) else a.addcmul_(q, big_a[:, None], value=-1.0)
    # One reduction asks whether any row is not finite (a NaN or ±inf row makes the sum so; a sum that merely
    # overflows finds no row below and redoes nothing); isfinite(loss).all() would be several ops.
    if not math.isfinite(float(loss.sum())):
        idx = (~torch.isfinite(loss)).nonzero()[:, 0]
        loss_r, g_r = _guarded_rows(lq[idx], lp[idx], spec, want_grad, _rows(q, idx), _rows(p, idx))
        loss[idx] = loss_r
        if want_grad:
            g[idx] = g_r
    return loss, g


def _rows(x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[idx]


def _scaled_fp32(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """x / T as a new fp32 buffer: one pass for fp32, the upcast copy scaled in place otherwise."""
    return x * inv_t if x.dtype == torch.float32 else x.float().mul_(inv_t)


def _log_probs(x: torch.Tensor, fresh: bool, want_prob: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ℓ = log_softmax(x) of (rows, V) logits and, if ``want_prob``, e^ℓ as well (else None). ``fresh``: x is an
    fp32 buffer of the caller's that ℓ may overwrite.

    Both from one pass of exponentials (torch's softmax) where both are needed: the row max m is subtracted
    first (the softmax is unchanged), then ℓ = (x − m) + log max e^ℓ (the largest probability is 1/Z, so this is
    (x − m) − log Z), one addition instead of a second pass of exp over the row (measured: 1.4x faster than
    log_softmax then exp at 16 x 8000 on one thread). The max and log Z stay two numbers, as in log_softmax:
    x − LSE would round LSE at the size of m (at logits near 1e6, an ulp of 1/16 in every probability). A row
    that is not a distribution gives NaN (x − m is NaN for a NaN, +inf or all −inf row), as log_softmax does.
    """
    if not want_prob:
        return x.log_softmax(-1, dtype=torch.float32), None
    if x.dtype != torch.float32:
        x, fresh = x.float(), True  # one upcast shared by the max, the softmax and ℓ
    m = x.amax(-1, keepdim=True)
    x = x.sub_(m) if fresh else x - m
    prob = x.softmax(-1)
    return x.add_(prob.amax(-1, keepdim=True).log_()), prob


class TorchBackend(Backend):
    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu")

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        return []  # plain ops run wherever torch does

    def loss_grad(self, s, t, row_weight, spec, grad):
        n, v = s.shape
        rows = max(1, _CHUNK_BYTES // (_LIVE_BUFFERS * 4 * max(v, 1)))
        if n <= rows:  # one chunk: no slicing, no copy of the loss (small calls are overhead-bound)
            return self._chunk(s, t, row_weight, spec, grad)
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            loss[lo:hi] = self._chunk(
                s[lo:hi], t[lo:hi], row_weight[lo:hi], spec, None if grad is None else grad[lo:hi]
            )
        return loss

    @staticmethod
    def _chunk(s, t, w, spec, out):
        """One chunk's per-row loss; its scaled gradient written into ``out`` (None: loss only)."""
        inv_t = 1.0 / spec.temperature
        lam = spec.interpolation
        want_grad = out is not None
        want_q = want_grad or spec.divergence in _USES_Q
        want_p = spec.divergence in _USES_P
        if inv_t == 1.0 and lam == 1.0:
            # no tempered copy: the inputs as they are (bf16 / fp16 upcast once where read)
            lq, q = _log_probs(s, False, want_q)
            lp, p = _log_probs(t, False, want_p)
        else:
            xs = s.float() if inv_t == 1.0 else _scaled_fp32(s, inv_t)
            xt = _scaled_fp32(t, inv_t)
            if lam != 1.0:  # TAID: the teacher becomes λ t̃ + (1 − λ) sg(s̃) (MATH.md, More divergences)
                xt.mul_(lam).add_(xs, alpha=1.0 - lam)
            # ℓ over the scaled copies (xs is s itself when s is fp32 and T = 1: read only then)
            lq, q = _log_probs(xs, xs is not s, want_q)
            lp, p = _log_probs(xt, True, want_p)
            del xs, xt
        # on the CPU, asking whether a row needs the guarded redo (or is masked) costs no device sync
        on_host = s.device.type == "cpu"
        loss, g = rows_loss_and_dlogits(lq, lp, spec, want_grad, redo_rows=on_host, q=q, p=p)
        del lq, lp, q, p
        some_masked = not on_host or not bool(w.all())  # a NaN weight counts as nonzero, as in w != 0
        if some_masked:
            active = w != 0
            loss = _where_pos(active, loss)
        if out is not None:
            # written straight into the gradient (any float dtype); masked rows exactly 0, even if NaN
            torch.mul(g, (w if inv_t == 1.0 else w * inv_t)[:, None], out=out)
            if some_masked:
                out.masked_fill_(~active[:, None], 0.0)
        return loss


register(TorchBackend())
