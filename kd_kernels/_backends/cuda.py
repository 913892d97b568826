"""The "cuda" backend: launcher for the hand-written CUDA kernels in ``kd_kernels._C`` (csrc/cuda).

The extension sees raw device pointers only (no torch headers). This launcher checks the layout the kernels
rely on, allocates the ``(N,)`` fp32 loss, and enqueues the kernel on the tensors' device and its current
torch stream; nothing synchronises the host. Kernel-side choices (one block or one cluster of blocks per row,
the row kept in shared memory when it fits) are made in csrc/cuda/kd_cuda.cu; the environment variable
``KD_KERNELS_CUDA_PATH`` (``auto``, ``stream``, ``cluster:C``) forces one, for tests and benchmarks.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._spec import KDSpec
from . import Backend, register

# dtype codes of kd::DType (csrc/include/kd_kernels/kd_math.h).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dtype_code(x: torch.Tensor, name: str) -> int:
    code = _DTYPE_CODES.get(x.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {x.dtype}; the cuda kernels take float32, bfloat16 or float16")
    return code


def _row_stride(x: torch.Tensor, name: str, n: int, v: int, device: torch.device) -> int:
    """Checks an (n, v) operand and returns the row stride to pass (any value ≥ v for a single row)."""
    if x.dim() != 2 or tuple(x.shape) != (n, v):
        raise ValueError(f"{name} must have shape ({n}, {v}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_logits on {device}; move both to one GPU")
    if v > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1); pass {name}.contiguous()")
    if n == 1:
        return max(x.stride(0), v)
    if x.stride(0) < v:
        raise ValueError(f"{name} has row stride {x.stride(0)} < V={v} (rows overlap); pass {name}.contiguous()")
    return x.stride(0)


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = super().unsupported_reasons(device)
        if not _ext.has_cuda():
            if _ext._C is None:
                reasons.append(f"the compiled extension kd_kernels._C is not importable ({_ext.load_error})")
            else:
                reasons.append(
                    "kd_kernels._C was built without CUDA kernels (no nvcc at build time); rebuild with "
                    "KD_KERNELS_CUDA=1 pip install --no-build-isolation -e ."
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
            raise ValueError(f"student logits must be (N, V) for the cuda kernels, got {tuple(s.shape)}")
        n, v = s.shape
        device = s.device
        if device.type != "cuda":
            raise ValueError(f"the cuda backend takes CUDA tensors; student_logits is on {device}")
        loss = torch.empty(n, dtype=torch.float32, device=device)
        if n == 0:
            return loss
        stride_s = _row_stride(s, "student_logits", n, v, device)
        stride_t = _row_stride(t, "teacher_logits", n, v, device)
        s_code, t_code = _dtype_code(s, "student_logits"), _dtype_code(t, "teacher_logits")
        if row_weight.dtype != torch.float32 or tuple(row_weight.shape) != (n,):
            raise ValueError(
                f"row_weight must be float32 of shape ({n},), got {row_weight.dtype} {tuple(row_weight.shape)}"
            )
        if row_weight.device != device:
            raise ValueError(f"row_weight is on {row_weight.device}; it must be on {device}")
        row_weight = row_weight.contiguous()
        grad_ptr, stride_g = 0, v
        if grad is not None:
            stride_g = _row_stride(grad, "grad", n, v, device)
            if grad.dtype != s.dtype:
                raise TypeError(f"grad has dtype {grad.dtype}; it must have the student's dtype {s.dtype}")
            grad_ptr = grad.data_ptr()
            if grad_ptr == s.data_ptr() and stride_g != stride_s:
                raise ValueError("an in-place grad (grad is student_logits) must have the same row stride")
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _ext._C.cuda_loss_grad(
                s.data_ptr(), t.data_ptr(), grad_ptr, row_weight.data_ptr(), loss.data_ptr(),
                n, v, stride_s, stride_t, stride_g, s_code, t_code,
                int(spec.divergence), float(spec.coef), float(spec.temperature), stream,
            )
        return loss


register(CudaBackend())
