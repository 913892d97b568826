"""kd_kernels.parallel (vocabulary-parallel KD) and FSDP2-sharded lm_heads, on 2 and 3 gloo CPU
processes spawned by the test (loopback only, bounded by a timeout).

One spawn per world size runs every case inside (process start-up dominates the cost); each rank
checks its results against the float64 reference on the unsharded tensors and reports the failures
of every case, so one failing case does not hide the others.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from kd_kernels._spec import Divergence

DIVERGENCES = tuple(d.label for d in Divergence)  # every one has a vocabulary-parallel form
COEF = {
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.3},
    "jsd": {"beta": 0.4},
    "alpha_beta": {"alpha": 0.6, "beta": 0.8},
    "renyi": {"alpha": 1.5},  # α > 1: the p^α q^(1−α) terms grow where q ≪ p
}
SPLITS = {2: [600, 431], 3: [300, 400, 331]}  # V = 1031, uneven
RTOL = 1e-5  # fp32 against the float64 reference, relative (norm-wise)
TIMEOUT_S = 240


def _vp_backends() -> tuple[str, str, str]:
    """(the compiled cpu one, torch, triton) where they run here; the cases spread over them (one spawn
    for all: process start-up dominates), "torch" standing in for one that cannot run."""
    from kd_kernels._backends import _vocab_parallel as vp
    from kd_kernels._backends import available_backends

    vp.resolve("torch")  # loads the backends, which register their implementations
    have = [b for b in available_backends("cpu") if b in vp._REGISTRY]
    return tuple(b if b in have else "torch" for b in ("cpu", "torch", "triton"))


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(triples: dict) -> dict:
    """{name: (ours, single-process kd_kernels or None, float64 reference)} → the failures: ours
    vs the single-process call or vs float64 beyond RTOL + twice the single-process call's own
    error against float64 (the fp32 rounding of the unsharded computation: two fp32 results of one
    sum differ by up to their two errors)."""
    bad = {}
    for key, (ours, single, ref) in triples.items():
        own = _rel(single, ref) if single is not None else 0.0
        errs = (_rel(ours, single) if single is not None else 0.0, _rel(ours, ref))
        if not max(errs) <= RTOL + 2 * own:
            bad[key] = errs
    return bad


def _reference(
    div,
    hs,
    ws,
    bs,
    ht,
    wt,
    bt,
    *,
    labels=None,
    ce_weight=0.0,
    mask=None,
    token_weights=None,
    reduction="mean",
    temperature=1.0,
    **kw,
):
    """float64 loss and (∂h_s, ∂W_s, ∂b_s) of the unsharded problem."""
    from kd_kernels import reference as R

    H = hs.detach().double().requires_grad_()
    W = ws.detach().double().requires_grad_()
    B = bs.detach().double().requires_grad_() if bs is not None else None
    s = H @ W.T + (B if B is not None else 0)
    t = ht.double() @ wt.double().T + (bt.double() if bt is not None else 0)
    if mask is None and labels is not None:
        mask = labels != -100
    loss = R.kd_loss(
        div,
        s,
        t,
        mask=mask,
        token_weights=token_weights,
        reduction=reduction,
        temperature=temperature,
        **kw,
    )
    if labels is not None:
        valid = labels != -100
        if mask is not None:
            valid = valid & mask
        lab = torch.where(valid, labels, torch.full_like(labels, -100))
        ce = R.cross_entropy_per_token(s, lab).sum()
        if reduction == "mean":
            ce = ce / valid.sum().clamp_min(1)
        loss = loss + ce_weight * ce
    loss.backward()
    return loss.detach(), H.grad, W.grad, (B.grad if B is not None else None)


def _fused_cases(world: int, rank: int, group, out: list) -> None:
    import kd_kernels
    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    g = torch.Generator().manual_seed(1234)  # the same full tensors on every rank
    lead, d_s, d_t, v = (3, 7), 16, 12, sum(split)
    hs = torch.randn(*lead, d_s, generator=g)
    ws = torch.randn(v, d_s, generator=g) / d_s**0.5 * 2
    bs = torch.randn(v, generator=g)
    ht = torch.randn(*lead, d_t, generator=g)
    wt = torch.randn(v, d_t, generator=g) / d_t**0.5 * 2
    bt = torch.randn(v, generator=g)
    labels = torch.randint(0, v, lead, generator=g)
    labels[0, :2] = -100
    labels[1, 3] = split[0]  # a label at a shard boundary
    labels[2, 1] = v - 1
    mask = torch.rand(lead, generator=g) > 0.25
    token_weights = torch.rand(lead, generator=g) + 0.5
    cpu, _, triton = _vp_backends()
    configs = []
    for i, div in enumerate(DIVERGENCES):
        configs.append(
            (
                div,
                {
                    "labels": labels,
                    "ce_weight": 0.5,
                    "mask": mask,
                    "token_weights": token_weights,
                    "chunk_size": 5,
                    "bias": True,
                    "backend": "auto",  # the compiled cpu implementation where it is built
                },
            )
        )
        configs.append(
            (
                div,
                {
                    "temperature": 2.0,
                    "reduction": "sum",
                    "bias": False,
                    "backend": "torch" if i % 2 else triton,
                },
            )
        )
    configs.append(
        ("forward_kl", {"labels": labels, "ce_weight": 1.5, "temperature": 2.0, "bias": True})
    )
    configs.append(("jsd", {"labels": labels, "ce_weight": 0.0, "reduction": "sum", "bias": True}))
    for div, cfg in configs:
        name = f"fused {div} {sorted(k for k in cfg)} T={cfg.get('temperature', 1.0)}"
        try:
            bias = cfg.pop("bias")
            backend = cfg.pop("backend", "auto")
            name += f" {backend}"
            kw = {**COEF.get(div, {}), **cfg}
            ref = _reference(
                div,
                hs,
                ws,
                bs if bias else None,
                ht,
                wt,
                bt if bias else None,
                **{k: x for k, x in kw.items() if k != "chunk_size"},
            )
            h = hs.clone().requires_grad_()
            w = ws[lo:hi].clone().requires_grad_()
            b = bs[lo:hi].clone().requires_grad_() if bias else None
            loss, parts = P.fused_linear_kd(
                h,
                w,
                ht,
                wt[lo:hi],
                group=group,
                divergence=div,
                student_bias=b,
                teacher_bias=bt[lo:hi] if bias else None,
                return_components=True,
                backend=backend,
                **kw,
            )
            loss.backward()
            H, W = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            B = bs.clone().requires_grad_() if bias else None
            kd_kernels.fused_linear_kd(
                H,
                W,
                ht,
                wt,
                divergence=div,
                student_bias=B,
                teacher_bias=bt if bias else None,
                backend="torch",
                **kw,
            ).backward()
            triples = {
                "loss": (loss, None, ref[0]),
                "h": (h.grad, H.grad, ref[1]),
                "w": (w.grad, W.grad[lo:hi], ref[2][lo:hi]),
            }
            if bias:
                triples["b"] = (b.grad, B.grad[lo:hi], ref[3][lo:hi])
            bad = _compare(triples)
            # Loss-only path (no grad) must give the same number.
            with torch.no_grad():
                again = P.fused_linear_kd(
                    hs,
                    ws[lo:hi],
                    ht,
                    wt[lo:hi],
                    group=group,
                    divergence=div,
                    student_bias=bs[lo:hi] if bias else None,
                    teacher_bias=bt[lo:hi] if bias else None,
                    backend=backend,
                    **kw,
                )
            if again.item() != loss.item():
                bad["no_grad"] = (again.item(), loss.item())
            total = parts.kd + cfg.get("ce_weight", 0.0) * (parts.ce if parts.ce is not None else 0)
            if not torch.allclose(total, loss.detach(), rtol=1e-6, atol=0):
                bad["components"] = (parts.kd.item(), loss.item())
            if cfg.get("labels") is None and parts.ce is not None:
                bad["components"] = "ce without labels"
            out.append({"case": name, "bad": bad})
        except Exception:  # noqa: BLE001 - reported per case
            out.append({"case": name, "bad": traceback.format_exc()})


def _bf16_case(world: int, rank: int, group, out: list) -> None:
    """bf16 heads: the sharded loss and gradients track the single-process bf16 call as closely as
    that call tracks float64 (plus a bf16 slack)."""
    import kd_kernels
    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    g = torch.Generator().manual_seed(3)
    v, d = sum(split), 32
    hs = torch.randn(20, d, generator=g).bfloat16()
    ws = (torch.randn(v, d, generator=g) / d**0.5 * 2).bfloat16()
    ht = torch.randn(20, d, generator=g).bfloat16()
    wt = (torch.randn(v, d, generator=g) / d**0.5 * 2).bfloat16()
    name = "fused bf16 skew_reverse_kl"
    try:
        ref = _reference("skew_reverse_kl", hs, ws, None, ht, wt, None, alpha=0.3)
        h, w = hs.clone().requires_grad_(), ws[lo:hi].clone().requires_grad_()
        loss = P.fused_linear_kd(
            h, w, ht, wt[lo:hi], group=group, divergence="skew_reverse_kl", alpha=0.3
        )
        loss.backward()
        H, W = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        one = kd_kernels.fused_linear_kd(
            H, W, ht, wt, divergence="skew_reverse_kl", alpha=0.3, backend="torch"
        )
        one.backward()
        bad = {}
        for key, ours, single, r in (
            ("loss", loss, one, ref[0]),
            ("h", h.grad, H.grad, ref[1]),
            ("w", w.grad, W.grad[lo:hi], ref[2][lo:hi]),
        ):
            if not _rel(ours, r) <= _rel(single, r) + 1e-2:
                bad[key] = (_rel(ours, r), _rel(single, r))
        if h.grad.dtype != torch.bfloat16 or w.grad.dtype != torch.bfloat16:
            bad["dtype"] = (h.grad.dtype, w.grad.dtype)
        out.append({"case": name, "bad": bad})
    except Exception:  # noqa: BLE001
        out.append({"case": name, "bad": traceback.format_exc()})


def _traffic_case(world: int, rank: int, group, out: list) -> None:
    """The bytes each rank sends per call match the documented count (module doc of
    kd_kernels.parallel): 4·K per counted token for the statistics, 8 for the row sums of skew /
    JSD / tvd / jeffreys / alpha_beta, N·D_s elements for the hidden-state gradient."""
    import torch.distributed as dist

    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    n, d = 21, 16
    torch.manual_seed(11)
    hs, ws = torch.randn(n, d), torch.randn(sum(split), d)
    ht, wt = torch.randn(n, 8), torch.randn(sum(split), 8)
    labels = torch.randint(0, sum(split), (n,))
    sent = {"all_gather": 0, "all_reduce": 0}
    real = dist.all_gather, dist.all_reduce

    def gather(parts, x, *a, **k):
        if x.dtype == torch.float32:  # all_gather_object's own uint8 / int64 traffic excluded
            sent["all_gather"] += x.numel() * x.element_size()
        return real[0](parts, x, *a, **k)

    def reduce(x, *a, **k):
        sent["all_reduce"] += x.numel() * x.element_size()
        return real[1](x, *a, **k)

    for div, kw, k_stats, sums in (
        ("forward_kl", {"labels": labels, "ce_weight": 1.0, "temperature": 2.0}, 5 + 1 + 2, 0),
        ("jsd", {}, 4, 8),
        ("alpha_beta", {}, 4, 8),
        ("renyi", {"labels": labels}, 6 + 1, 0),
    ):
        name = f"traffic {div}"
        sent.update(all_gather=0, all_reduce=0)
        dist.all_gather, dist.all_reduce = gather, reduce
        try:
            h = hs.clone().requires_grad_()
            P.fused_linear_kd(h, ws[lo:hi], ht, wt[lo:hi], group=group, divergence=div, **kw)
        except Exception:  # noqa: BLE001
            out.append({"case": name, "bad": traceback.format_exc()})
            continue
        finally:
            dist.all_gather, dist.all_reduce = real
        want = {"all_gather": 4 * k_stats * n, "all_reduce": sums * n + 4 * n * d}
        out.append({"case": name, "bad": {} if sent == want else {"sent": sent, "want": want}})


def _logits_cases(world: int, rank: int, group, out: list) -> None:
    import kd_kernels
    import kd_kernels.parallel as P
    from kd_kernels import reference as R

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    g = torch.Generator().manual_seed(99)
    lead, v = (2, 9), sum(split)
    s_full = torch.randn(*lead, v, generator=g) * 3
    t_full = torch.randn(*lead, v, generator=g) * 3
    # Rank 0's whole shard of one row is −inf in both (legal: a masked vocabulary range).
    s_full[0, 0, : split[0]] = t_full[0, 0, : split[0]] = -float("inf")
    mask = torch.rand(lead, generator=g) > 0.3
    token_weights = torch.rand(lead, generator=g) + 0.5
    upstream = torch.randn(lead, generator=g)
    cpu, torch_, triton = _vp_backends()
    for div in DIVERGENCES:
        for cfg in (
            {"mask": mask, "token_weights": token_weights, "backend": cpu},
            {"reduction": "none", "temperature": 0.7, "backend": torch_},
            {"reduction": "sum", "temperature": 2.0, "backend": triton},
        ):
            name = f"kd_loss {div} {sorted(cfg)} {cfg['backend']}"
            try:
                kw = {**COEF.get(div, {}), **cfg}
                # −1e4 for −inf in float64: the same loss (e^{−1e4} = 0), and autograd through
                # the reference gives 0 rather than NaN at those columns.
                S = s_full.double().clamp_min(-1e4).requires_grad_()
                backend = kw.pop("backend")
                ref = R.kd_loss(div, S, t_full.double().clamp_min(-1e4), **kw)
                s = s_full[..., lo:hi].clone().requires_grad_()
                loss = P.kd_loss(
                    s, t_full[..., lo:hi], group=group, divergence=div, backend=backend, **kw
                )
                if kw.get("reduction") == "none":
                    (ref * upstream.double()).sum().backward()
                    (loss * upstream).sum().backward()
                else:
                    ref.backward()
                    loss.backward()
                one = s_full.clone().requires_grad_()
                single = kd_kernels.kd_loss(one, t_full, divergence=div, backend="torch", **kw)
                (single * upstream if kw.get("reduction") == "none" else single).sum().backward()
                bad = _compare(
                    {
                        "loss": (loss, single, ref),
                        "grad": (s.grad, one.grad[..., lo:hi], S.grad[..., lo:hi]),
                    }
                )
                out.append({"case": name, "bad": bad})
            except Exception:  # noqa: BLE001
                out.append({"case": name, "bad": traceback.format_exc()})


def _expect_error(out: list, name: str, exc: type, words: tuple[str, ...], fn) -> None:
    try:
        fn()
    except exc as e:
        missing = [w for w in words if w not in str(e)]
        out.append({"case": name, "bad": f"message lacks {missing}: {e}" if missing else {}})
    except Exception:  # noqa: BLE001
        out.append({"case": name, "bad": traceback.format_exc()})
    else:
        out.append({"case": name, "bad": "no error raised"})


def _error_cases(world: int, rank: int, group, out: list) -> None:
    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    v = sum(split)
    torch.manual_seed(5)  # the same replicated tensors on every rank
    h, ht = torch.randn(4, 8), torch.randn(4, 6)
    ws, wt = torch.randn(hi - lo, 8), torch.randn(hi - lo, 6)
    _expect_error(
        out,
        "group None",
        TypeError,
        ("group",),
        lambda: P.fused_linear_kd(h, ws, ht, wt, group=None),
    )
    wt_bad = torch.randn(hi - lo + (1 if rank == 0 else 0), 6)
    _expect_error(
        out,
        "uneven heads",
        ValueError,
        ("rank 0", "teacher_weight"),
        lambda: P.fused_linear_kd(h, ws, ht, wt_bad, group=group),
    )
    labels = torch.tensor([0, 1, -100, v])
    _expect_error(
        out,
        "label out of range",
        ValueError,
        ("labels", str(v)),
        lambda: P.fused_linear_kd(h, ws, ht, wt, group=group, labels=labels),
    )
    _expect_error(
        out,
        "ranks disagree",
        ValueError,
        ("disagree", "spec"),
        lambda: P.fused_linear_kd(h, ws, ht, wt, group=group, temperature=1.0 + rank),
    )
    _expect_error(
        out,
        "ranks disagree on alpha_beta's beta",
        ValueError,
        ("disagree", "spec"),
        lambda: P.kd_loss(
            ws.T[:2].contiguous(),
            wt.T[:2].contiguous(),
            group=group,
            divergence="alpha_beta",
            beta=0.5 + 0.1 * rank,
        ),
    )
    bad_dtype = ws.double() if rank == world - 1 else ws
    _expect_error(
        out,
        "one rank's bad dtype",
        TypeError,
        ("student_weight",),
        lambda: P.fused_linear_kd(h, bad_dtype, ht, wt, group=group),
    )
    s, t = torch.randn(4, hi - lo), torch.randn(4, hi - lo + (rank == 1))
    _expect_error(
        out,
        "kd_loss shard mismatch",
        ValueError,
        ("rank 1", "teacher_logits"),
        lambda: P.kd_loss(s, t, group=group),
    )
    _expect_error(
        out,
        "explicit backend without vp",
        Exception,
        ("vocabulary-parallel",),
        lambda: P.fused_linear_kd(h, ws, ht, wt, group=group, backend="cuda"),
    )
    h_drop = h + 0.01 * rank  # e.g. dropout with a different seed per rank
    _expect_error(
        out,
        "hidden states differ",
        ValueError,
        ("disagree", "student_hidden"),
        lambda: P.fused_linear_kd(h_drop, ws, ht, wt, group=group),
    )
    # NaN semantics: a NaN in one rank's shard of a counted row makes that row's loss NaN and its
    # whole gradient row NaN on every rank; a masked row with NaN stays exactly 0; others exact.
    s_nan = torch.randn(4, hi - lo)
    if rank == world - 1:
        s_nan[1, 0] = s_nan[2, 0] = float("nan")
    x = s_nan.clone().requires_grad_()
    keep = torch.tensor([True, True, False, True])
    per_tok = P.kd_loss(x, torch.randn(4, hi - lo), group=group, mask=keep, reduction="none")
    per_tok.sum().backward()
    finite = torch.tensor([True, False, True, True])
    ok = (
        bool(per_tok[1].isnan())
        and bool(x.grad[1].isnan().all())
        and per_tok[2].item() == 0.0
        and bool((x.grad[2] == 0).all())
        and bool(per_tok[finite].isfinite().all())
        and bool(x.grad[finite].isfinite().all())
    )
    out.append({"case": "nan row", "bad": {} if ok else (per_tok.tolist(), x.grad.isnan().sum())})
    # After all of that the group still works (every error was raised at the same collective).
    loss = P.kd_loss(s, s, group=group)
    out.append({"case": "group still usable", "bad": {} if loss.item() == 0.0 else loss.item()})


def _fused_none_cases(world: int, rank: int, group, out: list) -> None:
    """reduction="none" (issue 26): per-token losses, components and, for a random upstream
    gradient (the same on every rank), the gradients equal the single-process call's."""
    import kd_kernels
    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    g = torch.Generator().manual_seed(4321)
    lead, d_s, d_t, v = (2, 5), 8, 6, sum(split)
    hs, ht = torch.randn(*lead, d_s, generator=g), torch.randn(*lead, d_t, generator=g)
    ws, wt = torch.randn(v, d_s, generator=g), torch.randn(v, d_t, generator=g)
    bs = torch.randn(v, generator=g)
    labels = torch.randint(0, v, lead, generator=g)
    labels[0, 1] = -100
    kw = {
        "labels": labels,
        "ce_weight": 0.5,
        "mask": torch.rand(lead, generator=g) > 0.2,
        "token_weights": torch.rand(lead, generator=g) + 0.5,
        "reduction": "none",
        "chunk_size": 4,
        "return_components": True,
    }
    upstream = torch.randn(lead, generator=g)
    for div, backend in zip(("reverse_kl", "jsd", "renyi"), _vp_backends()):
        name = f"fused none {div} {backend}"
        try:
            h, w, b = (x.clone().requires_grad_() for x in (hs, ws[lo:hi], bs[lo:hi]))
            loss, parts = P.fused_linear_kd(
                h,
                w,
                ht,
                wt[lo:hi],
                group=group,
                divergence=div,
                student_bias=b,
                backend=backend,
                **kw,
            )
            (loss * upstream).sum().backward()
            H, W, B = (x.clone().requires_grad_() for x in (hs, ws, bs))
            one, one_parts = kd_kernels.fused_linear_kd(
                H, W, ht, wt, divergence=div, student_bias=B, backend="torch", **kw
            )
            (one * upstream).sum().backward()
            with torch.no_grad():
                again = P.fused_linear_kd(
                    hs,
                    ws[lo:hi],
                    ht,
                    wt[lo:hi],
                    group=group,
                    divergence=div,
                    student_bias=bs[lo:hi],
                    backend=backend,
                    **kw,
                )[0]
            bad = {"shape": tuple(loss.shape)} if loss.shape != lead else {}
            bad.update(
                _compare(
                    {
                        "loss": (loss, None, one),
                        "no_grad": (again, None, one),
                        "kd": (parts.kd, None, one_parts.kd),
                        "ce": (parts.ce, None, one_parts.ce),
                        "h": (h.grad, None, H.grad),
                        "w": (w.grad, None, W.grad[lo:hi]),
                        "b": (b.grad, None, B.grad[lo:hi]),
                    }
                )
            )
            out.append({"case": name, "bad": bad})
        except Exception:  # noqa: BLE001
            out.append({"case": name, "bad": traceback.format_exc()})


