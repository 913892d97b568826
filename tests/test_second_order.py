"""Second derivatives and functorch transforms: every loss family raises a typed, named error
instead of silently dropping the loss's Hessian (or tangent)."""

import pytest
import torch
from torch.func import jvp, vmap

import kd_kernels
from kd_kernels import reference as R

TWICE = r"kd_kernels losses are differentiable once.*kd_kernels\.reference"
N, V, D, K = 4, 9, 5, 3


def _sparse_teacher():
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    lp = torch.full((N, K), -2.0)
    return ids, lp


def _families():
    """name → (input shape, loss of that input). Each loss is a scalar over a fresh kd_kernels
    call."""
    t = torch.randn(N, V)
    w, ht, wt = torch.randn(V, D), torch.randn(N, 6), torch.randn(V, 6)
    ids, lp = _sparse_teacher()
    tokens = torch.arange(N) % V
    return {
        "kd_loss": ((N, V), lambda x: kd_kernels.kd_loss(x, t)),
        "reverse_kl_nonleaf": ((N, V), lambda x: kd_kernels.reverse_kl(x * 1.0, t)),
        "jsd_none": ((N, V), lambda x: kd_kernels.jsd(x, t, reduction="none").sum()),
        "KDLoss": ((N, V), lambda x: kd_kernels.KDLoss("tvd")(x, t)),
        "fused_linear_kd": ((N, D), lambda h: kd_kernels.fused_linear_kd(h, w, ht, wt)),
        "fused_linear_kd_none": (
            (N, D),
            lambda h: kd_kernels.fused_linear_kd(h, w, ht, wt, reduction="none").sum(),
        ),
        "fused_linear_logprobs": (
            (N, D),
            lambda h: kd_kernels.fused_linear_logprobs(h, w, tokens).sum(),
        ),
        "sparse_kd": ((N, V), lambda x: kd_kernels.sparse_kd(x, ids, lp)),
        "sparse_kd_torch": ((N, V), lambda x: kd_kernels.sparse_kd(x, ids, lp, backend="torch")),
        "fused_linear_sparse_kd": (
            (N, D),
            lambda h: kd_kernels.fused_linear_sparse_kd(h, w, ids, lp),
        ),
    }


FAMILIES = tuple(_families())


@pytest.mark.parametrize("how", ["autograd.grad", "backward"])
@pytest.mark.parametrize("family", FAMILIES)
def test_second_derivative_raises(family, how):
    """The issue's repro: with another differentiable term next to the loss, d(g·v)/dx used to
    return only that term's Hessian (0.06 x here), without an error."""
    shape, loss_of = _families()[family]
    x = torch.randn(*shape, requires_grad=True)
    v = torch.randn(*shape)
    loss = loss_of(x) + 0.01 * (x**3).sum()
    if how == "autograd.grad":
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        with pytest.raises(RuntimeError, match=TWICE):
            torch.autograd.grad((g * v).sum(), x)
    else:
        loss.backward(create_graph=True)
        g, x.grad = x.grad, None
        with pytest.raises(RuntimeError, match=TWICE):
            (g * v).sum().backward()


def test_second_derivative_with_respect_to_the_weight_raises():
    """A Hessian block with respect to lm_head's weight (and a mixed one) reaches the guard as
    well."""
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    loss = kd_kernels.fused_linear_kd(h, w, torch.randn(N, 6), torch.randn(V, 6)) + (w**3).sum()
    _, gw = torch.autograd.grad(loss, (h, w), create_graph=True)
    for wrt in (w, h):
        with pytest.raises(RuntimeError, match=TWICE):
            torch.autograd.grad(gw.sum(), wrt, allow_unused=True)


def test_first_derivative_under_create_graph_is_unchanged():
    """create_graph=True still returns the exact first derivative (it is the second that raises)."""
    t = torch.randn(N, V)
    x = torch.randn(N, V, requires_grad=True)
    (g,) = torch.autograd.grad(kd_kernels.forward_kl(x, t), x, create_graph=True)
    (ref,) = torch.autograd.grad(R.kd_loss("forward_kl", x.double(), t.double()), x)
    torch.testing.assert_close(g.detach(), ref.float(), rtol=1e-5, atol=1e-7)


TRANSFORM = (
    r"torch\.func transform.*kd_kernels losses do not support functorch"
    r".*kd_kernels\.reference"
)


def _transforms():
    """name → a call of a functorch transform (or forward-mode AD) over one loss family."""
    import torch.autograd.forward_ad as fwAD

    fam = _families()

    def over(family, transform):
        shape, loss_of = fam[family]
        x = torch.randn(*shape)
        if transform == "vmap":
            return lambda: vmap(loss_of)(x.expand(2, *shape))
        if transform == "jvp":
            return lambda: jvp(loss_of, (x,), (torch.ones(*shape),))
        if transform == "grad":
            return lambda: torch.func.grad(loss_of)(x)

        def dual():
            with fwAD.dual_level():
                return loss_of(fwAD.make_dual(x, torch.ones(*shape)))

        return dual

    families = (
        "kd_loss",
        "fused_linear_kd",
        "fused_linear_logprobs",
        "sparse_kd",
        "fused_linear_sparse_kd",
    )
    return {
        f"{f}-{tr}": over(f, tr) for f in families for tr in ("vmap", "jvp", "grad", "forward_ad")
    }


