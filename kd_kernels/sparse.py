"""Sparse teachers: KD against K teacher ids and their log-probs per token (an inference server's
``logprobs`` / ``prompt_logprobs``, or an offline top-k cache), at the logits level
(``sparse_kd``) and from hidden states (``fused_linear_sparse_kd``), plus the teacher side of a
cache (``teacher_topk``). Math: MATH.md, "Sparse teachers"; kernels in ``_sparse_impl.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate as V
from ._fused_linear_impl import chunk_rows
from ._sparse_impl import (
    FusedLinearSparseKDFunction,
    SparseKDFunction,
    Tail,
    check_sparse_backend_name,
    resolve_sparse_backend,
    sparse_head_grads,
)
from ._spec import DEFAULT_DIVERGENCE, Divergence, KDSpec, check_ce_weight
from .fused_linear import (
    IGNORE_INDEX,
    KDComponents,
    _check_chunk_size,
    _check_head,
    _check_labels,
)

__all__ = ["SparseKDLoss", "fused_linear_sparse_kd", "sparse_kd", "teacher_topk"]

TAILS = ("bucket", "renormalize", "ignore")
# A row's teacher mass Σ_k exp(teacher_logprobs) may exceed 1 by this much (rounding of top-k log-probs
# stored in bf16 / fp16); beyond it the log-probs are not a distribution's and the call raises.
MASS_TOLERANCE = 1e-2

_NO_TAID = (
    "TAID's interpolated teacher needs the teacher's full logits: use kd_kernels.kd_loss "
    "or kd_kernels.fused_linear_kd with a dense teacher"
)
_SPARSE_DOC = """
    Args:
        teacher_ids: integer ``(..., K)``, the teacher's K token ids per position, in ``[0, V)`` and
            distinct within a row (duplicates only with ``tail="ignore"``: the sampled-token
            estimator). Ids of padded entries and of masked rows are never read.
        teacher_logprobs: ``(..., K)`` float32 / bfloat16 / float16, the teacher's log-probs of those
            ids under its full softmax (≤ 0); ``-inf`` marks padding (a row may carry fewer than K).
        divergence: any of :func:`kd_kernels.kd_loss`'s (``forward_kl``, ``reverse_kl``,
            ``skew_forward_kl`` / ``skew_reverse_kl`` (``alpha``, 0.1), ``jsd`` (``beta``, 0.5),
            ``tvd``, ``jeffreys``, ``alpha_beta`` (``alpha``, ``beta``, 0.5 each), ``renyi``
            (``alpha``, 0.5)), computed on the coarse-grained distributions of ``tail``.
        tail: ``"bucket"`` (default): the divergence between the K+1 categories "each id" and
            "everything else" on both sides, never above the full-vocabulary divergence. The
            teacher's tail ``1 − Σ p_k`` is clamped to 1e-6 (rounding of near-deterministic
            log-probs can make it ≤ 0) and its K+1 categories renormalized; if the ids cover the whole
            vocabulary there is no tail. ``"renormalize"``: both sides renormalized over the K ids
            (the gradient is zero off them). ``"ignore"`` (forward_kl only):
            ``Σ_k p_k (ℓ_k − log q_{i_k})`` against the full student softmax. A row whose entries are
            all padding contributes 0.
        temperature: divides the student logits only (> 0): the teacher arrives as log-probs of its
            own softmax, and tempering it would need its full distribution. Sample the teacher at
            the temperature you want instead. No T² factor.
        mask: bool ``(...)``, True where the token counts; masked rows add exactly 0 and are not read.
        token_weights: float ``(...)``, multiplies each token's loss (no gradient flows to it).
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` (compiled C++) or ``"triton"``; ``"auto"`` picks
            ``"cpu"`` on CPU tensors and ``"triton"`` on GPUs (there is no separate CUDA kernel).

    The teacher never receives a gradient. Bad ids (outside ``[0, V)``), duplicate ids without
    ``tail="ignore"``, positive log-probs (logits passed by mistake) and, without
    ``tail="ignore"``, a row whose probabilities sum above ``1 + MASS_TOLERANCE`` (0.01, room for
    bf16 / fp16 rounding of the stored log-probs) raise a ValueError naming the first offending row
    (one host sync per call for these checks; eagerly only: under ``torch.compile`` they are
    skipped, README "torch.compile").
"""


# Every divergence has a sparse form (on the coarse-grained distributions, MATH.md "Sparse teachers").


def _check_tail(tail: object, divergence: Divergence) -> Tail:
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r} is unknown; use one of {', '.join(map(repr, TAILS))}")
    if tail == "ignore" and divergence != Divergence.FORWARD_KL:
        raise ValueError(
            f"tail='ignore' is defined for forward_kl only, not {divergence.label!r}; use "
            "tail='bucket' or tail='renormalize' with this divergence"
        )
    return Tail[tail.upper()]


def _row_name(flat: int, lead: torch.Size) -> str:
    idx, r = [], flat
    for d in reversed(lead):
        idx.append(r % d if d else 0)
        r //= d if d else 1
    return f"row {tuple(reversed(idx))}" if len(lead) > 1 else f"row {flat}"


def _check_teacher(
    ids: object,
    lp: object,
    lead: torch.Size,
    vocab: int,
    device: torch.device,
    active: torch.Tensor | None,
    tail: Tail,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, K) int64, log-probs (N, K) fp32), contiguous, after every check."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"teacher_ids must be a torch.Tensor of token ids, got {type(ids).__name__}"
        )
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"teacher_ids has dtype {ids.dtype}; pass integer ids (teacher_ids.long())")
    if not isinstance(lp, torch.Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got {type(lp).__name__}")
    if lp.dtype not in V.FLOAT_DTYPES:
        raise TypeError(
            f"teacher_logprobs has dtype {lp.dtype}; pass float32, bfloat16 or float16 "
            "(teacher_logprobs.float())"
        )
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids has shape {tuple(ids.shape)}; it must be (..., K) with the student's "
            f"leading dims {tuple(lead)}"
        )
    if lp.shape != ids.shape:
        raise ValueError(
            f"teacher_logprobs has shape {tuple(lp.shape)} but teacher_ids {tuple(ids.shape)}; "
            "they must match (one log-prob per id)"
        )
    if ids.shape[-1] == 0:
        raise ValueError("teacher_ids has K=0 entries per row; pass at least one id per token")
    for x, name in ((ids, "teacher_ids"), (lp, "teacher_logprobs")):
        V.check_untransformed(x, name)
        if x.device != device:
            raise ValueError(
                f"{name} is on {x.device} but student_logits on {device}; move it with .to()"
            )
    n, k = lead.numel(), ids.shape[-1]
    ids2 = ids.reshape(n, k).long().contiguous()
    lp2 = lp.detach().reshape(n, k).float().contiguous()
    if torch.compiler.is_compiling():
        return ids2, lp2  # the value checks read the data (a host sync): eager only
    counted = lp2 != -math.inf
    if active is not None:
        counted &= active.reshape(n, 1)
    # One host sync for the value checks together.
    bad_id = counted & ((ids2 < 0) | (ids2 >= vocab))
    bad_lp = counted & (lp2 > 0)
    dup = torch.zeros(n, dtype=torch.bool, device=device)
    if tail != Tail.IGNORE and k > 1:
        # Sort each row's counted ids (uncounted entries get distinct negative sentinels).
        sentinel = -1 - torch.arange(k, device=device).expand(n, k)
        srt = torch.where(counted, ids2, sentinel).sort(-1).values
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(-1)
    # Σ exp(log-probs) of distinct ids is at most 1; tail='ignore' takes samples, which may repeat.
    mass = torch.where(counted, lp2, -math.inf).exp().sum(-1)
    over = mass > 1.0 + MASS_TOLERANCE if tail != Tail.IGNORE else torch.zeros_like(dup)
    flags = torch.stack([bad_id.any(-1), bad_lp.any(-1), dup, over])
    if bool(flags.any()):
        _raise_teacher_error(flags, ids2, lp2, bad_id, bad_lp, mass, lead, vocab)
    return ids2, lp2


def _raise_teacher_error(flags, ids2, lp2, bad_id, bad_lp, mass, lead, vocab) -> None:
    """The ValueError for the first failed check of ``_check_teacher`` (rows of ``flags``: bad id,
    positive log-prob, duplicate id, mass above 1)."""
    which = flags.any(-1).tolist()
    if which[0]:
        r = int(bad_id.any(-1).nonzero()[0])
        val = int(ids2[r][bad_id[r]][0])
        raise ValueError(
            f"teacher_ids {_row_name(r, lead)} holds {val}, outside [0, {vocab}) (V={vocab}); "
            "ids of padded entries (log-prob -inf) may be anything, the others must be "
            "student vocabulary ids"
        )
    if which[1]:
        r = int(bad_lp.any(-1).nonzero()[0])
        val = float(lp2[r][bad_lp[r]][0])
        raise ValueError(
            f"teacher_logprobs {_row_name(r, lead)} holds {val} > 0; pass log-probabilities "
            "(the teacher's log_softmax, ≤ 0; -inf = padding), not logits"
        )
    if which[2]:
        r = int(flags[2].nonzero()[0])
        raise ValueError(
            f"teacher_ids {_row_name(r, lead)} holds the same id twice; ids must be distinct within "
            "a row for tail='bucket' / 'renormalize' (duplicates are allowed only with "
            "tail='ignore', the sampled-token estimator)"
        )
    r = int(flags[3].nonzero()[0])
    raise ValueError(
        f"teacher_logprobs {_row_name(r, lead)} sums to {float(mass[r]):.6g} in probability "
        f"(Σ exp(teacher_logprobs) > 1 + {MASS_TOLERANCE:g}, the rounding tolerance); pass the "
        "teacher's log_softmax over its full vocabulary, gathered at the top-k ids (not "
        "log-probs renormalized over a different support, nor logits)"
    )


def sparse_kd(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: str = DEFAULT_DIVERGENCE,
    alpha: float | None = None,
    beta: float | None = None,
    tail: str = "bucket",
    temperature: float = 1.0,
    interpolation: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """KD divergence between the dense student ``softmax(student_logits / T)`` and a sparse teacher.

    With ``tail="ignore"`` it equals ``(p * (teacher_logprobs - log_softmax(s/T).gather(-1,
    teacher_ids))).sum(-1)`` (p = exp(teacher_logprobs), padded entries dropped); see ``tail`` for
    the other conventions. Reductions as in ``kd_kernels.kd_loss``: ``"mean"`` (over counted
    tokens), ``"sum"``, ``"none"`` (``(...)``, 0 where masked). Returns float32.
    ``interpolation`` (TAID) is not supported yet: ``NotImplementedError`` unless 1.
    """
    V.reject_unsupported("sparse_kd", {"interpolation": (interpolation, 1.0)}, _NO_TAID)
    spec = KDSpec.make(divergence, alpha=alpha, beta=beta, temperature=temperature)
    t = _check_tail(tail, spec.divergence)
    s = V.check_float_tensor(student_logits, "student_logits")
    V.check_reduction(reduction)
    lead, vocab = s.shape[:-1], s.shape[-1]
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dim (V=0)")
    mask = V.check_token_tensor(mask, "mask", lead, s.device, boolean=True)
    token_weights = V.check_token_tensor(
        token_weights, "token_weights", lead, s.device, boolean=False
    )
    b = resolve_sparse_backend(backend, s.device)
    ids2, lp2 = _check_teacher(teacher_ids, teacher_logprobs, lead, vocab, s.device, mask, t)
    n = lead.numel()
    s2 = s.reshape(n, vocab)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    c = V.row_weights(mask, token_weights, n, reduction, s.device)
    out = SparseKDFunction.apply(s2, ids2, lp2, c, spec, t, b, reduction == "none")
    return out.reshape(lead) if reduction == "none" else out


sparse_kd.__doc__ = (sparse_kd.__doc__ or "") + _SPARSE_DOC


def fused_linear_sparse_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: str = DEFAULT_DIVERGENCE,
    alpha: float | None = None,
    beta: float | None = None,
    tail: str = "bucket",
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    interpolation: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, KDComponents]:
    """``sparse_kd(h W_sᵀ + b_s, teacher_ids, teacher_logprobs, ...)`` (+ ``ce_weight`` × the
    hard-label CE ``−log softmax(s)[label]``) from the student's hidden states and lm_head, a chunk of
    tokens at a time: the ``(N, V)`` logits never exist and no teacher model or head is involved.

    Options as in :func:`sparse_kd` and :func:`kd_kernels.fused_linear_kd` (``labels`` with -100 =
    ignore; without a ``mask``, the KD mask is ``labels != -100``; ``reduction`` "mean" or "sum").
    Gradients are computed in this call; ``backward()`` only scales them. ``interpolation``,
    ``student_logit_scale`` and ``student_softcap`` are not supported yet (``NotImplementedError``
    unless off).
    """
    V.reject_unsupported(
        "fused_linear_sparse_kd",
        {
            "interpolation": (interpolation, 1.0),
            "student_logit_scale": (student_logit_scale, 1.0),
            "student_softcap": (student_softcap, None),
        },
        "leave it off: TAID needs a dense teacher (kd_kernels.fused_linear_kd); for a scaled / "
        "soft-capped student call kd_kernels.sparse_kd on its materialized logits",
    )
    spec = KDSpec.make(divergence, alpha=alpha, beta=beta, temperature=temperature)
    t = _check_tail(tail, spec.divergence)
    if reduction == "none":
        raise NotImplementedError(
            "reduction='none' is not available for fused_linear_sparse_kd (per-token losses would "
            "need the upstream gradient inside the forward pass); use reduction='mean' or 'sum', "
            "or kd_kernels.sparse_kd(..., reduction='none') on materialized logits"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is unknown; use 'mean' or 'sum'")
    chunk_size = _check_chunk_size(chunk_size)
    ce_weight = check_ce_weight(ce_weight, has_labels=labels is not None)
    h, w, bias = _check_head(
        student_hidden,
        student_weight,
        student_bias,
        ("student_hidden", "student_weight", "student_bias"),
    )
    lead, vocab, dev = h.shape[:-1], w.shape[0], h.device
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
            vocab,
            ignore_index=IGNORE_INDEX,
            hint="use -100 for tokens to ignore",
        )
        valid = (labels != IGNORE_INDEX).reshape(n)
        if mask is None:
            mask = valid.reshape(lead)
        else:
            valid = valid & mask.reshape(n)
        labels2 = torch.where(valid, labels.reshape(n), torch.zeros_like(labels.reshape(n))).long()
        ce_scale = valid.to(torch.float32)
        if reduction == "mean":
            ce_scale = ce_scale / ce_scale.sum().clamp_min(1)
    b = resolve_sparse_backend(backend, dev)
    ids2, lp2 = _check_teacher(teacher_ids, teacher_logprobs, lead, vocab, dev, mask, t)
    kd_weight = V.row_weights(mask, token_weights, n, reduction, dev)
    # The rows per chunk of fused_linear_kd with a teacher of the student's dtype: the peak is then the
    # dense form's minus the teacher's chunk (twice the rows measured a higher peak on CPU: the GEMM and
    # gradient temporaries scale with the rows).
    entry = 2 * h.element_size() + (4 if labels is not None else 0)
    rows = chunk_rows(n, vocab, entry, chunk_size, dev)
    h2 = h.reshape(n, h.shape[-1])
    args = (h2, w, bias, ids2, lp2, kd_weight, labels2, ce_scale, ce_weight, spec, t, b, rows)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h2, w, bias)):
        loss, kd, ce = FusedLinearSparseKDFunction.apply(*args)
    else:
        with torch.no_grad():
            kd, ce, _ = sparse_head_grads(
                (h2.detach(), w.detach(), bias.detach() if bias is not None else None, *args[3:8]),
                args[8:],
                (False, False, False),
            )
        loss = kd + ce_weight * ce if ce_scale is not None else kd.clone()
    if return_components:
        return loss, KDComponents(kd, ce if labels is not None else None)
    return loss


fused_linear_sparse_kd.__doc__ = (fused_linear_sparse_kd.__doc__ or "") + _SPARSE_DOC


def teacher_topk(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    *,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k from hidden states, a chunk of tokens at a time (never the full logits).

    Equals ``torch.log_softmax((h @ W.T + b).float() / temperature, -1).topk(k)`` as ``(ids int64
    (..., k), logprobs float32 (..., k))``, sorted by descending log-prob: the teacher side of a
    sparse-teacher cache. ``chunk_size``: tokens per chunk (default: 64 MiB of fp32 logits on CPU,
    512 MiB on CUDA). No gradient.
    """
    h, w, bias = _check_head(
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        ("teacher_hidden", "teacher_weight", "teacher_bias"),
    )
    vocab = w.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int in [1, V], got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, V] (V={vocab})")
    from ._spec import check_temperature

    check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    lead, n = h.shape[:-1], h.shape[:-1].numel()
    h2 = h.detach().reshape(n, h.shape[-1])
    w, bias = w.detach(), (bias.detach() if bias is not None else None)
    rows = chunk_rows(n, vocab, 4 + h.element_size(), chunk_size, h.device)
    ids = torch.empty(n, k, dtype=torch.int64, device=h.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=h.device)
    inv_t = 1.0 / temperature
    with torch.no_grad():
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            z = h2[lo:hi] @ w.t() if bias is None else torch.addmm(bias, h2[lo:hi], w.t())
            z = z.float()
            if inv_t != 1.0:
                z = z * inv_t
            lse = z.logsumexp(-1, keepdim=True)
            vals, idx = z.topk(k, -1)
            ids[lo:hi] = idx
            lps[lo:hi] = vals - lse
    return ids.reshape(*lead, k), lps.reshape(*lead, k)


class SparseKDLoss(nn.Module):
    """``SparseKDLoss(divergence, tail=..., ...)(student_logits, teacher_ids, teacher_logprobs,
    mask=None, token_weights=None)``: :func:`sparse_kd` with the options fixed at construction
    (invalid options fail there)."""

    def __init__(
        self,
        divergence: str = DEFAULT_DIVERGENCE,
        *,
        alpha: float | None = None,
        beta: float | None = None,
        tail: str = "bucket",
        temperature: float = 1.0,
        interpolation: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        V.reject_unsupported("SparseKDLoss", {"interpolation": (interpolation, 1.0)}, _NO_TAID)
        self.spec = KDSpec.make(divergence, alpha=alpha, beta=beta, temperature=temperature)
        _check_tail(tail, self.spec.divergence)
        self.alpha, self.beta, self.tail = alpha, beta, tail
        self.reduction = V.check_reduction(reduction)
        self.backend = check_sparse_backend_name(backend)

    def forward(
        self, student_logits, teacher_ids, teacher_logprobs, mask=None, token_weights=None
    ) -> torch.Tensor:
        return sparse_kd(
            student_logits,
            teacher_ids,
            teacher_logprobs,
            divergence=self.spec.divergence.label,
            alpha=self.alpha,
            beta=self.beta,
            tail=self.tail,
            temperature=self.spec.temperature,
            mask=mask,
            token_weights=token_weights,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.spec.divergence.label}, tail={self.tail!r}, "
            f"temperature={self.spec.temperature}, reduction={self.reduction!r}"
        )
