"""The per-row KD math split at the row-statistics boundary, for a vocabulary sharded over ranks.

MATH.md, "Vocabulary-parallel". A row's vocabulary is split into shards (one per rank); every
divergence is computed in three steps, with an exchange between them that the caller does
(``kd_kernels.parallel`` over ``torch.distributed``; nothing here communicates):

1. ``row_stats(s, t, spec)`` on the local shard → ``(rows, K)`` fp32 local statistics
   (layout below); the caller all-gathers them and ``combine_row_stats`` (shared math, same on
   every rank) turns the ``(P, rows, K)`` gathered values into the global ``(rows, 9)``
   statistics ``[LSE_s, LSE_t, L, C, M_s, log Z_s, M_t, log Z_t, M_u]`` (``M_u``: Rényi only).
   Forward / reverse KL and Rényi have their loss ``L`` from this step already.
2. For skew / JSD / TVD / Jeffreys / alpha-beta (``needs_row_sums(spec)``):
   ``row_sums(s, t, stats, spec)`` → ``(rows, 2)`` local partial sums
   ``[Σ loss terms, A = Σ a_v]`` with ``a_v = ∂L/∂ℓq_v`` (MATH.md "More divergences"), so that
   the gradient is ``a_j − q_j A`` for all five and every backend means the same by ``C``; the
   caller all-reduces (SUM) them and ``with_row_sums`` writes them into ``L`` and ``C = A``.
   With the shard's *global* log-probabilities the loss and ``A`` are sums over the vocabulary.
3. ``loss_grad_given_stats(s, t, stats, row_weight, spec, grad)`` writes the shard's gradient
   ``row_weight[i] · ∂L_i/∂s`` (temperature included) into ``grad`` (may be ``s`` itself) and
   returns the per-row loss ``L_i`` (0 where ``row_weight`` is 0).

Local statistics, per row, of the tempered shard logits ``s̃ = s/T``, ``t̃ = t/T``:
``[m_s, Z_s, m_t, Z_t]`` with ``m`` the shard's max (0 when the shard row is all −inf, so that no
``−inf − (−inf)`` appears) and ``Z = Σ e^{x − m}``, then ``A = Σ e^{t̃−m_t}(t̃ − s̃)`` for
forward_kl or ``B = Σ e^{s̃−m_s}(s̃ − t̃)`` for reverse_kl. Combined with ``M = max_r m_r``:
``Z = Σ_r Z_r e^{m_r − M}`` (same rescaling for A, B), ``LSE = M + log Z``,
``FKL = A/Z_t − LSE_t + LSE_s``, ``RKL = B/Z_s − LSE_s + LSE_t`` (with ``LSE_s − LSE_t`` formed as
``(M_s − M_t) + (log Z_s − log Z_t)``).

Rényi (not a sum of per-element terms: ``L = log R/(α−1)``, ``R = Σ_v p^α q^{1−α}``) adds the
shard max ``m_u`` and ``Z_u`` of the mixed logits ``u = α (t̃ − m_t) + (1−α) (s̃ − m_s)`` (−inf where
``t̃`` is, as in the dense form) to the first exchange (K = 6): formed from differences to the shard's
maxima, never as ``α t̃ + (1−α) s̃``, which rounds at the size of the logits (an ulp is 1/16 at 1e6).
``combine_row_stats`` moves each ``m_u`` to the global maxima (``+ α (m_t − M_t) + (1−α) (m_s − M_s)``,
in float64), so ``M_u + log Σ_r Z_{u,r} e^{m_{u,r} − M_u}`` is the log-sum-exp of
``α (t̃ − M_t) + (1−α) (s̃ − M_s)`` and ``log R = M_u + log Z_u − α log Z_t − (1−α) log Z_s`` comes
out of it in fp32 without overflow (an all-reduced ``Σ p^α q^{1−α}`` overflows fp32 for α > 1
where q ≪ p), without a second exchange and without a difference of large numbers; ``C = log Z_u``
(with ``M_u`` in its own column) and the gradient is ``q − e^{(u − M_u) − log Z_u}`` with
``u = α (t̃ − M_t) + (1−α) (s̃ − M_s)``.

The log-probabilities of the second and third steps are ``(x̃ − M) − log Z`` with the global max
``M`` and ``log Z`` (kept in the global statistics), exact at the max as in ``log_softmax``.

A backend implements :class:`VocabParallelRows` (three calls) with the per-element math it already
has for the dense loss, and ``register``s it; the callers do not change:

- ``torch`` (:class:`TorchVocabParallel`, here): plain torch ops, the shared torch definition of
  each divergence (``kd_kernels/_torch_terms.py``, as the dense and sparse torch paths);
- ``cpu`` (``cpu.CpuVocabParallel``): the compiled kernel (``vp_*`` in csrc/cpu/kd_cpu_kernels.cpp;
  pass 1 of the streaming rows for the statistics, kd_math.h's ``stream_grad`` / ``center_terms``
  given the global statistics), every divergence natively, at every compiled x86-64 level;
- ``triton`` (``triton_backend.TritonVocabParallel``): ``kd_vp_rows_kernel``, a ``MODE`` flag over
  the dense kernel's jitted base-2 helpers (``_row_stats``,
  ``_elem_terms`` / ``_sums_finish``, ``_elem_grad``); it converts at the boundary (raw maxima and
  differences scaled by 1/T on the way out, the global max and log Z turned into base-2
  log-probabilities on the way in), so the statistics it exchanges are the natural-log ones of the
  layout above, as for every backend.

All compute in fp32 from float32 / bfloat16 / float16 shards (the caller chunks the rows). ``resolve``
picks one for ``backend=`` and the tensors' device: "auto" = ``cpu`` for CPU tensors when the
extension is built, ``triton`` for CUDA tensors, else ``torch``; the ``cuda`` backend has none.
"""

