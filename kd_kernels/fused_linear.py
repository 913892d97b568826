"""Fused-linear KD: losses from hidden states and lm_head weights; the full ``(N, V)`` logits never
exist.

``fused_linear_kd(h_s, W_s, h_t, W_t, ...)`` equals ``kd_loss(h_s W_sᵀ + b_s, h_t W_tᵀ + b_t, ...)``
(plus an optional hard-label cross-entropy), computed a chunk of tokens at a time: per chunk both
logits come from a matmul, the backend's fused kernel (``Backend.loss_grad``) writes the
student-logit gradient over the student logits, and that gradient is folded into ``∂/∂h_s``,
``∂/∂W_s`` and ``∂/∂b_s`` at once. Peak extra memory is one chunk of logits plus an fp32 copy of
``W_s``'s gradient; the backward pass only scales by the upstream gradient.
``fused_linear_logprobs`` gives per-token ``log softmax(h Wᵀ/T)[token]`` (and the entropy) the same
way.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from . import _validate as V
from ._backends import BACKEND_NAMES, resolve_backend
from ._dtensor import plain_head_tensor
from ._fused_linear_impl import (
    FusedLinearKDFunction,
    FusedLinearKDRowsFunction,
    FusedLinearLogprobsFunction,
    chunk_rows,
    kd_ce_loss_only,
    kd_ce_rows,
    logprobs_pass,
)
from ._head import HeadTransform
from ._spec import DEFAULT_DIVERGENCE, KDSpec, check_ce_weight, check_temperature

IGNORE_INDEX = -100

__all__ = [
    "FusedLinearKDLoss",
    "KDComponents",
    "fused_linear_alpha_beta",
    "fused_linear_forward_kl",
    "fused_linear_jeffreys",
    "fused_linear_jsd",
    "fused_linear_kd",
    "fused_linear_logprobs",
    "fused_linear_renyi",
    "fused_linear_reverse_kl",
    "fused_linear_skew_forward_kl",
    "fused_linear_skew_reverse_kl",
    "fused_linear_tvd",
]


class KDComponents(NamedTuple):
    """The parts of a fused-linear loss, detached fp32 scalars for logging (no extra pass, no host
    sync).

    ``kd``: the reduced KD loss (before ``ce_weight``); ``ce``: the reduced hard-label cross-entropy
    (unweighted; the loss adds ``ce_weight · ce``), or None when no ``labels`` were given. With
    ``reduction="none"`` both are per-token ``(...)`` tensors.
    """

    kd: torch.Tensor
    ce: torch.Tensor | None


_FUSED_DOC = """
    Args:
        student_hidden: ``(..., D_s)`` float32 / bfloat16 / float16, the student's final hidden
            states. Receives a gradient (its dtype).
        student_weight: ``(V, D_s)`` student lm_head weight, same dtype as ``student_hidden``.
            Receives a gradient accumulated in fp32 and returned in its dtype.
        teacher_hidden: ``(..., D_t)``, the same leading dims as ``student_hidden`` (``D_t`` may
            differ). Never receives a gradient (nor does anything of the teacher's).
        teacher_weight: ``(V, D_t)`` teacher lm_head weight, same dtype as ``teacher_hidden`` (which
            may differ from the student's dtype).
        divergence: ``forward_kl`` (the default, as everywhere in kd_kernels), ``reverse_kl``,
            ``skew_forward_kl`` (uses ``alpha``),
            ``skew_reverse_kl`` (``alpha``), ``jsd`` (``beta``), ``tvd``, ``jeffreys``,
            ``alpha_beta`` (``alpha``, ``beta``) or ``renyi`` (``alpha``); ``alpha`` / ``beta`` None
            take the divergence's default; see ``kd_kernels.kd_loss``.
        student_bias, teacher_bias: optional ``(V,)`` biases of the lm_heads, each in its weight's
            dtype.
        temperature: divides both logits before the KD softmaxes (> 0), no T² factor; the CE term
            uses the untempered student logits.
        interpolation: λ in (0, 1] (1 = off): the teacher's tempered logits become
            ``λ·t/T + (1−λ)·sg(s/T)`` before the divergence (TAID); see ``kd_kernels.kd_loss``.
        mask: bool ``(...)``, True where the token counts. Masked tokens add exactly 0 to the loss
            and to every gradient, and are dropped before any matmul. When ``mask`` is None and
            ``labels`` are given, the KD mask is ``labels != -100``.
        token_weights: float ``(...)``, multiplies each token's KD loss (not the CE; no gradient
            flows to it).
        reduction: ``"mean"`` (KD: Σ over counted tokens / number counted, 0 if none), ``"sum"``,
            or ``"none"``: the per-token loss ``(...)``, ``k_i w_i KD_i + ce_weight · CE_i`` (0
            where masked; CE_i = 0 where the label is -100), for any upstream gradient (a reward,
            an advantage, per-sequence weights). ``"none"`` saves only the inputs and recomputes
            each chunk's logits in backward (one extra logits pass; no ``(N, V)`` tensor kept).
        labels: optional integer ``(...)`` next-token ids in ``[0, V)`` or -100 (ignored); the range
            is checked eagerly only (not under ``torch.compile``: README "torch.compile"). Adds
            ``ce_weight · CE`` where CE is the hard-label cross-entropy ``−log softmax(s)[label]``
            of the student logits over the tokens with a valid label (and, if a mask is given, mask
            True); reduced like KD: "mean" divides by the number of those tokens (0 if none), "sum"
            adds them.
        ce_weight: float ≥ 0, the CE coefficient. The CE is still computed for ``return_components``
            when 0.
        student_logit_scale, teacher_logit_scale: each model's logit scale σ > 0 (Cohere's
            ``config.logit_scale``; Granite's is ``1 / config.logits_scaling``); 1.0 = off.
        student_softcap, teacher_softcap: each model's final-logit softcap c > 0 (Gemma 2's
            ``config.final_logit_softcapping``, 30); None = off. The losses (KD and CE) are taken
            on the model-exact logits ``y = c · tanh(σ (h Wᵀ + b) / c)`` (``σ (h Wᵀ + b)`` without a
            cap), per chunk, and the student's gradient goes through ``σ (1 − tanh²)``.
        truncate_teacher_vocab: the teacher's vocabulary may be padded (Qwen2.5-7B has 152064
            lm_head rows, Qwen2.5-0.5B 151936); ``True`` uses only the first ``V_s`` rows of
            ``teacher_weight`` (and ``teacher_bias``), i.e. the logits-level loss on
            ``teacher_logits[..., :V_s]``. By default a vocabulary mismatch is a ValueError.
        chunk_size: tokens per chunk. Default: as many as fit the per-device budget
            ``kd_kernels._fused_linear_impl.CHUNK_BUDGET_BYTES`` (64 MiB of chunk logits on CPU, 512
            MiB on CUDA), a multiple of 8.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``: the kernel that
            computes each chunk's loss and logit gradient (see ``kd_kernels.available_backends()``).
        return_components: also return a :class:`KDComponents` ``(kd, ce)`` of detached values.

    Returns:
        fp32 scalar ``KD + ce_weight · CE``, or ``(...)`` per token for ``reduction="none"`` (or
        ``(loss, KDComponents)`` with ``return_components=True``). For "mean" / "sum" all gradients
        are computed in this call when any student tensor requires grad (none otherwise);
        ``backward()`` only scales them, so a second ``backward()`` raises.
