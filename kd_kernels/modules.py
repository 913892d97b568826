"""``nn.Module`` wrappers: the options fixed at construction, the tensors passed per call."""

from __future__ import annotations

import torch
from torch import nn

from ._backends import BACKEND_NAMES
from ._spec import DEFAULT_DIVERGENCE, KDSpec
from ._validate import check_bool, check_reduction
from .losses import kd_loss


class KDLoss(nn.Module):
    """``KDLoss(divergence, ...)(student_logits, teacher_logits, mask=None, token_weights=None)``.

    Same options and semantics as :func:`kd_kernels.kd_loss`; invalid options fail at construction.
    """

    def __init__(
        self,
        divergence: str = DEFAULT_DIVERGENCE,
        *,
        alpha: float | None = None,
        beta: float | None = None,
        temperature: float = 1.0,
        interpolation: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        inplace_grad: bool = False,
    ) -> None:
        super().__init__()
        self.spec = KDSpec.make(
            divergence, alpha=alpha, beta=beta, temperature=temperature, interpolation=interpolation
        )
        self.reduction = check_reduction(reduction)
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(
                f"backend={backend!r} is unknown; use one of {', '.join(map(repr, BACKEND_NAMES))}"
            )
        self.backend = backend
        self.inplace_grad = check_bool(inplace_grad, "inplace_grad")

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            divergence=self.spec.divergence.label,
            temperature=self.spec.temperature,
            interpolation=self.spec.interpolation,
            mask=mask,
            token_weights=token_weights,
            reduction=self.reduction,
            backend=self.backend,
            inplace_grad=self.inplace_grad,
            **self.spec.params(),
        )

    def extra_repr(self) -> str:
        coef = "".join(f", {k}={v}" for k, v in self.spec.params().items())
        lam = f", interpolation={self.spec.interpolation}" if self.spec.interpolation != 1.0 else ""
        return (
            f"{self.spec.divergence.label}{coef}, temperature={self.spec.temperature}{lam}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
