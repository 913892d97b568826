"""Fused-linear KD and token log-probabilities against the float64 reference on materialized
logits."""

from __future__ import annotations

import pytest
import torch
from _common import CPU_BACKENDS, DIVERGENCES

import kd_kernels
import kd_kernels.fused_linear as FL
from kd_kernels import reference as R

COEF = {"skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.3}, "jsd": {"beta": 0.4}}
# Slack added to the eager error (the rule: our error vs float64 is no worse than eager PyTorch's at
# the same input dtype, plus a small slack).
SLACK = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
D_S, D_T, VOCAB = 16, 24, 257


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def make_inputs(lead, dtype, *, bias=True, teacher_dtype=None, v_teacher=VOCAB):
    td = teacher_dtype or dtype
    hs = torch.randn(*lead, D_S).to(dtype)
    ws = (torch.randn(VOCAB, D_S) / D_S**0.5 * 2).to(dtype)
    ht = torch.randn(*lead, D_T).to(td)
    wt = (torch.randn(v_teacher, D_T) / D_T**0.5 * 2).to(td)
    bs = torch.randn(VOCAB).to(dtype) if bias else None
    bt = torch.randn(v_teacher).to(td) if bias else None
    return hs, ws, bs, ht, wt, bt


def reference_loss(
    divergence,
    hs,
    ws,
    bs,
    ht,
    wt,
    bt,
    *,
    compute=torch.float64,
    labels=None,
    ce_weight=0.0,
    mask=None,
    reduction="mean",
    **kw,
):
    """Materialized logits h Wᵀ + b in ``compute`` (float64: ground truth; the input dtype: eager
    PyTorch), the KD reference math in float64, plus the CE. Returns (loss, kd, ce, grads of hs, ws,
    bs)."""
    H, W = hs.detach().to(compute).requires_grad_(), ws.detach().to(compute).requires_grad_()
    B = bs.detach().to(compute).requires_grad_() if bs is not None else None
    s = H @ W.T + (B if B is not None else 0)
    t = ht.to(compute) @ wt[: ws.shape[0]].to(compute).T + (
        bt[: ws.shape[0]].to(compute) if bt is not None else 0
    )
    s64, t64 = s.double(), t.double()
    kd_mask = mask if mask is not None or labels is None else labels != -100
    kd = R.kd_loss(
        divergence, s64, t64, mask=kd_mask, reduction=reduction, **COEF.get(divergence, {}), **kw
    )
    ce = None
    loss = kd
    if labels is not None:
        valid = labels != -100 if mask is None else (labels != -100) & mask
        nll = R.cross_entropy_per_token(s64, torch.where(valid, labels, -100))
        ce = nll.sum() / valid.sum().clamp_min(1) if reduction == "mean" else nll.sum()
        loss = kd + ce_weight * ce
    params = [x for x in (H, W, B) if x is not None]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), kd.detach(), ce, grads


def fused(divergence, hs, ws, bs, ht, wt, bt, **kw):
    """(loss, components, grads of hs, ws, bs) from kd_kernels.fused_linear_kd."""
    H, W = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    B = bs.clone().requires_grad_() if bs is not None else None
    loss, parts = kd_kernels.fused_linear_kd(
        H,
        W,
        ht,
        wt,
        divergence=divergence,
        student_bias=B,
        teacher_bias=bt,
        return_components=True,
        **COEF.get(divergence, {}),
        **kw,
    )
    params = [x for x in (H, W, B) if x is not None]
    grads = torch.autograd.grad(loss, params)
    return loss, parts, grads


def assert_no_worse_than_eager(ours, eager, ref, dtype, what):
    e_ours, e_eager = rel_err(ours, ref), rel_err(eager, ref)
    assert e_ours <= 2 * e_eager + SLACK[dtype], f"{what}: ours {e_ours:.2e}, eager {e_eager:.2e}"


