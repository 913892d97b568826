"""Autograd glue: the forward call computes the loss and the student-logit gradient; backward only scales it.

The kernel call goes through the custom op ``kd_kernels::loss_grad`` (with a fake implementation) so that
``torch.compile`` graphs containing a kd_kernels loss stay compilable whatever the backend.
"""

from __future__ import annotations

import functools

import torch

from ._backends import get_backend
from ._spec import Divergence, KDSpec


@torch.library.custom_op("kd_kernels::loss_grad", mutates_args=())
def _loss_grad_op(
    s: torch.Tensor,
    t: torch.Tensor,
    row_weight: torch.Tensor,
    divergence: int,
    coef: float,
    coef2: float,
    temperature: float,
    interpolation: float,
    backend: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_grad else s.new_empty(0)
    spec = KDSpec(Divergence(divergence), coef, coef2, temperature, interpolation)
    loss = get_backend(backend).loss_grad(s, t, row_weight, spec, grad if need_grad else None)
    return loss, grad


@_loss_grad_op.register_fake
def _(s, t, row_weight, divergence, coef, coef2, temperature, interpolation, backend, need_grad):
    grad = s.new_empty(s.shape) if need_grad else s.new_empty(0)
    return s.new_empty(s.shape[0], dtype=torch.float32), grad


_TWICE = (
    b"kd_kernels losses are differentiable once: their backward returns a precomputed gradient, so a "
    b"second derivative (create_graph=True, double backward, Hessian-vector products) would silently "
    b"drop the loss's Hessian term; compute the loss with plain PyTorch ops (kd_kernels.reference) for that"
)


def differentiable_once(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator of every kd_kernels ``autograd.Function`` whose backward returns a
    precomputed gradient: a second derivative through it raises (``_TWICE``) instead of silently
    dropping the loss's Hessian term.

    ``forward`` keeps, per input that requires grad, a 0-element tensor computed from it
    (``ctx.kd_anchors``: no data, only the graph edge). Under ``create_graph=True``, ``backward``
    returns its gradients through one raising node whose edges lead to those anchors (and to any
    upstream gradient that requires grad), so ``torch.autograd.grad(g, inputs)`` cannot prune that
    node: differentiating a gradient with respect to anything the loss depends on reaches it.
    ``torch.autograd.function.once_differentiable`` ties its node to the upstream gradients only,
    which a loss added to another term receives without a graph.

    Under ``torch.compile`` AOTAutograd traces both methods and runs its own backward, whose double
    backward raises PyTorch's "does not support double backward" error; ``torch.autograd.grad``
    reaches that error only through a tensor the compiled graph saves that requires grad. So forward
    keeps the leaf inputs that require grad, or their leaf bases (``ctx.kd_links``: parameters and
    leaf hidden states or logits, alive anyway, saved by reference, no copy) and backward passes the
    upstream gradient through the opaque op ``kd_kernels::link``, which makes the graph save them
    (README "NaN and inf").
    """
    forward, backward = cls.forward, cls.backward

    @functools.wraps(forward)
    def forward_keeping_anchors(ctx, *args):
        if torch.compiler.is_compiling():
            ctx.kd_links = _leaves(args)
        else:
            ctx.kd_anchors = _anchors(args)
        return forward(ctx, *args)

    @functools.wraps(backward)
    def backward_once(ctx, *grad_outputs):
        if torch.compiler.is_compiling():
            if ctx.kd_links and isinstance(grad_outputs[0], torch.Tensor):
                grad_outputs = (_link_op(grad_outputs[0], list(ctx.kd_links)), *grad_outputs[1:])
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        links = [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.requires_grad]
        return _poisoned(grads, [*getattr(ctx, "kd_anchors", ()), *links])

    cls.forward = staticmethod(forward_keeping_anchors)
    cls.backward = staticmethod(backward_once)
    return cls


def _leaves(args: tuple) -> tuple[torch.Tensor, ...]:
    """The leaf tensors that require grad among the tensor arguments and the bases of those that are
    views (the public functions reshape their inputs)."""
    bases = (x if x._base is None else x._base for x in args if isinstance(x, torch.Tensor))
    return tuple(x for x in bases if x.requires_grad and x.is_leaf)


@torch.library.custom_op("kd_kernels::link", mutates_args=())
def _link_op(grad: torch.Tensor, links: list[torch.Tensor]) -> torch.Tensor:
    """``grad`` (a copy: a custom op cannot return its input); ``links`` are only read by the
    graph's partitioner, which must then save them for backward (see ``differentiable_once``)."""
    return grad.clone()


@_link_op.register_fake
def _(grad, links):
    return torch.empty_like(grad)


def _anchors(args: tuple) -> tuple[torch.Tensor, ...]:
    """A 0-element clone of each tensor argument that requires grad, recorded in the graph (forward
    runs with grad mode off): its node holds no tensor, so nothing stays alive that would not
    anyway."""
    with torch.enable_grad():
        return tuple(
            x.narrow(0, 0, 0).clone()
            for x in args
            if isinstance(x, torch.Tensor) and x.requires_grad and x.dim() > 0
        )


def _poisoned(grads: tuple, links: list[torch.Tensor]) -> tuple:
    """``grads`` (no copy) as outputs of one node that raises ``_TWICE`` when differentiated and
    whose edges lead to ``links``; without links, to a fresh leaf (``.backward()`` still reaches
    it)."""
    tensors = [g for g in grads if isinstance(g, torch.Tensor)]
    if not tensors:
        return grads
    if not links:
        links = [torch.empty(0, requires_grad=True)]
    raising = torch._C._functions.DelayedError(_TWICE, len(tensors) + len(links))
    outs = iter(raising(*tensors, *links))
    return tuple(next(outs) if isinstance(g, torch.Tensor) else g for g in grads)


def reduce_rows(loss: torch.Tensor, row_weight: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Σ_i c_i L_i, or the vector c_i L_i when ``per_token``; skipped rows have L_i = 0 and c_i = 0."""
    weighted = loss * row_weight
    return weighted if per_token else weighted.sum()


def loss_only(s, t, row_weight, spec: KDSpec, backend, per_token: bool) -> torch.Tensor:
    """What :class:`KDLossFunction` returns when nothing needs a gradient, without an autograd node: the
    launcher computes the loss alone. Eager only (a compiled graph needs the custom op)."""
    return reduce_rows(backend.loss_grad(s, t, row_weight, spec, None), row_weight, per_token)


@differentiable_once
class KDLossFunction(torch.autograd.Function):
    """(s, t, c) ↦ Σ_i c_i L_i  (or the vector c_i L_i when ``per_token``); gradient to ``s`` only."""

    @staticmethod
    def forward(ctx, s, t, row_weight, spec: KDSpec, backend: str, per_token: bool, inplace: bool):
        need_grad = ctx.needs_input_grad[0]
        if torch.compiler.is_compiling():
            # Graphs see the custom op; it cannot alias s, so inplace does not apply under compile.
            loss, grad = _loss_grad_op(
                s,
                t,
                row_weight,
                int(spec.divergence),
                spec.coef,
                spec.coef2,
                spec.temperature,
                spec.interpolation,
                backend,
                need_grad,
            )
        else:
            # Eager: call the launcher directly. Through the custom op, eager mode holds a second (N, V)
            # buffer at peak (measured: 2.17x the gradient instead of 1.0x at 1024 x 32000 fp32).
            grad = None
            if need_grad:
                grad = s if inplace else torch.empty(s.shape, dtype=s.dtype, device=s.device)
            loss = get_backend(backend).loss_grad(s, t, row_weight, spec, grad)
            if need_grad and inplace:
                # The kernel overwrote s with its gradient, each block read before written. Bump the version
                # so autograd raises if anything saved s for its own backward (see inplace_grad's docs).
                torch.autograd.graph.increment_version(s)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.per_token = per_token
        return reduce_rows(loss, row_weight, per_token)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            scale = (grad_out[:, None] if ctx.per_token else grad_out).to(grad.dtype)
            return (grad * scale).to(grad.dtype), None, None, None, None, None, None
        # In place: the saved gradient is used once. A second backward (retain_graph=True) makes autograd raise
        # a version error rather than return a doubly scaled gradient (the version bumps below keep that guard
        # where no in-place torch op runs).
        if not ctx.per_token:
            if grad_out.device.type == "cpu" and grad_out.item() == 1.0:
                # loss.backward() on a reduced loss: the scale is exactly 1, skip a full pass over the (N, V)
                # gradient (reading a CPU scalar costs no device synchronisation).
                torch.autograd.graph.increment_version(grad)
                return grad, None, None, None, None, None, None
            scaler = _device_scaler(grad, grad_out)
            if scaler is not None:
                # On a GPU the scalar lives on the device: reading it would synchronise. The kernel reads it
                # there and returns at once when it is 1 (no pass over the gradient); otherwise one in-place
                # pass, the product rounded once from fp32.
                scaler(grad, grad_out)
                torch.autograd.graph.increment_version(grad)
                return grad, None, None, None, None, None, None
        # In the gradient's dtype: an fp32 (N, 1) scale would promote a bf16 / fp16 in-place multiply through a
        # full-size fp32 temporary.
        scale = (grad_out[:, None] if ctx.per_token else grad_out).to(grad.dtype)
        return grad.mul_(scale), None, None, None, None, None, None


def _device_scaler(grad: torch.Tensor, grad_out: torch.Tensor):
    """The Triton in-place scale by a device scalar (``_triton_kernels.scale_by_device_scalar``) when it
    applies: a contiguous CUDA gradient, a one-element upstream gradient on the same device, triton importable.
    None otherwise (the caller multiplies with torch)."""
    if (
        grad.device.type != "cuda"
        or not grad.is_contiguous()
        or grad_out.numel() != 1
        or grad_out.device != grad.device
    ):
        return None
    try:
        from ._triton_kernels import scale_by_device_scalar
    except ImportError:  # triton not installed: the CUDA backend works without it
        return None
    return scale_by_device_scalar
