"""The "triton" backend: launcher for the Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1).

The kernels live in ``kd_kernels/_triton_kernels.py`` and are imported on the first launch, so registering this
backend (and ``import kd_kernels``) never imports triton.

Launch configuration: one program per row, the vocabulary walked in blocks of ``BLOCK_V`` columns.

- On a GPU, by default a fixed heuristic (:func:`_heuristic_config`); with ``KD_TRITON_AUTOTUNE=1`` in the
  environment a ``triton.autotune`` sweep instead, keyed on (divergence, gradient or not, V, dtypes) so it tunes
  once per vocabulary size, not per batch. Neither has been timed on an H100 yet; ``benchmarks/run.py --device cuda``
  times both so the default can be chosen from measurements.
- Under the interpreter, one fixed block (:data:`INTERPRET_BLOCK_V`) so the CPU test suite stays fast.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from .._spec import KDSpec
from . import Backend, register
from . import _vocab_parallel as vp

# Under TRITON_INTERPRET=1 every block operation is one numpy call with a fixed Python overhead, so a larger block
# only means fewer loop trips (V = 32003 takes 16). tests/test_triton_backend.py passes small blocks explicitly to
# cover many blocks with a ragged tail.
INTERPRET_BLOCK_V = 2048
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_requested() -> bool:
    return os.environ.get("KD_TRITON_AUTOTUNE", "0") == "1"


def _heuristic_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a GPU launch without autotuning.

    4096 columns and 8 warps: 16 values per thread and tensor, i.e. two (16-bit) or four (fp32) 16-byte loads
    in flight per thread per tensor, and 63-100 registers per thread at sm_90 without spills for every
    divergence in bf16 and fp32 (ptxas -v on kernels compiled here for sm_90a; 8192 x 8 warps needs 123-187,
    which halves the programs an SM can hold). Chosen from those counts, not from timings: none exist yet.
    Short rows get the next power of two so no lane works on a whole masked block.
    """
    block = max(128, min(4096, _next_power_of_2(v)))
    warps = 8 if block >= 2048 else 4
    return block, warps


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _autotune_configs(triton):
    configs = []
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            per_thread = block // (warps * 32)
            if 8 <= per_thread <= 64:
                configs.append(triton.Config({"BLOCK_V": block}, num_warps=warps))
    return configs


@functools.cache
def _kernel(autotuned: bool):
    """The jitted kernel, plain or wrapped in ``triton.autotune`` (built once per process)."""
    import triton

    from .. import _triton_kernels as K

    kernel = K.kd_loss_grad_kernel
    if autotuned:
        # s and g are restored after each timing run: with g aliasing s (in place) a trial would otherwise feed
        # its own gradient to the next one. Tensor dtypes are part of the autotuner's key automatically.
        kernel = triton.autotune(
            configs=_autotune_configs(triton),
            key=["V", "DIV", "HAS_GRAD"],
            restore_value=["s_ptr", "g_ptr"],
        )(kernel)
    return kernel


def _check_args(s, t, row_weight, grad) -> None:
    """Cheap shape / layout checks (no device sync): callers other than the public API use this contract too."""
    for name, x in (("s", s), ("t", t)):
        if x.dim() != 2 or x.dtype not in _KERNEL_DTYPES:
            raise ValueError(
                f"triton backend: {name} must be a 2-D float32/bfloat16/float16 tensor, "
                f"got {x.dim()}-D {x.dtype}"
            )
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(
                f"triton backend: {name} needs a unit stride along V; pass {name}.contiguous()"
            )
    if t.shape != s.shape or t.device != s.device:
        raise ValueError(
            f"triton backend: t {tuple(t.shape)} on {t.device} must match s {tuple(s.shape)} "
            f"on {s.device}"
        )
    n = s.shape[0]
    if (
        row_weight.shape != (n,)
        or row_weight.dtype != torch.float32
        or row_weight.device != s.device
        or (n > 1 and row_weight.stride(0) != 1)
    ):
        raise ValueError(
            f"triton backend: row_weight must be a contiguous float32 ({n},) tensor on {s.device}, "
            f"got {row_weight.dtype} {tuple(row_weight.shape)} on {row_weight.device}"
        )
    if grad is not None:
        if grad.shape != s.shape or grad.dtype != s.dtype or grad.device != s.device:
            raise ValueError(
                f"triton backend: grad must be a {s.dtype} {tuple(s.shape)} tensor on {s.device} "
                f"(or s itself), got {grad.dtype} {tuple(grad.shape)} on {grad.device}"
            )
        if s.shape[1] > 1 and grad.stride(1) != 1:
            raise ValueError("triton backend: grad needs a unit stride along V")