def _agreement_cases(world: int, rank: int, group, out: list) -> None:
    """Inputs whose rows are permuted on one rank (same values, so the same sums) are caught; a
    ce_weight beyond fp32 is rejected as by the single-process call (issue 26)."""
    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    g = torch.Generator().manual_seed(77)  # the same replicated tensors on every rank
    h, ht = torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g)
    ws, wt = torch.randn(hi - lo, 8, generator=g), torch.randn(hi - lo, 5, generator=g)
    s, t = torch.randn(6, hi - lo, generator=g), torch.randn(6, hi - lo, generator=g)
    labels = torch.randint(0, sum(split), (6,), generator=g)
    mask = torch.tensor([True, True, False, True, False, True])
    weights = torch.rand(6, generator=g) + 0.5
    last = rank == world - 1

    def perm(x):  # rows rolled by one on the last rank only
        return x.roll(1, 0) if last else x

    calls = {
        "student_hidden": lambda: P.fused_linear_kd(perm(h), ws, ht, wt, group=group),
        "teacher_hidden": lambda: P.fused_linear_kd(h, ws, perm(ht), wt, group=group),
        "labels": lambda: P.fused_linear_kd(h, ws, ht, wt, group=group, labels=perm(labels)),
        "mask": lambda: P.kd_loss(s, t, group=group, mask=perm(mask)),
        "token_weights": lambda: P.kd_loss(s, t, group=group, token_weights=perm(weights)),
    }
    for key, fn in calls.items():
        _expect_error(out, f"permuted {key}", ValueError, ("disagree", key), fn)
    _expect_error(
        out,
        "ce_weight beyond fp32",
        ValueError,
        ("ce_weight=1e+39", "float32"),
        lambda: P.fused_linear_kd(h, ws, ht, wt, group=group, labels=labels, ce_weight=1e39),
    )


