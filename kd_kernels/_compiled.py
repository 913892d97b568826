"""``torch.compile`` support of the chunked families (sparse teachers, fused linear, token
log-probs).

Their eager code is data dependent: the chunk loops compact the active rows (``nonzero``), the input
checks read values to raise on bad ones. Dynamo cannot trace that with ``fullgraph=True``, so
under ``torch.compiler.is_compiling()`` each family's ``autograd.Function`` hands its tensors to one
opaque custom op, ``kd_kernels::family``, which runs the family's eager implementation; its fake (meta)
implementation returns the outputs' shapes, so Dynamo and AOTAutograd never look inside.

A family registers ``run(tensors, backend, options) -> outputs`` and ``fake(...)`` with the same
signature (:func:`register_family`). ``tensors`` is a list of tensors or None, ``options`` a list of
floats (the family's scalars: :func:`spec_options`, :func:`head_options` and flags), ``backend`` a
backend name. ``run`` returns tensors or None (an empty placeholder in the op's output list). The
logits-level loss has its own op, ``kd_kernels::loss_grad`` (``_autograd.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._head import HeadTransform
from ._spec import Divergence, KDSpec

Tensors = Sequence[torch.Tensor | None]
Impl = Callable[[Tensors, str, Sequence[float]], Sequence[torch.Tensor | None]]

_FAMILIES: dict[str, tuple[Impl, Impl]] = {}


def register_family(name: str, run: Impl, fake: Impl) -> None:
    _FAMILIES[name] = (run, fake)


def _placeholder(outs: Sequence[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor]:
    return [o if o is not None else like.new_empty(0) for o in outs]


@torch.library.custom_op("kd_kernels::family", mutates_args=())
def _family_op(
    tensors: list[torch.Tensor | None], family: str, backend: str, options: list[float]
) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = _FAMILIES[family][0](tensors, backend, options)
    return _placeholder(outs, tensors[0])


@_family_op.register_fake
def _(tensors, family, backend, options):
    return _placeholder(_FAMILIES[family][1](tensors, backend, options), tensors[0])


def call(family: str, tensors: Tensors, backend: str, options: Sequence) -> list[torch.Tensor]:
    """The family's outputs through the custom op (empty tensors where ``run`` returns None)."""
    return _family_op(list(tensors), family, backend, [float(o) for o in options])


def spec_options(spec: KDSpec) -> list[float]:
    return [int(spec.divergence), spec.coef, spec.coef2, spec.temperature, spec.interpolation]


def spec_from(options: Sequence[float]) -> KDSpec:
    """The :class:`KDSpec` of ``spec_options`` (its five floats)."""
    div, coef, coef2, temperature, interpolation = options
    return KDSpec(Divergence(int(div)), coef, coef2, temperature, interpolation)


def head_options(tr: HeadTransform) -> list[float]:
    return [tr.scale, tr.softcap if tr.softcap is not None else 0.0]


def head_from(options: Sequence[float]) -> HeadTransform:
    """The :class:`HeadTransform` of ``head_options`` (softcap 0.0 = None)."""
    scale, softcap = options
    return HeadTransform(scale, softcap if softcap != 0.0 else None)


def head_grads_fake(h: torch.Tensor, w: torch.Tensor, need: Sequence[float]) -> list:
    """The fake (kd, ce, ∂h, ∂W, ∂b) of a fused-linear loss whose gradients come out of forward:
    fp32 scalars, ∂h in h's dtype, ∂W and ∂b accumulated in fp32; None where not needed."""
    scalar = h.new_empty((), dtype=torch.float32)
    need_h, need_w, need_b = (bool(x) for x in need)
    return [
        scalar,
        scalar.clone(),
        h.new_empty(h.shape) if need_h else None,
        w.new_empty(w.shape, dtype=torch.float32) if need_w else None,
        w.new_empty(w.shape[0], dtype=torch.float32) if need_b else None,
    ]
