"""Constants shared by the test modules (conftest.py has already switched on Triton's interpreter)."""

import kd_kernels

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd")
CPU_BACKENDS = tuple(kd_kernels.available_backends("cpu"))
