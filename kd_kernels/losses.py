"""Logits-level KD losses: validated public functions over the fused row kernels."""

from __future__ import annotations

import textwrap

import torch

from . import _validate as V
from ._autograd import KDLossFunction, loss_only
from ._backends import resolve_backend
from ._spec import DEFAULT_DIVERGENCE, KDSpec, describe_divergences

_COMMON_DOC = """
    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16. Receives the gradient (in its own dtype).
        teacher_logits: ``(..., V)``, same shape; never receives a gradient. Its dtype may differ.
        temperature: divides both logits before the softmax (> 0). No T² factor is applied; multiply the
            loss by ``temperature ** 2`` yourself for Hinton-style KD.
        interpolation: λ in (0, 1], default 1 (off). Below 1 the teacher's tempered logits become
            ``λ·t/T + (1−λ)·s/T`` (the student's part detached) before the divergence: TAID's interpolated
            teacher. Schedule λ from small to 1 over training yourself.
        mask: bool ``(...)``, True where the token counts (e.g. ``labels != -100``). Masked tokens add exactly
            0 to the loss and to the gradient, and the compiled backends do not read their rows.
        token_weights: float ``(...)``, multiplies each token's loss (no gradient flows to it).
        reduction: ``"mean"`` (Σ over counted tokens / number counted, 0 if none), ``"sum"`` or ``"none"``
            (per-token values of shape ``(...)``, 0 where masked).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; see
            ``kd_kernels.available_backends()``.
        inplace_grad: write the gradient into ``student_logits``' memory instead of a new tensor (saves one
            ``(N, V)`` buffer). Safe only when nothing reads the logits afterwards: they hold the gradient once
            this call returns (a ``Linear`` lm_head is fine: its backward needs its input, not its output).
            Needs a non-leaf ``student_logits`` (not a view of a leaf) whose rows do not overlap; a
            teacher sharing its memory is read from a copy. A single ``backward()``; the gradient is
            not differentiable again (double backward raises).

    Returns:
        float32 loss: a scalar, or ``(...)`` for ``reduction="none"``.
"""


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = DEFAULT_DIVERGENCE,
    alpha: float | None = None,
    beta: float | None = None,
    temperature: float = 1.0,
    interpolation: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Any KD divergence by name (default ``forward_kl``, as in every kd_kernels entry point):
    {names}.
        ``alpha`` / ``beta`` None take those defaults (the same in every entry point); a divergence
        ignores the one it does not use. The named functions below call this."""
    spec = KDSpec.make(
        divergence, alpha=alpha, beta=beta, temperature=temperature, interpolation=interpolation
    )
    s, t = V.check_logit_pair(student_logits, teacher_logits)
    V.check_reduction(reduction)
    lead, vocab = s.shape[:-1], s.shape[-1]
    mask = V.check_token_tensor(mask, "mask", lead, s.device, boolean=True)
    token_weights = V.check_token_tensor(
        token_weights, "token_weights", lead, s.device, boolean=False
    )
    b = resolve_backend(backend, s.device)
    V.check_bool(inplace_grad, "inplace_grad")
    compiling = torch.compiler.is_compiling()
    # Under torch.compile the graph calls a custom op that never aliases s: inplace_grad does not apply.
    inplace = inplace_grad and s.requires_grad and not compiling
    # A view shares its base's memory: writing into a view of a Parameter overwrites the Parameter.
    base = s if not inplace or s._base is None else s._base
    if inplace and base.is_leaf and base.requires_grad:
        what = "a leaf tensor" if s is base else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_grad=True would overwrite {what} that requires grad; pass the output of the "
            "lm_head (a non-leaf), or inplace_grad=False"
        )

    n = lead.numel()
    s2 = s if s.dim() == 2 else s.reshape(n, vocab)
    t2 = t.detach() if t.dim() == 2 else t.detach().reshape(n, vocab)
    # Kernels need a unit stride along the vocabulary; any row stride is fine.
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    if inplace:
        if n > 1 and s2.stride(0) < vocab:
            raise ValueError(
                f"inplace_grad=True needs student_logits whose rows do not overlap in memory (row stride "
                f"{s2.stride(0)} < V={vocab}, e.g. an expand()); pass inplace_grad=False"
            )
        if _overlaps(s2, t2):
            # The kernel would overwrite teacher values before reading them (e.g. X[1:] and X[:-1] of
            # one buffer): read the teacher from a copy.
            t2 = t2.clone()
    c = V.row_weights(mask, token_weights, n, reduction, s.device)
    if not (s.requires_grad and torch.is_grad_enabled()) and not compiling:
        # nothing to differentiate (evaluation, a teacher-side call): no autograd node, no gradient buffer
        out = loss_only(s2, t2, c, spec, b, reduction == "none")
    else:
        out = KDLossFunction.apply(s2, t2, c, spec, b.name, reduction == "none", inplace)
    return out.reshape(lead) if reduction == "none" else out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two (N, V) tensors with non-negative strides intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(x: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
        return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def forward_kl(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """KL(p‖q) per token, p = softmax(teacher/T), q = softmax(student/T): word-level KD and SeqKD.

    Equals ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="none").sum(-1)``.
    """
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="forward_kl",
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def reverse_kl(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """KL(q‖p) per token (MiniLLM's single-step term).

    Equals ``F.kl_div(log_softmax(t/T), log_softmax(s/T), log_target=True, reduction="none").sum(-1)``.
    """
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="reverse_kl",
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def skew_forward_kl(
    student_logits,
    teacher_logits,
    *,
    alpha=None,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """KL(p‖m), m = α p + (1−α) q (DistiLLM's SKL, α = 0.1). ``alpha`` in (0, 1)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="skew_forward_kl",
        alpha=alpha,
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def skew_reverse_kl(
    student_logits,
    teacher_logits,
    *,
    alpha=None,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """KL(q‖m'), m' = (1−α) p + α q (DistiLLM's SRKL, α = 0.1). ``alpha`` in (0, 1)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="skew_reverse_kl",
        alpha=alpha,
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def jsd(
    student_logits,
    teacher_logits,
    *,
    beta=None,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """Generalized JSD: β KL(p‖M) + (1−β) KL(q‖M), M = β p + (1−β) q (GKD). ``beta`` in (0, 1)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="jsd",
        beta=beta,
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def tvd(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """Total variation ½ Σ_v |p_v − q_v| per token (in [0, 1]).

    Equals ``0.5 * (softmax(t/T) - softmax(s/T)).abs().sum(-1)``; its gradient takes sign(0) = 0.
    """
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="tvd",
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def jeffreys(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """Jeffreys divergence KL(p‖q) + KL(q‖p) = Σ (p − q)(log p − log q) per token.

    Equals ``forward_kl(...) + reverse_kl(...)`` with ``reduction="none"``.
    """
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="jeffreys",
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def alpha_beta(
    student_logits,
    teacher_logits,
    *,
    alpha=None,
    beta=None,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """ABKD's α-β divergence −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)] per token, ``alpha`` > 0,
    ``beta`` > 0.

    ``beta = 1 − alpha`` is Amari's α-divergence; α = β = ½ (the default) is 2 Σ (√p − √q)²; (α, β) → (1, 0) is
    KL(p‖q) and → (0, 1) is KL(q‖p) (call ``forward_kl`` / ``reverse_kl`` for those).
    """
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="alpha_beta",
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


def renyi(
    student_logits,
    teacher_logits,
    *,
    alpha=None,
    temperature=1.0,
    interpolation=1.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    backend="auto",
    inplace_grad=False,
) -> torch.Tensor:
    """Rényi divergence of order α per token, 1/(α−1) log Σ p^α q^(1−α), ``alpha`` > 0 and ≠ 1 (α → 1 is
    KL(p‖q): call ``forward_kl``; the default α = ½ is twice the Bhattacharyya distance).

    Equals ``torch.logsumexp(α·log_softmax(t/T) + (1−α)·log_softmax(s/T), -1) / (α − 1)``.
    """
    return kd_loss(
        student_logits,
        teacher_logits,
        divergence="renyi",
        alpha=alpha,
        temperature=temperature,
        interpolation=interpolation,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        backend=backend,
        inplace_grad=inplace_grad,
    )


_INDENT = " " * 4
kd_loss.__doc__ = kd_loss.__doc__.replace(
    "{names}",
    textwrap.fill(describe_divergences(), 100, initial_indent=_INDENT, subsequent_indent=_INDENT),
)
for _f in (
    kd_loss,
    forward_kl,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    jsd,
    tvd,
    jeffreys,
    alpha_beta,
    renyi,
):
    _f.__doc__ = (_f.__doc__ or "") + _COMMON_DOC