"""


def _float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    V.check_untransformed(x, name)
    if x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; kd_kernels takes float32, bfloat16 or float16 "
            f"(cast with {name}.float())"
        )
    return x


def _check_head(
    hidden: object, weight: object, bias: object, names: tuple[str, str, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One model's hidden states ``(..., D)``, lm_head weight ``(V, D)`` and optional bias
    ``(V,)``."""
    hn, wn, bn = names
    h, w = _float_tensor(hidden, hn), _float_tensor(weight, wn)
    if h.dim() == 0:
        raise ValueError(f"{hn} is 0-d; it must have shape (..., D) with the hidden size last")
    if w.dim() != 2:
        raise ValueError(
            f"{wn} has shape {tuple(w.shape)}; it must be the lm_head weight of shape (V, D)"
        )
    if w.shape[0] == 0:
        raise ValueError(f"{wn} has an empty vocabulary dim (V=0)")
    if w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"{wn} has shape {tuple(w.shape)} but {hn} has hidden size {h.shape[-1]}; "
            "the weight must be "
            f"(V, {h.shape[-1]}) (nn.Linear.weight layout, not its transpose)"
        )
    if h.dtype != w.dtype:
        raise TypeError(
            f"{hn} is {h.dtype} but {wn} is {w.dtype}; cast one, e.g. {hn}.to({wn}.dtype)"
        )
    if h.device != w.device:
        raise ValueError(f"{hn} is on {h.device} but {wn} on {w.device}; move both to one device")
    b = None
    if bias is not None:
        b = _float_tensor(bias, bn)
        if b.shape != (w.shape[0],):
            raise ValueError(
                f"{bn} has shape {tuple(b.shape)}; it must be ({w.shape[0]},), one per vocab row"
            )
        if b.dtype != w.dtype:
            raise TypeError(
                f"{bn} is {b.dtype} but {wn} is {w.dtype}; cast it with {bn}.to({wn}.dtype)"
            )
        if b.device != w.device:
            raise ValueError(f"{bn} is on {b.device} but {wn} on {w.device}; move it with .to()")
    return h, w, b


