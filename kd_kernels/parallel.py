"""Vocabulary-parallel KD: the lm_heads (or the logits) split along the vocabulary over a
``torch.distributed`` process group, as in Megatron-style tensor parallelism.

``import kd_kernels.parallel``; two calls:

- ``fused_linear_kd(h_s, W_s_shard, h_t, W_t_shard, *, group, ...)``: every option of
  :func:`kd_kernels.fused_linear_kd` but ``interpolation`` (TAID) and the logit scale / softcap
  (``student_logit_scale``, ``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap``);
- ``kd_loss(s_shard, t_shard, *, group, ...)``: every option of :func:`kd_kernels.kd_loss` but
  ``inplace_grad`` and ``interpolation``, on logits sharded along their last dim.

Every divergence of :func:`kd_kernels.kd_loss` has its vocabulary-parallel form (forward / reverse
KL, skew forward / reverse KL, JSD, TVD, Jeffreys, alpha-beta, Rényi). ``interpolation`` and the
logit scale / softcap are parameters here only to be refused: anything but their off value raises
``NotImplementedError`` naming them (TAID needs the interpolated teacher in every statistic, the
softcap its derivative in every row pass, which this module does not form yet).

Layout: rank ``r`` of ``group`` (``P`` ranks) holds the vocabulary rows ``[o_r, o_r + V_r)`` of
both heads, in rank order (``o_0 = 0``, ``o_{r+1} = o_r + V_r``; uneven ``V_r`` allowed; the same
split for student and teacher), and the full hidden states (replicated, as after a column-parallel
lm_head with ``gather_output=False``). Everything else — hidden states, mask, token weights, labels
(global ids in ``[0, Σ V_r)``), options — must be the same on every rank; a first small exchange per
call checks that (shapes and order-sensitive checksums, so rows permuted between ranks are caught)
and raises the same error on every rank otherwise.

Result: the loss is the same fp32 number on every rank and equals the unsharded loss (the
single-process ``kd_kernels`` call on the concatenated heads); ``∂/∂h_s`` is the full one
(all-reduced over ``group``, so do not all-reduce it again); ``∂/∂W_s``, ``∂/∂b_s`` (and for
``kd_loss`` ``∂/∂s``) are the local shard's. As in the single-process calls, all gradients are
computed in the forward call and ``backward()`` only scales them.

Communication (MATH.md, "Vocabulary-parallel"), per token and rank, fp32:

- one all-gather of ``K`` row statistics: ``K = 5`` for forward / reverse KL (max and Z of both
  logits, A or B), ``K = 6`` for renyi (also max and Z of the mixed logits α t̃ + (1−α) s̃),
  ``K = 4`` for skew / JSD / tvd / jeffreys / alpha_beta; with ``labels`` +1 (the label logit, from
  the rank that owns it), and +2 more when ``temperature != 1`` (max and Z of the untempered student
  logits for the CE): ``4·K`` bytes sent, ``4·K·P`` received;
- skew / JSD / tvd / jeffreys / alpha_beta only: one all-reduce of 2 row sums (8 bytes);
- with gradients, once per call: one all-reduce of ``∂/∂h_s``, ``D_s`` elements of the hidden
  dtype per counted token (``2·D_s`` bytes in bf16) — the dominant term;
- per call, not per token: one ``all_gather_object`` of the argument summary (the consistency check).
- ``fused_linear_kd(..., reduction="none")`` with gradients: the per-row exchanges run again in
  backward (which recomputes each chunk), and the all-reduce of ``∂/∂h_s`` happens there.

The per-row math sits in ``kd_kernels._backends._vocab_parallel`` (local statistics → exchange →
loss / gradient given the global statistics); this module chunks, multiplies and communicates.
``backend=`` picks the implementation of those shard passes: ``"cpu"`` (the compiled C++ kernel),
``"triton"`` (GPU, or CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``, every divergence in
each; ``"auto"`` = ``"cpu"`` for CPU tensors when ``kd_kernels._C`` is built, ``"triton"`` for CUDA
tensors, else ``"torch"``. ``"cuda"``, or a backend that cannot run on the tensors' device, raises
``BackendUnavailableError``. Every rank must pass the same ``backend`` (checked).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from . import _validate as V
from ._autograd import differentiable_once
from ._backends import BACKEND_NAMES, BackendUnavailableError
from ._backends import _vocab_parallel as vp
from ._fused_linear_impl import save_head_grads, scale_head_grads
from ._spec import DEFAULT_DIVERGENCE, KDSpec, check_ce_weight
from .fused_linear import (
    IGNORE_INDEX,
    KDComponents,
    _check_chunk_size,
    _check_head,
    _check_id_tensor,
    _check_reduction,
)

__all__ = ["fused_linear_kd", "kd_loss"]

# fp32 (rows, V_r) temporaries per chunk of logits; the chunk is sized so that they stay within
# this budget (same budgets as the single-process calls).
_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
_LIVE_FP32_BUFFERS = 10  # about this many fp32 (rows, V_r) temporaries live at once in a chunk
_NOT_YET = (
    "the vocabulary-parallel passes do not form it yet; leave it off, or gather the "
    "logits and call the single-process kd_kernels function"
)


# ---------------------------------------------------------------------------------------------
# The group and the per-call agreement
# ---------------------------------------------------------------------------------------------


def _check_group(group: object) -> tuple[Any, int, int]:
    """(process group, this rank in it, its size)."""
    if group is None:
        raise TypeError(
            "group=None: pass the torch.distributed process group the vocabulary is split over "
            "(e.g. torch.distributed.group.WORLD, or a tensor-parallel group from "
            "torch.distributed.new_group); for one process use kd_kernels.fused_linear_kd / "
            "kd_kernels.kd_loss"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized; call torch.distributed.init_process_group(...) "
            "(or run under torchrun) before kd_kernels.parallel"
        )
    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(
                f"group is a {group.ndim}-D DeviceMesh; pass the 1-D tensor-parallel sub-mesh "
                "(mesh['tp']) or its process group"
            )
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup (or a 1-D DeviceMesh), got "
            f"{type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group; call with a group it belongs to")
    return group, rank, dist.get_world_size(group)


def _agree(group, rank: int, error: Exception | None, summary: dict | None) -> list[dict]:
    """Gather every rank's argument summary (or its argument error) and raise the same error on
    every rank when one rank rejected its arguments or the ranks disagree."""
    mine = (type(error).__name__, str(error)) if error is not None else summary
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    for r, item in enumerate(gathered):
        if isinstance(item, tuple):
            cls = {
                "TypeError": TypeError,
                "NotImplementedError": NotImplementedError,
                "BackendUnavailableError": BackendUnavailableError,
                "RuntimeError": RuntimeError,
            }.get(item[0], ValueError)
            raise cls(f"rank {r} of the group rejected its arguments: {item[1]}") from error
    first = gathered[0]
    for r, item in enumerate(gathered[1:], start=1):
        for key, value in first.items():
            if key in _PER_RANK:
                continue
            if not _same(item[key], value):
                raise ValueError(
                    f"the ranks of group disagree on {key}: rank 0 has {value}, rank {r} has "
                    f"{item[key]}; every rank must pass the same hidden states, mask, labels, "
                    "token weights and options (only the lm_head rows / logit columns are split); "
                    "is group the tensor-parallel group, not one spanning data-parallel replicas?"
                )
    return gathered


# Summary keys that differ between ranks by design.
_PER_RANK = ("vocab", "teacher_vocab")


def _fingerprint(x: torch.Tensor | None) -> tuple | None:
    """A cheap summary of a tensor that must be the same on every rank, compared across ranks:
    shape, dtype and sums that depend on the order of the elements (so rows permuted between
    ranks are caught, not only different values): for floating-point tensors, in float64, the
    sum, the sum of squares and a position-weighted sum; for integer and bool tensors (labels,
    masks) an exact position-weighted checksum. Catches hidden states, masks or labels that
    differ between ranks (dropout with a different seed per tensor-parallel rank, a batch
    shuffled per rank)."""
    if x is None:
        return None
    flat = x.detach().reshape(-1)
    sums = _float_sums(flat) if flat.is_floating_point() else (_int_checksum(flat),)
    return (tuple(x.shape), str(x.dtype), *sums)


_FINGERPRINT_BLOCK = 1 << 20
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_WEIGHT_MOD = 1048573  # a prime just below 2**20: position weights in [1, 2**20)
_CHECKSUM_MOD = (1 << 61) - 1  # a Mersenne prime: the running checksum stays below 2**61


def _float_sums(flat: torch.Tensor) -> list[float]:
    """Σ x, Σ x² and Σ (frac(i φ) − ½) x_i in float64 (i the flat index): the weights never repeat
    and average 0, so a permutation moves the last sum by about the size of the moved values
    whatever the tensor's mean."""
    acc = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for lo in range(0, flat.numel(), _FINGERPRINT_BLOCK):  # bounded float64 temporaries
        block = flat[lo : lo + _FINGERPRINT_BLOCK].to(torch.float64)
        pos = torch.arange(lo, lo + block.numel(), dtype=torch.float64, device=flat.device)
        pos = pos * _GOLDEN
        weighted = (block * (pos - pos.floor() - 0.5)).sum()
        acc += torch.stack([block.sum(), block.square().sum(), weighted])
    return acc.tolist()  # one host sync


