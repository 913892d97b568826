"""The "cpu" backend: launcher for the compiled C++ kernel in ``kd_kernels._C`` (csrc/cpu).

The kernel reads and writes host memory through raw pointers (no torch headers in the extension). This launcher
checks the layout it relies on, allocates the ``(N,)`` fp32 loss and passes pointers, strides and dtype codes;
the kernel runs with the GIL released on ``torch.get_num_threads()`` OpenMP threads.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._spec import KDSpec
from . import Backend, register

# Whether the compiled kernels are importable, decided once: torch.compile cannot trace the pybind11 call
# behind _ext.has_cpu() (it asks _C.build_info()), and backend resolution runs inside compiled code.
_HAS_CPU: bool = _ext.has_cpu()
_LOAD_ERROR: str | None = _ext.load_error

# dtype codes of kd::DType (csrc/include/kd_kernels/kd_math.h).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dtype_code(x: torch.Tensor, name: str) -> int:
    code = _DTYPE_CODES.get(x.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {x.dtype}; the cpu kernel takes float32, bfloat16 or float16")
    return code


def _check_rows(x: torch.Tensor, name: str, n: int, v: int) -> None:
    if x.dim() != 2 or tuple(x.shape) != (n, v):
        raise ValueError(f"{name} must have shape ({n}, {v}), got {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}; the cpu backend takes CPU tensors")
    if v > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1); pass {name}.contiguous()")
    if n > 1 and x.stride(0) < v:
        raise ValueError(
            f"{name} has row stride {x.stride(0)} < V={v} (rows overlap); pass {name}.contiguous()"
        )


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = super().unsupported_reasons(device)
        if not _HAS_CPU:
            reasons.append(
                f"the compiled extension kd_kernels._C is not importable ({_LOAD_ERROR}); "
                "build it with `pip install .`"
            )
        return reasons

    def loss_grad(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        row_weight: torch.Tensor,
        spec: KDSpec,
        grad: torch.Tensor | None,
    ) -> torch.Tensor:
        if s.dim() != 2:
            raise ValueError(f"student logits must be (N, V) for the cpu kernel, got {tuple(s.shape)}")
        n, v = s.shape
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        if n == 0:
            return loss
        _check_rows(s, "student_logits", n, v)
        _check_rows(t, "teacher_logits", n, v)
        s_code, t_code = _dtype_code(s, "student_logits"), _dtype_code(t, "teacher_logits")
        if row_weight.dtype != torch.float32 or tuple(row_weight.shape) != (n,):
            raise ValueError(
                f"row_weight must be float32 of shape ({n},), got {row_weight.dtype} {tuple(row_weight.shape)}"
            )
        row_weight = row_weight.contiguous()
        grad_ptr, stride_g = 0, v
        if grad is not None:
            _check_rows(grad, "grad", n, v)
            if grad.dtype != s.dtype:
                raise TypeError(f"grad has dtype {grad.dtype}; it must have the student's dtype {s.dtype}")
            grad_ptr, stride_g = grad.data_ptr(), grad.stride(0)
        _ext._C.cpu_loss_grad(
            s.data_ptr(),
            t.data_ptr(),
            grad_ptr,
            row_weight.data_ptr(),
            loss.data_ptr(),
            n,
            v,
            s.stride(0) if n > 1 else v,
            t.stride(0) if n > 1 else v,
            stride_g if n > 1 else v,
            s_code,
            t_code,
            int(spec.divergence),
            float(spec.coef),
            float(spec.temperature),
            torch.get_num_threads(),
        )
        return loss


register(CpuBackend())
