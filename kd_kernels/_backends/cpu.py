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
from . import _vocab_parallel as vp
from ._raw import _dtype_code, _readable, _row_stride, raw_args


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
                *args,
                int(spec.divergence),
                float(spec.coef),
                float(spec.coef2),
                float(spec.interpolation),
                float(spec.temperature),
                torch.get_num_threads(),
            )
        return loss


register(CpuBackend())


# ---------------------------------------------------------------------------------------------------------
# Vocabulary-parallel shard passes (kd_kernels.parallel): the same compiled row math, split at the
# row-statistics boundary (csrc/cpu/kd_cpu.h, VpArgs; protocol in _vocab_parallel.py).
# ---------------------------------------------------------------------------------------------------------

_VP_STATS, _VP_SUMS, _VP_GRAD = 0, 1, 2


class CpuVocabParallel(vp.VocabParallelRows):
    """``row_stats`` / ``row_sums`` / ``loss_grad_given_stats`` in the compiled C++ kernel, every divergence
    natively (fp32 math; float32 / bfloat16 / float16 shards; a teacher of another dtype than the student's is
    upcast to float32 first, exactly). Runs on ``torch.get_num_threads()`` OpenMP threads at the x86-64 level
    the extension chose (``kd_kernels._C._set_cpu_isa``)."""

    name = "cpu"

    @staticmethod
    def _operands(s: torch.Tensor, t: torch.Tensor, in_place: bool):
        if s.dim() != 2 or t.shape != s.shape:
            raise ValueError(
                f"cpu vocabulary-parallel rows: s and t must be (rows, V_r) of one shape, got "
                f"{tuple(s.shape)} and {tuple(t.shape)}"
            )
        n, v = s.shape
        if t.dtype != s.dtype:
            t = t.float()  # the kernels take a teacher of the student's dtype or float32
        if not in_place:
            s = _readable(s, n, v)
        t = _readable(t, n, v)
        stride_s = _row_stride(s, "student_logits", n, v, s.device)
        stride_t = _row_stride(t, "teacher_logits", n, v, s.device)
        codes = (_dtype_code(s, "student_logits", "cpu"), _dtype_code(t, "teacher_logits", "cpu"))
        return s, t, stride_s, stride_t, codes

    @staticmethod
    def _stats_arg(stats: torch.Tensor, n: int) -> torch.Tensor:
        if stats.dtype != torch.float32 or tuple(stats.shape) != (n, vp.N_GLOBAL):
            raise ValueError(
                f"stats must be float32 ({n}, {vp.N_GLOBAL}) global statistics, got {stats.dtype} "
                f"{tuple(stats.shape)}"
            )
        return stats.contiguous()

    @staticmethod
    def _call(mode, s, t, strides, codes, spec, stats=None, out=None, grad=None, row_weight=None):
        n, v = s.shape
        ptr = lambda x: x.data_ptr() if x is not None else 0  # noqa: E731
        stride_g = grad.stride(0) if grad is not None and n > 1 else v
        _ext._C.cpu_vp_rows(
            mode,
            s.data_ptr(),
            t.data_ptr(),
            ptr(stats),
            ptr(out),
            ptr(grad),
            ptr(row_weight),
            n,
            v,
            strides[0],
            strides[1],
            max(stride_g, v),
            codes[0],
            codes[1],
            int(spec.divergence),
            float(spec.coef),
            float(spec.coef2),
            float(spec.temperature),
            torch.get_num_threads(),
        )

    def row_stats(self, s, t, spec):
        s, t, *strides, codes = self._operands(s, t, in_place=False)
        out = torch.empty(s.shape[0], vp.n_local_stats(spec), dtype=torch.float32)
        if s.shape[0]:
            self._call(_VP_STATS, s, t, strides, codes, spec, out=out)
        return out

    def row_sums(self, s, t, stats, spec):
        if not vp.needs_row_sums(spec):
            raise AssertionError(f"{spec.divergence.label} needs no row sums")
        s, t, *strides, codes = self._operands(s, t, in_place=False)
        stats = self._stats_arg(stats, s.shape[0])
        out = torch.empty(s.shape[0], 2, dtype=torch.float32)
        if s.shape[0]:
            self._call(_VP_SUMS, s, t, strides, codes, spec, stats=stats, out=out)
        return out

    def loss_grad_given_stats(self, s, t, stats, row_weight, spec, grad):
        n = s.shape[0]
        stats = self._stats_arg(stats, n)
        if row_weight.dtype != torch.float32 or tuple(row_weight.shape) != (n,):
            raise ValueError(
                f"row_weight must be float32 of shape ({n},), got {row_weight.dtype} "
                f"{tuple(row_weight.shape)}"
            )
        active = row_weight != 0
        loss = torch.where(active, stats[:, vp.LOSS], torch.zeros((), dtype=torch.float32))
        if grad is None or n == 0:
            return loss
        in_place = grad.data_ptr() == s.data_ptr()
        s, t, *strides, codes = self._operands(s, t, in_place=in_place)
        _row_stride(grad, "grad", n, s.shape[1], s.device)
        if grad.dtype != s.dtype:
            raise TypeError(
                f"grad has dtype {grad.dtype}; it must have the student's dtype {s.dtype}"
            )
        if in_place and grad.stride(0) != s.stride(0) and n > 1:
            raise ValueError("an in-place grad (grad is s) must have the same row stride")
        self._call(
            _VP_GRAD,
            s,
            t,
            strides,
            codes,
            spec,
            stats=stats,
            grad=grad,
            row_weight=row_weight.contiguous(),
        )
        return loss


vp.register(CpuVocabParallel())