def _int_checksum(flat: torch.Tensor) -> int:
    """Σ_i w_i (x_i mod 2²⁰) mod (2⁶¹ − 1), w_i = (i · 40503 mod 1048573) + 1, exact in int64: every
    product is below 2⁴⁰, a block of 2²⁰ of them below 2⁶⁰."""
    acc = torch.zeros((), dtype=torch.int64, device=flat.device)
    for lo in range(0, flat.numel(), _FINGERPRINT_BLOCK):
        block = flat[lo : lo + _FINGERPRINT_BLOCK].to(torch.int64).remainder(1 << 20)
        pos = torch.arange(lo, lo + block.numel(), dtype=torch.int64, device=flat.device)
        weight = (pos * 40503).remainder(_WEIGHT_MOD) + 1
        acc = (acc + (block * weight).sum()).remainder(_CHECKSUM_MOD)
    return int(acc)  # one host sync


def _same(a: object, b: object) -> bool:
    """Equality of two summaries, floats to a relative 1e-6 (reduction order may differ between
    devices), NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _offsets(vocabs: list[int]) -> list[int]:
    out, o = [], 0
    for v in vocabs:
        out.append(o)
        o += v
    return out


def _chunk_rows(n: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    """Rows per chunk (the same on every rank: computed from the largest shard)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n, 1)))
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    rows = budget // max(1, vocab * 4 * _LIVE_FP32_BUFFERS)
    rows = max(8, rows - rows % 8)
    return max(1, min(rows, max(n, 1)))


