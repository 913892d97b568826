"""torch.compile(fullgraph=True) over a training step of every loss family matches eager (loss and
gradients): the data-dependent chunk loops run inside the opaque custom op ``kd_kernels::family``.

Compiling costs ~10-20 s per graph on a small CPU: CI runs one case per family; the matrix (every
reduction, labels + CE, dynamic shapes with a single token) is @pytest.mark.slow.
"""

import pytest
import torch

import kd_kernels

N, V, D, DT, K = 6, 11, 5, 4, 3


def _teacher(n, generator):
    ids = torch.stack([torch.randperm(V, generator=generator)[:K] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, V, generator=generator), -1).gather(1, ids)
    lp[0, -1] = -float("inf")  # a padded entry
    return ids, lp


def _inputs(n, seed=0):
    """Tensors of one step with n tokens: student hidden / logits, the heads, a sparse teacher,
    labels and a mask (one ignored label and one masked token when n > 1)."""
    g = torch.Generator().manual_seed(seed)
    ids, lp = _teacher(n, g)
    labels = torch.randint(0, V, (n,), generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    if n > 1:
        labels[-1] = -100
        mask[1] = False
    return {
        "h": torch.randn(n, D, generator=g),
        "x": torch.randn(n, V, generator=g),
        "w": torch.randn(V, D, generator=g),
        "b": torch.randn(V, generator=g),
        "ht": torch.randn(n, DT, generator=g),
        "wt": torch.randn(V, DT, generator=g),
        "ids": ids,
        "lp": lp,
        "labels": labels,
        "mask": mask,
        "upstream": torch.randn(n, generator=g),
    }


def _sparse(x, w, b, i, reduction="mean", tail="bucket", backend="auto"):
    loss = kd_kernels.sparse_kd(
        x,
        i["ids"],
        i["lp"],
        mask=i["mask"],
        reduction=reduction,
        tail=tail,
        divergence="jsd",
        temperature=2.0,
        backend=backend,
    )
    return (loss * i["upstream"]).sum() if reduction == "none" else loss


def _fused(x, w, b, i, reduction="mean", labels=True):
    opts = {"labels": i["labels"], "ce_weight": 0.5} if labels else {"mask": i["mask"]}
    loss = kd_kernels.fused_linear_kd(
        x,
        w,
        i["ht"],
        i["wt"],
        student_bias=b,
        chunk_size=4,
        divergence="reverse_kl",
        reduction=reduction,
        student_softcap=3.0,
        **opts,
    )
    return (loss * i["upstream"]).sum() if reduction == "none" else loss


def _fused_sparse(x, w, b, i, reduction="mean", labels=True):
    opts = {"labels": i["labels"], "ce_weight": 0.5} if labels else {"mask": i["mask"]}
    return kd_kernels.fused_linear_sparse_kd(
        x, w, i["ids"], i["lp"], student_bias=b, chunk_size=4, reduction=reduction, **opts
    )


def _logprobs(x, w, b, i, entropy=True):
    tokens = i["labels"].clamp_min(0)
    if entropy:
        lp, ent = kd_kernels.fused_linear_logprobs(
            x, w, tokens, bias=b, mask=i["mask"], return_entropy=True, chunk_size=4
        )
        return (lp * i["upstream"]).sum() + 0.3 * ent.sum()
    return (kd_kernels.fused_linear_logprobs(x, w, tokens, mask=i["mask"]) * i["upstream"]).sum()


LOSSES = {
    "sparse_kd": (_sparse, "x"),
    "fused_linear_kd": (_fused, "h"),
    "fused_linear_sparse_kd": (_fused_sparse, "h"),
    "fused_linear_logprobs": (_logprobs, "h"),
}


def _step(loss_fn, student, i, options):
    """loss and the gradients of the student tensors (hidden / logits, weight, bias)."""
    leaves = [
        i[student].clone().requires_grad_(),
        i["w"].clone().requires_grad_(),
        i["b"].clone().requires_grad_(),
    ]
    loss = loss_fn(leaves[0], leaves[1], leaves[2], i, **options)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros(()) for g in grads]


def _check(family, options, sizes, dynamic):
    torch._dynamo.reset()
    loss_fn, student = LOSSES[family]
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic)
    for n in sizes:
        i = _inputs(n, seed=n)
        loss_e, grads_e = _step(loss_fn, student, i, options)
        loss_c, grads_c = _step(compiled, student, i, options)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in grads_e)


# CI: one compiled graph per family, the options that exercise the most code.
FAST = [
    ("sparse_kd", {"reduction": "none"}),
    ("fused_linear_kd", {"reduction": "mean"}),
    ("fused_linear_sparse_kd", {"reduction": "sum"}),
    ("fused_linear_logprobs", {"entropy": True}),
]


@pytest.mark.parametrize(("family", "options"), FAST, ids=[f for f, _ in FAST])
def test_compiled_training_step_matches_eager(family, options):
    """Each used to stop Dynamo (fullgraph=True) on a host sync: nonzero in the chunk loop, the
    labels / teacher checks' bool(), math.isfinite on a tensor."""
    _check(family, options, sizes=(N,), dynamic=False)


SLOW = [
    *[
        ("sparse_kd", {"reduction": r, "tail": t})
        for r in ("mean", "sum", "none")
        for t in ("bucket", "renormalize")
    ],
    ("sparse_kd", {"backend": "torch"}),
    *[
        ("fused_linear_kd", {"reduction": r, "labels": lab})
        for r in ("mean", "sum", "none")
        for lab in (True, False)
    ],
    *[
        ("fused_linear_sparse_kd", {"reduction": r, "labels": lab})
        for r in ("mean", "sum")
        for lab in (True, False)
    ],
    ("fused_linear_logprobs", {"entropy": False}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "options"), SLOW, ids=[f"{f}-{o}" for f, o in SLOW])
def test_compiled_matrix_with_dynamic_shapes(family, options):
    """Every reduction, with and without labels; dynamic shapes, one token (T = 1) included."""
    _check(family, options, sizes=(N, 3, 1), dynamic=True)
