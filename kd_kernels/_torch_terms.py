"""The divergence family in torch: one definition of each divergence, the only place the torch
code knows its math (MATH.md, the two tables and "More divergences"; kd_kernels/_spec.py lists the
other kernel languages). Every torch path derives its loss and gradient from :data:`TERMS` (and
Rényi's two pieces, ``renyi_mixed`` and ``renyi_a``):

- the dense torch backend (``_backends/torch_backend.py``, ``rows_loss_and_dlogits``), whole rows;
- the sparse torch path (``_sparse_impl.category_terms``), the K (+ 1) coarse-grained categories;
- the vocabulary-parallel torch passes (``_vocab_parallel.TorchVocabParallel``), each shard:
  the row sums and the gradient from the shard's global log-probabilities, forward / reverse KL's
  local statistic from the same terms over the shard's unnormalized weights, Rényi from its two
  pieces with R's log-sum-exp from the exchange.

``kd_kernels/reference.py`` (the float64 ground truth) stays independent of this module.

Each entry maps fp32 (rows, V) log-probabilities ℓq, ℓp and q = e^ℓq, p = e^ℓp (None: formed here if
needed; read only: the callers use q, p afterwards) to
  L  (rows,)    the per-token loss,
  a  (rows, V)  ∂L/∂ℓq_v, up to any multiple of q (it cancels in the gradient); a new tensor (the
                callers may overwrite it),
  A             Σ_v a_v as a (rows,) tensor, or 0.0 when a multiple of q was added to make it 0
                (then a is the gradient itself, and must be NaN wherever ℓq or ℓp is),
and every caller forms the gradient ∂L/∂s̃_j = a_j − q_j A. want_grad=False: (L, None, None).

guard: the 0·log 0 = 0 convention where q or p is 0 (a −inf log-probability), through ``_pos``.
guard=False leaves those products as they come (0·(−inf) = NaN): the dense backend runs that cheaper
form first and redoes, guarded, only the rows whose loss is not finite; a row with a zero
probability always has one (the NaN product sits in L's sum), and every other row is the same
either way.
"""

from __future__ import annotations

import math

import torch

from ._spec import Divergence, KDSpec

Terms = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | float | None"]


def where_pos(cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where cond else 0: the 0·log 0 = 0 convention, without letting 0·(−inf) = NaN through."""
    return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 − w) b), a new tensor (written over its first term: one buffer fewer)."""
    x = log_a + math.log(w)
    return torch.logaddexp(x, log_b + math.log1p(-w), out=x)


def _pos(guard: bool, prob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where prob > 0 else 0 (guard), or x itself."""
    return where_pos(prob > 0, x) if guard else x


def _exp(lx: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    return lx.exp() if x is None else x


def _xlog(prob: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """prob · (log_a − log_b), a new tensor (0·(−inf) = NaN where prob = 0: callers guard it)."""
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


# Rényi is not a sum of per-element terms (L = log R / (α−1), R = Σ_v p^α q^(1−α)): its definition
# is these two pieces around R's log-sum-exp, which the dense form takes over the row and the
# vocabulary-parallel form gets from its exchange (of the mixed logits' own max and log Z).


def renyi_mixed(lq: torch.Tensor, lp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(p^α q^(1−α)) = α ℓp + (1−α) ℓq, −inf where ℓp is (a p = 0 term is 0 even when α > 1
    and q = 0); a constant shift of ℓq or ℓp (logits relative to their maxima) shifts it by one."""
    mix = alpha * lp + (1 - alpha) * lq
    return torch.where(lp == -math.inf, -math.inf, mix)


def renyi_a(q: torch.Tensor, mix: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """a = q − r, r = e^(mix − log R) (Σ_v r_v = 1: A = 0, a is the gradient); log_r (rows, 1)."""
    return q - (mix - log_r).exp()


def _renyi(lq, lp, q, p, spec: KDSpec, *, guard=True, want_grad=True) -> Terms:
    mix = renyi_mixed(lq, lp, spec.coef)
    lse = torch.logsumexp(mix, -1, keepdim=True)
    loss = lse[:, 0] / (spec.coef - 1)
    if not want_grad:
        return loss, None, None
    return loss, renyi_a(_exp(lq, q), mix, lse), 0.0


# The divergences whose terms use q (besides the gradient, which always does) and those that use p.
_D = Divergence
USES_Q = frozenset({_D.REVERSE_KL, _D.SKEW_REVERSE_KL, _D.JSD, _D.TVD, _D.JEFFREYS})
USES_P = frozenset({_D.FORWARD_KL, _D.SKEW_FORWARD_KL, _D.JSD, _D.TVD, _D.JEFFREYS})

TERMS = {
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
