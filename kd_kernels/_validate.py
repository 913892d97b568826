"""Input checks shared by the public functions. Every error names the argument and the fix."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def check_untransformed(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` is a plain tensor: not inside a ``torch.func`` transform (vmap, grad, jvp, jacrev...)
    nor a forward-mode dual. The kernels read raw memory and compute one precomputed gradient: under
    a transform they would fail on a storage-less tensor, or (a dual) silently drop the tangent."""
    if torch.compiler.is_compiling():
        return x
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(x)
    if wrapped or fwAD.unpack_dual(x).tangent is not None:
        raise NotImplementedError(
            f"{name} is inside a torch.func transform (vmap, grad, jvp, jacrev, ...) or is a "
            "forward-mode dual tensor: kd_kernels losses do not support functorch transforms or "
            "forward-mode AD; compute the loss with plain PyTorch ops (kd_kernels.reference) "
            "for that"
        )
    return x


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_untransformed(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; kd_kernels takes float32, bfloat16 or float16 "
            f"(cast with {name}.float())"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} is 0-d; logits must have shape (..., V) with the vocabulary last")
    return x


def check_logit_pair(student: object, teacher: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits of one shape (..., V) on one device."""
    s = check_float_tensor(student, "student_logits")
    t = check_float_tensor(teacher, "teacher_logits")
    if s.device != t.device:
        raise ValueError(
            f"student_logits is on {s.device} and teacher_logits on {t.device}; move both to one device"
        )
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} differ in their leading "
            "(token) dims; they must have the same shape (..., V)"
        )
    vs, vt = s.shape[-1], t.shape[-1]
    if vs != vt:
        fix = (
            f"if the teacher's vocabulary is the student's padded to {vt} rows, pass "
            f"teacher_logits[..., :{vs}]"
            if vt > vs
            else "the teacher must cover the student's vocabulary; pad the teacher with -inf columns "
            f"(torch.nn.functional.pad(teacher_logits, (0, {vs - vt}), value=-float('inf')))"
        )
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={vs}, teacher_logits V={vt}; {fix}"
        )
    if vs == 0:
        raise ValueError("student_logits has an empty vocabulary dim (V=0)")
    return s, t


def check_bool(x: object, name: str) -> bool:
    """A flag that must be a real bool: ``inplace_grad="no"`` is truthy and would silently mean True."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__} {x!r}")
    return x


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is unknown; use 'mean', 'sum' or 'none'")
    return reduction  # type: ignore[return-value]


def check_token_tensor(
    x: object, name: str, lead: torch.Size, device: torch.device, *, boolean: bool
) -> torch.Tensor | None:
    """A per-token tensor of shape ``lead`` (the logits' leading dims): the mask (bool) or token weights."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if boolean and x.dtype != torch.bool:
        raise TypeError(
            f"{name} has dtype {x.dtype}; it must be bool with True where the token counts "
            f"(e.g. mask = labels != -100)"
        )
    if not boolean and not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; pass floating-point weights (e.g. {name}.float())"
        )
    if x.shape != lead:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; it must match the logits' leading dims {tuple(lead)}"
        )
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but the logits are on {device}; move it with .to()"
        )
    return x


def row_weights(
    mask: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    n: int,
    reduction: str,
    device: torch.device,
) -> torch.Tensor:
    """Per-row factor c_i with  output = Σ c_i L_i  ('mean', 'sum')  or  c_i L_i  ('none').

    c_i = w_i where k_i else 0 (so a NaN / inf weight on a masked row adds exactly 0), divided by
    max(1, Σ k_i) for 'mean' (MATH.md, Reductions). Stays on device: no host sync.
    """
    if mask is None and token_weights is None:
        # one fill instead of ones / count (the same fp32 value: 1/n rounded once)
        return torch.full((n,), 1.0 / max(n, 1) if reduction == "mean" else 1.0, device=device)
    k = mask.reshape(n).to(torch.float32) if mask is not None else None
    c = k if k is not None else torch.ones(n, dtype=torch.float32, device=device)
    if token_weights is not None:
        w = token_weights.detach().reshape(n).to(torch.float32)
        # A select, not k·w: a masked row adds exactly 0 whatever its weight (0·NaN would be NaN).
        c = w if mask is None else torch.where(mask.reshape(n), w, torch.zeros((), device=device))
    if reduction == "mean":
        count = k.sum() if k is not None else torch.tensor(float(n), device=device)
        c = c / count.clamp_min(1)
    return c.contiguous()


def reject_unsupported(entry: str, options: dict[str, tuple[object, object]], fix: str) -> None:
    """A typed error for an option that ``entry`` does not implement yet (README, "Capability
    matrix"), instead of ignoring it: ``options`` maps each such option's name to (the value given,
    the default that means off); the first one given another value raises ``NotImplementedError``
    naming it, the entry point and ``fix``."""
    for name, (value, default) in options.items():
        if value is default or (
            default is not None and type(value) in (int, float, str) and value == default
        ):
            continue
        shown = "a tensor" if isinstance(value, torch.Tensor) else repr(value)
        raise NotImplementedError(
            f"{entry} does not support {name} yet (got {name}={shown}); {fix}"
        )