def _row_weights(mask, token_weights, n: int, reduction: str, device) -> torch.Tensor:
    """c_i with output = Σ c_i L_i ('mean', 'sum') or c_i L_i ('none'); a masked row's weight is
    exactly 0 whatever its token weight (select, not multiply)."""
    k = mask.reshape(n) if mask is not None else torch.ones(n, dtype=torch.bool, device=device)
    c = k.to(torch.float32)
    if token_weights is not None:
        w = token_weights.detach().reshape(n).to(torch.float32)
        c = torch.where(k, w, torch.zeros_like(w))
    if reduction == "mean":
        c = c / k.sum().clamp_min(1).to(torch.float32)
    return c.contiguous()


def _check_backend(backend: object, device: torch.device) -> vp.VocabParallelRows:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(
            f"backend={backend!r} is unknown; use one of {', '.join(map(repr, BACKEND_NAMES))}"
        )
    return vp.resolve(backend, device)


# ---------------------------------------------------------------------------------------------
# One chunk of rows: local statistics → exchange → loss and gradient
# ---------------------------------------------------------------------------------------------


def _all_gather_rows(local: torch.Tensor, group, world: int) -> torch.Tensor:
    """(rows, K) on every rank → (P, rows, K), rank order."""
    if world == 1:
        return local[None]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.stack(parts)


def _ce_local(s: torch.Tensor, y: torch.Tensor, offset: int, spec: KDSpec) -> torch.Tensor:
    """CE columns of the local statistics: the label logit where this shard owns the label (else 0)
    and, when T != 1, the shard max and Z of the untempered student logits."""
    v = s.shape[1]
    inside = (y >= offset) & (y < offset + v)
    local_id = (y - offset).clamp(0, v - 1)
    zc = s.float()
    y_logit = torch.where(inside, zc.gather(1, local_id[:, None]).squeeze(1), 0.0)
    if spec.temperature == 1.0:
        return y_logit[:, None]
    m = zc.amax(-1)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    return torch.stack([y_logit, m, (zc - m[:, None]).exp().sum(-1)], 1)


