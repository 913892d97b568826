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
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            w = row_weight[lo:hi]
            active = (w != 0)[:, None]
            lq = (s[lo:hi].float() * inv_t).log_softmax(-1)
            lp = (t[lo:hi].float() * inv_t).log_softmax(-1)
            L, g = rows_loss_and_dlogits(lq, lp, spec, grad is not None)
            loss[lo:hi] = _where_pos(active[:, 0], L)
            if grad is not None:
                grad[lo:hi] = _where_pos(active, g * (w * inv_t)[:, None])
        return loss


register(TorchBackend())