def _check_id_tensor(
    labels: object, name: str, lead: torch.Size, device: torch.device
) -> torch.Tensor:
    """Integer token ids of shape ``lead`` on ``device``, as int64 (values not checked)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} has dtype {labels.dtype}; pass integer token ids ({name}.long())")
    if labels.shape != lead:
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}; it must match the hidden states' "
            f"leading dims {tuple(lead)}"
        )
    if labels.device != device:
        raise ValueError(
            f"{name} is on {labels.device} but the hidden states are on {device}; "
            "move it with .to()"
        )
    # Compared in int64: in uint8, -100 wraps to 156 and a valid id can look out of range.
    return labels.long()


def _check_labels(
    labels: object,
    name: str,
    lead: torch.Size,
    device: torch.device,
    vocab: int,
    *,
    ignore_index: int | None = None,
    free: torch.Tensor | None = None,
    hint: str,
) -> torch.Tensor:
    """Integer ids of shape ``lead`` in [0, vocab), or ``ignore_index``; positions where ``free`` is
    True may hold anything."""
    labels = _check_id_tensor(labels, name, lead, device)
    if torch.compiler.is_compiling():
        return labels  # the range check reads the data (a host sync): eager only
    if ignore_index is None and free is None and labels.numel() > 0:
        lo, hi = torch.aminmax(
            labels
        )  # one reduction in the common case; the long way only to report
        if 0 <= int(lo) and int(hi) < vocab:
            return labels
    bad = (labels < 0) | (labels >= vocab)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if free is not None:
        bad &= ~free
    if bool(bad.any()):  # host sync, once per call
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"{name} holds {first}, outside [0, {vocab}) (V={vocab}); {hint}")
    return labels


def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size} must be >= 1 (or None for the memory-budget default)"
        )
    return chunk_size


def _check_reduction(reduction: object) -> str:
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is unknown; use 'mean', 'sum' or 'none'")
    return reduction


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = DEFAULT_DIVERGENCE,
    alpha: float | None = None,
    beta: float | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    interpolation: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    truncate_teacher_vocab: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, KDComponents]:
    """KD loss from hidden states and lm_head weights: ``kd_loss(h_s W_sᵀ + b_s, h_t W_tᵀ + b_t,
    ...)`` (+ ``ce_weight`` × hard-label CE), without materializing the logits; with a logit scale
    or softcap, the same on the model-exact logits ``c · tanh(σ (h Wᵀ + b) / c)``."""
    # FSDP2 / DTensor heads outside their module's forward: gathered, or refused (see _dtensor).
    student_weight = plain_head_tensor(student_weight, "student_weight", gets_grad=True)
    student_bias = plain_head_tensor(student_bias, "student_bias", gets_grad=True)
    teacher_weight = plain_head_tensor(teacher_weight, "teacher_weight", gets_grad=False)
    teacher_bias = plain_head_tensor(teacher_bias, "teacher_bias", gets_grad=False)
    spec = KDSpec.make(
        divergence, alpha=alpha, beta=beta, temperature=temperature, interpolation=interpolation
    )
    s_tr = HeadTransform.make(
        student_logit_scale, student_softcap, names=("student_logit_scale", "student_softcap")
    )
    t_tr = HeadTransform.make(
        teacher_logit_scale, teacher_softcap, names=("teacher_logit_scale", "teacher_softcap")
    )
    reduction = _check_reduction(reduction)
    chunk_size = _check_chunk_size(chunk_size)
    ce_weight = check_ce_weight(ce_weight, has_labels=labels is not None)
    V.check_bool(truncate_teacher_vocab, "truncate_teacher_vocab")
    V.check_bool(return_components, "return_components")

    h_s, w_s, b_s = _check_head(
        student_hidden,
        student_weight,
        student_bias,
        ("student_hidden", "student_weight", "student_bias"),
    )
    h_t, w_t, b_t = _check_head(
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        ("teacher_hidden", "teacher_weight", "teacher_bias"),
    )
    if h_s.device != h_t.device:
        raise ValueError(
            f"student_hidden is on {h_s.device} and teacher_hidden on {h_t.device}; "
            "move both to one device"
        )
    lead = h_s.shape[:-1]
    if h_t.shape[:-1] != lead:
        raise ValueError(
            f"student_hidden {tuple(h_s.shape)} and teacher_hidden {tuple(h_t.shape)} differ in "
            "their leading "
            "(token) dims; they must be (..., D_s) and (..., D_t) with the same (...)"
        )
    vs, vt = w_s.shape[0], w_t.shape[0]
    if vt != vs:
        if vt > vs and truncate_teacher_vocab:
            w_t = w_t[:vs]  # a view: the first V_s rows, no copy
            b_t = b_t[:vs] if b_t is not None else None
        elif vt > vs:
            raise ValueError(
                f"vocabulary mismatch: student_weight has V={vs} rows, teacher_weight V={vt}; "
                f"if the teacher's vocabulary is the student's padded to {vt} rows, pass "
                "truncate_teacher_vocab=True to use its "
                f"first {vs} rows"
            )
        else:
            raise ValueError(
                f"vocabulary mismatch: teacher_weight has V={vt} rows, fewer than student_weight's "
                f"V={vs}; the teacher must cover the student's vocabulary "
                "(truncate_teacher_vocab only drops teacher rows)"
            )

    dev = h_s.device
    mask = V.check_token_tensor(mask, "mask", lead, dev, boolean=True)
    token_weights = V.check_token_tensor(token_weights, "token_weights", lead, dev, boolean=False)
    n = lead.numel()
    labels2 = ce_scale = None
    if labels is not None:
        labels = _check_labels(
            labels,
            "labels",
            lead,
            dev,
            vs,
            ignore_index=IGNORE_INDEX,
            hint="use -100 for tokens to ignore",
        )
        valid = (labels != IGNORE_INDEX).reshape(n)
        if mask is None:
            mask = valid.reshape(lead)  # tokens without a label drop out of KD too
        else:
            valid = valid & mask.reshape(n)
        labels2 = torch.where(valid, labels.reshape(n), torch.zeros_like(labels.reshape(n))).long()
        ce_scale = valid.to(torch.float32)
        if reduction == "mean":
            ce_scale = ce_scale / ce_scale.sum().clamp_min(1)
    kd_weight = V.row_weights(mask, token_weights, n, reduction, dev)

    b = resolve_backend(backend, dev)
    entry = h_s.element_size() + h_t.element_size() + (4 if labels is not None else 0)
    entry += s_tr.extra_bytes_per_entry + t_tr.extra_bytes_per_entry
    rows = chunk_rows(n, vs, entry, chunk_size, dev)
    hs2 = h_s.reshape(n, h_s.shape[-1])
    ht2 = h_t.detach().reshape(n, h_t.shape[-1])
    wt, bt = w_t.detach(), (b_t.detach() if b_t is not None else None)
    args = (
        hs2,
        w_s,
        b_s,
        ht2,
        wt,
        bt,
        kd_weight,
        labels2,
        ce_scale,
        float(ce_weight),
        spec,
        b,
        rows,
        s_tr,
        t_tr,
    )
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hs2, w_s, b_s)
    )
    if reduction == "none":
        loss, kd, ce = (FusedLinearKDRowsFunction.apply if grad else kd_ce_rows)(*args)
        loss, kd, ce = loss.reshape(lead), kd.reshape(lead), ce.reshape(lead)
    elif grad:
        loss, kd, ce = FusedLinearKDFunction.apply(*args)
    else:  # evaluation: no gradient buffers, the kernel computes the loss only
        loss, kd, ce = kd_ce_loss_only(*args)
    if return_components:
        return loss, KDComponents(kd, ce if labels is not None else None)
    return loss


fused_linear_kd.__doc__ = (fused_linear_kd.__doc__ or "") + _FUSED_DOC


def _named(divergence: str, summary: str):
    def loss(
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        **options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, KDComponents]:
        if "divergence" in options:
            raise TypeError(
                f"fused_linear_{divergence} fixes divergence={divergence!r}; call fused_linear_kd"
            )
        return fused_linear_kd(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            divergence=divergence,
            **options,
        )

    loss.__name__ = loss.__qualname__ = f"fused_linear_{divergence}"
    loss.__doc__ = (
        f"{summary} from hidden states: ``fused_linear_kd(..., divergence={divergence!r})``; "
        "keyword options as there."
    )
    return loss


fused_linear_forward_kl = _named("forward_kl", "KL(p‖q)")
fused_linear_reverse_kl = _named("reverse_kl", "KL(q‖p)")
fused_linear_skew_forward_kl = _named("skew_forward_kl", "KL(p‖α p + (1−α) q)")
fused_linear_skew_reverse_kl = _named("skew_reverse_kl", "KL(q‖(1−α) p + α q)")
fused_linear_jsd = _named("jsd", "β KL(p‖M) + (1−β) KL(q‖M)")
fused_linear_tvd = _named("tvd", "½ Σ |p − q|")
fused_linear_jeffreys = _named("jeffreys", "KL(p‖q) + KL(q‖p)")
fused_linear_alpha_beta = _named("alpha_beta", "ABKD's α-β divergence")
fused_linear_renyi = _named("renyi", "1/(α−1) log Σ p^α q^(1−α)")


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(h Wᵀ/T + b/T)[token]`` without materializing the logits.

    Equals ``torch.log_softmax((hidden @ weight.T + bias) / temperature, -1)``
    ``.gather(-1, tokens[..., None]).squeeze(-1)``, zeroed where ``mask`` is False. Gradients flow
    to ``hidden``, ``weight`` and ``bias`` for any per-token upstream gradient (e.g. MiniLLM's
    policy gradient on log q(y_t)).

    Memory: forward keeps two fp32 numbers per token (the log-sum-exp and the entropy); backward
    recomputes each chunk's logits (one extra GEMM) instead of storing them. Chunks hold at most the
    device budget of fp32 logits (``CHUNK_BUDGET_BYTES``, a few such buffers live at once) unless
    ``chunk_size`` is given.

    Args:
        hidden: ``(..., D)`` float32 / bfloat16 / float16.
        weight: ``(V, D)`` lm_head weight, same dtype; its gradient is accumulated in fp32.
        tokens: integer ``(...)`` ids in ``[0, V)`` (anything where ``mask`` is False); checked
            eagerly only (not under ``torch.compile``).
        bias: optional ``(V,)``, the weight's dtype.
        temperature: divides the logits (> 0).
        mask: bool ``(...)``, True where the token counts; masked tokens return 0 (and get no
            gradient) and are not computed.
        return_entropy: also return the per-token entropy ``−Σ_v q_v log q_v`` of ``q =
            softmax(logits/T)`` from the same pass, differentiable too.
        chunk_size: tokens per chunk (default from the memory budget).
        logit_scale, softcap: the model's logit scale σ > 0 and final-logit softcap c > 0 (None =
            off): the log-probabilities are those of the model-exact logits ``y = c · tanh(σ (h Wᵀ
            + b) / c)``, i.e. ``log_softmax(y / T)[token]``; gradients go through ``σ (1 − tanh²)``.

    Returns:
        fp32 ``(...)`` log-probabilities, or ``(logprobs, entropy)``.

    On-policy recipes (responses ``y`` sampled from the student, ``mask`` on the response tokens):

    - sampled-token log-ratio ``log q(y_t) − log p(y_t)`` (Tinker, verl's k1; its negative is the
      per-token advantage): two calls, ``fused_linear_logprobs(h_s, W_s, y, ...) −
      fused_linear_logprobs(h_t, W_t, y, ...).detach()`` (the teacher's under ``no_grad``);
    - its exact, lower-variance counterpart, the full-vocabulary per-token reverse KL:
      ``fused_linear_kd(h_s, W_s, h_t, W_t, divergence="reverse_kl", mask=mask,
      reduction="none")``, which accepts any upstream gradient (``(kl * weights).sum()``...).
    """
    check_temperature(temperature)
    V.check_bool(return_entropy, "return_entropy")
    tr = HeadTransform.make(logit_scale, softcap, names=("logit_scale", "softcap"))
    chunk_size = _check_chunk_size(chunk_size)
    h, w, b = _check_head(hidden, weight, bias, ("hidden", "weight", "bias"))
    lead = h.shape[:-1]
    mask = V.check_token_tensor(mask, "mask", lead, h.device, boolean=True)
    tokens = _check_labels(
        tokens,
        "tokens",
        lead,
        h.device,
        w.shape[0],
        free=~mask if mask is not None else None,
        hint="pass mask=... to leave such tokens out (e.g. mask = tokens != -100)",
    )
    n = lead.numel()
    active = mask.reshape(n) if mask is not None else None
    safe = tokens.reshape(n).long()
    if active is not None:
        safe = torch.where(active, safe, torch.zeros_like(safe))
    rows = chunk_rows(n, w.shape[0], 3 * 4 + tr.extra_bytes_per_entry, chunk_size, h.device)
    h2 = h.reshape(n, h.shape[-1])
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h2, w, b))
    # Under torch.compile the autograd Function runs the loop inside the custom op (either way).
    if grad or torch.compiler.is_compiling():
        logp, ent = FusedLinearLogprobsFunction.apply(
            h2, w, b, safe, active, float(temperature), rows, return_entropy, tr
        )
    else:  # nothing to differentiate (e.g. the teacher's log-probs, or under no_grad): no autograd node
        logp, ent, _, _ = logprobs_pass(
            h2, w, b, safe, active, 1.0 / float(temperature), rows, return_entropy, tr, False
        )
    if return_entropy:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)


