"""Random valid and invalid inputs for every public function, each checked against the float64 reference
(``kd_kernels.reference``) or against the promised error type.

Shared by ``tests/test_fuzz.py`` (a few hundred fixed-seed cases, in CI) and ``benchmarks/fuzz.py``
(as many random cases as you give it time for). A case is a function of ``(seed, backend)`` alone, so every
failure prints the one line that reproduces it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

import kd_kernels
from kd_kernels import reference as R
from kd_kernels._spec import Divergence

DIVERGENCES = tuple(d.label for d in Divergence)  # every divergence, in the spec's order
NAMED = {
    "forward_kl": kd_kernels.forward_kl,
    "reverse_kl": kd_kernels.reverse_kl,
    "skew_forward_kl": kd_kernels.skew_forward_kl,
    "skew_reverse_kl": kd_kernels.skew_reverse_kl,
    "jsd": kd_kernels.jsd,
    "tvd": kd_kernels.tvd,
    "jeffreys": kd_kernels.jeffreys,
    "alpha_beta": kd_kernels.alpha_beta,
    "renyi": kd_kernels.renyi,
}
FUSED_NAMED = {
    "forward_kl": kd_kernels.fused_linear_forward_kl,
    "reverse_kl": kd_kernels.fused_linear_reverse_kl,
    "skew_forward_kl": kd_kernels.fused_linear_skew_forward_kl,
    "skew_reverse_kl": kd_kernels.fused_linear_skew_reverse_kl,
    "jsd": kd_kernels.fused_linear_jsd,
    "tvd": kd_kernels.fused_linear_tvd,
    "jeffreys": kd_kernels.fused_linear_jeffreys,
    "alpha_beta": kd_kernels.fused_linear_alpha_beta,
    "renyi": kd_kernels.fused_linear_renyi,
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Norm-wise relative error bounds against float64 on the same rounded inputs. The loss is formed in fp32
# from exactly upcast inputs; the gradient is rounded once to the student's dtype.
LOSS_RTOL = 2e-4
GRAD_RTOL = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Fused linear: the logits themselves come out of a GEMM in the input dtype.
FUSED_RTOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
LAYOUTS = ("contiguous", "row_padded", "transposed", "expanded", "leading_dims", "shared_buffer")


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """‖x − ref‖ / (‖ref‖ + floor): relative, with a floor for references that are (nearly) 0."""
    x, ref = x.detach().double(), ref.detach().double()
    if ref.numel() == 0:
        return 0.0
    return ((x - ref).norm() / (ref.norm() + floor)).item()


@dataclass
class Failure:
    case: str
    what: str

    def __str__(self) -> str:
        return f"{self.case}: {self.what}"


@dataclass
class Report:
    failures: list[Failure] = field(default_factory=list)
    checks: int = 0

    def merge(self, other: Report) -> Report:
        self.failures += other.failures
        self.checks += other.checks
        return self

    def check(self, ok: bool, case: str, what: str) -> None:
        self.checks += 1
        if not ok:
            self.failures.append(Failure(case, what))


def coef_for(divergence: str, rng: random.Random) -> dict:
    """Random valid parameters of ``divergence``, always given explicitly (so no case depends on an
    entry point's defaults)."""
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        return {"alpha": rng.uniform(0.02, 0.98)}
    if divergence == "jsd":
        return {"beta": rng.uniform(0.02, 0.98)}
    if divergence == "alpha_beta":
        return {"alpha": rng.uniform(0.2, 1.5), "beta": rng.uniform(0.2, 1.5)}
    if divergence == "renyi":
        return {"alpha": rng.choice([rng.uniform(0.3, 0.9), rng.uniform(1.1, 2.0)])}
    return {}


def row_coefficients(lead: tuple, mask, weights, reduction: str) -> torch.Tensor:
    """c_i: what row i's loss is multiplied by (0 on masked rows, / count for "mean"), float64."""
    k = torch.ones(lead, dtype=torch.float64) if mask is None else mask.double()
    c = k if weights is None else torch.where(k != 0, weights.double(), 0.0)
    return c / k.sum().clamp_min(1) if reduction == "mean" else c


def check_loss_and_grad(
    report: Report,
    case: str,
    loss: torch.Tensor,
    ref: torch.Tensor,
    grad: torch.Tensor,
    g_ref: torch.Tensor,
    *,
    c: torch.Tensor,
    upstream: torch.Tensor,
    z_scale: float,
    temperature: float,
) -> None:
    """Loss and logit gradient against float64. Error bounds: relative, plus an absolute floor at
    fp32 resolution of the terms involved. Row i of the gradient is c_i / T · ∂L_i/∂z (‖∂L/∂z‖ =
    O(1)), and the fp32 terms inside grow with z_scale = |logits| / T; a half-precision gradient can
    at best be the reference rounded to its dtype (small entries underflow)."""
    c_norm = (c * upstream.double()).norm().item()
    err = (loss.double() - ref).norm().item()
    report.check(
        err <= LOSS_RTOL * ref.norm().item() + 1e-5 * z_scale * c.norm().item(),
        case,
        f"loss error {err:.3g} (reference norm {ref.norm().item():.3g})",
    )
    g = grad.reshape(g_ref.shape).double()
    rounding = (g_ref.to(grad.dtype).double() - g_ref).norm().item()
    err = (g - g_ref).norm().item()
    bound = (
        GRAD_RTOL[grad.dtype] * g_ref.norm().item()
        + 2 * rounding
        + 1e-5 * z_scale * c_norm / temperature
    )
    report.check(
        err <= bound,
        case,
        f"grad error {err:.3g} > {bound:.3g} (reference norm {g_ref.norm().item():.3g})",
    )


def _temperature(rng: random.Random) -> float:
    return rng.choice([1.0, 1.0, 2.0, rng.uniform(0.3, 4.0), 0.5, 0.05, 30.0])


def check_masked_rows(
    report: Report,
    case: str,
    loss: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: str,
) -> None:
    """Masked rows: gradient row exactly 0 (and per-token loss exactly 0)."""
    if mask is None or mask.numel() == 0:
        return
    rows = ~mask.reshape(-1)
    grad = grad.reshape(rows.numel(), -1)
    report.check(bool((grad[rows] == 0).all()), case, "masked row has a gradient")
    if reduction == "none":
        report.check(bool((loss.reshape(-1)[rows] == 0).all()), case, "masked row has a loss")


def check_bad_row(
    report: Report, case: str, loss: torch.Tensor, grad: torch.Tensor, bad: int, masked: bool
) -> None:
    """README "NaN and inf": a row that is not a distribution is NaN (loss and whole gradient row)
    when counted, exactly 0 when masked (per-token loss ``loss``)."""
    if masked:
        report.check(
            loss[bad].item() == 0 and bool((grad[bad] == 0).all()),
            case,
            f"masked bad row: loss {loss[bad].item()}, gradient not 0",
        )
    else:
        report.check(bool(loss[bad].isnan()), case, f"loss {loss[bad].item()} instead of NaN")
        report.check(bool(grad[bad].isnan().all()), case, "gradient row not all NaN")


# ------------------------------------------------------------------------------------ logits level


def logits_case(seed: int, backend: str, report: Report, *, max_vocab: int = 1031) -> None:
    """One random valid call of kd_loss / a named loss / KDLoss, checked against the reference."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    vocab = rng.choice([v for v in (1, 2, 3, 17, 64, 131, 257, 1031) if v <= max_vocab])
    lead = rng.choice([(0,), (1,), (rng.randint(2, 9),), (2, rng.randint(1, 4)), (1, 3, 2)])
    n = math.prod(lead)
    s_dtype, t_dtype = rng.choice(DTYPES), rng.choice(DTYPES)
    layout = rng.choice(LAYOUTS)
    reduction = rng.choice(("mean", "sum", "none"))
    temperature = _temperature(rng)
    coef = coef_for(divergence, rng)
    scale = rng.choice([1.0, 3.0, 10.0, 100.0])
    identical = rng.random() < 0.05  # teacher = student: loss and gradient 0
    pad = rng.random() < 0.25 and vocab > 2  # some columns -inf in both: as if absent
    use_mask = rng.random() < 0.5
    use_weights = rng.random() < 0.4
    inplace = rng.random() < 0.3 and layout != "expanded"
    api = rng.choice(("kd_loss", "named", "module"))
    case = (
        f"logits_case(seed={seed}, backend={backend!r}) [{divergence} V={vocab} lead={lead} "
        f"{s_dtype}/{t_dtype} {layout} {reduction} T={temperature:.3g} mask={use_mask} "
        f"weights={use_weights} inplace={inplace} pad={pad} api={api} scale={scale} same={identical}]"
    )

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    # Values in float64, rounded to the dtypes once: kd_kernels and the reference see the same numbers.
    # A column that is -inf in both tensors is as if absent (a padded vocabulary).
    cols = torch.rand(vocab, generator=gen) < 0.3 if pad else torch.zeros(vocab, dtype=torch.bool)
    cols[0] = False  # at least one live column
    if (
        layout == "shared_buffer"
    ):  # student = rows 1.., teacher = rows ..-1 of one buffer (next-token style)
        t_dtype = s_dtype
        buf = randn(n + 1, vocab).to(s_dtype).masked_fill(cols, -math.inf)
        leaf = buf.clone().requires_grad_()
        work = (
            leaf * 1 if inplace else leaf
        )  # in place: the gradient overwrites the teacher's memory too
        s_in, t_in = work[1:].reshape(*lead, vocab), work.detach()[:-1].reshape(*lead, vocab)
        s_vals, t_vals = buf[1:], buf[:-1]
    else:
        s_vals = randn(n, vocab).to(s_dtype).masked_fill(cols, -math.inf)
        t_vals = randn(n, vocab).to(t_dtype).masked_fill(cols, -math.inf)
        if identical:
            t_dtype = s_dtype
            t_vals = s_vals.clone()
        if layout == "expanded":
            t_vals = t_vals[:1].expand(n, vocab)
        leaf = s_vals.clone().requires_grad_()

        def shaped(x: torch.Tensor) -> torch.Tensor:
            if layout == "row_padded":  # row stride V + 5
                x = torch.nn.functional.pad(x, (0, 5))[:, :vocab]
            elif layout == "transposed":  # column stride N
                x = x.t().contiguous().t()
            return x.reshape(*lead, vocab)

        s_in, t_in = shaped(leaf * 1 if inplace else leaf), shaped(t_vals)
    mask = (torch.rand(lead, generator=gen) < 0.6) if use_mask else None
    weights = None
    if use_weights:
        weights = (torch.rand(lead, generator=gen, dtype=torch.float64) * 2).to(rng.choice(DTYPES))
        if (
            mask is not None and n > 0
        ):  # a masked row's weight may be anything: it must add exactly 0
            weights = weights.masked_fill(~mask & (torch.rand(lead, generator=gen) < 0.5), math.nan)
            weights = weights.masked_fill(~mask & (torch.rand(lead, generator=gen) < 0.3), math.inf)
    upstream = torch.randn(lead if reduction == "none" else (), generator=gen)
    options = {
        "temperature": temperature,
        "mask": mask,
        "token_weights": weights,
        "reduction": reduction,
        "backend": backend,
        "inplace_grad": inplace,
    }
    try:
        if api == "module":
            mod = kd_kernels.KDLoss(
                divergence,
                temperature=temperature,
                reduction=reduction,
                backend=backend,
                inplace_grad=inplace,
                **coef,
            )
            loss = mod(s_in, t_in, mask=mask, token_weights=weights)
        elif api == "named":
            loss = NAMED[divergence](s_in, t_in, **coef, **options)
        else:
            loss = kd_kernels.kd_loss(s_in, t_in, divergence=divergence, **coef, **options)
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001 - any exception on valid input is a failure to report
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    grad = leaf.grad
    if layout == "shared_buffer" and grad is not None:
        report.check(bool((grad[0] == 0).all()), case, "gradient on the teacher-only row")
        grad = grad[1:]

    # Reference: float64, on the live columns only (a -inf column in both tensors is as if absent).
    live = ~cols
    s64 = s_vals.double()[:, live].clone().requires_grad_()
    t64 = t_vals.double()[:, live]
    ref = R.kd_loss(
        divergence,
        s64.reshape(*lead, int(live.sum())),
        t64.reshape(*lead, int(live.sum())),
        temperature=temperature,
        mask=mask,
        token_weights=weights,
        reduction=reduction,
        **coef,
    )
    ref.backward(upstream.double())
    g_ref = torch.zeros(n, vocab, dtype=torch.float64)
    g_ref[:, live] = s64.grad

    report.check(loss.dtype == torch.float32, case, f"loss dtype {loss.dtype}")
    report.check(tuple(loss.shape) == tuple(ref.shape), case, f"loss shape {tuple(loss.shape)}")
    report.check(
        grad is not None and grad.dtype == s_dtype, case, "gradient missing or wrong dtype"
    )
    if grad is None:
        return
    report.check(bool(torch.isfinite(loss).all()), case, f"non-finite loss {loss}")
    report.check(bool(torch.isfinite(grad).all()), case, "non-finite gradient")
    check_loss_and_grad(
        report,
        case,
        loss,
        ref,
        grad,
        g_ref,
        c=row_coefficients(lead, mask, weights, reduction),
        upstream=upstream,
        z_scale=max(1.0, scale / temperature),
        temperature=temperature,
    )
    report.check(
        bool((grad.reshape(n, vocab)[:, cols] == 0).all()), case, "gradient on a -inf column"
    )
    check_masked_rows(report, case, loss, grad, mask, reduction)


# ------------------------------------------------------------------------------------ fused linear


def token_options(
    gen: torch.Generator,
    lead: tuple,
    vocab: int,
    use_mask: bool,
    use_labels: bool,
    use_weights: bool,
    ignore: bool = True,
):
    """(mask, labels int64 with -100 where ignored, the KD mask, token weights) of a fused call;
    the weights are NaN on rows outside the KD mask (they must add exactly 0)."""
    mask = (torch.rand(lead, generator=gen) < 0.6) if use_mask else None
    labels = None
    if use_labels:
        labels = torch.randint(0, vocab, lead, generator=gen)
        if ignore:
            labels = labels.masked_fill(torch.rand(lead, generator=gen) < 0.3, -100)
    kd_mask = mask if mask is not None or labels is None else labels != -100
    weights = None
    if use_weights:
        weights = torch.rand(lead, generator=gen) * 2
        if kd_mask is not None:
            weights = weights.masked_fill(~kd_mask, math.nan)
    return mask, labels, kd_mask, weights


def student_logits64(leaves: list, lead: tuple) -> tuple[list, torch.Tensor]:
    """float64 leaves (h, W[, b]) that take gradients, and the student logits h Wᵀ + b (lead, V)."""
    L64 = [x.detach().double().requires_grad_() for x in leaves]
    s = L64[0] @ L64[1].T + (L64[2] if len(L64) > 2 else 0)
    return L64, s.reshape(*lead, s.shape[-1])


def fused_case(seed: int, backend: str, report: Report) -> None:
    """One random valid fused_linear_kd / named / FusedLinearKDLoss call against materialized logits."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    divergence = rng.choice(DIVERGENCES)
    vocab = rng.choice((1, 7, 64, 131, 300))
    v_teacher = vocab + rng.choice((0, 0, 5))
    d_s, d_t = rng.choice((1, 8, 16)), rng.choice((4, 24))
    lead = rng.choice([(0,), (1,), (rng.randint(2, 12),), (2, rng.randint(1, 5))])
    n = math.prod(lead)
    dtype = rng.choice((torch.float32, torch.float32, torch.bfloat16))
    t_dtype = rng.choice((dtype, torch.float32, torch.bfloat16))
    reduction = rng.choice(("mean", "sum"))
    temperature = _temperature(rng)
    coef = coef_for(divergence, rng)
    bias = rng.random() < 0.5
    use_labels = rng.random() < 0.5
    label_dtype = rng.choice((torch.int64, torch.int32, torch.int16, torch.uint8))
    if label_dtype == torch.uint8:
        vocab = v_teacher = min(vocab, 200) if vocab > 200 else vocab
    ce_weight = rng.choice((0.0, 0.5, 1.0)) if use_labels else 0.0
    use_mask = rng.random() < 0.4
    use_weights = rng.random() < 0.4
    chunk = rng.choice((None, 1, 3, 8))
    api = rng.choice(("fused_linear_kd", "named", "module"))
    hidden_view = rng.choice(("contiguous", "transposed", "sliced"))
    case = (
        f"fused_case(seed={seed}, backend={backend!r}) [{divergence} V={vocab}/{v_teacher} D={d_s}/{d_t} "
        f"lead={lead} {dtype}/{t_dtype} {reduction} T={temperature:.3g} bias={bias} "
        f"labels={use_labels and label_dtype} ce={ce_weight} mask={use_mask} weights={use_weights} "
        f"chunk={chunk} api={api} hidden={hidden_view}]"
    )

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    hs = randn(n, d_s).to(dtype)
    ws = (randn(vocab, d_s) * 2 / d_s**0.5).to(dtype)
    bs = randn(vocab).to(dtype) if bias else None
    ht = randn(n, d_t).to(t_dtype)
    wt = (randn(v_teacher, d_t) * 2 / d_t**0.5).to(t_dtype)
    bt = randn(v_teacher).to(t_dtype) if bias else None
    mask, labels, _, weights = token_options(
        gen, lead, vocab, use_mask, use_labels, use_weights, ignore=label_dtype != torch.uint8
    )
    labels = labels.to(label_dtype) if labels is not None else None
    leaves = [x.clone().requires_grad_() for x in (hs, ws) + ((bs,) if bias else ())]
    h_in = leaves[0]
    if hidden_view == "transposed":
        h_in = h_in.t().contiguous().t()
    elif hidden_view == "sliced":  # row stride D + 3
        h_in = torch.nn.functional.pad(h_in, (0, 3))[:, :d_s]
    h_in = h_in.reshape(*lead, d_s)
    options = {
        "student_bias": leaves[2] if bias else None,
        "teacher_bias": bt,
        "temperature": temperature,
        "mask": mask,
        "token_weights": weights,
        "reduction": reduction,
        "labels": labels,
        "ce_weight": ce_weight,
        "truncate_teacher_vocab": v_teacher != vocab,
        "chunk_size": chunk,
        "backend": backend,
    }
    try:
        if api == "module":
            mod = kd_kernels.FusedLinearKDLoss(
                divergence,
                temperature=temperature,
                reduction=reduction,
                ce_weight=ce_weight,
                truncate_teacher_vocab=v_teacher != vocab,
                chunk_size=chunk,
                backend=backend,
                **coef,
            )
            loss = mod(
                h_in,
                leaves[1],
                ht.reshape(*lead, d_t),
                wt,
                student_bias=options["student_bias"],
                teacher_bias=bt,
                mask=mask,
                token_weights=weights,
                labels=labels,
            )
        else:
            fn = (
                (lambda *a, **k: kd_kernels.fused_linear_kd(*a, divergence=divergence, **k))
                if api == "fused_linear_kd"
                else FUSED_NAMED[divergence]
            )
            loss = fn(h_in, leaves[1], ht.reshape(*lead, d_t), wt, **coef, **options)
        upstream = torch.randn((), generator=gen)
        loss.backward(upstream)
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return

    # Reference: logits from the GEMM in the input dtype (as the fused path forms them), then float64.
    L64, s = student_logits64(leaves, lead)
    t = (ht.double() @ wt[:vocab].double().T + (bt[:vocab].double() if bias else 0)).reshape(
        *lead, vocab
    )
    lab = labels.long() if labels is not None else None
    kd_mask = mask if mask is not None or lab is None else lab != -100
    kd = R.kd_loss(
        divergence,
        s,
        t,
        temperature=temperature,
        mask=kd_mask,
        token_weights=weights,
        reduction=reduction,
        **coef,
    )
    total = kd
    if lab is not None:
        valid = lab != -100 if mask is None else (lab != -100) & mask
        nll = R.cross_entropy_per_token(s, torch.where(valid, lab, -100))
        ce = nll.sum() / valid.sum().clamp_min(1) if reduction == "mean" else nll.sum()
        total = kd + ce_weight * ce
    total.backward(upstream.double())
    tol = FUSED_RTOL[dtype] if dtype != torch.float32 else FUSED_RTOL[t_dtype]
    report.check(bool(torch.isfinite(loss)), case, f"non-finite loss {loss}")
    z_scale = max(1.0, 3 / temperature)  # |logits| / T, roughly: the size of the fp32 terms inside
    c = row_coefficients(lead, kd_mask, weights, reduction)
    c_norm = (c.norm().item() + ce_weight) * abs(upstream.item())
    # fp32 terms of size |z| + log V per row: an absolute floor for losses near 0 (V = 1, large T)
    err = abs(loss.item() - total.item())
    bound = (
        tol * z_scale * abs(total.item())
        + 1e-5 * c.norm().item() * z_scale * (1 + math.log(vocab))
        + 1e-5 * ce_weight * z_scale * (1 + math.log(vocab)) * max(1, n)
    )
    report.check(
        err <= bound, case, f"loss error {err:.3g} > {bound:.3g} (reference {total.item():.4g})"
    )
    # Absolute floor as in logits_case: the logit gradient's rows are c_i / T · O(1) at fp32 resolution of
    # terms of size |z|; folded through W_s (for h_s), h_s (for W_s) or summed over rows (for b_s).
    g_floor = 1e-5 * z_scale * c_norm / temperature
    factors = (ws.double().norm().item(), hs.double().norm().item(), max(1, n) ** 0.5)
    for name, x, r, f in zip(("h_s", "W_s", "b_s"), leaves, L64, factors):
        report.check(x.grad.dtype == x.dtype, case, f"grad {name} dtype {x.grad.dtype}")
        err, ref_norm = (x.grad.double() - r.grad).norm().item(), r.grad.norm().item()
        bound = 3 * tol * z_scale * ref_norm + g_floor * f
        report.check(
            err <= bound,
            case,
            f"grad {name} error {err:.3g} > {bound:.3g} (ref norm {ref_norm:.3g})",
        )
    if mask is not None and n > 0:
        report.check(
            bool((leaves[0].grad[~mask.reshape(n)] == 0).all()), case, "masked row has a gradient"
        )


def logprobs_case(seed: int, report: Report) -> None:
    """fused_linear_logprobs (with entropy) against log_softmax of the materialized logits."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab, d = rng.choice((1, 5, 64, 300)), rng.choice((3, 16))
    lead = rng.choice([(0,), (1,), (rng.randint(2, 9),), (2, 3)])
    n = math.prod(lead)
    # not T = 0.05: log q = z − LSE of |z| ~ 10³ carries fp32 errors the float64 reference does not
    temperature = max(0.3, _temperature(rng))
    bias = rng.random() < 0.5
    use_mask = rng.random() < 0.5
    token_dtype = rng.choice((torch.int64, torch.int32, torch.uint8))
    if token_dtype == torch.uint8:
        vocab = min(vocab, 255)
    chunk = rng.choice((None, 1, 4))
    case = (
        f"logprobs_case(seed={seed}) [V={vocab} D={d} lead={lead} T={temperature:.3g} bias={bias} "
        f"mask={use_mask} tokens={token_dtype} chunk={chunk}]"
    )
    h = torch.randn(n, d, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = (
        (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 2 / d**0.5)
        .float()
        .requires_grad_()
    )
    b = (
        torch.randn(vocab, generator=gen, dtype=torch.float64).float().requires_grad_()
        if bias
        else None
    )
    tokens = torch.randint(0, vocab, lead, generator=gen)
    mask = (torch.rand(lead, generator=gen) < 0.6) if use_mask else None
    if mask is not None:
        tokens = tokens.masked_fill(~mask, 250 if token_dtype == torch.uint8 else -100)  # anything
    tokens = tokens.to(token_dtype)
    g1, g2 = torch.randn(lead, generator=gen), torch.randn(lead, generator=gen)
    try:
        lp, ent = kd_kernels.fused_linear_logprobs(
            h.reshape(*lead, d),
            w,
            tokens,
            bias=b,
            temperature=temperature,
            mask=mask,
            return_entropy=True,
            chunk_size=chunk,
        )
        torch.autograd.backward([lp, ent], [g1, g2])
    except Exception as e:  # noqa: BLE001
        report.check(False, case, f"raised {type(e).__name__}: {e}")
        return
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    z = ((h64 @ w64.T + (b64 if bias else 0)) / temperature).reshape(*lead, vocab)
    logq = z.log_softmax(-1)
    safe = tokens.long().clamp(0, vocab - 1)
    lp_ref = logq.gather(-1, safe[..., None]).squeeze(-1)
    ent_ref = -(logq.exp() * logq).sum(-1)
    if mask is not None:
        lp_ref = torch.where(mask, lp_ref, torch.zeros_like(lp_ref))
        ent_ref = torch.where(mask, ent_ref, torch.zeros_like(ent_ref))
    torch.autograd.backward([lp_ref, ent_ref], [g1.double(), g2.double()])
    # fp32 resolution of terms of size |z| (log q = z − LSE is off by ~eps·|z|)
    floor = 1e-6 * max(1.0, z.abs().max().item() if z.numel() else 1.0) * max(1, n) ** 0.5
    e = rel_err(lp, lp_ref, floor)
    report.check(e <= 1e-4, case, f"logprobs rel err {e:.3g}")
    e = rel_err(ent, ent_ref, floor)
    report.check(e <= 1e-4, case, f"entropy rel err {e:.3g}")
    for name, x, r in (("h", h, h64), ("W", w, w64)) + ((("b", b, b64),) if bias else ()):
        e = rel_err(x.grad, r.grad, floor)
        report.check(e <= 1e-3, case, f"grad {name} rel err {e:.3g}")


# ------------------------------------------------------------------------------------ invalid input


def _bad_logits_calls(rng: random.Random):
    """(description, thunk, expected exception type) for invalid logits-level calls."""
    v = rng.choice((5, 17))
    s, t = torch.randn(3, v), torch.randn(3, v)
    yield "int student", lambda: kd_kernels.kd_loss(s.long(), t), TypeError
    yield "float64 teacher", lambda: kd_kernels.kd_loss(s, t.double()), TypeError
    yield "list student", lambda: kd_kernels.kd_loss(s.tolist(), t), TypeError
    yield "0-d", lambda: kd_kernels.kd_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError
    yield "lead mismatch", lambda: kd_kernels.kd_loss(s, torch.randn(4, v)), ValueError
    yield "vocab mismatch", lambda: kd_kernels.kd_loss(s, torch.randn(3, v + 1)), ValueError
    yield "V=0", lambda: kd_kernels.kd_loss(torch.randn(3, 0), torch.randn(3, 0)), ValueError
    yield "float mask", lambda: kd_kernels.kd_loss(s, t, mask=torch.ones(3)), TypeError
    yield (
        "mask shape",
        lambda: kd_kernels.kd_loss(s, t, mask=torch.ones(4, dtype=torch.bool)),
        ValueError,
    )
    yield (
        "int weights",
        lambda: kd_kernels.kd_loss(s, t, token_weights=torch.ones(3, dtype=torch.long)),
        TypeError,
    )
    yield (
        "reduction",
        lambda: kd_kernels.kd_loss(s, t, reduction=rng.choice(["avg", "", None, 1])),
        ValueError,
    )
    yield (
        "backend",
        lambda: kd_kernels.kd_loss(s, t, backend=rng.choice(["cudnn", "", None])),
        ValueError,
    )
    for bad in (0.0, -1.0, math.nan, math.inf, -math.inf, 1e-39, 1e-45):
        yield (
            f"temperature={bad}",
            lambda b=bad: kd_kernels.kd_loss(s, t, temperature=b),
            ValueError,
        )
    for bad in ("2", None, [1.0], True):
        yield (
            f"temperature={bad!r}",
            lambda b=bad: kd_kernels.kd_loss(s, t, temperature=b),
            TypeError,
        )
    for name in ("skew_forward_kl", "skew_reverse_kl", "jsd"):
        key = "beta" if name == "jsd" else "alpha"
        for bad in (0.0, 1.0, -0.5, 1.5, math.nan, math.inf):
            yield (
                f"{name} {key}={bad}",
                lambda n=name, k=key, b=bad: kd_kernels.kd_loss(s, t, divergence=n, **{k: b}),
                ValueError,
            )
        yield (
            f"{name} {key}='x'",
            lambda n=name, k=key: kd_kernels.kd_loss(s, t, divergence=n, **{k: "x"}),
            TypeError,
        )
    yield "divergence", lambda: kd_kernels.kd_loss(s, t, divergence="kl"), ValueError
    yield "divergence type", lambda: kd_kernels.kd_loss(s, t, divergence=3), TypeError
    for bad in ("no", 1, 0, None, "True"):
        yield (
            f"inplace_grad={bad!r}",
            lambda b=bad: kd_kernels.kd_loss(s * 1, t, inplace_grad=b),
            TypeError,
        )
    p = torch.nn.Parameter(torch.randn(3, v))
    yield "inplace on leaf", lambda: kd_kernels.kd_loss(p, t, inplace_grad=True), ValueError
    yield (
        "inplace on view of leaf",
        lambda: kd_kernels.kd_loss(p.view(3, v), t, inplace_grad=True),
        ValueError,
    )
    yield (
        "inplace on view of leaf (slice)",
        lambda: kd_kernels.kd_loss(p[1:], t[1:], inplace_grad=True),
        ValueError,
    )
    x = torch.randn(1, v, requires_grad=True) * 1
    yield (
        "inplace on expanded student",
        lambda: kd_kernels.kd_loss(x.expand(3, v), t, inplace_grad=True),
        ValueError,
    )
    yield "KDLoss backend", lambda: kd_kernels.KDLoss(backend="gpu"), ValueError
    yield "KDLoss inplace_grad", lambda: kd_kernels.KDLoss(inplace_grad="yes"), TypeError
    yield "KDLoss reduction", lambda: kd_kernels.KDLoss(reduction="avg"), ValueError
    yield "KDLoss temperature", lambda: kd_kernels.KDLoss(temperature=math.nan), ValueError
    yield "KDLoss alpha", lambda: kd_kernels.KDLoss("skew_forward_kl", alpha=1.0), ValueError


def _bad_fused_calls(rng: random.Random):
    v, d = 11, 4
    hs, ws, ht, wt = torch.randn(3, d), torch.randn(v, d), torch.randn(3, 5), torch.randn(v, 5)
    f = kd_kernels.fused_linear_kd
    yield "weight transposed", lambda: f(hs, ws.t(), ht, wt), ValueError
    yield "dtype mismatch", lambda: f(hs, ws.bfloat16(), ht, wt), TypeError
    yield "lead mismatch", lambda: f(hs, ws, torch.randn(4, 5), wt), ValueError
    yield "teacher vocab padded", lambda: f(hs, ws, ht, torch.randn(v + 3, 5)), ValueError
    yield (
        "teacher vocab short",
        lambda: f(hs, ws, ht, torch.randn(v - 1, 5), truncate_teacher_vocab=True),
        ValueError,
    )
    yield "bias shape", lambda: f(hs, ws, ht, wt, student_bias=torch.randn(v + 1)), ValueError
    yield "labels float", lambda: f(hs, ws, ht, wt, labels=torch.zeros(3)), TypeError
    yield (
        "labels out of range",
        lambda: f(hs, ws, ht, wt, labels=torch.tensor([0, v, 1])),
        ValueError,
    )
    yield "labels negative", lambda: f(hs, ws, ht, wt, labels=torch.tensor([0, -5, 1])), ValueError
    yield "ce_weight without labels", lambda: f(hs, ws, ht, wt, ce_weight=1.0), ValueError
    for bad in (-1.0, math.nan, math.inf, 1e39):
        yield (
            f"ce_weight={bad}",
            lambda b=bad: f(hs, ws, ht, wt, labels=torch.tensor([0, 1, 2]), ce_weight=b),
            ValueError,
        )
    yield "ce_weight str", lambda: f(hs, ws, ht, wt, ce_weight="1"), TypeError
    yield "reduction", lambda: f(hs, ws, ht, wt, reduction="avg"), ValueError
    for bad in (0, -3):
        yield f"chunk_size={bad}", lambda b=bad: f(hs, ws, ht, wt, chunk_size=b), ValueError
    yield "chunk_size float", lambda: f(hs, ws, ht, wt, chunk_size=2.0), TypeError
    for bad in ("no", 1, None):
        yield (
            f"truncate_teacher_vocab={bad!r}",
            lambda b=bad: f(hs, ws, ht, wt, truncate_teacher_vocab=b),
            TypeError,
        )
        yield (
            f"return_components={bad!r}",
            lambda b=bad: f(hs, ws, ht, wt, return_components=b),
            TypeError,
        )
    yield "temperature tiny", lambda: f(hs, ws, ht, wt, temperature=1e-39), ValueError
    yield (
        "named with divergence",
        lambda: kd_kernels.fused_linear_jsd(hs, ws, ht, wt, divergence="jsd"),
        TypeError,
    )
    yield "module ce_weight", lambda: kd_kernels.FusedLinearKDLoss(ce_weight=math.inf), ValueError
    yield (
        "module truncate",
        lambda: kd_kernels.FusedLinearKDLoss(truncate_teacher_vocab="yes"),
        TypeError,
    )
    yield "module backend", lambda: kd_kernels.FusedLinearKDLoss(backend="gpu"), ValueError
    yield "module chunk", lambda: kd_kernels.FusedLinearKDLoss(chunk_size=0), ValueError
    lp = kd_kernels.fused_linear_logprobs
    yield "logprobs token range", lambda: lp(hs, ws, torch.tensor([0, v, 1])), ValueError
    yield "logprobs float tokens", lambda: lp(hs, ws, torch.zeros(3)), TypeError
    yield (
        "logprobs return_entropy",
        lambda: lp(hs, ws, torch.tensor([0, 1, 2]), return_entropy="yes"),
        TypeError,
    )
    yield (
        "logprobs temperature",
        lambda: lp(hs, ws, torch.tensor([0, 1, 2]), temperature=0.0),
        ValueError,
    )


def expect_errors(report: Report, prefix: str, calls) -> None:
    """Each ``(description, thunk, exception type)`` of ``calls`` raises that type (a message)."""
    for desc, thunk, exc in calls:
        case = f"{prefix} [{desc}]"
        try:
            thunk()
        except exc as e:
            report.check(len(str(e)) > 10, case, f"{exc.__name__} without a useful message: {e!r}")
        except Exception as e:  # noqa: BLE001
            report.check(False, case, f"raised {type(e).__name__} instead of {exc.__name__}: {e}")
        else:
            report.check(False, case, f"accepted; expected {exc.__name__}")


def invalid_cases(seed: int, report: Report) -> None:
    rng = random.Random(seed)
    expect_errors(
        report,
        f"invalid_cases(seed={seed})",
        list(_bad_logits_calls(rng)) + list(_bad_fused_calls(rng)),
    )