# The option sets each divergence × dtype is checked under.
CASES = {
    "2d-plain-sum": {"lead": (23,), "bias": False, "reduction": "sum"},
    "3d-bias-mask-weights-mean": {
        "lead": (3, 7),
        "bias": True,
        "mask": True,
        "token_weights": True,
        "temperature": 2.0,
    },
    "3d-labels-ce-mean": {
        "lead": (2, 11),
        "bias": True,
        "labels": True,
        "ce_weight": 0.7,
        "temperature": 1.5,
    },
    "2d-labels-ce-mask-sum": {
        "lead": (17,),
        "bias": True,
        "labels": True,
        "ce_weight": 1.3,
        "mask": True,
        "reduction": "sum",
    },
}


def interpreted(backend: str) -> bool:
    """Triton on CPU tensors runs in its (slow) interpreter: check it on a subset to keep this file
    fast."""
    return backend == "triton"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, divergence, dtype, case):
    if interpreted(backend) and (dtype != torch.float32 or case != "3d-labels-ce-mean"):
        pytest.skip("Triton interpreter: checked on the fp32 bias + labels + CE case only (speed)")
    c = CASES[case]
    lead = c["lead"]
    hs, ws, bs, ht, wt, bt = make_inputs(lead, dtype, bias=c["bias"])
    kw = {"reduction": c.get("reduction", "mean"), "temperature": c.get("temperature", 1.0)}
    if c.get("mask"):
        kw["mask"] = torch.rand(lead) > 0.3
    if c.get("token_weights"):
        kw["token_weights"] = torch.rand(lead) + 0.5
    if c.get("labels"):
        labels = torch.randint(0, VOCAB, lead)
        labels[torch.rand(lead) < 0.3] = -100
        kw.update(labels=labels, ce_weight=c["ce_weight"])
    # 5 tokens per chunk: several chunks and a ragged last one for every case.
    loss, parts, grads = fused(
        divergence, hs, ws, bs, ht, wt, bt, backend=backend, chunk_size=5, **kw
    )
    ref_loss, ref_kd, ref_ce, ref_grads = reference_loss(divergence, hs, ws, bs, ht, wt, bt, **kw)
    eager_loss, _, _, eager_grads = reference_loss(
        divergence, hs, ws, bs, ht, wt, bt, compute=dtype, **kw
    )

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.isfinite(loss)
    assert_no_worse_than_eager(loss, eager_loss, ref_loss, dtype, "loss")
    assert rel_err(parts.kd, ref_kd) <= 2 * rel_err(eager_loss, ref_loss) + SLACK[dtype] + 1e-5
    if ref_ce is None:
        assert parts.ce is None
    else:
        assert abs(parts.ce.item() - ref_ce.item()) <= 1e-4 * abs(ref_ce.item()) + SLACK[dtype]
    for name, g, e, r in zip(("hidden", "weight", "bias"), grads, eager_grads, ref_grads):
        assert g.dtype == dtype
        assert_no_worse_than_eager(g, e, r, dtype, f"grad {name}")
    if "mask" in kw:
        assert torch.all(grads[0][~kw["mask"]] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_size_does_not_change_the_result(backend):
    hs, ws, bs, ht, wt, bt = make_inputs((4, 9), torch.float32)
    mask = torch.rand(4, 9) > 0.2
    sizes = (7, None) if interpreted(backend) else (1, 4, 7, 36, 1000, None)
    results = [
        fused("jsd", hs, ws, bs, ht, wt, bt, mask=mask, backend=backend, chunk_size=cs)
        for cs in sizes
    ]
    loss0, _, grads0 = results[0]
    for loss, _, grads in results[1:]:
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_rows_are_never_read(backend):
    """NaN hidden states on masked tokens (student and teacher) must not reach the loss or any
    gradient."""
    hs, ws, bs, ht, wt, bt = make_inputs((5, 6), torch.float32)
    mask = torch.rand(5, 6) > 0.5
    mask[0, 0] = True
    hs[~mask] = float("nan")
    ht[~mask] = float("nan")
    loss, _, grads = fused(
        "reverse_kl", hs, ws, bs, ht, wt, bt, mask=mask, backend=backend, chunk_size=4
    )
    ref_loss, _, _, ref_grads = reference_loss(
        "reverse_kl", torch.nan_to_num(hs), ws, bs, torch.nan_to_num(ht), wt, bt, mask=mask
    )
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][~mask] == 0)
    assert rel_err(loss, ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


def test_labels_drop_out_of_kd_unless_mask_given():
    hs, ws, bs, ht, wt, bt = make_inputs((2, 8), torch.float32)
    labels = torch.randint(0, VOCAB, (2, 8))
    labels[:, :3] = -100
    # No mask: ignored labels leave KD too, so KD equals KD under mask = labels != -100.
    _, parts, _ = fused("forward_kl", hs, ws, bs, ht, wt, bt, labels=labels)
    _, masked, _ = fused("forward_kl", hs, ws, bs, ht, wt, bt, mask=labels != -100)
    torch.testing.assert_close(parts.kd, masked.kd)
    # An explicit mask wins for KD; CE counts tokens with a valid label and mask True.
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, -2:] = False
    loss, parts, grads = fused(
        "forward_kl", hs, ws, bs, ht, wt, bt, labels=labels, ce_weight=2.0, mask=mask
    )
    ref_loss, ref_kd, ref_ce, ref_grads = reference_loss(
        "forward_kl", hs, ws, bs, ht, wt, bt, labels=labels, ce_weight=2.0, mask=mask
    )
    assert rel_err(parts.kd, ref_kd) < 1e-5 and rel_err(parts.ce, ref_ce) < 1e-5
    assert rel_err(loss, ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


def test_ce_is_logged_when_its_weight_is_zero():
    hs, ws, bs, ht, wt, bt = make_inputs((10,), torch.float32)
    labels = torch.randint(0, VOCAB, (10,))
    loss, parts, _ = fused("reverse_kl", hs, ws, bs, ht, wt, bt, labels=labels)
    _, _, ref_ce, _ = reference_loss("reverse_kl", hs, ws, bs, ht, wt, bt, labels=labels)
    torch.testing.assert_close(loss, parts.kd)
    assert rel_err(parts.ce, ref_ce) < 1e-5


def test_padded_teacher_vocab():
    hs, ws, bs, ht, wt, bt = make_inputs((9,), torch.float32, v_teacher=VOCAB + 7)
    with pytest.raises(ValueError, match="truncate_teacher_vocab=True"):
        kd_kernels.fused_linear_kd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)
    loss, _, grads = fused("reverse_kl", hs, ws, bs, ht, wt, bt, truncate_teacher_vocab=True)
    ref_loss, _, _, ref_grads = reference_loss(
        "reverse_kl", hs, ws, bs, ht, wt, bt
    )  # uses wt[:V_s]
    assert rel_err(loss, ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4
    with pytest.raises(ValueError, match="cover the student's vocabulary"):
        kd_kernels.fused_linear_kd(hs, ws[:, :], ht, wt[: VOCAB - 1], truncate_teacher_vocab=True)


def test_mixed_dtypes_and_grad_dtypes():
    hs, ws, bs, ht, wt, bt = make_inputs((12,), torch.bfloat16, teacher_dtype=torch.float32)
    loss, _, grads = fused("skew_reverse_kl", hs, ws, bs, ht, wt, bt)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    ref_loss, _, _, _ = reference_loss("skew_reverse_kl", hs, ws, bs, ht, wt, bt)
    assert rel_err(loss, ref_loss) < 2e-2


def test_upstream_gradient_scales_and_teacher_gets_none():
    hs, ws, bs, ht, wt, bt = make_inputs((2, 5), torch.float32)
    _, _, grads = fused("forward_kl", hs, ws, bs, ht, wt, bt)
    H, W, B = hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()
    wt_leaf = wt.clone().requires_grad_()
    loss = kd_kernels.fused_linear_forward_kl(H, W, ht, wt_leaf, student_bias=B, teacher_bias=bt)
    (-3.0 * loss).backward()
    for p, g in zip((H, W, B), grads):
        torch.testing.assert_close(p.grad, -3.0 * g)
    assert wt_leaf.grad is None
    with pytest.raises(RuntimeError):
        # the gradients were consumed in place: a second backward must not silently double them
        loss.backward()


def test_no_grad_skips_gradient_work(monkeypatch):
    seen = []
    real = FL.resolve_backend

    class Spy:
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def loss_grad(self, s, t, row_weight, spec, grad):
            seen.append(grad is None)
            return self.inner.loss_grad(s, t, row_weight, spec, grad)

    monkeypatch.setattr(FL, "resolve_backend", lambda name, device: Spy(real(name, device)))
    hs, ws, _bs, ht, wt, _bt = make_inputs((20,), torch.float32)
    wr = ws.clone().requires_grad_()
    with torch.no_grad():
        loss = kd_kernels.fused_linear_kd(hs, wr, ht, wt, chunk_size=8)
    assert not loss.requires_grad and seen == [True] * 3
    seen.clear()
    loss2 = kd_kernels.fused_linear_kd(hs, wr, ht, wt, chunk_size=8)
    assert loss2.requires_grad and seen == [False] * 3
    torch.testing.assert_close(loss, loss2.detach())


def test_all_masked_and_empty():
    hs, ws, bs, ht, wt, bt = make_inputs((2, 4), torch.float32)
    loss, _parts, grads = fused(
        "jsd", hs, ws, bs, ht, wt, bt, mask=torch.zeros(2, 4, dtype=torch.bool)
    )
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)
    hs, ws, bs, ht, wt, bt = make_inputs((0,), torch.float32)
    loss, _, grads = fused("reverse_kl", hs, ws, bs, ht, wt, bt, reduction="sum")
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_module_and_named_forms():
    hs, ws, bs, ht, wt, bt = make_inputs((3, 4), torch.float32)
    labels = torch.randint(0, VOCAB, (3, 4))
    module = kd_kernels.FusedLinearKDLoss(
        "skew_forward_kl", alpha=0.1, temperature=1.3, ce_weight=0.5
    )
    out = module(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, labels=labels)
    ref, parts = kd_kernels.fused_linear_kd(
        hs,
        ws,
        ht,
        wt,
        divergence="skew_forward_kl",
        alpha=0.1,
        temperature=1.3,
        student_bias=bs,
        teacher_bias=bt,
        labels=labels,
        ce_weight=0.5,
        return_components=True,
    )
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(module.last_components.kd, parts.kd)
    torch.testing.assert_close(module.last_components.ce, parts.ce)
    assert "skew_forward_kl" in repr(module)
    with pytest.raises(ValueError, match="'mean', 'sum' or 'none'"):
        kd_kernels.FusedLinearKDLoss(reduction="avg")
    for div in DIVERGENCES:
        named = getattr(kd_kernels, f"fused_linear_{div}")
        torch.testing.assert_close(
            named(hs, ws, ht, wt, **COEF.get(div, {})),
            kd_kernels.fused_linear_kd(hs, ws, ht, wt, divergence=div, **COEF.get(div, {})),
        )