from __future__ import annotations

import abc
import math

import torch

from .. import _torch_terms as terms
from .._spec import Divergence, KDSpec

# Columns of the global statistics; the global max M and log Z of each side are kept too, so that
# the log-probabilities are formed as (x̃ − M) − log Z, exact at the max, like log_softmax (x̃ − LSE
# would round LSE at the magnitude of M: a relative error of q of eps·|M| instead of eps·|log Z|).
# Rényi also keeps the global max of its mixed logits in MAX_U (its log Z in CENTER).
LSE_S, LSE_T, LOSS, CENTER, MAX_S, LOGZ_S, MAX_T, LOGZ_T, MAX_U = range(9)
N_GLOBAL = 9


def n_local_stats(spec: KDSpec) -> int:
    """K, the number of local statistics per row that ``row_stats`` returns for this divergence."""
    if spec.divergence == Divergence.RENYI:
        return 6
    return 5 if spec.divergence in (Divergence.FORWARD_KL, Divergence.REVERSE_KL) else 4


# The divergences whose loss comes out of the first exchange (no row sums).
_ONE_EXCHANGE = (Divergence.FORWARD_KL, Divergence.REVERSE_KL, Divergence.RENYI)


def needs_row_sums(spec: KDSpec) -> bool:
    """True when the divergence needs the second exchange (skew / JSD / TVD / Jeffreys / alpha-beta:
    sums over the normalized p, q)."""
    return spec.divergence not in _ONE_EXCHANGE


