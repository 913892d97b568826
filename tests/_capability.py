"""The capability matrix (issue #27): every public entry point × every divergence × the options,
checked against the float64 reference (``kd_kernels.reference``), or against the typed
``NotImplementedError`` that names an option the entry point does not support yet.

``SUPPORT`` below is the one declaration: tests/test_capability.py runs it (a pairwise covering
set in CI, the full product under ``-m slow``) and ``python tests/_capability.py --markdown``
prints the README's capability table from it (``--write`` puts it into README.md between the
``capability`` markers; a test checks that the two agree).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from _fuzz import DIVERGENCES, FUSED_RTOL, GRAD_RTOL, LOSS_RTOL, Report, coef_for, rel_err

# option -> its values, the first one "off"; the README column of each value but the first
OPTIONS = {
    "temperature": (1.0, 2.0),
    "interpolation": (1.0, 0.6),
    "softcap": (False, True),
    "labels": (False, True),
    "mask": (False, True),
    "token_weights": (False, True),
    "reduction": ("mean", "sum", "none"),
    "dtype": ("float32", "bfloat16"),
}
COLUMNS = {
    ("temperature", 2.0): "T ≠ 1",
    ("interpolation", 0.6): "interpolation (TAID)",
    ("softcap", True): "logit scale + softcap",
    ("labels", True): "labels + CE",
    ("mask", True): "mask",
    ("token_weights", True): "token_weights",
    ("reduction", "sum"): 'reduction="sum"',
    ("reduction", "none"): 'reduction="none"',
    ("dtype", "bfloat16"): "bf16",
}
LOGITS_ONLY = ("softcap", "labels")  # options of a head: not applicable to logits-level calls
# entry point -> (level, {option: the values it does not support yet})
SUPPORT = {
    "kd_loss": ("logits", {}),
    "forward_kl, … (named)": ("logits", {}),
    "KDLoss": ("logits", {}),
    "fused_linear_kd": ("head", {}),
    "fused_linear_forward_kl, … (named)": ("head", {}),
    "FusedLinearKDLoss": ("head", {}),
    "sparse_kd": ("logits", {"interpolation": (0.6,)}),
    "SparseKDLoss": ("logits", {"interpolation": (0.6,)}),
    "fused_linear_sparse_kd": (
        "head",
        {"interpolation": (0.6,), "softcap": (True,), "reduction": ("none",)},
    ),
    "parallel.kd_loss": ("logits", {"interpolation": (0.6,)}),
    "parallel.fused_linear_kd": ("head", {"interpolation": (0.6,), "softcap": (True,)}),
    "hf.distill_loss": (
        "head",
        {"interpolation": (0.6,), "token_weights": (True,), "reduction": ("sum", "none")},
    ),
}
# the keywords an error for each option may name
KEYWORDS = {
    "softcap": ("softcap", "logit_scale"),
    "labels": ("labels", "ce_weight"),
    "dtype": ("dtype",),
}
N, V, D_S, D_T, K = 5, 37, 8, 6, 8
SPLIT = (15, 22)  # the vocabulary over 2 ranks, uneven
SOFTCAP = {
    "student_logit_scale": 0.8,
    "student_softcap": 3.0,
    "teacher_logit_scale": 1.3,
    "teacher_softcap": 4.0,
}
CE_WEIGHT = 0.5
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    entry: str
    divergence: str
    temperature: float = 1.0
    interpolation: float = 1.0
    softcap: bool = False
    labels: bool = False
    mask: bool = False
    token_weights: bool = False
    reduction: str = "mean"
    dtype: str = "float32"

    def unsupported(self) -> str | None:
        """The option of this case that its entry point does not support (None: all are)."""
        gaps = SUPPORT[self.entry][1]
        return next((o for o in OPTIONS if getattr(self, o) in gaps.get(o, ())), None)

    @property
    def seed(self) -> int:
        return sum(ord(c) * 31**i for i, c in enumerate(repr(self))) % 2**31


def applicable(entry: str) -> list[str]:
    return [o for o in OPTIONS if SUPPORT[entry][0] == "head" or o not in LOGITS_ONLY]


def _factors(entry: str, supported: bool) -> dict[str, tuple]:
    gaps = SUPPORT[entry][1]
    out = {"divergence": DIVERGENCES}
    for o in applicable(entry):
        out[o] = tuple(v for v in OPTIONS[o] if not supported or v not in gaps.get(o, ()))
    return out


def _pairs(case: dict, names: list[str]) -> set:
    return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}


def covering_cases(entry: str, seed: int = 0) -> list[Case]:
    """CI's set for ``entry``: every pair of (divergence or option) values it supports in at least
    one case (greedy, fixed seed), then each unsupported value once with every divergence."""
    rng = random.Random(f"{entry}:{seed}")
    factors = _factors(entry, supported=True)
    names = list(factors)
    todo = set().union(
        *(_pairs(dict(zip(names, c)), names) for c in itertools.product(*factors.values()))
    )
    out = []
    while todo:
        a, x, b, y = min(todo, key=repr)  # start each case from an uncovered pair
        best = None
        for _ in range(24):
            cand = {n: rng.choice(factors[n]) for n in names} | {a: x, b: y}
            gain = len(_pairs(cand, names) & todo)
            if best is None or gain > best[0]:
                best = (gain, cand)
        todo -= _pairs(best[1], names)
        out.append(Case(entry, **best[1]))
    return out + unsupported_cases(entry)


def unsupported_cases(entry: str) -> list[Case]:
    out = []
    for option, values in SUPPORT[entry][1].items():
        for v, d in itertools.product(values, DIVERGENCES):
            out.append(Case(entry, d, **{option: v}))
    return out


def full_cases(entry: str) -> list[Case]:
    """The full product for ``entry`` (every supported combination), plus the unsupported ones."""
    factors = _factors(entry, supported=True)
    return [
        Case(entry, **dict(zip(factors, c))) for c in itertools.product(*factors.values())
    ] + unsupported_cases(entry)


# ------------------------------------------------------------------------------------ inputs


def _inputs(case: Case) -> dict:
    """Heads, logits, sparse teacher, token options and the upstream gradient of ``case``."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    x = {
        "hs": rnd(N, D_S),
        "ws": rnd(V, D_S, s=2 / D_S**0.5),
        "ht": rnd(N, D_T),
        "wt": rnd(V, D_T, s=2 / D_T**0.5),
        "s": rnd(N, V, s=2.0),
        "t": rnd(N, V, s=2.0),
    }
    t_sparse = (
        x["t"].double()
        if SUPPORT[case.entry][0] == "logits"
        else x["ht"].double() @ x["wt"].double().T
    )
    x["lp"], x["ids"] = t_sparse.log_softmax(-1).topk(K, -1)
    x["lp"] = x["lp"].float()
    mask = torch.rand(N, generator=gen) < 0.6
    mask[0] = True
    x["mask"] = mask if case.mask else None
    x["token_weights"] = torch.rand(N, generator=gen) * 2 if case.token_weights else None
    labels = torch.randint(0, V, (N,), generator=gen).masked_fill(
        torch.rand(N, generator=gen) < 0.3, -100
    )
    x["labels"] = labels if case.labels else None
    x["upstream"] = torch.randn((N,) if case.reduction == "none" else (), generator=gen)
    x["coef"] = coef_for(case.divergence, random.Random(case.seed))
    return x