def _fsdp_cases(world: int, rank: int, group, out: list) -> None:
    """kd_kernels.fused_linear_kd (the ordinary one) with an FSDP2-sharded lm_head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import kd_kernels

    d, v, n = 8, 37, 6
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(v, d, generator=g)
    wt = torch.randn(v, 5, generator=g)
    data = [(torch.randn(n, d, generator=g), torch.randn(n, 5, generator=g)) for _ in range(world)]

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(d, v, bias=False)

        def forward(self, h, h_t, w_t):
            return kd_kernels.fused_linear_kd(
                h, self.lm_head.weight, h_t, w_t, divergence="jsd", backend="torch"
            )

    mesh = init_device_mesh("cpu", (world,))
    for name in ("fsdp2 inside forward", "fsdp2 teacher dtensor", "fsdp2 student outside"):
        try:
            model = Head()
            with torch.no_grad():
                model.lm_head.weight.copy_(w0)
            fully_shard(model, mesh=mesh)
            h, h_t = data[rank]
            bad: dict | str = {}
            if name == "fsdp2 inside forward":
                loss = model(h, h_t, wt)
                loss.backward()
                # FSDP2 averages the ranks' gradients: compare with the mean of the per-rank ones
                ref = torch.zeros(v, d, dtype=torch.float64)
                for hr, htr in data:
                    W = w0.double().requires_grad_()
                    from kd_kernels import reference as R

                    R.kd_loss("jsd", hr.double() @ W.T, htr.double() @ wt.double().T).backward()
                    ref += W.grad / world
                grad = model.lm_head.weight.grad.full_tensor()
                if not _rel(grad, ref) <= RTOL:
                    bad = {"w": _rel(grad, ref)}
            elif name == "fsdp2 teacher dtensor":
                teacher = torch.nn.Linear(5, v, bias=False)
                with torch.no_grad():
                    teacher.weight.copy_(wt)
                fully_shard(teacher, mesh=mesh)
                got = kd_kernels.fused_linear_kd(h, w0, h_t, teacher.weight, divergence="jsd")
                want = kd_kernels.fused_linear_kd(h, w0, h_t, wt, divergence="jsd")
                if not _rel(got, want) <= RTOL:
                    bad = {"loss": (got.item(), want.item())}
            else:
                try:
                    kd_kernels.fused_linear_kd(h, model.lm_head.weight, h_t, wt)
                    bad = "no error for a sharded student weight outside forward"
                except TypeError as e:
                    if "fully_shard" not in str(e):
                        bad = f"unclear message: {e}"
            out.append({"case": name, "bad": bad})
        except Exception:  # noqa: BLE001
            out.append({"case": name, "bad": traceback.format_exc()})


def _whitening_case(world, rank, group, out) -> None:
    """MiniLLM's official whitening summed over real data-parallel ranks (issue 16): each rank's
    block whitened with the trainer's all-reduce equals the whole (all ranks') block whitened in
    one process, on this rank's rows."""
    try:
        from kd_kernels.train.methods import _sum_over_ranks
        from kd_kernels.train.minillm import whiten_block

        width, blocks = 6, []
        for r in range(world):  # every rank builds every block (same seeds), uses its own
            g = torch.Generator().manual_seed(100 + r)
            vals = torch.randn(2 + r, width, generator=g, dtype=torch.float64) * (1 + r)
            mask = torch.rand(2 + r, width, generator=g) < 0.7
            blocks.append((vals, mask))
        vals, mask = blocks[rank]
        got = whiten_block(vals, mask, width, _sum_over_ranks(world))
        whole = whiten_block(
            torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks]), width
        )
        lo = sum(2 + r for r in range(rank))
        want = whole[lo : lo + vals.shape[0]]
        alone = whiten_block(vals, mask, width)
        bad = None
        if not torch.allclose(got, want, rtol=1e-12, atol=1e-12):
            bad = f"cross-rank whitening differs: {(got - want).abs().max().item()}"
        elif torch.allclose(alone, want):
            bad = "the per-rank whitening equals the global one: the case cannot tell them apart"
        out.append({"case": "minillm_whiten_block_over_ranks", "bad": bad})
    except Exception:  # noqa: BLE001
        out.append({"case": "minillm_whiten_block_over_ranks", "bad": traceback.format_exc()})


