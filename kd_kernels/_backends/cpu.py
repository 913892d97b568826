"""The "cpu" backend: launcher for the compiled C++ kernel in ``kd_kernels._C`` (csrc/cpu)."""

from __future__ import annotations

import torch

from .. import _ext
from . import Backend, register


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = super().unsupported_reasons(device)
        if not _ext.has_cpu():
            reasons.append(
                f"the compiled extension kd_kernels._C is not importable ({_ext.load_error}); "
                "build it with `pip install .`"
            )
        return reasons

    def loss_grad(self, s, t, row_weight, spec, grad):
        raise NotImplementedError("TODO(cpu kernel): launcher for _C")


register(CpuBackend())
