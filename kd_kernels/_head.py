"""Model-exact logits: the lm_head output transform ``y = c · tanh(σ z / c)`` of one model.

Shared by every fused-linear loss (KD, per-token KD, token log-probabilities; the sparse forms and
``teacher_topk`` can take the same two calls): ``HeadTransform.make`` validates a model's logit
scale σ and softcap c once, ``head_logits`` computes one chunk's transformed logits (and, for the
student, ``∂y/∂z`` to fold into the chunk's gradient).

Math (docs/MATH.md, "Model-exact logits"): ``z = h Wᵀ + b``; Cohere multiplies by
``logit_scale`` σ, Gemma 2 caps with ``final_logit_softcapping`` c, in that order:
``y = c · tanh(σ z / c)``, ``∂y/∂z = σ (1 − tanh²(σ z / c))``; σ = 1 and c = None (∞) mean off. Without
a softcap ``y = σ z`` and ``∂y/∂z = σ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HeadTransform", "head_logits", "linear"]


def _positive(value: object, name: str, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    off = " or None (no softcap)" if allow_none else " (1.0 leaves the logits unscaled)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float{off}, got {type(value).__name__}")
    # Comparisons only (no math.isfinite): under torch.compile(dynamic=True) it may be a SymFloat.
    if not (0 < value < math.inf):
        raise ValueError(f"{name}={value} must be a finite number > 0{off}")
    return float(value)


@dataclass(frozen=True)
class HeadTransform:
    """A model's logit scale σ (> 0, 1 = off) and final-logit softcap c (> 0, None = off)."""

    scale: float = 1.0
    softcap: float | None = None

    @staticmethod
    def make(scale: object, softcap: object, *, names: tuple[str, str]) -> HeadTransform:
        """Validated transform; ``names`` are the caller's argument names, used in the errors."""
        return HeadTransform(
            _positive(scale, names[0], allow_none=False),  # type: ignore[arg-type]
            _positive(softcap, names[1], allow_none=True),
        )

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    @property
    def extra_bytes_per_entry(self) -> int:
        """Chunk bytes per (row, vocab) entry this transform adds (fp32 logits and ∂y/∂z)."""
        if self.identity:
            return 0
        return 8 if self.softcap is not None else 4


def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``h Wᵀ (+ b)`` in the inputs' dtype."""
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()


def head_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    tr: HeadTransform,
    *,
    want_deriv: bool,
) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """One chunk's model-exact logits ``y`` (the inputs' dtype, a fresh buffer the caller may
    overwrite) and, when ``want_deriv``, ``∂y/∂z``: None for the identity, the float σ without a
    softcap, else an fp32 ``(rows, V)`` tensor ``σ (1 − tanh²)``.

    The transform is computed in fp32 from the GEMM output (one rounding to the input dtype at the
    end), so ``1 − tanh²`` keeps its precision where the cap saturates.
    """
    z = linear(h, w, b)
    if tr.identity:
        return z, None
    if tr.softcap is None:
        y = z.mul_(tr.scale)
        return y, (tr.scale if want_deriv else None)
    c = tr.softcap
    th = z.float() if z.dtype != torch.float32 else z  # fp32 buffer, overwritten in place
    th.mul_(tr.scale / c).tanh_()
    y = th * c if z.dtype == torch.float32 else (th * c).to(z.dtype)
    if not want_deriv:
        return y, None
    d = th.square_().neg_().add_(1.0).mul_(tr.scale)  # σ (1 − tanh²), reusing tanh's buffer
    return y, d
