"""Backend registry: which implementations exist, which can run here, and which one "auto" picks.

Each backend is a *launcher* for one fused row kernel with a single contract (``Backend.loss_grad``). Backends
declare why they cannot run (``unsupported_reasons``); "auto" falls back quietly, an explicit choice raises.
"""

from __future__ import annotations

import abc

import torch

from .._spec import KDSpec


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these tensors in this process."""


class Backend(abc.ABC):
    """One implementation of the fused per-row KD kernel.

    Contract of :meth:`loss_grad` (every backend, every divergence):

    - ``s``, ``t``: ``(N, V)`` student / teacher logits, fp32 / bf16 / fp16 (dtypes may differ), last dim
      contiguous, any row stride, on the same device.
    - ``row_weight``: ``(N,)`` fp32 contiguous. Rows with weight 0 are *skipped*: not read, loss 0, gradient row 0.
    - ``grad``: ``None`` (loss only) or an ``(N, V)`` tensor of the student's dtype with a contiguous last dim,
      possibly ``s`` itself (in place). Row i receives ``row_weight[i] · ∂L_i/∂s_i`` (temperature included).
    - returns ``(N,)`` fp32: the unweighted per-token divergence ``L_i`` (0 for skipped rows).

    No host synchronisation on the hot path.
    """

    name: str = ""
    # Device types this backend's kernels can take tensors from.
    device_types: tuple[str, ...] = ()

    def unsupported_reasons(self, device: torch.device) -> list[str]:
        reasons = []
        if device.type not in self.device_types:
            where = " or ".join(self.device_types)
            reasons.append(
                f"the {self.name!r} backend takes {where} tensors, these are on {device.type}"
            )
        return reasons

    @abc.abstractmethod
    def loss_grad(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        row_weight: torch.Tensor,
        spec: KDSpec,
        grad: torch.Tensor | None,
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, Backend] = {}
# "auto" tries these in order for each device type; the first that can run wins.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}
BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "cuda")


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


_loaded = False


def _load_all() -> None:
    # The backend modules register themselves on import; imported here, on first use, so that importing
    # kd_kernels stays cheap. (A flag, not the registry, says whether it ran: one module may already have been
    # imported directly.)
    global _loaded
    if not _loaded:
        from . import cpu, cuda, torch_backend, triton_backend  # noqa: F401

        _loaded = True


def get_backend(name: str) -> Backend:
    _load_all()
    return _REGISTRY[name]


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run in this process (on ``device`` if given, else on any device)."""
    _load_all()
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + (
            [torch.device("cuda")] if torch.cuda.is_available() else []
        )
    return [
        name for name, b in _REGISTRY.items() if any(not b.unsupported_reasons(d) for d in devices)
    ]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend to run on ``device``: ``name`` itself, or the first usable one for "auto"."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(
            f"backend={name!r} is unknown; use one of {', '.join(map(repr, BACKEND_NAMES))}"
        )
    _load_all()
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            b = _REGISTRY.get(candidate)
            if b is not None and not b.unsupported_reasons(device):
                return b
        return _REGISTRY["torch"]
    b = _REGISTRY[name]
    reasons = b.unsupported_reasons(device)
    if reasons:
        usable = ", ".join(repr(n) for n in available_backends(device)) or "none"
        raise BackendUnavailableError(
            f"backend={name!r} cannot run: {'; '.join(reasons)}. Usable here: {usable} (or backend='auto')"
        )
    return b
