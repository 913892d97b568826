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


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """log(w·a + (1−w)·b) from log a and log b, in log space (MATH.md); ``out`` may be ``log_b``."""
    x = log_a + math.log(w)
    return torch.logaddexp(x, torch.add(log_b, math.log1p(-w), out=out), out=out if out is not None else x)


def rows_loss_and_dlogits(
    lq: torch.Tensor, lp: torch.Tensor, spec: KDSpec, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss L and ∂L/∂s̃ from fp32 log-probabilities (MATH.md, the two tables)."""
    q, p = lq.exp(), lp.exp()
    qpos, ppos = q > 0, p > 0
    d, a = spec.divergence, spec.coef
    g = None
    if d == Divergence.FORWARD_KL:
        loss = _where_pos(ppos, p * (lp - lq)).sum(-1)
        if want_grad:
            g = q - p
    elif d == Divergence.REVERSE_KL:
        loss = _where_pos(qpos, q * (lq - lp)).sum(-1)
        if want_grad:
            g = _where_pos(qpos, q * (lq - lp - loss[:, None]))
    elif d == Divergence.SKEW_FORWARD_KL:
        lm = _log_mix(lp, lq, a)
        loss = _where_pos(ppos, p * (lp - lm)).sum(-1)
        if want_grad:
            r = _where_pos(ppos, (lp - lm).exp())
            g = (1 - a) * q * ((q * r).sum(-1, keepdim=True) - r)
    elif d == Divergence.SKEW_REVERSE_KL:
        lm = _log_mix(lq, lp, a)  # m' = α q + (1−α) p
        loss = _where_pos(qpos, q * (lq - lm)).sum(-1)
        if want_grad:
            u = _where_pos(qpos, lq - lm - a * (lq - lm).exp())
            g = q * (u - (q * u).sum(-1, keepdim=True))
    elif d == Divergence.JSD:
        lm = _log_mix(lp, lq, a)  # M = β p + (1−β) q
        loss = a * _where_pos(ppos, p * (lp - lm)).sum(-1) + (1 - a) * _where_pos(qpos, q * (lq - lm)).sum(-1)
        if want_grad:
            w = _where_pos(qpos, lq - lm)
            g = (1 - a) * q * (w - (q * w).sum(-1, keepdim=True))
    else:  # pragma: no cover - Divergence is closed
        raise AssertionError(d)
    return loss, g


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, without an (rows, V) temporary."""
    return torch.linalg.vecdot(a, b, dim=-1)


def _log_probs_and_probs(x: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(x/T), softmax(x/T)) in fp32, from one exp per element (two new buffers)."""
    x = x if x.dtype == torch.float32 else x.float()
    z = torch.sub(x, x.amax(-1, keepdim=True))
    if inv_t != 1.0:
        z.mul_(inv_t)
    e = torch.exp(z)
    total = e.sum(-1, keepdim=True)
    return z.sub_(total.log()), e.div_(total)


def rows_fast(s: torch.Tensor, t: torch.Tensor, spec: KDSpec, inv_t: float, c: torch.Tensor,
              g: torch.Tensor | None, active: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """Per-row loss L of the logits rows ``s``, ``t``, and ``g = c · ∂L/∂s̃`` written into ``g``, for rows
    whose log-probabilities are all finite: the formulas of :func:`rows_loss_and_dlogits` without its
    0·log 0 guards, with in-place ops (a handful of (rows, V) fp32 buffers, no ``where``).

    ``c``: (rows, 1) gradient scale. A row with a non-finite entry gives a non-finite L here (each formula
    multiplies a probability by a log-ratio that is then ±inf or NaN). L is checked on the ``active``
    rows (one host read) before ``g`` is touched: if one is not finite (or for a divergence not covered
    here) the result is None and ``g`` is unchanged, so the caller can redo the rows with the guarded
    formulas. Otherwise returns (L, whether any row is inactive); inactive rows are not zeroed here.
    """
    d, a = spec.divergence, spec.coef
    if d not in _FAST:
        return None
    want_grad = g is not None
    if d == Divergence.REVERSE_KL:
        lq, q = _log_probs_and_probs(s, inv_t)
        diff = torch.sub(lq, _log_probs(t, inv_t), out=lq)  # log q − log p
        loss = _dot(q, diff)
        if not (ok := _finite_on(loss, active))[0]:
            return None
        if want_grad:
            torch.mul(diff.sub_(loss[:, None]), q.mul_(c), out=g)
    elif d == Divergence.FORWARD_KL:
        lp, p = _log_probs_and_probs(t, inv_t)
        lq, q = _log_probs_and_probs(s, inv_t) if want_grad else (_log_probs(s, inv_t), None)
        loss = _dot(p, lp.sub_(lq))  # Σ p (log p − log q)
        if not (ok := _finite_on(loss, active))[0]:
            return None
        if want_grad:
            torch.mul(q.sub_(p), c, out=g)
    elif d == Divergence.SKEW_FORWARD_KL:  # m = α p + (1−α) q
        lp, p = _log_probs_and_probs(t, inv_t)
        lq, q = _log_probs_and_probs(s, inv_t) if want_grad else (_log_probs(s, inv_t), None)
        e = torch.sub(lp, _log_mix(lp, lq, a, out=lq), out=lp)  # log(p / m)
        loss = _dot(p, e)
        if not (ok := _finite_on(loss, active))[0]:
            return None
        if want_grad:
            r = torch.exp(e, out=e)  # p / m
            sq = _dot(q, r)
            torch.mul(torch.sub(sq[:, None], r, out=r), q.mul_(c * (1 - a)), out=g)
    elif d == Divergence.SKEW_REVERSE_KL:  # m' = α q + (1−α) p
        lq, q = _log_probs_and_probs(s, inv_t)
        lp = _log_probs(t, inv_t)
        e = torch.sub(lq, _log_mix(lq, lp, a, out=lp), out=lq)  # log(q / m')
        loss = _dot(q, e)
        if not (ok := _finite_on(loss, active))[0]:
            return None
        if want_grad:
            u = e.sub_(torch.exp(e, out=lp), alpha=a)  # log(q/m') − α q/m'
            su = _dot(q, u)
            torch.mul(u.sub_(su[:, None]), q.mul_(c), out=g)
    else:  # JSD, M = β p + (1−β) q
        lp, p = _log_probs_and_probs(t, inv_t)
        lq, q = _log_probs_and_probs(s, inv_t)
        lm = _log_mix(lp, lq, a)
        w = lq.sub_(lm)  # log(q / M)
        sq = _dot(q, w)
        loss = a * _dot(p, lp.sub_(lm)) + (1 - a) * sq
        if not (ok := _finite_on(loss, active))[0]:
            return None
        if want_grad:
            torch.mul(w.sub_(sq[:, None]), q.mul_(c * (1 - a)), out=g)
    return loss, ok[1]


_FAST = (Divergence.FORWARD_KL, Divergence.REVERSE_KL, Divergence.SKEW_FORWARD_KL,
         Divergence.SKEW_REVERSE_KL, Divergence.JSD)


def _finite_on(loss: torch.Tensor, active: torch.Tensor) -> tuple[bool, bool]:
    """(every active row's loss is finite, some row is inactive), in one host read."""
    bad, masked = torch.stack([(~torch.isfinite(loss) & active).any(), (~active).any()]).tolist()
    return not bad, masked


# Rows per chunk: the fast path keeps about six (rows, V) fp32 buffers live, within the same _CHUNK_BYTES
# of scratch as before. Smaller, cache-sized chunks were as fast on one thread but several times slower on two
# threads of a loaded machine (every op is a parallel region; see docs/BENCHMARKS.md). The guarded redo of a
# chunk (about ten buffers) goes through it in sub-chunks of _CHUNK_BYTES / ten buffers.
_FAST_LIVE_BUFFERS = 6


def _chunk_rows(v: int, live_buffers: int) -> int:
    return max(1, _CHUNK_BYTES // (live_buffers * 4 * max(v, 1)))


def _log_probs(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """fp32 log-softmax of x / T (a new buffer)."""
    if inv_t != 1.0:
        x = x.float() * inv_t if x.dtype == torch.float32 else x.float().mul_(inv_t)
    return torch.log_softmax(x, -1, dtype=torch.float32)


class TorchBackend(Backend):
    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu")

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        return []  # plain ops run wherever torch does

    def loss_grad(self, s, t, row_weight, spec, grad):
        n, v = s.shape
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        rows = _chunk_rows(v, _FAST_LIVE_BUFFERS)
        sub = _chunk_rows(v, _LIVE_BUFFERS)
        inv_t = 1.0 / spec.temperature
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            w = row_weight[lo:hi]
            active = (w != 0)[:, None]
            # Fast path: in-place formulas without guards, valid when every counted row is finite. One host
            # read per chunk decides (free on CPU); otherwise the chunk is redone with the guarded formulas.
            g_out = None if grad is None else grad[lo:hi]
            fast = rows_fast(s[lo:hi], t[lo:hi], spec, inv_t, (w * inv_t)[:, None], g_out, active[:, 0])
            if fast is not None:
                L, masked = fast
                if masked:  # masked rows: exactly 0, whatever they held
                    L = _where_pos(active[:, 0], L)
                    if g_out is not None:
                        g_out[~active[:, 0]] = 0
                loss[lo:hi] = L
                continue
            for a in range(lo, hi, sub):
                b = min(hi, a + sub)
                lq = _log_probs(s[a:b], inv_t)
                lp = _log_probs(t[a:b], inv_t)
                L, g = rows_loss_and_dlogits(lq, lp, spec, grad is not None)
                on = active[a - lo:b - lo]
                loss[a:b] = _where_pos(on[:, 0], L)
                if grad is not None:
                    grad[a:b] = _where_pos(on, g * (row_weight[a:b] * inv_t)[:, None])
        return loss


register(TorchBackend())
