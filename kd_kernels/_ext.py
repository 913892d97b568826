"""The compiled extension ``kd_kernels._C``: loaded if present, never a reason for ``import kd_kernels`` to fail."""

from __future__ import annotations

import importlib

try:
    _C = importlib.import_module("kd_kernels._C")

    load_error: str | None = None
except (
    ImportError
) as e:  # not built (source checkout without `pip install -e .`) or built for another Python
    _C = None
    load_error = f"{type(e).__name__}: {e}"


# Read once: pybind11 calls cannot be traced by torch.compile, and these answers never change in a process.
_NATIVE_INFO: dict = (
    {"cpu": False, "cuda": False, "cuda_archs": "", "error": load_error}
    if _C is None
    else dict(_C.build_info())
)


def has_cpu() -> bool:
    return bool(_NATIVE_INFO.get("cpu", False))


def has_cuda() -> bool:
    return bool(_NATIVE_INFO.get("cuda", False))


def native_build_info() -> dict:
    """What the extension says of itself, or a record of why it is missing."""
    return dict(_NATIVE_INFO)