# ------------------------------------------------------------------------------------- bad inputs
def _good():
    hs, ws, _bs, ht, wt, _bt = make_inputs((2, 3), torch.float32)
    return {"student_hidden": hs, "student_weight": ws, "teacher_hidden": ht, "teacher_weight": wt}


BAD = [
    (
        "hidden not a tensor",
        {"student_hidden": [1.0]},
        TypeError,
        "student_hidden must be a torch.Tensor",
    ),
    (
        "int hidden",
        {"student_hidden": torch.ones(2, 3, D_S, dtype=torch.long)},
        TypeError,
        "student_hidden",
    ),
    (
        "weight transposed",
        {"student_weight": torch.randn(D_S, VOCAB)},
        ValueError,
        "nn.Linear.weight layout",
    ),
    ("weight 1-d", {"teacher_weight": torch.randn(VOCAB)}, ValueError, "teacher_weight has shape"),
    (
        "hidden/weight dtype",
        {"student_hidden": torch.randn(2, 3, D_S, dtype=torch.bfloat16)},
        TypeError,
        "student_hidden.to",
    ),
    ("lead dims differ", {"teacher_hidden": torch.randn(3, 2, D_T)}, ValueError, "leading"),
    ("device", {"teacher_hidden": torch.randn(2, 3, D_T, device="meta")}, ValueError, "one device"),
    ("teacher vocab smaller", {"teacher_weight": torch.randn(VOCAB - 1, D_T)}, ValueError, "cover"),
    (
        "student bias shape",
        {"student_bias": torch.randn(VOCAB + 1)},
        ValueError,
        "student_bias has shape",
    ),
    (
        "teacher bias dtype",
        {"teacher_bias": torch.randn(VOCAB, dtype=torch.float16)},
        TypeError,
        "teacher_bias",
    ),
    ("labels range", {"labels": torch.full((2, 3), VOCAB)}, ValueError, "outside [0, 257)"),
    (
        "labels negative",
        {"labels": torch.full((2, 3), -5)},
        ValueError,
        "-100 for tokens to ignore",
    ),
    ("labels float", {"labels": torch.zeros(2, 3)}, TypeError, "labels.long()"),
    ("labels shape", {"labels": torch.zeros(6, dtype=torch.long)}, ValueError, "labels has shape"),
    ("ce_weight without labels", {"ce_weight": 0.5}, ValueError, "needs labels"),
    (
        "ce_weight negative",
        {"ce_weight": -1.0, "labels": torch.zeros(2, 3, dtype=torch.long)},
        ValueError,
        "ce_weight",
    ),
    ("mask dtype", {"mask": torch.ones(2, 3)}, TypeError, "mask"),
    (
        "token_weights shape",
        {"token_weights": torch.ones(3, 2)},
        ValueError,
        "token_weights has shape",
    ),
    ("reduction unknown", {"reduction": "avg"}, ValueError, "reduction"),
    ("chunk_size", {"chunk_size": 0}, ValueError, "chunk_size"),
    ("temperature", {"temperature": 0.0}, ValueError, "temperature"),
    ("divergence", {"divergence": "kl"}, ValueError, "divergence"),
    ("backend", {"backend": "gpu"}, ValueError, "backend"),
]