def _chunk(
    s: torch.Tensor,
    t: torch.Tensor,
    c: torch.Tensor,
    y: torch.Tensor | None,
    sc: torch.Tensor | None,
    ce_weight: float,
    spec: KDSpec,
    impl: vp.VocabParallelRows,
    offset: int,
    group,
    world: int,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk on the local shard: per-row KD losses (rows,), per-row CE (rows,) or empty, and
    ``grad`` (may be ``s``) holding ``∂(Σ c_i KD_i + ce_weight Σ sc_i CE_i)/∂s`` for the shard."""
    local = impl.row_stats(s, t, spec)
    k = local.shape[1]
    if sc is not None:
        local = torch.cat([local, _ce_local(s, y, offset, spec)], 1)
    gathered = _all_gather_rows(local, group, world)
    stats = vp.combine_row_stats(gathered[..., :k], spec)
    if vp.needs_row_sums(spec):
        sums = impl.row_sums(s, t, stats, spec)
        if world > 1:
            dist.all_reduce(sums, group=group)
        stats = vp.with_row_sums(stats, sums)
    nll = ce_grad = None
    if sc is not None:
        y_logit = gathered[..., k].sum(0)
        if spec.temperature == 1.0:
            lse_c = stats[:, vp.LSE_S]
        else:
            big = gathered[..., k + 1].amax(0)
            lse_c = big + (gathered[..., k + 2] * (gathered[..., k + 1] - big).exp()).sum(0).log()
        nll = lse_c - y_logit
        if grad is not None and ce_weight != 0.0:
            # ce_weight · sc · (softmax(s) − onehot(y)) on this shard, before grad overwrites s
            coef = (sc * ce_weight)[:, None]
            ce_grad = (s.float() - lse_c[:, None]).exp_().mul_(coef)
            v = s.shape[1]
            inside = ((y >= offset) & (y < offset + v))[:, None]
            ce_grad.scatter_add_(
                1, (y - offset).clamp(0, v - 1)[:, None], torch.where(inside, -coef, 0.0)
            )
    loss = impl.loss_grad_given_stats(s, t, stats, c, spec, grad)
    if ce_grad is not None:
        grad.add_(ce_grad)
    return loss, nll, grad


def _weighted(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """values · weight, exactly 0 where the weight is 0 (a NaN value there stays out)."""
    return torch.where(weight != 0, values * weight, torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------
# Fused linear
# ---------------------------------------------------------------------------------------------


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()


def _fused_loop(
    h_s,
    w_s,
    b_s,
    h_t,
    w_t,
    b_t,
    c,
    labels,
    ce_scale,
    ce_weight,
    spec,
    impl,
    rows,
    offset,
    group,
    world,
    need,
    active=None,
    rows_out=None,
):
    """(Σ c_i KD_i, Σ ce_scale_i CE_i, (∂h_s full, ∂W_s shard fp32, ∂b_s shard fp32)) over the
    active rows (default: c_i ≠ 0 or ce_scale_i ≠ 0), a chunk at a time; masked rows are dropped
    before any matmul. ``rows_out``: two (N,) tensors that receive c_i KD_i and ce_scale_i CE_i."""
    need_h, need_w, need_b = need
    need_grad = any(need)
    dev = h_s.device
    grad_h = torch.zeros_like(h_s) if need_h else None
    grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
    grad_b = torch.zeros(w_s.shape[0], dtype=torch.float32, device=dev) if need_b else None
    kd_total = torch.zeros((), dtype=torch.float32, device=dev)
    ce_total = torch.zeros((), dtype=torch.float32, device=dev)
    if active is None:
        active = _active_rows(c, ce_scale)
    idx = active.nonzero().squeeze(1)  # host sync; the same rows on every rank (checked)
    for lo in range(0, idx.numel(), rows):
        sel = idx[lo : lo + rows]
        hs, ht, cc = h_s.index_select(0, sel), h_t.index_select(0, sel), c.index_select(0, sel)
        y = labels.index_select(0, sel) if labels is not None else None
        sc = ce_scale.index_select(0, sel) if ce_scale is not None else None
        s = _linear(hs, w_s, b_s)
        t = _linear(ht, w_t, b_t)
        loss, nll, g = _chunk(
            s, t, cc, y, sc, ce_weight, spec, impl, offset, group, world, s if need_grad else None
        )
        del t
        kd_rows = _weighted(loss, cc)
        kd_total += kd_rows.sum()
        if rows_out is not None:
            rows_out[0].index_copy_(0, sel, kd_rows)
        if nll is not None:
            ce_rows = _weighted(nll, sc)
            ce_total += ce_rows.sum()
            if rows_out is not None:
                rows_out[1].index_copy_(0, sel, ce_rows)
        if not need_grad:
            continue
        if need_h:
            grad_h.index_copy_(0, sel, g @ w_s)
        if need_w:
            if grad_w.dtype == g.dtype:
                grad_w.addmm_(g.t(), hs)
            else:
                grad_w.add_(g.t() @ hs)
        if need_b:
            grad_b += g.sum(0, dtype=torch.float32)
    if need_h and world > 1:
        dist.all_reduce(grad_h, group=group)  # ∂h_s = Σ_r G_r W_{s,r}
    return kd_total, ce_total, (grad_h, grad_w, grad_b)


def _active_rows(c: torch.Tensor, ce_scale: torch.Tensor | None) -> torch.Tensor:
    return c != 0 if ce_scale is None else (c != 0) | (ce_scale != 0)


@differentiable_once
class _FusedFunction(torch.autograd.Function):
    """(h_s, W_s, b_s, h_t, W_t, b_t) ↦ (loss, kd, ce); gradients computed in forward, backward
    only scales them."""

    @staticmethod
    def forward(
        ctx,
        h_s,
        w_s,
        b_s,
        h_t,
        w_t,
        b_t,
        c,
        labels,
        ce_scale,
        ce_weight,
        spec,
        impl,
        rows,
        offset,
        group,
        world,
        need,
    ):
        kd, ce, grads = _fused_loop(
            h_s,
            w_s,
            b_s,
            h_t,
            w_t,
            b_t,
            c,
            labels,
            ce_scale,
            ce_weight,
            spec,
            impl,
            rows,
            offset,
            group,
            world,
            need,
        )
        loss = kd + ce_weight * ce if ce_scale is not None else kd.clone()
        save_head_grads(ctx, grads, w_s, b_s)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        return scale_head_grads(ctx, grad_loss) + (None,) * 14


# reduction="none" (MATH.md, "Fused linear, per-token"), as kd_kernels.fused_linear_kd: forward
# computes the per-row values c_i KD_i + ce_weight · v_i CE_i without gradient work; backward runs
# the chunk loop again with the row weights g_i c_i and CE factors g_i v_i (g the upstream
# gradient), over the rows forward visited, so every rank runs the same collectives.


def _fused_rows(*args):
    """Per-row (loss, kd, ce), each (N,) fp32, without gradient work. ``args``: those of
    :func:`_fused_loop` before ``need``."""
    h_s, w_s, b_s, h_t, w_t, b_t, c, labels, ce_scale, ce_weight = args[:10]
    n, dev = h_s.shape[0], h_s.device
    kd = torch.zeros(n, dtype=torch.float32, device=dev)
    ce = torch.zeros(n, dtype=torch.float32, device=dev)
    plain = (h_s.detach(), w_s.detach(), b_s.detach() if b_s is not None else None)
    with torch.no_grad():
        _fused_loop(*plain, *args[3:], (False, False, False), rows_out=(kd, ce))
    loss = kd + ce_weight * ce if ce_scale is not None else kd.clone()
    return loss, kd, ce


@differentiable_once
class _FusedRowsFunction(torch.autograd.Function):
    """(h_s, W_s, b_s, h_t, W_t, b_t) ↦ per-row (loss, kd, ce), each (N,); any upstream gradient
    on ``loss``, the same on every rank (as the loss is)."""

    @staticmethod
    def forward(ctx, *args):
        loss, kd, ce = _fused_rows(*args[:-1])
        ctx.save_for_backward(*args[:9])
        ctx.options, ctx.need = args[9:-1], args[-1]
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        h_s, w_s, b_s, h_t, w_t, b_t, c, labels, ce_scale = ctx.saved_tensors
        g = grad_loss.float()
        kd_w = _weighted(g, c).contiguous()
        ce_s = _weighted(g, ce_scale) if ce_scale is not None else None
        with torch.no_grad():
            _, _, (grad_h, grad_w, grad_b) = _fused_loop(
                h_s,
                w_s,
                b_s,
                h_t,
                w_t,
                b_t,
                kd_w,
                labels,
                ce_s,
                *ctx.options,
                ctx.need,
                active=_active_rows(c, ce_scale),
            )
        if grad_w is not None:
            grad_w = grad_w.to(w_s.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(b_s.dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 14


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    group: Any,
    divergence: str = DEFAULT_DIVERGENCE,
    alpha: float | None = None,
    beta: float | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    truncate_teacher_vocab: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_components: bool = False,
    interpolation: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, KDComponents]:
    """Vocabulary-parallel :func:`kd_kernels.fused_linear_kd`: equals
    ``kd_kernels.fused_linear_kd(h_s, cat_r W_{s,r}, h_t, cat_r W_{t,r}, ...)`` (same options),
    with this rank's vocabulary rows only.

    Args (besides those of ``kd_kernels.fused_linear_kd``):
        student_weight, teacher_weight: ``(V_r, D)`` this rank's rows ``[o_r, o_r + V_r)`` of the
            lm_head weights (the same split for both; see the module doc). ``student_bias`` /
            ``teacher_bias``: the matching ``(V_r,)`` slices.
        group: the ``torch.distributed`` process group (or a 1-D ``DeviceMesh``) the vocabulary is
            split over, ranks in vocabulary order.
        labels: global token ids in ``[0, Σ_r V_r)`` or -100, the same on every rank.
        truncate_teacher_vocab: the teacher head may have extra rows past the student's vocabulary
            on the last rank only (its shard's first ``V_r`` rows are used).
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``: the implementation of the
            vocabulary-parallel row passes (module doc); ``"cuda"`` raises
            ``BackendUnavailableError``.

    Returns:
        The same fp32 scalar on every rank, or ``(...)`` per token for ``reduction="none"`` (or
        ``(loss, KDComponents)``). ``∂/∂student_hidden`` is the full gradient (already all-reduced
        over ``group``); the weight / bias gradients are the shard's. With ``reduction="none"`` the
        backward recomputes each chunk and communicates again: every rank must call it with the same
        upstream gradient (as the loss, it is the same on every rank).
    """
    group, rank, world = _check_group(group)
    error, prepared = None, None
    try:
        V.reject_unsupported(
            "parallel.fused_linear_kd",
            {
                "interpolation": (interpolation, 1.0),
                "student_logit_scale": (student_logit_scale, 1.0),
                "student_softcap": (student_softcap, None),
                "teacher_logit_scale": (teacher_logit_scale, 1.0),
                "teacher_softcap": (teacher_softcap, None),
            },
            _NOT_YET,
        )
        prepared = _prepare_fused(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            divergence,
            alpha,
            beta,
            student_bias,
            teacher_bias,
            temperature,
            mask,
            token_weights,
            reduction,
            labels,
            ce_weight,
            truncate_teacher_vocab,
            chunk_size,
            backend,
        )
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        error = e
    summaries = _agree(group, rank, error, prepared["summary"] if prepared else None)
    p = prepared
    vocabs = [x["vocab"] for x in summaries]
    teacher_vocabs = [x["teacher_vocab"] for x in summaries]
    _check_split(vocabs, teacher_vocabs, truncate_teacher_vocab)
    if p["truncate"] and teacher_vocabs[rank] > vocabs[rank]:
        p["w_t"] = p["w_t"][: vocabs[rank]]
        p["b_t"] = p["b_t"][: vocabs[rank]] if p["b_t"] is not None else None
    v_total, offset = sum(vocabs), _offsets(vocabs)[rank]
    labels2, ce_scale = _global_labels(p, v_total)
    n = p["n"]
    rows = _chunk_rows(n, max(vocabs), p["chunk_size"], p["h_s"].device)
    args = (
        p["h_s"],
        p["w_s"],
        p["b_s"],
        p["h_t"],
        p["w_t"],
        p["b_t"],
        p["c"],
        labels2,
        ce_scale,
        p["ce_weight"],
        p["spec"],
        p["impl"],
        rows,
        offset,
        group,
        world,
    )
    loss, kd, ce = _run_fused(p, args)
    if return_components:
        return loss, KDComponents(kd, ce if labels is not None else None)
    return loss


def _check_split(vocabs: list[int], teacher_vocabs: list[int], truncate: bool) -> None:
    """Both heads split at the same offsets (the last rank's teacher shard may be longer with
    ``truncate_teacher_vocab``); the same error on every rank otherwise (the lists are global)."""
    last = len(vocabs) - 1
    for r, (vs, vt) in enumerate(zip(vocabs, teacher_vocabs)):
        if vt == vs or (vt > vs and r == last and truncate):
            continue
        fix = (
            "pass truncate_teacher_vocab=True if the extra teacher rows are padding past the "
            "student's vocabulary"
            if vt > vs and r == last
            else "both heads must be split at the same vocabulary offsets"
        )
        raise ValueError(
            f"rank {r} holds {vs} student_weight rows but {vt} teacher_weight rows; {fix} "
            f"(student rows per rank: {vocabs}, teacher: {teacher_vocabs})"
        )


def _run_fused(p: dict, args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce) of the prepared call: per token (``(...)``) for reduction="none", else
    scalars; an autograd node only when a student tensor needs a gradient."""
    grad, need = p["summary"]["grad"], p["need"]
    if p["reduction"] == "none":
        rows_out = _FusedRowsFunction.apply(*args, need) if grad else _fused_rows(*args)
        return tuple(x.reshape(p["lead"]) for x in rows_out)
    if grad:
        return _FusedFunction.apply(*args, need)
    with torch.no_grad():
        kd, ce, _ = _fused_loop(*args, (False, False, False))
    loss = kd + p["ce_weight"] * ce if args[8] is not None else kd.clone()  # args[8]: ce_scale
    return loss, kd, ce


def _prepare_fused(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    divergence,
    alpha,
    beta,
    student_bias,
    teacher_bias,
    temperature,
    mask,
    token_weights,
    reduction,
    labels,
    ce_weight,
    truncate_teacher_vocab,
    chunk_size,
    backend,
) -> dict:
    """Every check that needs no other rank; returns the flattened tensors and the summary that
    ``_agree`` compares across ranks."""
    spec = KDSpec.make(divergence, alpha=alpha, beta=beta, temperature=temperature)
    reduction = _check_reduction(reduction)
    chunk_size = _check_chunk_size(chunk_size)
    ce_weight = check_ce_weight(ce_weight, has_labels=labels is not None)
    if not isinstance(truncate_teacher_vocab, bool):
        raise TypeError("truncate_teacher_vocab must be True or False")
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
            "their leading (token) dims; they must be (..., D_s) and (..., D_t) with the same (...)"
        )
    dev = h_s.device
    impl = _check_backend(backend, dev)
    mask = V.check_token_tensor(mask, "mask", lead, dev, boolean=True)
    token_weights = V.check_token_tensor(token_weights, "token_weights", lead, dev, boolean=False)
    n = lead.numel()
    if labels is not None:
        # ids are checked against the global vocabulary once it is known (_global_labels)
        labels = _check_id_tensor(labels, "labels", lead, dev).reshape(n)
        if mask is None:
            # tokens without a label drop out of KD too
            mask = (labels != IGNORE_INDEX).reshape(lead)
    c = _row_weights(mask, token_weights, n, reduction, dev)
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h_s, w_s, b_s)
    )
    need = (
        grad and h_s.requires_grad,
        grad and w_s.requires_grad,
        grad and b_s is not None and b_s.requires_grad,
    )
    summary = {
        "vocab": w_s.shape[0],
        "teacher_vocab": w_t.shape[0],
        "student_hidden": _fingerprint(h_s),
        "teacher_hidden": _fingerprint(h_t),
        "biases": (b_s is not None, b_t is not None),
        "spec": (spec.divergence.label, spec.coef, spec.coef2, spec.temperature),
        "reduction": reduction,
        "ce_weight": ce_weight,
        "chunk_size": chunk_size,
        "backend": impl.name,
        "truncate_teacher_vocab": truncate_teacher_vocab,
        "grad": grad,
        "need": need,
        "mask": _fingerprint(mask),
        "token_weights": _fingerprint(token_weights),
        "labels": _fingerprint(labels),
    }
    return {
        "summary": summary,
        "lead": lead,
        "spec": spec,
        "impl": impl,
        "n": n,
        "chunk_size": chunk_size,
        "h_s": h_s.reshape(n, h_s.shape[-1]),
        "w_s": w_s,
        "b_s": b_s,
        "h_t": h_t.detach().reshape(n, h_t.shape[-1]),
        "w_t": w_t.detach(),
        "b_t": b_t.detach() if b_t is not None else None,
        "c": c,
        "labels": labels,
        "mask": mask,
        "reduction": reduction,
        "ce_weight": ce_weight,
        "need": need,
        "truncate": truncate_teacher_vocab,
    }


