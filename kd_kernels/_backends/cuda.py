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
from ._raw import raw_args


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = super().unsupported_reasons(device)
        if not _ext.has_cuda():
            if _ext._C is None:
                reasons.append(
                    f"the compiled extension kd_kernels._C is not importable ({_ext.load_error})"
                )
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
        if s.device.type != "cuda":
            raise ValueError(
                f"the cuda backend takes CUDA tensors; student_logits is on {s.device}"
            )
        loss, args = raw_args("cuda", s, t, row_weight, grad)
        if args is not None:
            with torch.cuda.device(s.device):
                stream = torch.cuda.current_stream(s.device).cuda_stream
                _ext._C.cuda_loss_grad(
                    *args,
                    int(spec.divergence),
                    float(spec.coef),
                    float(spec.coef2),
                    float(spec.interpolation),
                    float(spec.temperature),
                    stream,
                )
        return loss


register(CudaBackend())
