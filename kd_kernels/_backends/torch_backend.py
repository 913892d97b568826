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
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


# ----------------------------------------------------------------------------------------------------------------
# The divergence family, one definition each (MATH.md tables; kd_kernels/_spec.py lists the other places).
# Each maps fp32 (rows, V) log-probabilities ℓq, ℓp and q = e^ℓq, p = e^ℓp (read only: the sparse categories and
# the vocabulary-parallel shards call the same functions and use q, p afterwards) to
#   L  (rows,)    the per-token loss,
#   a  (rows, V)  ∂L/∂ℓq_v, up to any multiple of q (it cancels below); a new tensor (it is overwritten),
#   A             Σ_v a_v as a (rows,) tensor, or 0.0 when a multiple of q was added to make it 0 (then a is the
#                 gradient itself, and must be NaN wherever ℓq or ℓp is),
# and rows_loss_and_dlogits forms the gradient ∂L/∂s̃_j = a_j − q_j A for all of them.
# ----------------------------------------------------------------------------------------------------------------
Terms = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | float"]


def _forward_kl(lq, lp, q, p, spec: KDSpec) -> Terms:
    d = torch.sub(lp, lq).mul_(p).masked_fill_(p == 0, 0.0)  # p (ℓp − ℓq), 0 where p = 0
    return d.sum(-1), q - p, 0.0  # a = −p + q (a new tensor: the inputs are shared, never written)


def _reverse_kl(lq, lp, q, p, spec: KDSpec) -> Terms:
    a = _where_pos(q > 0, q * (lq - lp))
    loss = a.sum(-1)
    return loss, a, loss


def _skew_forward_kl(lq, lp, q, p, spec: KDSpec) -> Terms:
    d = lp - _log_mix(lp, lq, spec.coef)  # log(p / m), m = α p + (1−α) q
    r = _where_pos(p > 0, d.exp())
    a = -(1 - spec.coef) * q * r
    return _where_pos(p > 0, p * d).sum(-1), a, a.sum(-1)


def _skew_reverse_kl(lq, lp, q, p, spec: KDSpec) -> Terms:
    d = lq - _log_mix(lq, lp, spec.coef)  # log(q / m'), m' = α q + (1−α) p
    a = q * _where_pos(q > 0, d - spec.coef * d.exp())
    return _where_pos(q > 0, q * d).sum(-1), a, a.sum(-1)


def _jsd(lq, lp, q, p, spec: KDSpec) -> Terms:
    b = spec.coef
    lm = _log_mix(lp, lq, b)  # M = β p + (1−β) q
    wq = _where_pos(q > 0, lq - lm)
    loss = b * _where_pos(p > 0, p * (lp - lm)).sum(-1) + (1 - b) * (q * wq).sum(-1)
    a = (1 - b) * q * wq
    return loss, a, a.sum(-1)


def _tvd(lq, lp, q, p, spec: KDSpec) -> Terms:
    diff = q - p
    a = 0.5 * q * diff.sign()
    return 0.5 * diff.abs().sum(-1), a, a.sum(-1)


def _jeffreys(lq, lp, q, p, spec: KDSpec) -> Terms:
    rev = _where_pos(q > 0, q * (lq - lp))
    rkl = rev.sum(-1)
    loss = _where_pos(p > 0, p * (lp - lq)).sum(-1) + rkl
    return loss, rev - p, rkl - 1.0  # Σ (−p) = −1


def _alpha_beta(lq, lp, q, p, spec: KDSpec) -> Terms:
    al, be = spec.coef, spec.coef2
    ab = al + be
    pq = (al * lp + be * lq).exp()  # p^α q^β; exp of −inf is 0, so zero probabilities need no guard
    qq = (ab * lq).exp()
    terms = pq - (al / ab) * (ab * lp).exp() - (be / ab) * qq
    a = (qq - pq) / al  # (1/α) q^β (q^α − p^α)
    return terms.sum(-1) / -(al * be), a, a.sum(-1)


def _renyi(lq, lp, q, p, spec: KDSpec) -> Terms:
    al = spec.coef
    mix = al * lp + (1 - al) * lq  # log(p^α q^(1−α)); a p = 0 term is 0 even when α > 1 and q = 0
    mix = torch.where(lp == -math.inf, -math.inf, mix)
    lse = torch.logsumexp(mix, -1, keepdim=True)
    return lse[:, 0] / (al - 1), q - (mix - lse).exp(), 0.0  # a = −r + q


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


def rows_loss_and_dlogits(
    lq: torch.Tensor, lp: torch.Tensor, spec: KDSpec, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss L and ∂L/∂s̃ = a − q A from fp32 log-probabilities (MATH.md, the two tables).

    A row that is not a distribution (a NaN, a +inf, all −inf, or overflow after 1/T) reaches here as a row of
    NaN: log_softmax's sum of exponentials is NaN for it (NaN − max, inf − inf, −inf − (−inf)). Such a row gets
    loss NaN and an all-NaN gradient row (the decided semantics, the same on every backend); checking column 0
    finds it. Valid rows never hold a NaN log-probability.
    """
    q, p = lq.exp(), lp.exp()
    loss, a, big_a = _TERMS[spec.divergence](lq, lp, q, p, spec)
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


class TorchBackend(Backend):
    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu")

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        return []  # plain ops run wherever torch does

    def loss_grad(self, s, t, row_weight, spec, grad):
        n, v = s.shape
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        rows = max(1, _CHUNK_BYTES // (_LIVE_BUFFERS * 4 * max(v, 1)))
        inv_t = 1.0 / spec.temperature
        lam = spec.interpolation
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            w = row_weight[lo:hi]
            active = (w != 0)[:, None]
            # fp32 at T = 1 needs no tempered copy: log_softmax does not write its input
            xs = s[lo:hi].float() if inv_t == 1.0 else s[lo:hi].float() * inv_t
            if lam != 1.0:  # TAID: the teacher becomes λ t̃ + (1 − λ) sg(s̃) (MATH.md, More divergences)
                xt = (t[lo:hi].float() * inv_t).mul_(lam).add_(xs, alpha=1.0 - lam)
            else:
                xt = t[lo:hi].float() if inv_t == 1.0 else t[lo:hi].float() * inv_t
            lq = xs.log_softmax(-1)
            lp = xt.log_softmax(-1)
            del xs, xt  # two (rows, V) buffers fewer while the terms are live
            L, g = rows_loss_and_dlogits(lq, lp, spec, grad is not None)
            loss[lo:hi] = _where_pos(active[:, 0], L)
            if grad is not None:
                # written straight into the gradient (any float dtype); masked rows exactly 0, even if NaN
                out = grad[lo:hi]
                torch.mul(g, (w * inv_t)[:, None], out=out)
                out.masked_fill_(~active, 0.0)
        return loss


register(TorchBackend())