def launch(
    s: torch.Tensor,
    t: torch.Tensor,
    row_weight: torch.Tensor,
    spec: KDSpec,
    grad: torch.Tensor | None,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """Run the kernel for ``spec`` on (N, V) logits; the Backend contract of ``loss_grad``.

    ``block_v`` / ``num_warps`` override the configuration (tests use a small block to force many iterations;
    the benchmark compares configurations) and bypass the autotuner. ``autotune`` forces the autotuned kernels
    on or off (default: the ``KD_TRITON_AUTOTUNE`` environment variable); the interpreter never autotunes.
    """
    _check_args(s, t, row_weight, grad)
    n, v = s.shape
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    if n == 0:
        return loss
    if grad is not None and v > 0 and grad.data_ptr() != s.data_ptr():
        # A partial overlap (not exactly in place) would let one row's gradient overwrite another row's input.
        lo, hi = s.data_ptr(), s.data_ptr() + s.element_size() * ((n - 1) * s.stride(0) + v)
        glo = grad.data_ptr()
        ghi = glo + grad.element_size() * ((n - 1) * grad.stride(0) + v)
        if glo < hi and lo < ghi:
            raise ValueError(
                "triton backend: grad overlaps s without being s itself; pass grad=s or a new tensor"
            )

    d = spec.divergence
    has_grad = grad is not None
    g = grad if has_grad else s  # never written when HAS_GRAD is False
    inv_temp = 1.0 / spec.temperature
    if autotune is None:
        autotune = _autotune_requested()
    autotuned = autotune and block_v is None and num_warps is None and not _interpreting()
    kernel = _kernel(autotuned)
    # The divergence's parameters as the kernel takes them (_triton_kernels.kd_loss_grad_kernel); the logs are
    # only read by the skew divergences and JSD, whose coefficient lies in (0, 1).
    c = spec.coef
    log_c = math.log(c) if 0.0 < c < 1.0 else 0.0
    log_1mc = math.log1p(-c) if 0.0 < c < 1.0 else 0.0
    lam = spec.interpolation
    args = (
        s,
        t,
        row_weight,
        loss,
        g,
        s.stride(0),
        t.stride(0),
        g.stride(0),
        v,
        inv_temp,
        lam,
        c,
        spec.coef2,
        log_c,
        log_1mc,
    )
    meta = {
        "DIV": int(d),
        "ONLINE": d.info.online,
        "INTERP": lam != 1.0,
        "HAS_GRAD": has_grad,
        "BF16_BY_BITS": _interpreting(),
    }
    if not autotuned:
        if _interpreting():
            default_block, default_warps = INTERPRET_BLOCK_V, 4
        else:
            default_block, default_warps = _heuristic_config(v)
        meta["BLOCK_V"] = block_v or default_block
        meta["num_warps"] = num_warps or default_warps

    if s.device.type == "cuda":
        with torch.cuda.device(s.device):  # launch on the tensors' GPU, on its current stream
            kernel[(n,)](*args, **meta)
    else:
        # The interpreter evaluates both sides of every tl.where with numpy, which warns about the −inf − (−inf)
        # lanes the kernel then selects away (absent columns), and about logits that overflow fp32 after 1/T (rows
        # the kernel turns into NaN on purpose); the results are exact, so hush numpy here.
        import numpy as np

        with np.errstate(invalid="ignore", over="ignore"):
            kernel[(n,)](*args, **meta)
    return loss


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
        if device.type == "cuda" and not _interpreting() and not torch.cuda.is_available():
            reasons.append("no CUDA device is visible to torch")
        return reasons

    def loss_grad(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        row_weight: torch.Tensor,
        spec: KDSpec,
        grad: torch.Tensor | None,
    ) -> torch.Tensor:
        return launch(s, t, row_weight, spec, grad)


register(TritonBackend())


# -------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel shard passes (kd_kernels.parallel): _triton_kernels.kd_vp_rows_kernel, the same jitted
# divergence helpers split at the row-statistics boundary (protocol in _vocab_parallel.py).
# -------------------------------------------------------------------------------------------------------------


class TritonVocabParallel(vp.VocabParallelRows):
    """``row_stats`` / ``row_sums`` / ``loss_grad_given_stats`` as one Triton kernel with a ``MODE`` flag
    (one program per row; fp32 math; float32 / bfloat16 / float16 shards). ``block_v`` / ``num_warps``
    override the launch configuration (tests use small blocks to cover many blocks per shard)."""

    name = "triton"

    def __init__(self, block_v: int | None = None, num_warps: int | None = None) -> None:
        self.block_v = block_v
        self.num_warps = num_warps

    def _launch(self, mode, s, t, spec, stats=None, out=None, grad=None, row_weight=None):
        from .. import _triton_kernels as K

        if s.dim() != 2 or t.shape != s.shape or t.device != s.device:
            raise ValueError(
                f"triton vocabulary-parallel rows: s and t must be (rows, V_r) of one shape on one device, "
                f"got {tuple(s.shape)} on {s.device} and {tuple(t.shape)} on {t.device}"
            )
        for name, x in (("s", s), ("t", t)):
            if x.dtype not in _KERNEL_DTYPES:
                raise ValueError(
                    f"triton backend: {name} must be float32/bfloat16/float16, got {x.dtype}"
                )
            if x.shape[1] > 1 and x.stride(1) != 1:
                raise ValueError(
                    f"triton backend: {name} needs a unit stride along V; pass {name}.contiguous()"
                )
        n, v = s.shape
        if n == 0:
            return
        if stats is not None and (
            stats.dtype != torch.float32 or tuple(stats.shape) != (n, vp.N_GLOBAL)
        ):
            raise ValueError(
                f"stats must be float32 ({n}, {vp.N_GLOBAL}), got {stats.dtype} {tuple(stats.shape)}"
            )
        stats = stats.contiguous() if stats is not None else out
        c = spec.coef
        log_c = math.log(c) if 0.0 < c < 1.0 else 0.0
        log_1mc = math.log1p(-c) if 0.0 < c < 1.0 else 0.0
        g = grad if grad is not None else s  # never written outside MODE 2
        w = row_weight if row_weight is not None else stats
        o = out if out is not None else stats
        if _interpreting():
            default_block, default_warps = INTERPRET_BLOCK_V, 4
        else:
            default_block, default_warps = _heuristic_config(v)
        meta = {
            "DIV": int(spec.divergence),
            "MODE": mode,
            "K": vp.n_local_stats(spec),
            "BF16_BY_BITS": _interpreting(),
            "BLOCK_V": self.block_v or default_block,
            "num_warps": self.num_warps or default_warps,
        }
        args = (
            s,
            t,
            stats,
            o,
            w,
            g,
            s.stride(0),
            t.stride(0),
            g.stride(0),
            v,
            1.0 / spec.temperature,
            c,
            spec.coef2,
            log_c,
            log_1mc,
        )
        if s.device.type == "cuda":
            with torch.cuda.device(s.device):
                K.kd_vp_rows_kernel[(n,)](*args, **meta)
        else:  # the interpreter: see launch() for why numpy is hushed
            import numpy as np

            with np.errstate(invalid="ignore", over="ignore"):
                K.kd_vp_rows_kernel[(n,)](*args, **meta)

    def row_stats(self, s, t, spec):
        out = torch.empty(s.shape[0], vp.n_local_stats(spec), dtype=torch.float32, device=s.device)
        self._launch(0, s, t, spec, out=out)
        return out

    def row_sums(self, s, t, stats, spec):
        if not vp.needs_row_sums(spec):
            raise AssertionError(f"{spec.divergence.label} needs no row sums")
        out = torch.empty(s.shape[0], 2, dtype=torch.float32, device=s.device)
        self._launch(1, s, t, spec, stats=stats, out=out)
        return out

    def loss_grad_given_stats(self, s, t, stats, row_weight, spec, grad):
        n = s.shape[0]
        if row_weight.dtype != torch.float32 or tuple(row_weight.shape) != (n,):
            raise ValueError(
                f"row_weight must be float32 of shape ({n},), got {row_weight.dtype} {tuple(row_weight.shape)}"
            )
        loss = torch.where(
            row_weight != 0,
            stats[:, vp.LOSS],
            torch.zeros((), dtype=torch.float32, device=stats.device),
        )
        if grad is None:
            return loss
        if grad.shape != s.shape or grad.dtype != s.dtype or grad.device != s.device:
            raise ValueError(
                f"triton backend: grad must be a {s.dtype} {tuple(s.shape)} tensor on {s.device} "
                f"(or s itself), got {grad.dtype} {tuple(grad.shape)} on {grad.device}"
            )
        if s.shape[1] > 1 and grad.stride(1) != 1:
            raise ValueError("triton backend: grad needs a unit stride along V")
        self._launch(2, s, t, spec, stats=stats, grad=grad, row_weight=row_weight.contiguous())
        return loss


vp.register(TritonVocabParallel())
