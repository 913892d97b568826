"""DTensor lm_head weights (FSDP2's ``fully_shard``, tensor parallelism) given to the
single-process fused-linear loss.

Inside the forward of a module wrapped by ``fully_shard`` FSDP2 has all-gathered the module's
parameters into plain tensors, and its post-backward hook reduce-scatters whatever gradient reaches
them: the loss needs nothing special there. Outside that forward the parameters are sharded
DTensors. A teacher's (or a student's that needs no gradient) is all-gathered here, which gives the
correct loss. A student weight that needs a gradient is refused: its gradient would bypass FSDP2's
reduce-scatter (and its averaging over ranks), so the result would be silently wrong.
"""

from __future__ import annotations

import torch


def plain_head_tensor(x: object, name: str, *, gets_grad: bool) -> object:
    """``x`` itself, or the full tensor of a DTensor ``x`` (no gradient path); a TypeError for a
    DTensor that would need a gradient (``gets_grad`` and grad mode on and ``x.requires_grad``)."""
    if type(x) in (torch.Tensor, torch.nn.Parameter) or not isinstance(x, torch.Tensor):
        return x
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support: there are no DTensors
        return x
    if not isinstance(x, DTensor):
        return x
    if gets_grad and torch.is_grad_enabled() and x.requires_grad:
        raise TypeError(
            f"{name} is a sharded DTensor (placements {tuple(x.placements)}): with FSDP2, call the "
            "loss inside the forward of the module wrapped by fully_shard that owns this lm_head "
            "(there FSDP2 has gathered it into a plain tensor and reduce-scatters its gradient); "
            "for a tensor-parallel (vocabulary-sharded) head use kd_kernels.parallel."
            f"fused_linear_kd with its local rows ({name}.to_local())"
        )
    return x.detach().full_tensor()
