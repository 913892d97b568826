"""Fuzzing the sparse-teacher functions (``sparse_kd``, ``SparseKDLoss``,
``fused_linear_sparse_kd``, ``teacher_topk``): random valid calls against the float64 reference
(``reference.sparse_kd_loss``, MATH.md "Sparse teachers"), non-distribution rows against the
documented NaN semantics, invalid calls against their typed errors. A case is a function of
``(seed, backend)``; see ``_fuzz.py``.
"""

from __future__ import annotations

import math
import random

import torch
from _fuzz import (
    DIVERGENCES,
    DTYPES,
    FUSED_RTOL,
    Report,
    check_bad_row,
    check_loss_and_grad,
    check_masked_rows,
    coef_for,
    expect_errors,
    row_coefficients,
    student_logits64,
    token_options,
)

import kd_kernels
from kd_kernels import reference as R

INF = math.inf


def _ids_dtype(rng: random.Random, vocab: int) -> torch.dtype:
    options = [torch.int64, torch.int32] + ([torch.int16] if vocab < 2**15 - 8 else [])
    return rng.choice(options + ([torch.uint8] if vocab < 250 else []))


def _tail(rng: random.Random, divergence: str) -> str:
    ignore = ("ignore",) if divergence == "forward_kl" else ()
    return rng.choice(("bucket", "renormalize") + ignore)


def sparse_teacher(
    rng: random.Random,
    gen: torch.Generator,
    n: int,
    vocab: int,
    k: int,
    lp_dtype: torch.dtype,
    tail: str,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(ids (n, K) int64, log-probs (n, K) in lp_dtype, a description): a random teacher's top-k or
    K random ids (any order), some entries padding (-inf, garbage id), sometimes a row of padding
    only; with tail="ignore" sometimes K sampled ids (duplicates) at log(1/K). Σ p ≤ 1 after
    rounding."""
    sharp = rng.choice([0.5, 2.0, 5.0])
    logp = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * sharp).log_softmax(-1)
    how = rng.choice(("topk", "random", "sampled" if tail == "ignore" else "topk"))
    if how == "topk":
        lp, ids = logp.topk(k, -1)
    elif how == "random":
        ids = (
            torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
            if n
            else torch.zeros(0, k, dtype=torch.long)
        )
        lp = logp.gather(-1, ids)
    else:  # the sampled-token estimator: ids drawn from the teacher, duplicates allowed
        ids = (
            torch.multinomial(logp.exp(), k, replacement=True, generator=gen)
            if n
            else torch.zeros(0, k, dtype=torch.long)
        )
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
    """∂(upstream · ref)/∂leaf; zeros when ref does not depend on leaf (no rows, all masked)."""
    if ref.requires_grad:
        ref.backward(upstream.double())
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def sparse_case(seed: int, backend: str, report: Report) -> None:
    """One random valid sparse_kd / SparseKDLoss call, checked against reference.sparse_kd_loss."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    tail = rng.choice(
        ("bucket", "renormalize") + (("ignore",) * 2 if divergence == "forward_kl" else ())
    )
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
    case = (
        f"sparse_case(seed={seed}, backend={backend!r}) [{divergence} {coef} tail={tail} "
        f"V={vocab} K={k} lead={lead} {s_dtype}/{lp_dtype} ids={ids_dtype} {reduction} "
        f"T={temperature:.3g} "
        f"scale={scale} {layout} mask={use_mask} weights={use_weights} api={api} {how}]"
    )
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
            loss = kd_kernels.sparse_kd(
                s_in,
                ids_in,
                lp.reshape(*lead, k),
                divergence=divergence,
                mask=mask,
                token_weights=weights,
                **coef,
                **opts,
            )
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001 - any exception on valid input is a failure to report
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    clean_w = (
        None
        if weights is None
        else (weights.double() if mask is None else torch.where(mask, weights.double(), 0.0))
    )
    s64 = s_vals.double().requires_grad_()
    ref = R.sparse_kd_loss(
        divergence,
        s64.reshape(*lead, vocab),
        ids.reshape(*lead, k),
        lp.double().reshape(*lead, k),
        tail=tail,
        temperature=temperature,
        mask=mask,
        token_weights=clean_w,
        reduction=reduction,
        **coef,
    )
    g_ref = _backward(ref, upstream, s64)
    report.check(loss.dtype == torch.float32, case, f"loss dtype {loss.dtype}")
    report.check(tuple(loss.shape) == tuple(ref.shape), case, f"loss shape {tuple(loss.shape)}")
    grad = leaf.grad
    report.check(grad is not None and grad.dtype == s_dtype, case, "no gradient, or another dtype")
    if grad is None:
        return
    report.check(bool(torch.isfinite(loss).all()), case, f"non-finite loss {loss}")
    report.check(bool(torch.isfinite(grad).all()), case, "non-finite gradient")
    z_scale = max(1.0, s_vals.double().abs().max().item() / temperature if n else 1.0)
    check_loss_and_grad(
        report,
        case,
        loss,
        ref,
        grad,
        g_ref,
        c=row_coefficients(lead, mask, weights, reduction),
        upstream=upstream,
        z_scale=z_scale,
        temperature=temperature,
    )
    check_masked_rows(report, case, loss, grad, mask, reduction)


