"""GKD, on-policy distillation (Agarwal et al., 2024; TRL's GKD trainer); MATH.md "GKD / on-policy
distillation".

- Each step, with probability ``λ`` (``--gkd-lambda``) the batch's responses are sampled from the current
  student (``--gkd-temperature``, no gradient through sampling); otherwise the training responses are
  used (the teacher's references, or teacher samples with ``--gkd-seq-kd``).
- :func:`gkd_divergence`: TRL's generalized JSD with interpolation ``β`` (``--gkd-beta``): ``β = 0`` is
  forward KL(p‖q), ``β = 1`` reverse KL(q‖p), ``0 < β < 1`` is kd_kernels' ``jsd`` with that ``β``
  (``β KL(p‖M) + (1 − β) KL(q‖M)``, ``M = β p + (1 − β) q``).
- :func:`full_loss` (``--gkd-estimator full``): that divergence over the full vocabulary at every
  response token, token mean, one ``fused_linear_kd`` call.
- :func:`sampled_token_loss` (``--gkd-estimator sampled``, reverse KL only): the sampled-token
  estimator. Per response token ``A_t = −(log q(y_t) − log p(y_t))`` (a constant) and the
  importance-weighted policy-gradient loss ``−mean_t A_t · q_θ(y_t) / q_s(y_t)``, with ``q_s`` the
  distribution the token was sampled from (the student at ``--gkd-temperature``, no gradient). Its value
  is the importance-weighted estimate of KL(q‖p) and its gradient an unbiased estimate of the reverse
  KL's; :func:`full_loss` with ``β = 1`` is the exact, lower-variance counterpart.
"""

from __future__ import annotations

import torch

import kd_kernels

from .losses import Head, head_kd


def gkd_divergence(beta: float) -> tuple[str, float]:
    """``(divergence name, jsd β)`` of kd_kernels for TRL's ``beta``: 0 → forward_kl, 1 → reverse_kl,
    in between jsd(β)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"--gkd-beta={beta} must be in [0, 1] (0: forward KL, 1: reverse KL)")
    if beta == 0.0:
        return "forward_kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", beta


def full_loss(
    student: Head,
    teacher: Head,
    mask: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Token mean over ``mask`` of TRL's generalized JSD(β) between the teacher's and the student's
    full-vocabulary distributions at ``temperature`` (:func:`gkd_divergence`)."""
    divergence, jsd_beta = gkd_divergence(beta)
    return head_kd(
        student,
        teacher,
        divergence=divergence,
        beta=jsd_beta,
        temperature=temperature,
        mask=mask,
        reduction="mean",
        chunk_size=chunk_size,
        backend=backend,
    )


def sampled_token_loss(
    student: Head,
    teacher: Head,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    sample_temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The sampled-token reverse-KL policy gradient on the student's own samples ``targets``.

    ``log q_θ`` and ``log p`` at ``temperature`` (the KD temperature), ``log q_s`` (the sampler) at
    ``sample_temperature``, all through ``fused_linear_logprobs``. Loss = token mean of
    ``−A_t · exp(log q_θ(y_t) − log q_s(y_t))`` with ``A_t = −(log q_θ(y_t) − log p(y_t))`` held
    constant. Returns the loss and ``{"kl_sampled": mean of log q − log p, "ratio": mean ratio}``."""
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logq = kd_kernels.fused_linear_logprobs(
        student.hidden,
        student.weight,
        safe,
        bias=student.bias,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        **student.transform(),
    )
    with torch.no_grad():
        s, t = student.detached(), teacher.detached()
        logq_s = kd_kernels.fused_linear_logprobs(
            s.hidden,
            s.weight,
            safe,
            bias=s.bias,
            temperature=sample_temperature,
            mask=mask,
            chunk_size=chunk_size,
            **s.transform(),
        )
        logp = kd_kernels.fused_linear_logprobs(
            t.hidden,
            t.weight,
            safe,
            bias=t.bias,
            temperature=temperature,
            mask=mask,
            chunk_size=chunk_size,
            **t.transform(),
        )
        adv = -(logq.detach() - logp)
    ratio = torch.exp(logq - logq_s)
    n = mask.sum().clamp_min(1)
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    loss = torch.where(mask, -adv * ratio, zero).sum() / n
    with torch.no_grad():
        info = {
            "kl_sampled": float(torch.where(mask, -adv, zero).sum() / n),
            "ratio": float(torch.where(mask, ratio, zero).sum() / n),
        }
    return loss, info