@pytest.mark.parametrize("case", tuple(_transforms()))
def test_functorch_transforms_raise_a_named_error(case):
    """vmap / jvp used to fail on 'Cannot access data pointer of Tensor that doesn't have storage'
    (the no-grad fast path) and forward-mode AD returned no tangent, silently."""
    with pytest.raises(NotImplementedError, match=TRANSFORM):
        _transforms()[case]()


# Sparse teachers' inputs (issue #26): a row whose log-probs are not a distribution's, and the
# module's backend.


@pytest.mark.parametrize("call", ["sparse_kd", "fused_linear_sparse_kd"])
def test_sparse_teacher_mass_above_one_is_a_value_error(call):
    from kd_kernels.sparse import MASS_TOLERANCE

    ids, _ = _sparse_teacher()
    lp = torch.full((N, K), -2.0)
    lp[2] = torch.log(torch.tensor([0.6, 0.3, 0.2]))  # Σ p = 1.1 on row 2
    x = torch.randn(N, V) if call == "sparse_kd" else torch.randn(N, D)
    args = (x, ids, lp) if call == "sparse_kd" else (x, torch.randn(V, D), ids, lp)
    fn = getattr(kd_kernels, call)
    with pytest.raises(ValueError, match=r"teacher_logprobs row 2 sums to 1\.1 .*1 \+ 0\.01"):
        fn(*args)
    # within the rounding tolerance, and with tail='ignore' (samples may repeat), it is accepted
    lp[2] = torch.log(torch.tensor([0.6, 0.3, 0.1 + MASS_TOLERANCE / 2]))
    assert torch.isfinite(fn(*args))
    lp[2] = torch.log(torch.tensor([0.6, 0.6, 0.6]))
    assert torch.isfinite(fn(*args, tail="ignore"))


def test_sparse_module_checks_its_backend_when_built():
    """SparseKDLoss(backend="gpu") used to construct; it now fails like sparse_kd(backend="gpu")."""
    ids, lp = _sparse_teacher()
    for bad, err in (("gpu", ValueError), ("cuda", kd_kernels.BackendUnavailableError)):
        with pytest.raises(err) as direct:
            kd_kernels.sparse_kd(torch.randn(N, V), ids, lp, backend=bad)
        with pytest.raises(err) as built:
            kd_kernels.SparseKDLoss(backend=bad)
        assert str(built.value) == str(direct.value)


# Under torch.compile AOTAutograd runs its own backward; its double backward raises PyTorch's error.
COMPILED_TWICE = r"torch\.compile with aot_autograd does not currently support double backward"


def _compiled_losses():
    """name → (input shape, a compiled (fullgraph) loss of a leaf input): one graph each."""
    t, ht, wt = torch.randn(N, V), torch.randn(N, 6), torch.randn(V, 6)
    w = torch.randn(V, D, requires_grad=True)
    return {
        "kd_loss": ((N, V), lambda x: kd_kernels.kd_loss(x, t)),
        "fused_linear_kd": ((N, D), lambda h: kd_kernels.fused_linear_kd(h, w, ht, wt)),
    }


@pytest.mark.parametrize("family", ["kd_loss", "fused_linear_kd"])
def test_compiled_second_derivative_raises(family):
    """A compiled graph holding only the loss on the logits it receives used to return the other
    term's Hessian alone under autograd.grad (PyTorch's error hung off a detached leaf)."""
    torch._dynamo.reset()
    shape, loss_of = _compiled_losses()[family]
    compiled = torch.compile(loss_of, fullgraph=True)
    for how in ("autograd.grad", "backward"):
        x = torch.randn(*shape, requires_grad=True)
        v = torch.randn(*shape)
        loss = compiled(x) + 0.01 * (x**3).sum()
        if how == "autograd.grad":
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            with pytest.raises(RuntimeError, match=COMPILED_TWICE):
                torch.autograd.grad((g * v).sum(), x)
        else:
            loss.backward(create_graph=True)
            with pytest.raises(RuntimeError, match=COMPILED_TWICE):
                (x.grad * v).sum().backward()
        # the first derivative under create_graph=True is the eager one
        y = x.detach().requires_grad_()
        (ref,) = torch.autograd.grad(loss_of(y), y)
        (first,) = torch.autograd.grad(compiled(x), x, create_graph=True)
        torch.testing.assert_close(first.detach(), ref)