def _combine_max_sum(m: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, rows) shard maxima and rescaled sums → global max (rows,) and weights e^{m_r − M}."""
    big = m.amax(0)  # NaN in any shard propagates: the row turns NaN on every rank
    return big, (m - big).exp()


def _log_sum_scaled(m: torch.Tensor, z: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """log Σ_r z_r e^{m_r − big} over the (P, rows) shard values, in float64, as fp32 (rows,)."""
    acc = _acc_dtype(z.device)
    w = (m.to(acc) - big.to(acc)[None]).exp()
    return (z.to(acc) * w).sum(0).log().float()


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def combine_row_stats(gathered: torch.Tensor, spec: KDSpec) -> torch.Tensor:
    """``(P, rows, K)`` local statistics of every shard (rank order) → global ``(rows, N_GLOBAL)``.

    Same computation on every rank from the same gathered values, so the result is identical
    (bitwise) everywhere. ``L`` is set for forward / reverse KL and Rényi (and Rényi's ``C``);
    otherwise ``L`` and ``C`` are 0 until ``with_row_sums``.
    """
    ms, ws = _combine_max_sum(gathered[..., 0], gathered[..., 1])
    mt, wt = _combine_max_sum(gathered[..., 2], gathered[..., 3])
    zs, zt = (gathered[..., 1] * ws).sum(0), (gathered[..., 3] * wt).sum(0)
    out = torch.zeros(gathered.shape[1], N_GLOBAL, dtype=torch.float32, device=gathered.device)
    # log Z in float64 from the shards' Z (P values a row: cheap), rounded once: q = e^{ℓq} then
    # sums to 1 as closely as log_softmax's (a few fp32 roundings of Z would show up where a
    # peaked q makes the gradient a small difference, e.g. JSD's w − Σ q w).
    out[:, MAX_S], out[:, LOGZ_S] = ms, _log_sum_scaled(gathered[..., 0], gathered[..., 1], ms)
    out[:, MAX_T], out[:, LOGZ_T] = mt, _log_sum_scaled(gathered[..., 2], gathered[..., 3], mt)
    out[:, LSE_S] = ms + out[:, LOGZ_S]
    out[:, LSE_T] = mt + out[:, LOGZ_T]
    d = spec.divergence
    # LSE_s − LSE_t as (M_s − M_t) + (log Z_s − log Z_t): the LSEs themselves are rounded at the size of
    # the logits (1/16 at 1e6), their difference need not be.
    dlse = (ms - mt) + (out[:, LOGZ_S] - out[:, LOGZ_T])
    if d == Divergence.FORWARD_KL:
        a = (gathered[..., 4] * wt).sum(0)
        out[:, LOSS] = a / zt + dlse
    elif d == Divergence.REVERSE_KL:
        b = (gathered[..., 4] * ws).sum(0)
        out[:, LOSS] = b / zs - dlse
    elif d == Divergence.RENYI:
        _combine_renyi(gathered, out, spec.coef)
    return out


def _combine_renyi(gathered: torch.Tensor, out: torch.Tensor, a: float) -> None:
    """Rényi's global columns (MAX_U, CENTER = log Z_u, LOSS) from the shards' m_u, Z_u (module doc):
    each shard's m_u moved from its own maxima to the global ones, in float64 (P values a row)."""
    acc = _acc_dtype(gathered.device)
    m, z = gathered.to(acc), gathered[..., 5]
    mu = (
        m[..., 4]
        + a * (m[..., 2] - out[:, MAX_T].to(acc))
        + (1 - a) * (m[..., 0] - out[:, MAX_S].to(acc))
    )
    # A shard without mixed mass (Z_u = 0: its teacher all −inf) must not set the max: its moved m_u is
    # arbitrary (its shifted maxima are 0). A NaN Z_u still reaches log Z_u (NaN · 0).
    mu = torch.where(z > 0, mu, -math.inf)
    big = mu.amax(
        0
    ).float()  # rounded once: log Z_u is taken against the very value the gradient uses
    big = torch.where(big == -math.inf, 0.0, big)
    log_zu = _log_sum_scaled(mu, z, big)
    log_r = big + log_zu - a * out[:, LOGZ_T] - (1 - a) * out[:, LOGZ_S]
    # +inf (α > 1, q = 0 where p > 0 on some shard): an infinite divergence (log Z_u is NaN there).
    out[:, LOSS] = torch.where(big == math.inf, math.inf, log_r / (a - 1))
    out[:, CENTER], out[:, MAX_U] = log_zu, big


def with_row_sums(stats: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Global statistics with ``L`` and ``C`` from the all-reduced ``(rows, 2)`` row sums."""
    out = stats.clone()
    out[:, LOSS] = sums[:, 0]
    out[:, CENTER] = sums[:, 1]
    return out


class VocabParallelRows(abc.ABC):
    """One backend's implementation of the three local steps (shapes: ``s``, ``t`` ``(rows, V_r)``
    of any float dtype with a contiguous last dim; everything returned is fp32)."""

    name: str = ""

    @abc.abstractmethod
    def row_stats(self, s: torch.Tensor, t: torch.Tensor, spec: KDSpec) -> torch.Tensor:
        """``(rows, n_local_stats(spec))`` local statistics (layout in the module doc)."""

    @abc.abstractmethod
    def row_sums(
        self, s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, spec: KDSpec
    ) -> torch.Tensor:
        """``(rows, 2)`` shard partial sums ``[loss terms, centering terms]`` given the global
        LSEs (only where ``needs_row_sums(spec)``)."""

    @abc.abstractmethod
    def loss_grad_given_stats(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        stats: torch.Tensor,
        row_weight: torch.Tensor,
        spec: KDSpec,
        grad: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-row loss ``(rows,)`` (0 where ``row_weight`` is 0) and, if ``grad`` is given, the
        shard gradient ``row_weight[i] · ∂L_i/∂s`` written into it (``grad`` may be ``s``)."""


class TorchVocabParallel(VocabParallelRows):
    """The three steps in plain torch ops (fp32 math; the caller chunks the rows). The divergences'
    math is the shared torch definition (``kd_kernels/_torch_terms.py``), applied to the shard."""

    name = "torch"

    @staticmethod
    def _tempered(x: torch.Tensor, spec: KDSpec) -> torch.Tensor:
        return x.float().mul(1.0 / spec.temperature)  # always a new fp32 tensor

    @staticmethod
    def _shift(z: torch.Tensor) -> torch.Tensor:
        m = z.amax(-1)
        return torch.where(m == -math.inf, torch.zeros_like(m), m)

    def row_stats(self, s, t, spec):
        zs, zt = self._tempered(s, spec), self._tempered(t, spec)
        ms, mt = self._shift(zs), self._shift(zt)
        es, et = (zs - ms[:, None]).exp(), (zt - mt[:, None]).exp()
        acc = _acc_dtype(es.device)  # Z accumulated in float64, rounded once (combine_row_stats)
        cols = [ms, es.sum(-1, dtype=acc).float(), mt, et.sum(-1, dtype=acc).float()]
        d = spec.divergence
        if d in (Divergence.FORWARD_KL, Divergence.REVERSE_KL):
            # A = Σ e^{t̃−m_t}(t̃ − s̃) / B = Σ e^{s̃−m_s}(s̃ − t̃): the KL's terms with the shard's
            # unnormalized weights for p / q and its tempered logits for ℓp, ℓq
            cols.append(terms.TERMS[d](zs, zt, es, et, spec, want_grad=False)[0])
        elif d == Divergence.RENYI:  # relative to the shard's maxima (module doc)
            u = terms.renyi_mixed(zs - ms[:, None], zt - mt[:, None], spec.coef)
            mu = self._shift(u)
            cols += [mu, (u - mu[:, None]).exp().sum(-1)]
        return torch.stack(cols, 1)

    def _logprobs(self, s, t, stats, spec):
        lq = self._tempered(s, spec).sub_(stats[:, MAX_S, None]).sub_(stats[:, LOGZ_S, None])
        lp = self._tempered(t, spec).sub_(stats[:, MAX_T, None]).sub_(stats[:, LOGZ_T, None])
        return lq, lp, lq.exp(), lp.exp()

    def row_sums(self, s, t, stats, spec):
        if not needs_row_sums(spec):
            raise AssertionError(f"{spec.divergence.label} needs no row sums")
        # The shard's part of L and of A = Σ_v a_v (the entry's own A is not used: it may rest on
        # global identities, Jeffreys' Σ p = 1).
        loss, a, _ = terms.TERMS[spec.divergence](*self._logprobs(s, t, stats, spec), spec)
        return torch.stack([loss, a.sum(-1)], 1)

    def loss_grad_given_stats(self, s, t, stats, row_weight, spec, grad):
        active = row_weight != 0
        # README "NaN and inf": a counted row that is not a distribution on the whole vocabulary (a
        # NaN, a +inf or an overflow after 1/T in any shard, or all −inf) is NaN, its loss and its
        # whole gradient row; the global statistics show it identically on every rank (the
        # selections below would otherwise turn some of those NaN into 0).
        bad = ~(torch.isfinite(stats[:, LSE_S]) & torch.isfinite(stats[:, LSE_T]))
        loss = terms.where_pos(active, torch.where(bad, math.nan, stats[:, LOSS]))
        if grad is None:
            return loss
        g = self._dlogits(s, t, stats, spec)
        scale = (row_weight / spec.temperature)[:, None]
        g = torch.where(bad[:, None], math.nan, g * scale)
        grad.copy_(terms.where_pos(active[:, None], g))
        return loss

    def _dlogits(self, s, t, stats, spec):
        """∂L/∂s̃ on the shard: a − q A with the entry's a and the global A (the exchanged row sum C,
        or L for reverse KL, whose A is its loss); Rényi's q − r with R from the exchange."""
        lq, lp, q, p = self._logprobs(s, t, stats, spec)
        if spec.divergence == Divergence.RENYI:
            # r = e^{(u − M_u) − log Z_u} (C = log Z_u), u relative to the global maxima (module doc)
            zs = self._tempered(s, spec).sub_(stats[:, MAX_S, None])
            zt = self._tempered(t, spec).sub_(stats[:, MAX_T, None])
            u = terms.renyi_mixed(zs, zt, spec.coef)
            return terms.renyi_a(q, u.sub_(stats[:, MAX_U, None]), stats[:, CENTER, None])
        _, a, big_a = terms.TERMS[spec.divergence](lq, lp, q, p, spec)
        if isinstance(big_a, float):  # 0.0: a is the gradient itself (forward KL)
            return a
        big_a = stats[:, CENTER if needs_row_sums(spec) else LOSS, None]
        return a.addcmul_(q, big_a, value=-1.0)


_REGISTRY: dict[str, VocabParallelRows] = {}
# "auto" picks the first of these whose dense backend of the same name can run on the tensors' device
# (the compiled kernel on the CPU when kd_kernels._C loads, Triton on a GPU), else "torch".
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}


