"""Fuzzing ``kd_kernels.parallel`` (``kd_loss`` and ``fused_linear_kd``) on gloo CPU processes:
random uneven vocabulary splits, every divergence, dtypes, temperatures, masks, token weights,
reductions, labels / CE, each call compared with the single-process call on the unsharded tensors
and with the float64 reference; NaN rows in one rank's shard against the documented semantics;
invalid calls raise the same typed error on every rank (and the group stays usable).

``run(seeds, world)`` spawns ``world`` processes once and runs every seed inside (process start-up
dominates); a case is a function of ``(seed, world)``, the same on every rank.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
import traceback

import torch
from _fuzz import DIVERGENCES, Failure, Report, check_bad_row, coef_for, expect_errors

RTOL = 1e-5  # beyond twice the single-process call's own error against float64


def _vp_backends() -> list[str]:
    from kd_kernels._backends import _vocab_parallel as vp
    from kd_kernels._backends import available_backends

    vp.resolve("torch")  # loads the backends, which register their implementations
    return [b for b in available_backends("cpu") if b in vp._REGISTRY]


def _split(rng: random.Random, vocab: int, world: int) -> list[int]:
    """Uneven positive shard sizes summing to vocab."""
    cuts = sorted(rng.sample(range(1, vocab), world - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, vocab])]


def _close(report: Report, case: str, what: str, ours, single, ref, floor: float) -> None:
    """ours as close to float64 as the unsharded call is (twice its error, + RTOL), and to it."""
    ours, single, ref = (x.detach().double() for x in (ours, single, ref))
    own = (single - ref).norm().item()
    err = (ours - ref).norm().item()
    bound = 2 * own + RTOL * ref.norm().item() + floor
    report.check(err <= bound, case, f"{what} error {err:.3g} > {bound:.3g} (unsharded {own:.3g})")


def _options(rng: random.Random, gen: torch.Generator, lead: tuple) -> dict:
    mask = (torch.rand(lead, generator=gen) < 0.6) if rng.random() < 0.5 else None
    weights = None
    if rng.random() < 0.4:
        weights = torch.rand(lead, generator=gen) * 2
        if mask is not None:
            weights = weights.masked_fill(~mask, math.nan)  # masked rows add exactly 0
    reductions = ("mean", "sum", "none")
    return {
        "temperature": rng.choice([1.0, 2.0, 0.5, rng.uniform(0.3, 4.0)]),
        "mask": mask,
        "token_weights": weights,
        "reduction": rng.choice(reductions),
    }


def logits_case(seed: int, rank: int, world: int, group, report: Report) -> None:
    """parallel.kd_loss on this rank's columns against kd_kernels.kd_loss on the full logits."""
    import kd_kernels
    import kd_kernels.parallel as P
    from kd_kernels import reference as R

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    coef = coef_for(divergence, rng)
    vocab = rng.randint(world, 300)
    split = _split(rng, vocab, world)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    lead = rng.choice([(1,), (rng.randint(2, 9),), (2, rng.randint(1, 4))])
    dtype, backend = rng.choice((torch.float32, torch.bfloat16)), rng.choice(_vp_backends())
    opts = _options(rng, gen, lead)
    scale = rng.choice([1.0, 3.0])
    s_full = (torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t_full = (torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    upstream = torch.randn(lead if opts["reduction"] == "none" else (), generator=gen)
    case = (
        f"parallel logits_case(seed={seed}, world={world}) rank {rank} [{divergence} {coef} "
        f"split={split} lead={lead} {dtype} {backend} T={opts['temperature']:.3g} "
        f"{opts['reduction']} mask={opts['mask'] is not None} "
        f"weights={opts['token_weights'] is not None}]"
    )
    s = s_full[..., lo:hi].clone().requires_grad_()
    try:
        loss = P.kd_loss(
            s,
            t_full[..., lo:hi],
            group=group,
            divergence=divergence,
            backend=backend,
            **coef,
            **opts,
        )
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    one = s_full.clone().requires_grad_()
    single = kd_kernels.kd_loss(one, t_full, divergence=divergence, backend="torch", **coef, **opts)
    single.backward(upstream)
    clean = dict(opts)
    if opts["token_weights"] is not None and opts["mask"] is not None:
        clean["token_weights"] = torch.where(opts["mask"], opts["token_weights"], 0.0)
    s64 = s_full.double().requires_grad_()
    ref = R.kd_loss(divergence, s64, t_full.double(), **coef, **clean)
    ref.backward(upstream.double())
    report.check(
        loss.dtype == torch.float32 and loss.shape == ref.shape,
        case,
        f"loss {loss.dtype} {tuple(loss.shape)}",
    )
    report.check(s.grad.dtype == dtype, case, f"gradient dtype {s.grad.dtype}")
    _close(report, case, "loss", loss, single, ref, 1e-6 * scale)
    rounding = (s64.grad.to(dtype).double() - s64.grad).norm().item()
    _close(
        report,
        case,
        "shard gradient",
        s.grad,
        one.grad[..., lo:hi],
        s64.grad[..., lo:hi],
        2 * rounding + 1e-6 * scale,
    )


def fused_case(seed: int, rank: int, world: int, group, report: Report) -> None:
    """parallel.fused_linear_kd on this rank's head rows against kd_kernels.fused_linear_kd."""
    import kd_kernels
    import kd_kernels.parallel as P

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    coef = coef_for(divergence, rng)
    vocab, d_s, d_t = rng.randint(world, 300), rng.choice((4, 16)), rng.choice((6, 24))
    split = _split(rng, vocab, world)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    lead = rng.choice([(1,), (rng.randint(2, 12),), (2, rng.randint(1, 5))])
    dtype, backend = rng.choice((torch.float32, torch.bfloat16)), rng.choice(_vp_backends())
    opts = _options(rng, gen, lead)
    bias, chunk = rng.random() < 0.5, rng.choice((None, 1, 3))
    labels, ce_weight = None, 0.0
    if rng.random() < 0.5:
        labels = torch.randint(0, vocab, lead, generator=gen)
        labels = labels.masked_fill(torch.rand(lead, generator=gen) < 0.3, -100)
        ce_weight = rng.choice((0.0, 0.5, 1.0))
        if opts["mask"] is None and opts["token_weights"] is not None:
            opts["token_weights"] = opts["token_weights"].masked_fill(labels == -100, math.nan)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    hs, ht = rnd(*lead, d_s), rnd(*lead, d_t)
    ws, wt = rnd(vocab, d_s, s=2 / d_s**0.5), rnd(vocab, d_t, s=2 / d_t**0.5)
    bs, bt = (rnd(vocab), rnd(vocab)) if bias else (None, None)
    # the same upstream gradient on every rank (the seed is shared), as reduction="none" requires
    upstream = torch.randn(lead if opts["reduction"] == "none" else (), generator=gen)
    case = (
        f"parallel fused_case(seed={seed}, world={world}) rank {rank} [{divergence} {coef} "
        f"split={split} D={d_s}/{d_t} lead={lead} {dtype} {backend} "
        f"T={opts['temperature']:.3g} {opts['reduction']} mask={opts['mask'] is not None} "
        f"weights={opts['token_weights'] is not None} labels={labels is not None} "
        f"ce={ce_weight} bias={bias} chunk={chunk}]"
    )
    common = {
        "divergence": divergence,
        "labels": labels,
        "ce_weight": ce_weight,
        "chunk_size": chunk,
        **coef,
        **opts,
    }
    mine = [hs.clone().requires_grad_(), ws[lo:hi].clone().requires_grad_()]
    mine += [bs[lo:hi].clone().requires_grad_()] if bias else []
    try:
        loss = P.fused_linear_kd(
            mine[0],
            mine[1],
            ht,
            wt[lo:hi],
            group=group,
            backend=backend,
            student_bias=mine[2] if bias else None,
            teacher_bias=bt[lo:hi] if bias else None,
            **common,
        )
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    full = [x.clone().requires_grad_() for x in (hs, ws) + ((bs,) if bias else ())]
    single = kd_kernels.fused_linear_kd(
        full[0],
        full[1],
        ht,
        wt,
        backend="torch",
        student_bias=full[2] if bias else None,
        teacher_bias=bt,
        **common,
    )
    single.backward(upstream)
    f64 = [x.detach().double().requires_grad_() for x in full]
    ref = _fused_reference(f64, ht, wt, bt, common)
    ref.backward(upstream.double())
    scale = 1e-6 * (1 + ce_weight) * max(1.0, 3 / opts["temperature"])
    _close(report, case, "loss", loss, single, ref, scale)
    shards = (slice(None), slice(lo, hi), slice(lo, hi))
    for name, x, y, r, sl in zip(("h_s", "W_s shard", "b_s shard"), mine, full, f64, shards):
        _close(report, case, f"grad {name}", x.grad, y.grad[sl], r.grad[sl], 10 * scale)


def _fused_reference(f64: list, ht, wt, bt, common: dict) -> torch.Tensor:
    """The unsharded fused loss in float64 from its definition (logits, kd_loss, CE)."""
    from kd_kernels import reference as R

    s = f64[0] @ f64[1].T + (f64[2] if len(f64) > 2 else 0)
    t = ht.double() @ wt.double().T + (bt.double() if bt is not None else 0)
    labels, mask, weights = common["labels"], common["mask"], common["token_weights"]
    kd_mask = mask if mask is not None or labels is None else labels != -100
    if weights is not None and kd_mask is not None:
        weights = torch.where(kd_mask, weights, 0.0)
    coef = {k: common[k] for k in ("alpha", "beta") if k in common}
    total = R.kd_loss(
        common["divergence"],
        s,
        t,
        temperature=common["temperature"],
        mask=kd_mask,
        token_weights=weights,
        reduction=common["reduction"],
        **coef,
    )
    if labels is not None:
        valid = labels != -100 if mask is None else (labels != -100) & mask
        nll = R.cross_entropy_per_token(s, torch.where(valid, labels, -100))
        reduce = {
            "mean": lambda x: x.sum() / valid.sum().clamp_min(1),
            "sum": torch.sum,
            "none": lambda x: x,
        }
        ce = reduce[common["reduction"]](nll)
        total = total + common["ce_weight"] * ce
    return total


def hostile_case(seed: int, rank: int, world: int, group, report: Report) -> None:
    """A NaN / +inf / all −inf row in one rank's shard: counted, NaN loss and an all-NaN gradient
    on every rank; masked, exactly 0; every other row exact."""
    import kd_kernels.parallel as P
    from kd_kernels import reference as R

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    coef = coef_for(divergence, rng)
    vocab, n = rng.randint(2 * world, 100), rng.randint(2, 6)
    split = _split(rng, vocab, world)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    kind = rng.choice(("nan", "posinf", "neginf"))
    owner, bad = rng.randrange(world), rng.randrange(n)
    masked, backend = rng.random() < 0.4, rng.choice(_vp_backends())
    case = (
        f"parallel hostile_case(seed={seed}, world={world}) rank {rank} [{kind} in rank "
        f"{owner}'s shard, row {bad}, masked={masked} {divergence} {coef} split={split} "
        f"{backend}]"
    )
    s_full, t_full = torch.randn(n, vocab, generator=gen), torch.randn(n, vocab, generator=gen)
    o_lo, o_hi = sum(split[:owner]), sum(split[: owner + 1])
    target = s_full if rng.random() < 0.5 else t_full
    if kind == "neginf":  # the whole row −inf: not a distribution
        target[bad] = -math.inf
    else:
        target[bad, rng.randrange(o_lo, o_hi)] = math.nan if kind == "nan" else math.inf
    mask = torch.ones(n, dtype=torch.bool)
    mask[bad] = not masked
    x = s_full[:, lo:hi].clone().requires_grad_()
    try:
        loss = P.kd_loss(
            x,
            t_full[:, lo:hi],
            group=group,
            divergence=divergence,
            mask=mask,
            reduction="none",
            backend=backend,
            **coef,
        )
        loss.sum().backward()
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    good = [i for i in range(n) if i != bad]
    s64 = s_full[good].double().requires_grad_()
    ref = R.kd_loss(divergence, s64, t_full[good].double(), reduction="none", **coef)
    ref.sum().backward()
    err = (loss[good].double() - ref).abs().max().item()
    report.check(err <= 1e-4 * max(1.0, ref.abs().max().item()), case, f"other rows {err:.3g}")
    err = (x.grad[good].double() - s64.grad[:, lo:hi]).abs().max().item()
    report.check(err <= 1e-5, case, f"other rows' gradient {err:.3g}")
    check_bad_row(report, case, loss, x.grad, bad, masked)


def _bad_calls(rng: random.Random, rank: int, world: int, group):
    """Invalid calls, the same on every rank: each must raise its typed error on every rank."""
    import kd_kernels
    import kd_kernels.parallel as P

    v = 5 + rank  # uneven shards
    s, t = torch.randn(3, v), torch.randn(3, v)
    h, ws, ht, wt = torch.randn(3, 4), torch.randn(v, 4), torch.randn(3, 6), torch.randn(v, 6)
    kd, fl = P.kd_loss, P.fused_linear_kd
    yield "group None", lambda: kd(s, t, group=None), TypeError
    yield "group str", lambda: kd(s, t, group="tp"), TypeError
    for bad in (0.0, -1.0, math.nan, math.inf, 1e-39):
        yield f"temperature={bad}", lambda b=bad: kd(s, t, group=group, temperature=b), ValueError
    yield "reduction", lambda: kd(s, t, group=group, reduction=rng.choice(["avg", ""])), ValueError
    yield "divergence", lambda: kd(s, t, group=group, divergence="kl"), ValueError
    yield "jsd beta=1", lambda: kd(s, t, group=group, divergence="jsd", beta=1.0), ValueError
    yield "renyi alpha=1", lambda: kd(s, t, group=group, divergence="renyi", alpha=1.0), ValueError
    yield "interpolation", lambda: kd(s, t, group=group, interpolation=0.5), NotImplementedError
    yield "inplace_grad", lambda: kd(s, t, group=group, inplace_grad=True), TypeError
    yield "student int", lambda: kd(s.long(), t, group=group), TypeError
    yield "lead mismatch", lambda: kd(s, torch.randn(4, v), group=group), ValueError
    yield "mask float", lambda: kd(s, t, group=group, mask=torch.ones(3)), TypeError
    yield (
        "mask shape",
        lambda: kd(s, t, group=group, mask=torch.ones(2, dtype=torch.bool)),
        ValueError,
    )
    yield (
        "backend cuda",
        lambda: kd(s, t, group=group, backend="cuda"),
        kd_kernels.BackendUnavailableError,
    )
    yield "backend unknown", lambda: kd(s, t, group=group, backend="gpu"), ValueError
    yield "fused weight transposed", lambda: fl(h, ws.t(), ht, wt, group=group), ValueError
    yield "fused dtype mismatch", lambda: fl(h, ws.bfloat16(), ht, wt, group=group), TypeError
    total = sum(5 + r for r in range(world))
    yield (
        "fused label = ΣV_r",
        lambda: fl(h, ws, ht, wt, group=group, labels=torch.tensor([0, total, 1])),
        ValueError,
    )
    yield (
        "fused ce_weight without labels",
        lambda: fl(h, ws, ht, wt, group=group, ce_weight=1.0),
        ValueError,
    )
    yield (
        "fused ce_weight < 0",
        lambda: fl(h, ws, ht, wt, group=group, ce_weight=-1.0, labels=torch.tensor([0, 1, 2])),
        ValueError,
    )
    yield "fused chunk_size", lambda: fl(h, ws, ht, wt, group=group, chunk_size=0), ValueError
    yield (
        "fused interpolation",
        lambda: fl(h, ws, ht, wt, group=group, interpolation=0.5),
        NotImplementedError,
    )


def invalid_cases(seed: int, rank: int, world: int, group, report: Report) -> None:
    import kd_kernels.parallel as P

    rng = random.Random(seed)
    expect_errors(
        report,
        f"parallel invalid_cases(seed={seed}, world={world}) rank {rank}",
        _bad_calls(rng, rank, world, group),
    )
    s = torch.randn(2, 3 + rank)
    report.check(
        P.kd_loss(s, s, group=group).item() == 0.0,
        f"parallel invalid_cases(seed={seed})",
        "the group is not usable after the errors",
    )


FAMILIES = {"logits": logits_case, "fused": fused_case, "hostile": hostile_case}


def _worker(rank: int, world: int, init_file: str, seeds: list, out_dir: str, body=None) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = Report()
    try:
        if body is not None:
            body(seeds, rank, world, dist.group.WORLD, report)
        else:
            for seed in seeds:
                for fn in FAMILIES.values():
                    fn(seed, rank, world, dist.group.WORLD, report)
            invalid_cases(seeds[0] if seeds else 0, rank, world, dist.group.WORLD, report)
    except Exception:  # noqa: BLE001 - reported, never a hang of the other ranks' collectives
        report.check(False, f"parallel worker rank {rank}", traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(
                {"checks": report.checks, "failures": [[x.case, x.what] for x in report.failures]},
                f,
            )
        dist.barrier()
        dist.destroy_process_group()


def run(seeds: list, world: int = 2, timeout_s: float = 300.0, body=None) -> Report:
    """Spawn ``world`` gloo processes once, run every family for each seed on each rank (or
    ``body(seeds, rank, world, group, report)``, a module-level function, instead), and gather
    their checks into one Report."""
    import torch.multiprocessing as mp

    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "pg")
        ctx = mp.spawn(
            _worker, args=(world, init, list(seeds), tmp, body), nprocs=world, join=False
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    report.check(False, "parallel run", f"not finished within {timeout_s} s")
                    return report
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        for rank in range(world):
            data = json.loads(open(os.path.join(tmp, f"rank{rank}.json")).read())
            report.merge(
                Report([Failure(case, what) for case, what in data["failures"]], data["checks"])
            )
    return report