def _global_labels(p: dict, v_total: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Labels checked against the global vocabulary; (ids with ignored rows set to 0, CE row
    factors)."""
    labels = p["labels"]
    if labels is None:
        return None, None
    n = p["n"]
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= v_total))
    if bool(bad.any()):  # same labels on every rank (checked), so every rank raises
        first = labels[bad][0].item()
        raise ValueError(
            f"labels holds {first}, outside [0, {v_total}) (the group's total vocabulary, Σ V_r); "
            "labels are global token ids; use -100 for tokens to ignore"
        )
    if p["mask"] is not None:
        valid = valid & p["mask"].reshape(n)
    ce_scale = valid.to(torch.float32)
    if p["reduction"] == "mean":
        ce_scale = ce_scale / ce_scale.sum().clamp_min(1)
    return torch.where(valid, labels, torch.zeros_like(labels)), ce_scale


# ---------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------


@differentiable_once
class _LogitsFunction(torch.autograd.Function):
    """(s shard, t shard, c) ↦ Σ_i c_i L_i (or c_i L_i per token); gradient to the s shard."""

    @staticmethod
    def forward(ctx, s, t, c, spec, impl, rows, group, world, per_token):
        n = s.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_grad else None
        loss = torch.zeros(n, dtype=torch.float32, device=s.device)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            g = grad[lo:hi] if grad is not None else None
            loss[lo:hi], _, _ = _chunk(
                s[lo:hi], t[lo:hi], c[lo:hi], None, None, 0.0, spec, impl, 0, group, world, g
            )
        weighted = torch.where(c != 0, loss * c, torch.zeros_like(loss))
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.per_token = per_token
        return weighted if per_token else weighted.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scale = grad_out[:, None] if ctx.per_token else grad_out
        return grad.mul_(scale.to(grad.dtype)), None, None, None, None, None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    group: Any,
    divergence: str = DEFAULT_DIVERGENCE,
    alpha: float | None = None,
    beta: float | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    interpolation: float = 1.0,
) -> torch.Tensor:
    """Vocabulary-parallel :func:`kd_kernels.kd_loss` on logits split along their last dim: equals
    ``kd_kernels.kd_loss(cat_r s_r, cat_r t_r, ...)`` (same options, no ``inplace_grad``).

    ``student_logits`` / ``teacher_logits`` are this rank's ``(..., V_r)`` columns
    ``[o_r, o_r + V_r)`` (the same split for both, rank order); ``mask`` and ``token_weights``
    are the same on every rank. Returns the same fp32 loss on every rank (a scalar, or ``(...)``
    for ``reduction="none"``); the gradient to ``student_logits`` is this shard's.
    """
    group, rank, world = _check_group(group)
    error = summary = None
    try:
        V.reject_unsupported("parallel.kd_loss", {"interpolation": (interpolation, 1.0)}, _NOT_YET)
        spec = KDSpec.make(divergence, alpha=alpha, beta=beta, temperature=temperature)
        s, t = V.check_logit_pair(student_logits, teacher_logits)
        reduction = V.check_reduction(reduction)
        impl = _check_backend(backend, s.device)
        lead, vocab = s.shape[:-1], s.shape[-1]
        mask = V.check_token_tensor(mask, "mask", lead, s.device, boolean=True)
        token_weights = V.check_token_tensor(
            token_weights, "token_weights", lead, s.device, boolean=False
        )
        need_grad = torch.is_grad_enabled() and s.requires_grad
        summary = {
            "vocab": vocab,
            "teacher_vocab": t.shape[-1],
            "lead": tuple(lead),  # the logits differ between ranks by design: shapes only
            "dtypes": (str(s.dtype), str(t.dtype)),
            "spec": (spec.divergence.label, spec.coef, spec.coef2, spec.temperature),
            "reduction": reduction,
            "backend": impl.name,
            "grad": need_grad,
            "mask": _fingerprint(mask),
            "token_weights": _fingerprint(token_weights),
        }
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        error = e
    summaries = _agree(group, rank, error, summary)
    vocabs = [x["vocab"] for x in summaries]
    n = lead.numel()
    s2 = s.reshape(n, vocab)
    t2 = t.detach().reshape(n, vocab)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    c = _row_weights(mask, token_weights, n, reduction, s.device)
    rows = _chunk_rows(n, max(vocabs), None, s.device)
    if not need_grad:
        s2 = s2.detach()
    out = _LogitsFunction.apply(s2, t2, c, spec, impl, rows, group, world, reduction == "none")
    return out.reshape(lead) if reduction == "none" else out