def register(impl: VocabParallelRows) -> VocabParallelRows:
    _REGISTRY[impl.name] = impl
    return impl


register(TorchVocabParallel())


def _reasons(name: str, device: torch.device) -> list[str]:
    """Why the implementation ``name`` cannot run on ``device``: those of the dense backend of the
    same name (the same kernels, the same requirements: the compiled extension, TRITON_INTERPRET=1
    for CPU tensors under Triton, ...)."""
    from . import get_backend

    return get_backend(name).unsupported_reasons(device)


def resolve(name: str, device: torch.device | str = "cpu") -> VocabParallelRows:
    """The implementation for ``backend=name`` on tensors of ``device`` ("auto" → the first usable
    of ``_AUTO_ORDER``); an explicit name that cannot run here raises ``BackendUnavailableError``."""
    from . import BACKEND_NAMES, BackendUnavailableError, _load_all

    _load_all()  # the cpu / triton backend modules register their implementations on import
    device = torch.device(device)
    if name == "auto":
        for n in _AUTO_ORDER.get(device.type, ("torch",)):
            if n in _REGISTRY and not _reasons(n, device):
                return _REGISTRY[n]
        return _REGISTRY["torch"]
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"backend={name!r} is unknown; use one of {', '.join(map(repr, BACKEND_NAMES))}"
        )
    if name not in _REGISTRY:
        have = ", ".join(repr(n) for n in ("auto", *_REGISTRY))
        raise BackendUnavailableError(
            f"backend={name!r} has no vocabulary-parallel implementation yet; use one of {have}"
        )
    reasons = _reasons(name, device)
    if reasons:
        usable = [n for n in _REGISTRY if not _reasons(n, device)]
        raise BackendUnavailableError(
            f"backend={name!r} cannot run the vocabulary-parallel passes here: {'; '.join(reasons)}. "
            f"Usable here: {', '.join(map(repr, usable))} (or backend='auto')"
        )
    return _REGISTRY[name]
