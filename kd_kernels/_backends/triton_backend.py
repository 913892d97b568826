"""The "triton" backend: launcher for the Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import Backend, register


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"

    @property
    def device_types(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = super().unsupported_reasons(device)
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install triton)")
        if device.type == "cpu" and not _interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before the process starts")
        return reasons

    def loss_grad(self, s, t, row_weight, spec, grad):
        raise NotImplementedError("TODO(triton kernel)")


register(TritonBackend())