@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(name, change, exc, match):
    args = _good()
    kw = {k: change.pop(k) for k in list(change) if k in args}
    args.update(kw)
    with pytest.raises(
        exc, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        kd_kernels.fused_linear_kd(
            args.pop("student_hidden"),
            args.pop("student_weight"),
            args.pop("teacher_hidden"),
            args.pop("teacher_weight"),
            **change,
        )


# --------------------------------------------------------------------------------------- logprobs
def reference_logprobs(h, w, b, tokens, temperature, mask, compute=torch.float64):
    H, W = h.detach().to(compute).requires_grad_(), w.detach().to(compute).requires_grad_()
    B = b.detach().to(compute).requires_grad_() if b is not None else None
    z = ((H @ W.T + (B if B is not None else 0)).double() / temperature).log_softmax(-1)
    lp = z.gather(-1, torch.where(mask, tokens, 0)[..., None]).squeeze(-1)
    ent = -(z.exp() * z).sum(-1)
    zero = torch.zeros_like(lp)
    return (
        torch.where(mask, lp, zero),
        torch.where(mask, ent, zero),
        [x for x in (H, W, B) if x is not None],
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("lead", ((19,), (3, 5)), ids=("2d", "3d"))
@pytest.mark.parametrize("entropy", (False, True))
@pytest.mark.parametrize("masked", (False, True))
def test_logprobs_match_reference(dtype, lead, entropy, masked):
    h = torch.randn(*lead, D_S).to(dtype)
    w = (torch.randn(VOCAB, D_S) / D_S**0.5 * 2).to(dtype)
    b = torch.randn(VOCAB).to(dtype)
    tokens = torch.randint(0, VOCAB, lead)
    mask = torch.rand(lead) > 0.3 if masked else torch.ones(lead, dtype=torch.bool)
    if masked:
        tokens[~mask] = -100  # anything goes on masked tokens
    temperature = 1.7
    H, W, B = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    out = kd_kernels.fused_linear_logprobs(
        H,
        W,
        tokens,
        bias=B,
        temperature=temperature,
        mask=mask if masked else None,
        return_entropy=entropy,
        chunk_size=4,
    )
    lp, ent = out if entropy else (out, None)
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)
    objective = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0)
    grads = torch.autograd.grad(objective, (H, W, B))

    refs = {}
    for name, compute in (("ref", torch.float64), ("eager", dtype)):
        r_lp, r_ent, params = reference_logprobs(h, w, b, tokens, temperature, mask, compute)
        r_obj = (r_lp * g_lp.double()).sum() + ((r_ent * g_ent.double()).sum() if entropy else 0)
        refs[name] = (r_lp.detach(), r_ent.detach(), torch.autograd.grad(r_obj, params))
    assert lp.dtype == torch.float32 and lp.shape == lead
    assert_no_worse_than_eager(lp, refs["eager"][0], refs["ref"][0], dtype, "logprobs")
    if entropy:
        assert_no_worse_than_eager(ent, refs["eager"][1], refs["ref"][1], dtype, "entropy")
        assert torch.all(ent >= -1e-5)
    for name, g, e, r in zip(("hidden", "weight", "bias"), grads, refs["eager"][2], refs["ref"][2]):
        assert g.dtype == dtype
        assert_no_worse_than_eager(g, e, r, dtype, f"grad {name}")
    if masked:
        assert torch.all(lp[~mask] == 0) and torch.all(grads[0][~mask] == 0)