def fused_sparse_case(seed: int, backend: str, report: Report) -> None:
    """One random valid fused_linear_sparse_kd call against sparse_kd's reference on the logits."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    tail = _tail(rng, divergence)
    coef = coef_for(divergence, rng)
    vocab, d = rng.choice((1, 7, 64, 131, 300)), rng.choice((1, 8, 16))
    k = min(vocab, rng.choice((1, 4, 16, vocab)))
    lead = rng.choice([(0,), (1,), (rng.randint(2, 12),), (2, rng.randint(1, 5))])
    n = math.prod(lead)
    dtype = rng.choice((torch.float32, torch.float32, torch.bfloat16))
    reduction = rng.choice(("mean", "sum"))
    temperature = rng.choice([1.0, 2.0, rng.uniform(0.3, 4.0), 0.5])
    bias, use_labels = rng.random() < 0.5, rng.random() < 0.5
    ce_weight = rng.choice((0.0, 0.5, 1.0)) if use_labels else 0.0
    use_mask, use_weights = rng.random() < 0.4, rng.random() < 0.4
    chunk = rng.choice((None, 1, 3, 8))
    ids, lp, how = sparse_teacher(rng, gen, n, vocab, k, rng.choice(DTYPES), tail)
    case = (
        f"fused_sparse_case(seed={seed}, backend={backend!r}) [{divergence} {coef} tail={tail} "
        f"V={vocab} D={d} K={k} lead={lead} {dtype} {reduction} T={temperature:.3g} "
        f"bias={bias} "
        f"labels={use_labels} ce={ce_weight} mask={use_mask} weights={use_weights} "
        f"chunk={chunk} {how}]"
    )
    hs = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    ws = (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 2 / d**0.5).to(dtype)
    bs = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    mask, labels, kd_mask, weights = token_options(
        gen, lead, vocab, use_mask, use_labels, use_weights
    )
    leaves = [x.clone().requires_grad_() for x in (hs, ws) + ((bs,) if bias else ())]
    upstream = torch.randn((), generator=gen)
    try:
        loss = kd_kernels.fused_linear_sparse_kd(
            leaves[0].reshape(*lead, d),
            leaves[1],
            ids.reshape(*lead, k),
            lp.reshape(*lead, k),
            divergence=divergence,
            tail=tail,
            student_bias=leaves[2] if bias else None,
            temperature=temperature,
            mask=mask,
            token_weights=weights,
            reduction=reduction,
            labels=labels,
            ce_weight=ce_weight,
            chunk_size=chunk,
            backend=backend,
            **coef,
        )
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    L64, s = student_logits64(leaves, lead)
    clean_w = (
        None
        if weights is None
        else (weights.double() if kd_mask is None else torch.where(kd_mask, weights.double(), 0.0))
    )
    total = R.sparse_kd_loss(
        divergence,
        s,
        ids.reshape(*lead, k),
        lp.double().reshape(*lead, k),
        tail=tail,
        temperature=temperature,
        mask=kd_mask,
        token_weights=clean_w,
        reduction=reduction,
        **coef,
    )
    if labels is not None:
        valid = labels != -100 if mask is None else (labels != -100) & mask
        nll = R.cross_entropy_per_token(s, torch.where(valid, labels, -100))
        ce = nll.sum() / valid.sum().clamp_min(1) if reduction == "mean" else nll.sum()
        total = total + ce_weight * ce
    grads = [torch.zeros_like(x) for x in L64]
    if total.requires_grad:
        grads = torch.autograd.grad(total * upstream.double(), L64, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, L64)]
    tol = FUSED_RTOL[dtype]
    z_scale = max(1.0, 3 / temperature)
    c = row_coefficients(lead, kd_mask, weights, reduction)
    err = abs(loss.item() - total.item())
    floor = 1e-5 * z_scale * (1 + math.log(vocab)) * (c.norm().item() + ce_weight * max(1, n))
    report.check(
        err <= tol * z_scale * abs(total.item()) + floor,
        case,
        f"loss error {err:.3g} (reference {total.item():.4g})",
    )
    g_floor = 1e-5 * z_scale * (c.norm().item() + ce_weight) * abs(upstream.item()) / temperature
    factors = (ws.double().norm().item(), hs.double().norm().item(), max(1, n) ** 0.5)
    for name, x, g, f in zip(("h_s", "W_s", "b_s"), leaves, grads, factors):
        report.check(x.grad is not None and x.grad.dtype == x.dtype, case, f"grad {name} dtype")
        if x.grad is None:
            continue
        err, ref_norm = (x.grad.double() - g).norm().item(), g.norm().item()
        bound = 3 * tol * z_scale * ref_norm + g_floor * f
        report.check(
            err <= bound,
            case,
            f"grad {name} error {err:.3g} > {bound:.3g} (ref norm {ref_norm:.3g})",
        )


def topk_case(seed: int, report: Report) -> None:
    """teacher_topk against log_softmax(h Wᵀ + b) / T in float64 (values; ties may swap ids)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab, d = rng.choice((1, 5, 64, 300)), rng.choice((3, 16))
    k = min(vocab, rng.choice((1, 3, 8, vocab)))
    lead = rng.choice([(0,), (1,), (rng.randint(2, 9),), (2, 3)])
    n = math.prod(lead)
    dtype = rng.choice((torch.float32, torch.bfloat16))
    temperature = rng.choice([1.0, 2.0, 0.5, rng.uniform(0.3, 4.0)])
    bias, chunk = rng.random() < 0.5, rng.choice((None, 1, 4))
    case = (
        f"topk_case(seed={seed}) [V={vocab} D={d} k={k} lead={lead} {dtype} "
        f"T={temperature:.3g} bias={bias} chunk={chunk}]"
    )
    h = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 2 / d**0.5).to(dtype)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    try:
        ids, lps = kd_kernels.teacher_topk(
            h.reshape(*lead, d), w, k, teacher_bias=b, temperature=temperature, chunk_size=chunk
        )
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    report.check(
        ids.dtype == torch.int64 and lps.dtype == torch.float32,
        case,
        f"dtypes {ids.dtype}, {lps.dtype}",
    )
    report.check(tuple(ids.shape) == tuple(lps.shape) == (*lead, k), case, f"shape {ids.shape}")
    logp = ((h.double() @ w.double().T + (b.double() if bias else 0)) / temperature).log_softmax(-1)
    ref_vals = logp.topk(k, -1).values.reshape(*lead, k)
    # the GEMM in the input dtype: |z| error up to eps · Σ |h_d w_d|, twice (the LSE moves too)
    eps = 2e-6 if dtype == torch.float32 else 1e-2
    tol = 2 * eps * (h.double().abs() @ w.double().abs().T).max().item() / temperature if n else 0
    err = (lps.double() - ref_vals).abs().max().item() if n else 0.0
    report.check(err <= tol + 1e-6, case, f"log-prob error {err:.3g} > {tol:.3g}")
    flat = ids.reshape(n, k)
    report.check(bool(((flat >= 0) & (flat < vocab)).all()), case, "id out of range")
    distinct = all(len(set(r)) == k for r in flat.tolist())
    report.check(distinct, case, "an id twice in a row")
    got = logp.gather(-1, flat.clamp(0, vocab - 1)).reshape(*lead, k)
    err = (got - lps.double()).abs().max().item() if n else 0.0
    report.check(err <= tol + 1e-6, case, f"returned log-probs are not their ids' ({err:.3g})")
    report.check(
        bool((lps[..., 1:] <= lps[..., :-1]).all()) if k > 1 else True,
        case,
        "not sorted by descending log-prob",
    )


