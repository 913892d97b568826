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
from ._raw import raw_args


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

    def loss_grad(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        row_weight: torch.Tensor,
        spec: KDSpec,
        grad: torch.Tensor | None,
    ) -> torch.Tensor:
        loss, args = raw_args("cpu", s, t, row_weight, grad)
        if args is not None:
            _ext._C.cpu_loss_grad(
                *args, int(spec.divergence), float(spec.coef), float(spec.coef2), float(spec.interpolation),
                float(spec.temperature), torch.get_num_threads(),
            )
        return loss


register(CpuBackend())