@pytest.mark.parametrize("masked", (False, True))
@pytest.mark.parametrize("entropy", (False, True))
@pytest.mark.parametrize("chunk_size", (3, None))
def test_logprobs_without_grad_match_the_grad_path(masked, entropy, chunk_size):
    """With nothing to differentiate the forward runs without an autograd node, keeps no log-sum-exp and
    (on the CPU) takes log_softmax over the logits' own buffer; it gives the same values bit for bit as the
    differentiable path, under no_grad and for plain (teacher) inputs, in several chunks (3 rows) or one."""
    h, w, b = torch.randn(2, 7, D_S), torch.randn(VOCAB, D_S) / D_S**0.5 * 3, torch.randn(VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 7))
    mask = torch.rand(2, 7) > 0.4 if masked else None
    kw = dict(bias=b, temperature=1.3, mask=mask, return_entropy=entropy, chunk_size=chunk_size)
    with_grad = kd_kernels.fused_linear_logprobs(h.clone().requires_grad_(), w, tokens, **kw)
    plain = kd_kernels.fused_linear_logprobs(h, w, tokens, **kw)
    with torch.no_grad():
        no_grad = kd_kernels.fused_linear_logprobs(h.clone().requires_grad_(), w, tokens, **kw)
    for out in (plain, no_grad):
        for x, y in zip(*((o,) if not entropy else o for o in (out, with_grad))):
            assert x.grad_fn is None and y.grad_fn is not None
            torch.testing.assert_close(x, y.detach(), rtol=0, atol=0)


def test_logprobs_bad_inputs():
    h, w = torch.randn(4, D_S), torch.randn(VOCAB, D_S)
    with pytest.raises(ValueError, match="mask=..."):
        kd_kernels.fused_linear_logprobs(h, w, torch.tensor([0, 1, -100, 3]))
    with pytest.raises(ValueError, match="outside"):
        kd_kernels.fused_linear_logprobs(h, w, torch.tensor([0, 1, VOCAB, 3]))
    with pytest.raises(TypeError, match="tokens"):
        kd_kernels.fused_linear_logprobs(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match="weight has shape"):
        kd_kernels.fused_linear_logprobs(h, w.T, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        kd_kernels.fused_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long), temperature=-1.0)
    # the masked-out -100 is fine
    out = kd_kernels.fused_linear_logprobs(
        h, w, torch.tensor([0, 1, -100, 3]), mask=torch.tensor([True, True, False, True])
    )
    assert out[2] == 0 and torch.isfinite(out).all()