BAD_ROWS = (
    "nan_student",
    "posinf_student",
    "neginf_student",
    "overflow",
    "nan_teacher",
    "nan_weight",
)


def sparse_hostile_case(seed: int, backend: str, report: Report) -> None:
    """A row that is not a distribution (README "NaN and inf"; sparse_kd's docs): counted, its loss
    and whole gradient row are NaN and every other row exact; masked, it adds exactly 0."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kind, masked = rng.choice(BAD_ROWS), rng.random() < 0.4
    divergence = rng.choice(DIVERGENCES)
    tail = _tail(rng, divergence)
    coef = coef_for(divergence, rng)
    n, vocab = rng.randint(2, 6), rng.choice((5, 33, 131))
    k = min(vocab, rng.choice((1, 4, 8)))
    bad = rng.randrange(n)
    case = (
        f"sparse_hostile_case(seed={seed}, backend={backend!r}) [{kind} masked={masked} "
        f"{divergence} {coef} tail={tail} N={n} V={vocab} K={k} row={bad}]"
    )
    s = torch.randn(n, vocab, generator=gen)
    ids, lp, _ = sparse_teacher(rng, gen, n, vocab, k, torch.float32, tail)
    row_lp, row_ids = torch.randn(vocab, generator=gen, dtype=torch.float64).log_softmax(-1).topk(k)
    ids[bad], lp[bad] = row_ids, row_lp.float()  # a full row of teacher entries (no padding)
    temperature = 0.1 if kind == "overflow" else rng.choice([1.0, 2.0])
    weights = torch.rand(n, generator=gen) + 0.5
    col = rng.randrange(vocab)
    if kind == "nan_student":
        s[bad, col] = math.nan
    elif kind == "posinf_student":
        s[bad, col] = INF
    elif kind == "neginf_student":
        s[bad] = -INF
    elif kind == "overflow":  # 1e38 / 0.1 overflows fp32
        s[bad, col] = 1e38
    elif kind == "nan_teacher":
        lp[bad, 0] = math.nan
    else:
        weights[bad] = math.nan
    mask = torch.ones(n, dtype=torch.bool)
    mask[bad] = not masked
    x = s.clone().requires_grad_()
    try:
        loss = kd_kernels.sparse_kd(
            x,
            ids,
            lp,
            divergence=divergence,
            tail=tail,
            mask=mask,
            token_weights=weights,
            temperature=temperature,
            reduction="none",
            backend=backend,
            **coef,
        )
        loss.backward(torch.ones(n))
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    good = [i for i in range(n) if i != bad]
    s64 = s[good].double().requires_grad_()
    ref = R.sparse_kd_loss(
        divergence,
        s64,
        ids[good],
        lp[good].double(),
        tail=tail,
        temperature=temperature,
        token_weights=weights[good].double(),
        reduction="none",
        **coef,
    )
    (ref.sum().backward() if ref.requires_grad else None)
    g_ref = s64.grad if s64.grad is not None else torch.zeros_like(s64)
    err = (loss[good].double() - ref).abs().max().item()
    report.check(err <= 1e-4 * max(1.0, ref.abs().max().item()), case, f"other rows {err:.3g}")
    err = (x.grad[good].double() - g_ref).abs().max().item()
    report.check(
        err <= 1e-4 * max(1.0, g_ref.abs().max().item()) / temperature,
        case,
        f"other rows' gradient {err:.3g}",
    )
    check_bad_row(report, case, loss, x.grad, bad, masked)


def _bad_sparse_calls(rng: random.Random):
    """(description, thunk, expected exception type) for invalid sparse-teacher calls."""
    v, k = rng.choice((11, 17)), 4
    s = torch.randn(3, v)
    lp, ids = torch.randn(3, v).log_softmax(-1).topk(k, -1)
    f = kd_kernels.sparse_kd

    def edit(x, r, c, val):
        x = x.clone()
        x[r, c] = val
        return x

    yield "ids float", lambda: f(s, ids.float(), lp), TypeError
    yield "ids bool", lambda: f(s, ids.bool(), lp), TypeError
    yield "ids list", lambda: f(s, ids.tolist(), lp), TypeError
    yield "logprobs int", lambda: f(s, ids, lp.long()), TypeError
    yield "logprobs float64", lambda: f(s, ids, lp.double()), TypeError
    yield "ids lead", lambda: f(s, ids[:2], lp[:2]), ValueError
    yield "logprobs shape", lambda: f(s, ids, lp[:, :2]), ValueError
    yield "K=0", lambda: f(s, ids[:, :0], lp[:, :0]), ValueError
    yield "id = V", lambda: f(s, edit(ids, 1, 2, v), lp), ValueError
    yield "id negative", lambda: f(s, edit(ids, 0, 0, -1), lp), ValueError
    yield "duplicate id", lambda: f(s, edit(ids, 2, 3, int(ids[2, 1])), lp), ValueError
    yield "positive log-prob", lambda: f(s, ids, edit(lp, 1, 0, 0.5)), ValueError
    yield "student int", lambda: f(s.long(), ids, lp), TypeError
    yield "student V=0", lambda: f(torch.randn(3, 0), ids, lp), ValueError
    yield "tail", lambda: f(s, ids, lp, tail=rng.choice(["top", "", None])), ValueError
    yield (
        "tail ignore + reverse_kl",
        lambda: f(s, ids, lp, tail="ignore", divergence="reverse_kl"),
        ValueError,
    )
    yield "backend", lambda: f(s, ids, lp, backend=rng.choice(["gpu", "", None])), ValueError
    yield "backend cuda", lambda: f(s, ids, lp, backend="cuda"), kd_kernels.BackendUnavailableError
    for bad in (0.0, -1.0, math.nan, math.inf, 1e-39):
        yield f"temperature={bad}", lambda b=bad: f(s, ids, lp, temperature=b), ValueError
    yield "temperature str", lambda: f(s, ids, lp, temperature="1"), TypeError
    yield "reduction", lambda: f(s, ids, lp, reduction="avg"), ValueError
    yield "mask float", lambda: f(s, ids, lp, mask=torch.ones(3)), TypeError
    yield "mask shape", lambda: f(s, ids, lp, mask=torch.ones(2, dtype=torch.bool)), ValueError
    yield "weights int", lambda: f(s, ids, lp, token_weights=torch.ones(3).long()), TypeError
    yield "divergence", lambda: f(s, ids, lp, divergence="kl"), ValueError
    for name, key, bad in (
        ("jsd", "beta", 1.0),
        ("skew_forward_kl", "alpha", 0.0),
        ("renyi", "alpha", 1.0),
        ("alpha_beta", "beta", -1.0),
    ):
        yield (
            f"{name} {key}={bad}",
            lambda n=name, kk=key, b=bad: f(s, ids, lp, divergence=n, **{kk: b}),
            ValueError,
        )
    yield "module tail", lambda: kd_kernels.SparseKDLoss(tail="top"), ValueError
    yield "module reduction", lambda: kd_kernels.SparseKDLoss(reduction="avg"), ValueError
    yield "module temperature", lambda: kd_kernels.SparseKDLoss(temperature=0.0), ValueError
    h, w = torch.randn(3, 5), torch.randn(v, 5)
    fl = kd_kernels.fused_linear_sparse_kd
    yield "fused weight transposed", lambda: fl(h, w.t(), ids, lp), ValueError
    yield "fused dtype mismatch", lambda: fl(h, w.bfloat16(), ids, lp), TypeError
    yield "fused ids lead", lambda: fl(h, w, ids[:2], lp[:2]), ValueError
    yield "fused reduction none", lambda: fl(h, w, ids, lp, reduction="none"), NotImplementedError
    yield "fused ce_weight without labels", lambda: fl(h, w, ids, lp, ce_weight=1.0), ValueError
    yield (
        "fused ce_weight",
        lambda: fl(h, w, ids, lp, labels=torch.tensor([0, 1, 2]), ce_weight=-1.0),
        ValueError,
    )
    yield "fused labels float", lambda: fl(h, w, ids, lp, labels=torch.zeros(3)), TypeError
    yield (
        "fused labels range",
        lambda: fl(h, w, ids, lp, labels=torch.tensor([0, v, 1])),
        ValueError,
    )
    yield "fused chunk_size", lambda: fl(h, w, ids, lp, chunk_size=0), ValueError
    yield "fused bias shape", lambda: fl(h, w, ids, lp, student_bias=torch.randn(v + 1)), ValueError
    tk = kd_kernels.teacher_topk
    yield "topk k=0", lambda: tk(h, w, 0), ValueError
    yield "topk k>V", lambda: tk(h, w, v + 1), ValueError
    yield "topk k float", lambda: tk(h, w, 2.0), TypeError
    yield "topk k bool", lambda: tk(h, w, True), TypeError
    yield "topk temperature", lambda: tk(h, w, 2, temperature=0.0), ValueError
    yield "topk chunk_size", lambda: tk(h, w, 2, chunk_size=-1), ValueError
    yield "topk weight transposed", lambda: tk(h, w.t(), 2), ValueError
    yield "topk hidden int", lambda: tk(h.long(), w, 2), TypeError


def invalid_sparse_cases(seed: int, report: Report) -> None:
    expect_errors(
        report, f"invalid_sparse_cases(seed={seed})", _bad_sparse_calls(random.Random(seed))
    )
