"""The "cuda" backend: launcher for the hand-written CUDA kernels in ``kd_kernels._C`` (csrc/cuda)."""

from __future__ import annotations

import torch

from .. import _ext
from . import Backend, register


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = super().unsupported_reasons(device)
        if not _ext.has_cuda():
            reasons.append("kd_kernels._C was built without CUDA kernels (no nvcc at build time)")
        return reasons

    def loss_grad(self, s, t, row_weight, spec, grad):
        raise NotImplementedError("TODO(cuda kernel)")


register(CudaBackend())
