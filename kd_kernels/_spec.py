"""What a loss call asks for, in one frozen value that travels from the public function to the kernels."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

FP32_TINY = 2.0**-126  # smallest normal float32
FP32_MAX = float.fromhex("0x1.fffffep+127")  # largest finite float32


class Divergence(enum.IntEnum):
    """The divergences, numbered as the compiled kernels number them (``csrc/include/kd_kernels/kd_math.h``)."""

    FORWARD_KL = 0
    REVERSE_KL = 1
    SKEW_FORWARD_KL = 2
    SKEW_REVERSE_KL = 3
    JSD = 4

    @classmethod
    def parse(cls, name: str | Divergence) -> Divergence:
        if isinstance(name, Divergence):
            return name
        if not isinstance(name, str):
            raise TypeError(f"divergence must be a string such as 'reverse_kl', got {type(name).__name__}")
        try:
            return cls[name.upper()]
        except KeyError:
            names = ", ".join(repr(d.name.lower()) for d in cls)
            raise ValueError(f"divergence={name!r} is unknown; use one of {names}") from None

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def is_skew(self) -> bool:
        return self in (Divergence.SKEW_FORWARD_KL, Divergence.SKEW_REVERSE_KL)


@dataclass(frozen=True)
class KDSpec:
    """One divergence with its parameters.

    ``coef`` is α for the skew divergences, β for JSD, and unused (0.0) for forward / reverse KL.
    """

    divergence: Divergence
    coef: float = 0.0
    temperature: float = 1.0

    @staticmethod
    def make(divergence: str | Divergence, *, alpha: float, beta: float, temperature: float) -> KDSpec:
        d = Divergence.parse(divergence)
        check_temperature(temperature)
        if d.is_skew:
            check_open_unit(alpha, "alpha", d)
            coef = float(alpha)
        elif d == Divergence.JSD:
            check_open_unit(beta, "beta", d)
            coef = float(beta)
        else:
            coef = 0.0
        return KDSpec(d, coef, float(temperature))


# Which loss an endpoint of alpha / beta silently turns into, so the error can name it.
_ENDPOINT_HINTS = {
    (Divergence.SKEW_FORWARD_KL, 0): "skew_forward_kl with alpha=0 is forward_kl: call kd_kernels.forward_kl",
    (Divergence.SKEW_FORWARD_KL, 1): "skew_forward_kl with alpha=1 is identically 0 (m = p): drop the loss",
    (Divergence.SKEW_REVERSE_KL, 0): "skew_reverse_kl with alpha=0 is reverse_kl: call kd_kernels.reverse_kl",
    (Divergence.SKEW_REVERSE_KL, 1): "skew_reverse_kl with alpha=1 is identically 0 (m' = q): drop the loss",
    (Divergence.JSD, 0): "jsd with beta=0 is identically 0 (M = q); for KL(q‖p) call kd_kernels.reverse_kl",
    (Divergence.JSD, 1): "jsd with beta=1 is identically 0 (M = p); for KL(p‖q) call kd_kernels.forward_kl",
}


def check_open_unit(value: float, name: str, divergence: Divergence) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1), got {type(value).__name__}")
    if not (0.0 < float(value) < 1.0):
        hint = ""
        if value in (0, 1):
            hint = "; " + _ENDPOINT_HINTS[(divergence, int(value))]
        raise ValueError(f"{name}={value} is outside the open interval (0, 1){hint}")


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(temperature).__name__}")
    # Comparisons only (no math.isfinite): under torch.compile(dynamic=True) the temperature is a SymFloat.
    # The lower bound keeps 1/T finite in fp32 (the kernels scale by 1/T in fp32); NaN fails both tests.
    if not (FP32_TINY <= temperature < math.inf):
        raise ValueError(
            f"temperature={temperature} must be a finite number >= {FP32_TINY:.4g} (the smallest normal "
            "fp32, so that 1/T is finite in fp32); 1.0 leaves logits unscaled"
        )
