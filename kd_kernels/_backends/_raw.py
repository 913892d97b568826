"""The raw-pointer call shared by the compiled launchers ("cpu" and "cuda").

Checks the layout the C++/CUDA kernels rely on (csrc/include/kd_kernels/kd_args.h) and turns the tensors into
the positional arguments both `_C.cpu_loss_grad` and `_C.cuda_loss_grad` begin with.
"""

from __future__ import annotations

import torch

# Codes of kd::DType (csrc/include/kd_kernels/kd_math.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dtype_code(x: torch.Tensor, name: str, backend: str) -> int:
    code = DTYPE_CODES.get(x.dtype)
    if code is None:
        raise TypeError(
            f"{name} has dtype {x.dtype}; the {backend} kernels take float32, bfloat16 or float16"
        )
    return code


class _Args(tuple):
    """The positional arguments, plus (``keep``) the temporary copies their pointers point into: held by the
    caller's ``args`` variable until the kernel call returns (a plain tuple of ints would let them be freed)."""

    keep: tuple = ()


def _readable(x: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """A read-only operand whose rows overlap (e.g. an ``expand()``-ed teacher, row stride 0) as a dense copy:
    the kernels take row strides >= V."""
    if n > 1 and x.dim() == 2 and x.stride(-1) == 1 and 0 <= x.stride(0) < v:
        return x.contiguous()
    return x


def _row_stride(x: torch.Tensor, name: str, n: int, v: int, device: torch.device) -> int:
    """Checks an (n, v) operand and returns the row stride to pass (any value ≥ v for a single row)."""
    if x.dim() != 2 or tuple(x.shape) != (n, v):
        raise ValueError(f"{name} must have shape ({n}, {v}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but student_logits on {device}; move both to one device"
        )
    if v > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dim (stride(-1) == 1); pass {name}.contiguous()"
        )
    if n == 1:
        return max(x.stride(0), v)
    if x.stride(0) < v:
        raise ValueError(
            f"{name} has row stride {x.stride(0)} < V={v} (rows overlap); pass {name}.contiguous()"
        )
    return x.stride(0)


def raw_args(
    backend: str,
    s: torch.Tensor,
    t: torch.Tensor,
    row_weight: torch.Tensor,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple]:
    """(loss, args): the (N,) fp32 loss to be filled and ``(s, t, grad, row_weight, loss, n_rows, vocab, stride_s,
    stride_t, stride_g, s_dtype, t_dtype)`` as the bindings take them (pointers as ints, grad 0 = loss only).

    ``args`` is None when there are no rows (nothing to launch).
    """
    if s.dim() != 2:
        raise ValueError(
            f"student logits must be (N, V) for the {backend} kernels, got {tuple(s.shape)}"
        )
    n, v = s.shape
    device = s.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return loss, None
    if grad is None or grad.data_ptr() != s.data_ptr():
        s = _readable(s, n, v)
    t = _readable(t, n, v)
    stride_s = _row_stride(s, "student_logits", n, v, device)
    stride_t = _row_stride(t, "teacher_logits", n, v, device)
    s_code = _dtype_code(s, "student_logits", backend)
    t_code = _dtype_code(t, "teacher_logits", backend)
    if row_weight.dtype != torch.float32 or tuple(row_weight.shape) != (n,):
        raise ValueError(
            f"row_weight must be float32 of shape ({n},), got {row_weight.dtype} {tuple(row_weight.shape)}"
        )
    if row_weight.device != device:
        raise ValueError(f"row_weight is on {row_weight.device}; it must be on {device}")
    row_weight = row_weight.contiguous()
    grad_ptr, stride_g = 0, stride_s
    if grad is not None:
        stride_g = _row_stride(grad, "grad", n, v, device)
        if grad.dtype != s.dtype:
            raise TypeError(
                f"grad has dtype {grad.dtype}; it must have the student's dtype {s.dtype}"
            )
        grad_ptr = grad.data_ptr()
        if grad_ptr == s.data_ptr() and stride_g != stride_s:
            raise ValueError(
                "an in-place grad (grad is student_logits) must have the same row stride"
            )
    args = _Args(
        (
            s.data_ptr(),
            t.data_ptr(),
            grad_ptr,
            row_weight.data_ptr(),
            loss.data_ptr(),
            n,
            v,
            stride_s,
            stride_t,
            stride_g,
            s_code,
            t_code,
        )
    )
    args.keep = (s, t, row_weight)
    return loss, args
