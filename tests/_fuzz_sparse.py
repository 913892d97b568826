"""Fuzzing the sparse-teacher functions (``sparse_kd``, ``SparseKDLoss``, ``fused_linear_sparse_kd``,
``teacher_topk``): random valid calls against the float64 reference (``reference.sparse_kd_loss``,
MATH.md "Sparse teachers"), non-distribution rows against the documented NaN semantics, invalid calls
against their typed errors. A case is a function of ``(seed, backend)``; see ``_fuzz.py``.
"""

from __future__ import annotations

import math
import random

import torch
from _fuzz import (
    DTYPES,
    FUSED_RTOL,
    Report,
    check_loss_and_grad,
    coef_for,
    expect_errors,
    row_coefficients,
)

import kd_kernels
from kd_kernels import reference as R
from kd_kernels._spec import Divergence

ALL_DIVERGENCES = tuple(d.label for d in Divergence)
INF = math.inf


def _ids_dtype(rng: random.Random, vocab: int) -> torch.dtype:
    options = [torch.int64, torch.int32] + ([torch.int16] if vocab < 2**15 - 8 else [])
    return rng.choice(options + ([torch.uint8] if vocab < 250 else []))


def sparse_teacher(rng: random.Random, gen: torch.Generator, n: int, vocab: int, k: int,
                   lp_dtype: torch.dtype, tail: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(ids (n, K) int64, log-probs (n, K) in lp_dtype, a description): a random teacher's top-k or
    K random ids (any order), some entries padding (-inf, garbage id), sometimes a row of padding
    only; with tail="ignore" sometimes K sampled ids (duplicates) at log(1/K). Σ p ≤ 1 after rounding."""
    sharp = rng.choice([0.5, 2.0, 5.0])
    logp = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * sharp).log_softmax(-1)
    how = rng.choice(("topk", "random", "sampled" if tail == "ignore" else "topk"))
    if how == "topk":
        lp, ids = logp.topk(k, -1)
    elif how == "random":
        ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)]) if n \
            else torch.zeros(0, k, dtype=torch.long)
        lp = logp.gather(-1, ids)
    else:  # the sampled-token estimator: ids drawn from the teacher, duplicates allowed
        ids = torch.multinomial(logp.exp(), k, replacement=True, generator=gen) if n \
            else torch.zeros(0, k, dtype=torch.long)
        lp = torch.full((n, k), -math.log(k), dtype=torch.float64)
    pad = torch.rand(n, k, generator=gen) < rng.choice([0.0, 0.2])
    if n and rng.random() < 0.2:
        pad[rng.randrange(n)] = True  # a row with no teacher entry at all: contributes 0
    lp = lp.masked_fill(pad, -INF)
    ids = ids.masked_fill(pad, vocab + 3)  # padded entries' ids are never read
    lp_r = lp.to(lp_dtype)
    for _ in range(20):  # rounding up may push Σ p over 1: shift those rows down a little
        over = lp_r.double().exp().sum(-1) > 1
        if not bool(over.any()):
            break
        lp_r[over] = (lp_r[over].double() - 2**-6).to(lp_dtype)
    return ids, lp_r, f"{how} pad={bool(pad.any())}"


def _backward(ref: torch.Tensor, upstream: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """∂(upstream · ref)/∂leaf; zeros when ref does not depend on leaf (no rows, every row masked)."""
    if ref.requires_grad:
        ref.backward(upstream.double())
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def sparse_case(seed: int, backend: str, report: Report) -> None:
    """One random valid sparse_kd / SparseKDLoss call, checked against reference.sparse_kd_loss."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(ALL_DIVERGENCES)
    tail = rng.choice(("bucket", "renormalize") + (("ignore",) * 2 if divergence == "forward_kl"
                                                   else ()))
    coef = coef_for(divergence, rng)
    vocab = rng.choice((1, 2, 3, 17, 64, 131, 257))
    k = min(vocab, rng.choice((1, 2, 8, 16, vocab)))
    lead = rng.choice([(0,), (1,), (rng.randint(2, 9),), (2, rng.randint(1, 4))])
    n = math.prod(lead)
    s_dtype, lp_dtype = rng.choice(DTYPES), rng.choice(DTYPES)
    ids_dtype = _ids_dtype(rng, vocab)
    reduction = rng.choice(("mean", "sum", "none"))
    temperature = rng.choice([1.0, 2.0, rng.uniform(0.3, 4.0), 0.5, 0.1, 10.0])
    scale = rng.choice([1.0, 3.0, 10.0])
    layout = rng.choice(("contiguous", "row_padded", "transposed"))
    use_mask, use_weights = rng.random() < 0.5, rng.random() < 0.4
    api = rng.choice(("sparse_kd", "module"))
    ids, lp, how = sparse_teacher(rng, gen, n, vocab, k, lp_dtype, tail)
    case = (f"sparse_case(seed={seed}, backend={backend!r}) [{divergence} {coef} tail={tail} V={vocab} "
            f"K={k} lead={lead} {s_dtype}/{lp_dtype} ids={ids_dtype} {reduction} T={temperature:.3g} "
            f"scale={scale} {layout} mask={use_mask} weights={use_weights} api={api} {how}]")
    s_vals = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale).to(s_dtype)
    mask = (torch.rand(lead, generator=gen) < 0.6) if use_mask else None
    if mask is not None and n:  # masked rows are never read: garbage ids and log-probs there
        rows = ~mask.reshape(n)
        ids[rows], lp[rows] = -5 if ids_dtype != torch.uint8 else 255, 3.0
    weights = None
    if use_weights:
        weights = torch.rand(lead, generator=gen, dtype=torch.float64).to(rng.choice(DTYPES)) * 2
        if mask is not None:  # a masked row's weight may be anything: it adds exactly 0
            weights = weights.masked_fill(~mask, rng.choice([math.nan, math.inf]))
    ids_in = ids.to(ids_dtype).reshape(*lead, k)
    leaf = s_vals.clone().requires_grad_()
    s_in = leaf
    if layout == "row_padded":
        s_in = torch.nn.functional.pad(s_in, (0, 5))[:, :vocab]
    elif layout == "transposed":
        s_in = s_in.t().contiguous().t()
    s_in = s_in.reshape(*lead, vocab)
    upstream = torch.randn(lead if reduction == "none" else (), generator=gen)
    opts = {"tail": tail, "temperature": temperature, "reduction": reduction, "backend": backend}
    try:
        if api == "module":
            mod = kd_kernels.SparseKDLoss(divergence, **coef, **opts)
            loss = mod(s_in, ids_in, lp.reshape(*lead, k), mask=mask, token_weights=weights)
        else:
            loss = kd_kernels.sparse_kd(s_in, ids_in, lp.reshape(*lead, k), divergence=divergence,
                                        mask=mask, token_weights=weights, **coef, **opts)
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001 - any exception on valid input is a failure to report
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    clean_w = None if weights is None else (
        weights.double() if mask is None else torch.where(mask, weights.double(), 0.0))
    s64 = s_vals.double().requires_grad_()
    ref = R.sparse_kd_loss(divergence, s64.reshape(*lead, vocab), ids.reshape(*lead, k),
                           lp.double().reshape(*lead, k), tail=tail, temperature=temperature,
                           mask=mask, token_weights=clean_w, reduction=reduction, **coef)
    g_ref = _backward(ref, upstream, s64)
    report.check(loss.dtype == torch.float32, case, f"loss dtype {loss.dtype}")
    report.check(tuple(loss.shape) == tuple(ref.shape), case, f"loss shape {tuple(loss.shape)}")
    grad = leaf.grad
    report.check(grad is not None and grad.dtype == s_dtype, case, "gradient missing or wrong dtype")
    if grad is None:
        return
    report.check(bool(torch.isfinite(loss).all()), case, f"non-finite loss {loss}")
    report.check(bool(torch.isfinite(grad).all()), case, "non-finite gradient")
    z_scale = max(1.0, s_vals.double().abs().max().item() / temperature if n else 1.0)
    check_loss_and_grad(report, case, loss, ref, grad, g_ref,
                        c=row_coefficients(lead, mask, weights, reduction), upstream=upstream,
                        z_scale=z_scale, temperature=temperature)
    if mask is not None and n:
        rows = ~mask.reshape(n)
        report.check(bool((grad[rows] == 0).all()), case, "masked row has a gradient")
        if reduction == "none":
            report.check(bool((loss.reshape(n)[rows] == 0).all()), case, "masked row has a loss")