class FusedLinearKDLoss(nn.Module):
    """``FusedLinearKDLoss(divergence, ...)(student_hidden, student_weight, teacher_hidden,
    teacher_weight, student_bias=None, teacher_bias=None, mask=None, token_weights=None,
    labels=None)``.

    Same options and semantics as :func:`fused_linear_kd`, fixed at construction (invalid ones fail
    there). After each call, ``last_components`` holds the :class:`KDComponents` (detached kd and
    ce) of that call.
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
        ce_weight: float = 0.0,
        truncate_teacher_vocab: bool = False,
        chunk_size: int | None = None,
        backend: str = "auto",
        student_logit_scale: float = 1.0,
        student_softcap: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = KDSpec.make(
            divergence, alpha=alpha, beta=beta, temperature=temperature, interpolation=interpolation
        )
        self.student_head = HeadTransform.make(
            student_logit_scale, student_softcap, names=("student_logit_scale", "student_softcap")
        )
        self.teacher_head = HeadTransform.make(
            teacher_logit_scale, teacher_softcap, names=("teacher_logit_scale", "teacher_softcap")
        )
        self.alpha, self.beta = alpha, beta
        self.reduction = _check_reduction(reduction)
        self.ce_weight = check_ce_weight(ce_weight)
        self.truncate_teacher_vocab = V.check_bool(truncate_teacher_vocab, "truncate_teacher_vocab")
        self.chunk_size = _check_chunk_size(chunk_size)
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(
                f"backend={backend!r} is unknown; use one of {', '.join(map(repr, BACKEND_NAMES))}"
            )
        self.backend = backend
        self.last_components: KDComponents | None = None

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss, parts = fused_linear_kd(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            divergence=self.spec.divergence.label,
            alpha=self.alpha,
            beta=self.beta,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            temperature=self.spec.temperature,
            interpolation=self.spec.interpolation,
            mask=mask,
            token_weights=token_weights,
            reduction=self.reduction,
            labels=labels,
            ce_weight=self.ce_weight,
            truncate_teacher_vocab=self.truncate_teacher_vocab,
            chunk_size=self.chunk_size,
            backend=self.backend,
            return_components=True,
            student_logit_scale=self.student_head.scale,
            student_softcap=self.student_head.softcap,
            teacher_logit_scale=self.teacher_head.scale,
            teacher_softcap=self.teacher_head.softcap,
        )
        self.last_components = parts
        return loss

    def extra_repr(self) -> str:
        coef = "".join(f", {k}={v}" for k, v in self.spec.params().items())
        if self.spec.interpolation != 1.0:
            coef += f", interpolation={self.spec.interpolation}"
        heads = ""
        for who, tr in (("student", self.student_head), ("teacher", self.teacher_head)):
            if tr.scale != 1.0:
                heads += f", {who}_logit_scale={tr.scale}"
            if tr.softcap is not None:
                heads += f", {who}_softcap={tr.softcap}"
        return (
            f"{self.spec.divergence.label}{coef}, temperature={self.spec.temperature}, "
            f"reduction={self.reduction!r}, ce_weight={self.ce_weight}, backend={self.backend!r}"
            f"{heads}"
        )