def _second_order_cases(world: int, rank: int, group, out: list) -> None:
    """A second derivative through either parallel loss raises kd_kernels' error (as in
    tests/test_second_order.py), under torch.autograd.grad, for every reduction."""
    import kd_kernels.parallel as P

    split = SPLITS[world]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    torch.manual_seed(11)  # the same replicated tensors on every rank
    s_full, t_full = torch.randn(4, sum(split)), torch.randn(4, sum(split))
    h, ht = torch.randn(4, 8), torch.randn(4, 6)
    ws, wt = torch.randn(sum(split), 8)[lo:hi], torch.randn(sum(split), 6)[lo:hi]
    calls = {
        "kd_loss": (s_full[:, lo:hi], lambda x: P.kd_loss(x, t_full[:, lo:hi], group=group)),
        "fused_linear_kd": (h, lambda x: P.fused_linear_kd(x, ws, ht, wt, group=group)),
        "fused_linear_kd none": (
            h,
            lambda x: P.fused_linear_kd(x, ws, ht, wt, group=group, reduction="none").sum(),
        ),
    }
    for name, (x0, loss_of) in calls.items():
        case = f"second derivative {name}"
        x = x0.clone().requires_grad_()
        try:
            (g,) = torch.autograd.grad(loss_of(x) + 0.01 * (x**3).sum(), x, create_graph=True)
        except Exception:  # noqa: BLE001
            out.append({"case": case, "bad": traceback.format_exc()})
            continue
        _expect_error(
            out,
            case,
            RuntimeError,
            ("differentiable once", "kd_kernels.reference"),
            lambda g=g, x=x: torch.autograd.grad((g * g.detach()).sum(), x),
        )


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out: list = []
    try:
        group = dist.group.WORLD
        _fused_cases(world, rank, group, out)
        _bf16_case(world, rank, group, out)
        _traffic_case(world, rank, group, out)
        _logits_cases(world, rank, group, out)
        _error_cases(world, rank, group, out)
        _fused_none_cases(world, rank, group, out)
        _agreement_cases(world, rank, group, out)
        _whitening_case(world, rank, group, out)
        _second_order_cases(world, rank, group, out)
        if world == 2:  # FSDP2 needs no more ranks to show its reduce-scatter; keeps CI short
            _fsdp_cases(world, rank, group, out)
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        # Every rank out of its last collective before any tears the group down (a rank that
        # closes its sockets while a peer still reads can make gloo abort the peer).
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_matches_unsharded(world, tmp_path):
    ctx = mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        n_div = 9
        fsdp = 3 if world == 2 else 0
        # fused, bf16, traffic, logits, errors, whitening, fused "none", agreement, second
        # derivatives, fsdp
        expected = 2 * n_div + 2 + 1 + 4 + 3 * n_div + 11 + 1 + 3 + 6 + 3 + fsdp
        assert len(results) == expected, [r["case"] for r in results]
        names = " ".join(r["case"] for r in results)
        for backend in set(_vp_backends()):  # every implementation that runs here took part
            assert f" {backend}" in names, backend
        failures = [r for r in results if r["bad"]]
        assert not failures, f"rank {rank}: " + "\n".join(
            f"{r['case']}: {r['bad']}" for r in failures
        )