def _head(
    h: torch.Tensor, w: torch.Tensor, scale: float, cap: float | None, dtype: torch.dtype
) -> torch.Tensor:
    """Float64 logits as the fused path forms them: the GEMM's output rounded to the input dtype
    (straight through: the gradient is the exact one; TVD's sign(p − q) would otherwise flip on
    the rounding), then the scale and softcap."""
    z = h @ w.T
    z = (z + (z.to(dtype).double() - z).detach()) * scale
    return cap * torch.tanh(z / cap) if cap is not None else z


def reference(case: Case, x: dict, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """The loss of ``case`` in float64 from its definition, on logits ``s`` (and ``t``)."""
    from kd_kernels import reference as R

    labels, mask = x["labels"], x["mask"]
    kd_mask = mask if mask is not None or labels is None else labels != -100
    opts = {
        "temperature": case.temperature,
        "mask": kd_mask,
        "token_weights": x["token_weights"],
        "reduction": case.reduction,
        **x["coef"],
    }
    if case.entry.startswith(("sparse", "SparseKD", "fused_linear_sparse")):
        loss = R.sparse_kd_loss(case.divergence, s, x["ids"], x["lp"].double(), **opts)
    else:
        loss = R.kd_loss(case.divergence, s, t, interpolation=case.interpolation, **opts)
    if labels is not None:
        valid = labels != -100 if mask is None else (labels != -100) & mask
        nll = R.cross_entropy_per_token(s, torch.where(valid, labels, -100))
        reduce = {
            "mean": lambda v: v.sum() / valid.sum().clamp_min(1),
            "sum": torch.sum,
            "none": lambda v: v,
        }
        loss = loss + CE_WEIGHT * reduce[case.reduction](nll)
    return loss


# ------------------------------------------------------------------------------------ calls


def _call(case: Case, x: dict, leaves: list, group=None, shard=slice(None)) -> torch.Tensor:
    """The entry point of ``case`` on ``leaves`` (student logits, or its hidden states and head
    rows ``shard``)."""
    import kd_kernels as kd
    import kd_kernels.parallel as P

    d, e = case.divergence, case.entry
    tok = {"mask": x["mask"], "token_weights": x["token_weights"]}
    opts = {"temperature": case.temperature, "reduction": case.reduction, **x["coef"]}
    if case.interpolation != 1.0:
        opts["interpolation"] = case.interpolation
    head = {}
    if case.labels:
        head = {"labels": x["labels"], "ce_weight": CE_WEIGHT}
    if case.softcap:
        head |= (
            SOFTCAP
            if "sparse" not in e
            else {k: v for k, v in SOFTCAP.items() if k.startswith("student")}
        )
    s, t, ids, lp = leaves[0], x["t"][:, shard], x["ids"], x["lp"]
    hs, ws, ht, wt = leaves[0], leaves[-1], x["ht"], x["wt"][shard]
    calls = {
        "kd_loss": lambda: kd.kd_loss(s, t, divergence=d, **opts, **tok),
        "forward_kl, … (named)": lambda: getattr(kd, d)(s, t, **opts, **tok),
        "KDLoss": lambda: kd.KDLoss(d, **opts)(s, t, **tok),
        "fused_linear_kd": lambda: kd.fused_linear_kd(
            hs, ws, ht, wt, divergence=d, **opts, **tok, **head
        ),
        "fused_linear_forward_kl, … (named)": lambda: getattr(kd, f"fused_linear_{d}")(
            hs, ws, ht, wt, **opts, **tok, **head
        ),
        "FusedLinearKDLoss": lambda: kd.FusedLinearKDLoss(
            d, **opts, **{k: v for k, v in head.items() if k != "labels"}
        )(hs, ws, ht, wt, labels=x["labels"], **tok),
        "sparse_kd": lambda: kd.sparse_kd(s, ids, lp, divergence=d, **opts, **tok),
        "SparseKDLoss": lambda: kd.SparseKDLoss(d, **opts)(s, ids, lp, **tok),
        "fused_linear_sparse_kd": lambda: kd.fused_linear_sparse_kd(
            hs, ws, ids, lp, divergence=d, **opts, **tok, **head
        ),
        "parallel.kd_loss": lambda: P.kd_loss(s, t, group=group, divergence=d, **opts, **tok),
        "parallel.fused_linear_kd": lambda: P.fused_linear_kd(
            hs, ws, ht, wt, group=group, divergence=d, **opts, **tok, **head
        ),
    }
    return calls[e]()


def _expect_refusal(report: Report, case: Case, fn) -> None:
    """``fn()`` raises NotImplementedError naming the entry point and the unsupported option."""
    option = case.unsupported()
    words = KEYWORDS.get(option, (option,))
    try:
        fn()
    except NotImplementedError as e:
        named = case.entry.split(" ")[0] in str(e) and any(w in str(e) for w in words)
        report.check(
            named, repr(case), f"NotImplementedError not naming {case.entry} and {option}: {e}"
        )
    except Exception as e:  # noqa: BLE001
        report.check(False, repr(case), f"{type(e).__name__} instead of NotImplementedError: {e}")
    else:
        report.check(False, repr(case), f"{option} accepted (silently?) instead of refused")


def _compare(report: Report, case: Case, loss, ref, grads, ref_grads) -> None:
    """Loss and gradients against float64, with the dtype's tolerance (the fused GEMM rounds the
    logits to the input dtype)."""
    dtype = getattr(torch, case.dtype)
    fused = SUPPORT[case.entry][0] == "head"
    loss_tol = FUSED_RTOL[dtype] if fused else LOSS_RTOL
    grad_tol = 3 * FUSED_RTOL[dtype] if fused else GRAD_RTOL[dtype]
    if fused and case.divergence == "tvd" and dtype != torch.float32:
        # TVD's gradient holds sign(p − q): entries with p ≈ q flip on the fp32 softcap /
        # interpolation of bf16-rounded logits, an O(1) change each (full product: up to 0.19)
        grad_tol *= 2
    report.check(
        loss.dtype == torch.float32 and loss.shape == ref.shape,
        repr(case),
        f"loss {loss.dtype} {tuple(loss.shape)}, reference {tuple(ref.shape)}",
    )
    err = rel_err(loss, ref)
    report.check(err <= loss_tol, repr(case), f"loss rel error {err:.3g} > {loss_tol}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        err = rel_err(g, r) if g is not None else math.inf
        report.check(err <= grad_tol, repr(case), f"gradient {i} rel error {err:.3g} > {grad_tol}")


def run_case(case: Case, report: Report, group=None, rank: int = 0) -> None:
    """One case of a logits-level or fused entry point (``group``: the parallel ones, on this
    rank's shard of ``SPLIT``)."""
    x = _inputs(case)
    shard = slice(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])) if group is not None else slice(None)
    fused = SUPPORT[case.entry][0] == "head"
    full = [x["hs"], x["ws"]] if fused else [x["s"]]
    leaves = [y.clone().requires_grad_() for y in full]
    if fused:
        leaves[1] = x["ws"][shard].clone().requires_grad_()
    else:
        leaves[0] = x["s"][:, shard].clone().requires_grad_()
    if case.unsupported():
        _expect_refusal(report, case, lambda: _call(case, x, leaves, group, shard))
        return
    try:
        loss = _call(case, x, leaves, group, shard)
        loss.backward(x["upstream"])
    except Exception as e:  # noqa: BLE001 - any exception on a supported combination fails
        report.check(False, repr(case), f"raised {type(e).__name__}: {e}")
        return
    f64 = [y.detach().double().requires_grad_() for y in full]
    if fused:
        cap = SOFTCAP if case.softcap else {}
        dtype = getattr(torch, case.dtype)
        s = _head(
            f64[0], f64[1], cap.get("student_logit_scale", 1.0), cap.get("student_softcap"), dtype
        )
        t = _head(
            x["ht"].double(),
            x["wt"].double(),
            cap.get("teacher_logit_scale", 1.0),
            cap.get("teacher_softcap"),
            dtype,
        )
    else:
        s, t = f64[0], x["t"].double()
    ref = reference(case, x, s, t)
    ref_grads = torch.autograd.grad(ref, f64, x["upstream"].double())
    shards = [slice(None), shard] if fused else [(slice(None), shard)]
    _compare(
        report,
        case,
        loss,
        ref,
        [leaf.grad for leaf in leaves],
        [g[sl] for g, sl in zip(ref_grads, shards)],
    )


