"""Plain PyTorch definitions of every divergence: the ground truth of the tests.

Readable, unfused and dtype-generic (the tests run it in float64). Every formula is the one in
``docs/MATH.md``; nothing here is tuned for speed or memory.

Each ``*_per_token`` function takes student logits ``s`` and teacher logits ``t`` of shape ``(..., V)`` and
returns the per-token divergence of shape ``(...)``. ``kd_loss`` adds temperature, mask, token weights and
the reduction, with the same semantics as the public functions.
"""

from __future__ import annotations

import math

import torch

from ._spec import Divergence

__all__ = [
    "alpha_beta_per_token",
    "cross_entropy_per_token",
    "forward_kl_per_token",
    "jeffreys_per_token",
    "jsd_per_token",
    "kd_loss",
    "per_token",
    "renyi_per_token",
    "reverse_kl_per_token",
    "skew_forward_kl_per_token",
    "skew_reverse_kl_per_token",
    "sparse_kd_loss",
    "sparse_per_token",
    "tvd_per_token",
]


def _plogp_ratio(logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v − log r_v) with the convention 0 · log 0 = 0 (p_v = 0 columns contribute 0)."""
    p = logp.exp()
    term = torch.where(p > 0, p * (logp - logr), torch.zeros_like(p))
    return term.sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), formed in log space so it never underflows to log 0."""
    return torch.logaddexp(math.log(w) + log_a, math.log1p(-w) + log_b)


def forward_kl_per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q), p = softmax(t), q = softmax(s)."""
    return _plogp_ratio(t.log_softmax(-1), s.log_softmax(-1))


def reverse_kl_per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) = Σ q (log q − log p)."""
    return _plogp_ratio(s.log_softmax(-1), t.log_softmax(-1))