def test_every_divergence_has_a_vocab_parallel_form(tmp_path):
    """Every divergence of kd_kernels is accepted by kd_kernels.parallel (the spawned tests above
    check each against the unsharded call); here, in process on a group of one, each equals the
    single-process kd_loss, loss and gradient."""
    import torch.distributed as dist

    import kd_kernels
    import kd_kernels.parallel as P

    assert DIVERGENCES == tuple(d.label for d in Divergence)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        g = torch.Generator().manual_seed(0)
        s0, t = torch.randn(3, 11, generator=g) * 2, torch.randn(3, 11, generator=g) * 2
        for divergence in DIVERGENCES:
            kw = COEF.get(divergence, {})
            s = s0.clone().requires_grad_()
            P.kd_loss(s, t, group=group, divergence=divergence, temperature=0.8, **kw).backward()
            one = s0.clone().requires_grad_()
            ref = kd_kernels.kd_loss(
                one, t, divergence=divergence, temperature=0.8, backend="torch", **kw
            )
            ref.backward()
            again = P.kd_loss(s0, t, group=group, divergence=divergence, temperature=0.8, **kw)
            assert _rel(again, ref) <= RTOL, divergence
            assert _rel(s.grad, one.grad) <= RTOL, divergence
    finally:
        dist.destroy_process_group()