# ------------------------------------------------------------------------------------ hf


_MODELS: dict = {}


def _hf_model(family: str, seed: int, dtype: str):
    from _fuzz_hf import model

    key = (family, seed, dtype)
    if key not in _MODELS:
        _MODELS[key] = copy.deepcopy(model(family, V, seed, 32)).to(getattr(torch, dtype))
    return _MODELS[key]


def run_hf_case(case: Case, report: Report) -> None:
    """hf.distill_loss against kd_loss (+ CE) on the models' own logits in float64: a Gemma 2
    student (softcap) and a Cohere teacher (logit scale) for ``softcap``, else Llama and Qwen2;
    ``mask``: right padding in the attention mask; ``labels``: -100 on some positions."""
    from _fuzz_hf import _student_grads

    from kd_kernels import hf

    gen = torch.Generator().manual_seed(case.seed)
    fams = ("gemma2", "cohere") if case.softcap else ("llama", "qwen2")
    student, teacher = _hf_model(fams[0], 0, case.dtype), _hf_model(fams[1], 3, case.dtype)
    ids = torch.randint(3, V, (2, 4), generator=gen)
    am = torch.ones(2, 4, dtype=torch.long)
    am[1, -2:] = 0
    labels = ids.masked_fill(torch.rand(2, 4, generator=gen) < 0.3, -100)
    inputs = {"input_ids": ids} | ({"attention_mask": am} if case.mask else {})
    labels = labels.masked_fill(am == 0, -100) if case.mask else labels
    coef = coef_for(case.divergence, random.Random(case.seed))
    kw = {"divergence": case.divergence, "temperature": case.temperature, **coef}
    if case.labels:
        kw |= {"labels": labels, "ce_weight": CE_WEIGHT}
    if case.interpolation != 1.0:
        kw["interpolation"] = case.interpolation
    if case.reduction != "mean":
        kw["reduction"] = case.reduction
    if case.token_weights:
        kw["token_weights"] = torch.ones(2, 3)
    if case.unsupported():
        _expect_refusal(report, case, lambda: hf.distill_loss(student, teacher, **inputs, **kw))
        return
    s = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1].double()
    shifted = labels[:, 1:] if case.labels else None
    x = {
        "labels": shifted,
        "mask": None
        if shifted is not None or not case.mask
        else am[:, 1:].bool() & am[:, :-1].bool(),
        "token_weights": None,
        "coef": coef,
    }
    ref = reference(case, x, s, t)
    try:
        loss = hf.distill_loss(student, teacher, **inputs, **kw)
        grads = _student_grads(student, loss)
    except Exception as e:  # noqa: BLE001
        report.check(False, repr(case), f"raised {type(e).__name__}: {e}")
        return
    _compare(
        report,
        case,
        loss,
        ref,
        [torch.cat([g.flatten() for g in grads])],
        [torch.cat([g.flatten().double() for g in _student_grads(student, ref)])],
    )