def skew_forward_kl_per_token(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(p‖m) with m = α p + (1−α) q."""
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    return _plogp_ratio(lp, _log_mix(lp, lq, alpha))


def skew_reverse_kl_per_token(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(q‖m') with m' = (1−α) p + α q."""
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    return _plogp_ratio(lq, _log_mix(lq, lp, alpha))


def jsd_per_token(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """β KL(p‖M) + (1−β) KL(q‖M) with M = β p + (1−β) q."""
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    lm = _log_mix(lp, lq, beta)
    return beta * _plogp_ratio(lp, lm) + (1.0 - beta) * _plogp_ratio(lq, lm)


def tvd_per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ |p − q| (autograd takes sign(0) = 0, as MATH.md does)."""
    return 0.5 * (t.softmax(-1) - s.softmax(-1)).abs().sum(-1)


def jeffreys_per_token(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) + KL(q‖p) = Σ (p − q)(log p − log q)."""
    return forward_kl_per_token(s, t) + reverse_kl_per_token(s, t)


def alpha_beta_per_token(
    s: torch.Tensor, t: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """ABKD's α-β divergence −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)], α, β > 0.

    Powers are taken as exp(α log p) so a zero probability gives 0 (and gradient 0), never 0^α through log 0.
    """
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    ab = alpha + beta
    terms = (
        (alpha * lp + beta * lq).exp() - alpha / ab * (ab * lp).exp() - beta / ab * (ab * lq).exp()
    )
    return -terms.sum(-1) / (alpha * beta)


def renyi_per_token(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rényi divergence 1/(α−1) log Σ p^α q^(1−α), α > 0, α ≠ 1 (p_v = 0 terms are 0, also for α > 1)."""
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    mix = alpha * lp + (1.0 - alpha) * lq
    mix = torch.where(lp == -math.inf, torch.full_like(mix, -math.inf), mix)
    return torch.logsumexp(mix, -1) / (alpha - 1.0)


def per_token(
    divergence: str,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Dispatch by name; ``alpha`` / ``beta`` None take the divergence's default (``kd_kernels._spec``)."""
    params = Divergence.parse(divergence).info.params
    given = {"alpha": alpha, "beta": beta}
    kw = {p.keyword: (p.default if given[p.keyword] is None else given[p.keyword]) for p in params}
    return _PER_TOKEN[divergence](s, t, **kw)


_PER_TOKEN = {
    "forward_kl": forward_kl_per_token,
    "reverse_kl": reverse_kl_per_token,
    "skew_forward_kl": skew_forward_kl_per_token,
    "skew_reverse_kl": skew_reverse_kl_per_token,
    "jsd": jsd_per_token,
    "tvd": tvd_per_token,
    "jeffreys": jeffreys_per_token,
    "alpha_beta": alpha_beta_per_token,
    "renyi": renyi_per_token,
}


def kd_loss(
    divergence: str,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    temperature: float = 1.0,
    interpolation: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss the public functions compute, written out plainly.

    ``interpolation`` λ < 1 replaces the tempered teacher logits by ``λ t/T + (1 − λ) sg(s/T)`` (TAID).
    ``sum = Σ k_i w_i L_i``, ``mean = sum / max(1, Σ k_i)``, ``none = k_i w_i L_i`` (MATH.md, Reductions),
    where a masked row (k_i = 0) adds exactly 0 whatever its weight or its loss.
    Computed in the dtype of ``s`` (pass float64 tensors for a reference value).
    """
    ss, tt = s / temperature, t.to(s.dtype) / temperature
    if interpolation != 1.0:
        tt = interpolation * tt + (1.0 - interpolation) * ss.detach()
    L = per_token(divergence, ss, tt, alpha=alpha, beta=beta)
    k = torch.ones_like(L) if mask is None else mask.to(L.dtype)
    w = k if token_weights is None else token_weights.to(L.dtype)
    if mask is not None and token_weights is not None:
        # a select: a masked row's weight (even NaN or inf) never reaches the sum (0·NaN would be NaN)
        w = torch.where(mask, w, torch.zeros_like(w))
    # where() rather than a product so a masked row's value (even inf) never leaks in as 0·inf = NaN.
    weighted = torch.where(w != 0, w * L, torch.zeros_like(L))
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / k.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy_per_token(
    s: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """−log softmax(s)[label], 0 where ``labels == ignore_index``."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -s.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, nll, torch.zeros_like(nll))


# ------------------------------------------------------------------------------------------------
# Sparse teachers (MATH.md, "Sparse teachers"): the teacher is K ids and their log-probs per token.
# ------------------------------------------------------------------------------------------------

# The teacher's tail 1 − P is clamped to this floor (after rounding it can be ≤ 0), so that
# reverse-type divergences stay finite; the K+1 teacher categories are then renormalized.
SPARSE_TAIL_FLOOR = 1e-6


def _sparse_row(
    divergence: str,
    s: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    tail: str,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """One row: s (V,) student logits (already divided by T), ids (K,), lp (K,) teacher log-probs."""
    valid = lp != -math.inf
    ids_v, lp_v = ids[valid].long(), lp[valid].to(s.dtype)
    lq = s.log_softmax(-1)
    if not bool(valid.any()):  # all padding: no teacher information, the row contributes 0
        return (lq * 0.0).sum()
    if tail == "ignore":  # forward KL on the given ids only: Σ_k p_k (ℓ_k − log q_{i_k})
        return (lp_v.exp() * (lp_v - lq[ids_v])).sum()
    if tail == "renormalize":  # p̂ = p/P, q̂ = q/Q on S: log_softmax over the support does both
        return per_token(divergence, lq[ids_v], lp_v, alpha=alpha, beta=beta)
    if tail != "bucket":
        raise ValueError(f"unknown tail {tail!r}")
    in_support = torch.zeros_like(lq, dtype=torch.bool)
    in_support[ids_v] = True
    lq_cat, lp_cat = lq[ids_v], lp_v
    if not bool(in_support.all()):  # a tail category exists: "everything else"
        lq_tail = lq[~in_support].logsumexp(-1)
        p_tail = (-torch.expm1(lp_v.logsumexp(-1))).clamp_min(SPARSE_TAIL_FLOOR)
        lq_cat = torch.cat([lq_cat, lq_tail[None]])
        lp_cat = torch.cat([lp_cat, p_tail.log()[None]])
    # per_token applies log_softmax: a no-op on the student's categories (they sum to 1), the
    # renormalization of the teacher's when its tail was clamped.
    return per_token(divergence, lq_cat, lp_cat, alpha=alpha, beta=beta)


def sparse_per_token(
    divergence: str,
    s: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    *,
    tail: str = "bucket",
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Per-token divergence against a sparse teacher, one row at a time (readable, slow).

    ``s`` (..., V) student logits (temperature already applied), ``ids`` (..., K), ``lp`` (..., K)
    teacher log-probs with −inf = padding. ``tail``: "bucket" compares the K+1 categories (the ids
    and everything else; teacher tail max(1 − P, SPARSE_TAIL_FLOOR), renormalized), "renormalize"
    the K ids renormalized on both sides, "ignore" is Σ_k p_k (ℓ_k − log q_{i_k}).
    """
    v = s.shape[-1]
    s2, ids2, lp2 = s.reshape(-1, v), ids.reshape(-1, ids.shape[-1]), lp.reshape(-1, lp.shape[-1])
    rows = [
        _sparse_row(divergence, s2[i], ids2[i], lp2[i], tail, alpha, beta)
        for i in range(s2.shape[0])
    ]
    out = torch.stack(rows) if rows else s2.new_zeros(0)
    return out.reshape(s.shape[:-1])


def sparse_kd_loss(
    divergence: str,
    s: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    *,
    tail: str = "bucket",
    alpha: float | None = None,
    beta: float | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``kd_kernels.sparse_kd`` written out plainly: the temperature divides the student only.

    Masked rows are not evaluated (their ids may be anything); reductions as in ``kd_loss``.
    """
    lead = s.shape[:-1]
    k = torch.ones(lead, dtype=s.dtype) if mask is None else mask.to(s.dtype)
    n, v = lead.numel(), s.shape[-1]
    s2, kk = (s / temperature).reshape(n, v), k.reshape(n)
    ids2, lp2 = ids.reshape(n, ids.shape[-1]), lp.reshape(n, lp.shape[-1])
    rows = [
        _sparse_row(divergence, s2[i], ids2[i], lp2[i], tail, alpha, beta)
        if kk[i] != 0
        else s2.new_zeros(())
        for i in range(n)
    ]
    L = (torch.stack(rows) if rows else s2.new_zeros(0)).reshape(lead)
    w = k if token_weights is None else k * token_weights.to(L.dtype)
    weighted = torch.where(w != 0, w * L, torch.zeros_like(L))
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / k.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")
