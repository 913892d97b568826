"""kd_kernels: fused knowledge-distillation losses for LLMs.

Public surface: the nine divergences and the generic ``kd_loss`` at the logits level with their module
``KDLoss``; the fused-linear forms (``fused_linear_kd``, the named ``fused_linear_*``, ``FusedLinearKDLoss``,
``fused_linear_logprobs``) that never build the logits; the sparse-teacher forms (``sparse_kd``,
``fused_linear_sparse_kd``, ``SparseKDLoss``, ``teacher_topk``); and two introspection calls, ``build_info()`` and
``available_backends()``.
"""

from __future__ import annotations

import importlib.metadata

import torch

from . import _ext
from ._backends import BackendUnavailableError, available_backends
from ._version import __version__
from .fused_linear import (
    FusedLinearKDLoss,
    KDComponents,
    fused_linear_alpha_beta,
    fused_linear_forward_kl,
    fused_linear_jeffreys,
    fused_linear_jsd,
    fused_linear_kd,
    fused_linear_logprobs,
    fused_linear_renyi,
    fused_linear_reverse_kl,
    fused_linear_skew_forward_kl,
    fused_linear_skew_reverse_kl,
    fused_linear_tvd,
)
from .losses import (
    alpha_beta,
    forward_kl,
    jeffreys,
    jsd,
    kd_loss,
    renyi,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from .modules import KDLoss
from .sparse import SparseKDLoss, fused_linear_sparse_kd, sparse_kd, teacher_topk

__all__ = [
    "BackendUnavailableError",
    "FusedLinearKDLoss",
    "KDComponents",
    "KDLoss",
    "SparseKDLoss",
    "__version__",
    "alpha_beta",
    "available_backends",
    "build_info",
    "forward_kl",
    "fused_linear_alpha_beta",
    "fused_linear_forward_kl",
    "fused_linear_jeffreys",
    "fused_linear_jsd",
    "fused_linear_kd",
    "fused_linear_logprobs",
    "fused_linear_renyi",
    "fused_linear_reverse_kl",
    "fused_linear_skew_forward_kl",
    "fused_linear_skew_reverse_kl",
    "fused_linear_sparse_kd",
    "fused_linear_tvd",
    "jeffreys",
    "jsd",
    "kd_loss",
    "renyi",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_kd",
    "teacher_topk",
    "tvd",
]


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict:
    """How this copy of kd_kernels was built and what it runs with.

    Keys: ``version``, ``cpu`` (compiled CPU kernels present), ``cuda`` (compiled CUDA kernels present),
    ``cuda_archs``, ``torch``, ``triton`` (installed version or None), plus what the extension reports of its
    build (compiler, SIMD targets) or ``error`` when it could not be loaded.
    """
    native = _ext.native_build_info()
    return {
        **native,
        "version": __version__,
        "cpu": bool(native.get("cpu", False)),
        "cuda": bool(native.get("cuda", False)),
        "cuda_archs": str(native.get("cuda_archs", "")),
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
    }
