"""Every vocabulary-sized computation of training and evaluation, in one place.

All of them go through kd_kernels' fused-linear functions on the models' final hidden states and lm_head
weights, with each model's logit scale / softcap (the logits its ``.logits`` define): no ``(tokens, V)``
logits tensor is ever materialized by the trainer. Positions are already
shifted (hidden state i predicts target i); ``mask`` is True on the tokens that count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import kd_kernels


@dataclass(frozen=True)
class Head:
    """A model's final hidden states ``(B, T, D)``, its lm_head ``(V, D)`` weight / ``(V,)`` bias and the
    logit transform its ``.logits`` apply (``kd_kernels.hf.lm_head``): the logits are
    ``c · tanh(σ (hidden @ weight.T + bias) / c)`` with σ = ``logit_scale``, c = ``softcap``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def detached(self) -> Head:
        return replace(
            self,
            hidden=self.hidden.detach(),
            weight=self.weight.detach(),
            bias=None if self.bias is None else self.bias.detach(),
        )

    def transform(self) -> dict[str, float | None]:
        """The logit transform as ``fused_linear_logprobs`` takes it."""
        return {"logit_scale": self.logit_scale, "softcap": self.softcap}

    def scaled(self, what: str) -> Head:
        """The same logits with σ folded into the hidden states and bias (``σ(hWᵀ + b) = (σh)Wᵀ + σb``),
        for the functions without a logit-scale argument (``fused_linear_sparse_kd``, ``teacher_topk``);
        a soft-capped head raises ValueError, as they cannot apply the cap."""
        if self.softcap is not None:
            raise ValueError(
                f"--teacher-cache: {what} has no softcap argument, and this model soft-caps its "
                f"logits (final_logit_softcapping={self.softcap}); train it without --teacher-cache"
            )
        if self.logit_scale == 1.0:
            return self
        s = self.logit_scale
        return replace(
            self,
            hidden=self.hidden * s,
            bias=None if self.bias is None else self.bias * s,
            logit_scale=1.0,
        )


def head_kd(student: Head, teacher: Head, **options) -> torch.Tensor:
    """``kd_kernels.fused_linear_kd`` between two heads: the student's hidden states, weight, bias
    and logit transforms, the teacher's detached (it gets no gradient); ``options`` as that function
    takes them (divergence, temperature, mask, reduction, ...)."""
    t = teacher.detached()
    return kd_kernels.fused_linear_kd(
        student.hidden,
        student.weight,
        t.hidden,
        t.weight,
        student_bias=student.bias,
        teacher_bias=t.bias,
        student_logit_scale=student.logit_scale,
        student_softcap=student.softcap,
        teacher_logit_scale=t.logit_scale,
        teacher_softcap=t.softcap,
        **options,
    )


def _chunk(chunk_size: int) -> int | None:
    return chunk_size if chunk_size > 0 else None


def ce_loss(
    student: Head, targets: torch.Tensor, mask: torch.Tensor, *, chunk_size: int = 0
) -> torch.Tensor:
    """Token-mean hard-label cross-entropy ``−mean log q(target)`` over the masked-in tokens (0 if none)."""
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp = kd_kernels.fused_linear_logprobs(
        student.hidden,
        student.weight,
        safe,
        bias=student.bias,
        mask=mask,
        chunk_size=_chunk(chunk_size),
        **student.transform(),
    )
    return -logp.sum() / mask.sum().clamp_min(1)


def kd_mix_loss(
    student: Head,
    teacher: Head,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float,
    temperature: float = 1.0,
    chunk_size: int = 0,
    backend: str = "auto",
    divergence: str = "forward_kl",
    alpha: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Word-level KD as in MiniLLM's baseline: ``(1 − r)·CE + r·KD``, KD = token-mean forward KL(p‖q).

    One fused call computes both terms: ``fused_linear_kd`` returns ``KD + c·CE``; with ``c = (1 − r)/r``
    and the result scaled by ``r`` that is ``r·KD + (1 − r)·CE``. ``r = 0`` is plain CE (no teacher pass).
    ``divergence`` / ``alpha`` choose another KD term (DistiLLM: ``skew_reverse_kl``, α = 0.1).
    Returns the loss and the unweighted parts ``{"ce", "kd"}`` for logging.
    """
    if ratio == 0.0:
        ce = ce_loss(student, targets, mask, chunk_size=chunk_size)
        return ce, {"ce": float(ce.detach()), "kd": float("nan")}
    labels = torch.where(mask, targets, torch.full_like(targets, -100))
    loss, parts = head_kd(
        student,
        teacher,
        divergence=divergence,
        alpha=alpha,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ce_weight=(1.0 - ratio) / ratio,
        reduction="mean",
        chunk_size=_chunk(chunk_size),
        backend=backend,
        return_components=True,
    )
    return ratio * loss, {"ce": float(parts.ce), "kd": float(parts.kd)}


def sparse_mix_loss(
    student: Head,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float,
    tail: str = "bucket",
    temperature: float = 1.0,
    chunk_size: int = 0,
    backend: str = "auto",
    divergence: str = "forward_kl",
    alpha: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_mix_loss`` against a sparse teacher (its top-K ids and log-probs per token, −inf where
    ``mask`` is False) through ``fused_linear_sparse_kd``: ``(1 − r)·CE + r·KD``, no teacher forward."""
    if ratio == 0.0:
        ce = ce_loss(student, targets, mask, chunk_size=chunk_size)
        return ce, {"ce": float(ce.detach()), "kd": float("nan")}
    labels = torch.where(mask, targets, torch.full_like(targets, -100))
    student = student.scaled("fused_linear_sparse_kd (the --teacher-cache loss)")
    loss, parts = kd_kernels.fused_linear_sparse_kd(
        student.hidden,
        student.weight,
        teacher_ids,
        teacher_logprobs,
        divergence=divergence,
        alpha=alpha,
        tail=tail,
        student_bias=student.bias,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ce_weight=(1.0 - ratio) / ratio,
        reduction="mean",
        chunk_size=_chunk(chunk_size),
        backend=backend,
        return_components=True,
    )
    return ratio * loss, {"ce": float(parts.ce), "kd": float(parts.kd)}


@torch.no_grad()
def token_divergences(
    student: Head,
    teacher: Head,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = 0,
    backend: str = "auto",
) -> dict[str, float]:
    """Token-mean forward KL(p‖q), reverse KL(q‖p) and the student's CE on ``targets``; sums and counts
    are returned too so callers can pool batches exactly."""
    n = int(mask.sum())
    out = {"tokens": n}
    s, t = student.detached(), teacher.detached()
    for name in ("forward_kl", "reverse_kl"):
        val = head_kd(
            s,
            t,
            divergence=name,
            mask=mask,
            reduction="sum",
            chunk_size=_chunk(chunk_size),
            backend=backend,
        )
        out[name + "_sum"] = float(val)
    out["ce_sum"] = float(ce_loss(s, targets, mask, chunk_size=chunk_size)) * max(n, 1)
    return out