# ------------------------------------------------------------------------------------ parallel


def parallel_body(cases: list[Case], rank: int, world: int, group, report: Report) -> None:
    """Every parallel case on this rank (the body of one gloo spawn, tests/_fuzz_parallel.run)."""
    for case in cases:
        run_case(case, report, group, rank)


def run_cases(cases: list[Case]) -> Report:
    """Every case: the parallel ones in one spawn of 2 gloo ranks, the others here."""
    from _fuzz_parallel import run

    report = Report()
    parallel = [c for c in cases if c.entry.startswith("parallel.")]
    for case in cases:
        if case.entry == "hf.distill_loss":
            run_hf_case(case, report)
        elif not case.entry.startswith("parallel."):
            run_case(case, report)
    if parallel:
        report.merge(run(parallel, world=len(SPLIT), body=parallel_body))
    return report


# ------------------------------------------------------------------------------------ the table


def markdown() -> str:
    """The README's capability table: ✓ supported (checked against float64), ✗ not yet
    (``NotImplementedError`` naming it), — not applicable (no lm_head in the call)."""
    head = ["entry point", "divergences"] + list(COLUMNS.values())
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry, (_, gaps) in SUPPORT.items():
        name = f"`{entry}`" if "…" not in entry else f"`{entry.split(',')[0]}`, … (named)"
        cells = [name, f"all {len(DIVERGENCES)}"]
        for option, value in COLUMNS:
            cells.append(
                "—"
                if option not in applicable(entry)
                else "✗"
                if value in gaps.get(option, ())
                else "✓"
            )
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "Not supported yet (each raises `NotImplementedError` naming the option and the "
        "entry point):"
    )
    lines += ["", note, ""]
    lines += [
        f"- `{entry}`: " + ", ".join(COLUMNS[o, v] for o, vs in g.items() for v in vs)
        for entry, (_, g) in SUPPORT.items()
        if g
    ]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- capability:begin -->\n", "<!-- capability:end -->"


def readme_table(text: str) -> str:
    return text.split(BEGIN)[1].split(END)[0]


if __name__ == "__main__":
    if "--write" in sys.argv:
        path = ROOT / "README.md"
        before, rest = path.read_text().split(BEGIN)
        path.write_text(before + BEGIN + markdown() + END + rest.split(END, 1)[1])
    else:
        print(markdown(), end="")
