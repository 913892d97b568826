"""What a loss call asks for, in one frozen value that travels from the public function to the kernels, and the
divergence family as data.

Each divergence is described once, here: its number (shared with the compiled kernels), its parameters with their
defaults and valid ranges (:data:`DIVERGENCES`), and how many passes over a row its kernels need. Its math lives
in one definition per kernel language (plus a scalar one in each compiled sparse kernel, below), from which every
backend derives its passes:

- ``kd_kernels/reference.py``: ``<name>_per_token`` (float64 ground truth, differentiated by autograd in tests);
- ``kd_kernels/_torch_terms.py``: one entry of ``TERMS``: ``(ℓq, ℓp, q, p, spec) → (L, a, A)`` (Rényi also
  in two pieces, ``renyi_mixed`` / ``renyi_a``), the only torch definition: the dense torch backend, the sparse
  torch path (``_sparse_impl.category_terms``) and the vocabulary-parallel torch passes (``TorchVocabParallel``)
  all call it;
- ``kd_kernels/_triton_kernels.py``: one branch of ``_elem_terms`` (the per-element loss term and ``a``; the
  mixtures write them as two sums finished per row in ``_sums_finish`` and ``_elem_grad``), plus, for a streaming
  ("online") divergence, one branch each of ``_online_fold`` and ``_online_finish``;
- ``csrc/include/kd_kernels/kd_math.h``: the same per-element terms in C++, shared by the CPU and CUDA kernels.

Every backend computes the gradient the same way from those terms: with ``a_v = ∂L/∂ℓq_v`` (any multiple of q may
be added to it) and the row sum ``A = Σ_v a_v``, ``∂L/∂s̃_j = a_j − q_j A`` and ``∂L/∂s = (1/T) ∂L/∂s̃``.

Adding the next divergence therefore touches: a number in :class:`Divergence` (and in kd_math.h), an entry of
:data:`DIVERGENCES`, the four definitions above, a named function in ``losses.py`` / ``fused_linear.py`` (exported
from ``__init__.py``), the name in the test lists (``tests/test_divergences.py``), and one scalar branch each in
the sparse kernels (``csrc/cpu/kd_sparse_kernels.cpp`` ``category_terms``, ``kd_kernels/_triton_sparse.py``
``_cat_terms``); the sparse and vocabulary-parallel torch paths need nothing new (docs/DIVERGENCES.md).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

FP32_TINY = 2.0**-126  # smallest normal float32
FP32_MAX = float.fromhex("0x1.fffffep+127")  # largest finite float32

# The divergence of every public entry point called without ``divergence=`` (kd_loss, the fused,
# sparse, vocabulary-parallel and Hugging Face forms, their modules): one objective per call.
DEFAULT_DIVERGENCE = "forward_kl"


class Divergence(enum.IntEnum):
    """The divergences, numbered as the compiled kernels number them (``csrc/include/kd_kernels/kd_math.h``)."""

    FORWARD_KL = 0
    REVERSE_KL = 1
    SKEW_FORWARD_KL = 2
    SKEW_REVERSE_KL = 3
    JSD = 4
    TVD = 5
    JEFFREYS = 6
    ALPHA_BETA = 7
    RENYI = 8

    @classmethod
    def parse(cls, name: str | Divergence) -> Divergence:
        if isinstance(name, Divergence):
            return name
        if not isinstance(name, str):
            raise TypeError(
                f"divergence must be a string such as 'reverse_kl', got {type(name).__name__}"
            )
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

    @property
    def info(self) -> DivergenceInfo:
        return DIVERGENCES[self]


@dataclass(frozen=True)
class Param:
    """One parameter of a divergence: its public keyword, default and domain ``low < x < high``, minus
    ``excluded``. ``hints`` says, for a value just outside (an endpoint, an excluded point), what the divergence
    becomes there and which function to call instead."""

    keyword: str  # "alpha" or "beta"
    default: float
    low: float = 0.0
    high: float = math.inf
    excluded: tuple[float, ...] = ()
    hints: dict[float, str] = field(default_factory=dict)

    @property
    def domain(self) -> str:
        hi = "∞" if self.high == math.inf else f"{self.high:g}"
        text = f"the open interval ({self.low:g}, {hi})"
        if self.excluded:
            text += " without " + ", ".join(f"{x:g}" for x in self.excluded)
        return text

    def check(self, value: object, divergence: Divergence) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{self.keyword} must be a float in {self.domain} for {divergence.label}, "
                f"got {type(value).__name__}"
            )
        x = float(value)
        if not (self.low < x < self.high) or x in self.excluded:
            hint = self.hints.get(x)
            raise ValueError(
                f"{self.keyword}={value} is outside {self.domain} for {divergence.label}"
                + (f"; {hint}" if hint else "")
            )
        return x


@dataclass(frozen=True)
class DivergenceInfo:
    """A divergence as data.

    ``params`` fill :attr:`KDSpec.coef` and :attr:`KDSpec.coef2` in order. ``online``: the loss and ``A`` come
    from the streaming pass that also finds the log-sum-exps, so a kernel reads a row twice (that pass and the
    gradient pass); otherwise a second pass over the normalized ℓq, ℓp sums the loss and ``A`` (three reads).
    ``formula``: the per-token loss (MATH.md), for docs and error messages.
    """

    params: tuple[Param, ...]
    online: bool
    formula: str

    @property
    def row_passes(self) -> int:
        """Reads of s and t per row when the gradient is written (one fewer for the loss alone)."""
        return 2 if self.online else 3


_OPEN_UNIT = {"low": 0.0, "high": 1.0}

DIVERGENCES: dict[Divergence, DivergenceInfo] = {
    Divergence.FORWARD_KL: DivergenceInfo((), True, "KL(p‖q)"),
    Divergence.REVERSE_KL: DivergenceInfo((), True, "KL(q‖p)"),
    Divergence.SKEW_FORWARD_KL: DivergenceInfo(
        (
            Param(
                "alpha",
                0.1,
                **_OPEN_UNIT,
                hints={
                    0.0: "skew_forward_kl with alpha=0 is forward_kl: call kd_kernels.forward_kl",
                    1.0: "skew_forward_kl with alpha=1 is identically 0 (m = p): drop the loss",
                },
            ),
        ),
        False,
        "KL(p‖α p + (1−α) q)",
    ),
    Divergence.SKEW_REVERSE_KL: DivergenceInfo(
        (
            Param(
                "alpha",
                0.1,
                **_OPEN_UNIT,
                hints={
                    0.0: "skew_reverse_kl with alpha=0 is reverse_kl: call kd_kernels.reverse_kl",
                    1.0: "skew_reverse_kl with alpha=1 is identically 0 (m' = q): drop the loss",
                },
            ),
        ),
        False,
        "KL(q‖(1−α) p + α q)",
    ),
    Divergence.JSD: DivergenceInfo(
        (
            Param(
                "beta",
                0.5,
                **_OPEN_UNIT,
                hints={
                    0.0: "jsd with beta=0 is identically 0 (M = q); for KL(q‖p) call kd_kernels.reverse_kl",
                    1.0: "jsd with beta=1 is identically 0 (M = p); for KL(p‖q) call kd_kernels.forward_kl",
                },
            ),
        ),
        False,
        "β KL(p‖M) + (1−β) KL(q‖M), M = β p + (1−β) q",
    ),
    Divergence.TVD: DivergenceInfo((), False, "½ Σ |p − q|"),
    Divergence.JEFFREYS: DivergenceInfo((), True, "KL(p‖q) + KL(q‖p)"),
    Divergence.ALPHA_BETA: DivergenceInfo(
        (
            Param(
                "alpha",
                0.5,
                hints={
                    0.0: "alpha_beta at alpha=0 is only a limit (with beta=1 it is KL(q‖p): call kd_kernels.reverse_kl)"
                },
            ),
            Param(
                "beta",
                0.5,
                hints={
                    0.0: "alpha_beta at beta=0 is only a limit (with alpha=1 it is KL(p‖q): call kd_kernels.forward_kl)"
                },
            ),
        ),
        False,
        "−1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]",
    ),
    Divergence.RENYI: DivergenceInfo(
        (
            Param(
                "alpha",
                0.5,
                excluded=(1.0,),
                hints={
                    1.0: "renyi with alpha=1 is the limit KL(p‖q): call kd_kernels.forward_kl",
                    0.0: "renyi at alpha=0 is −log Σ_{p>0} q, 0 whenever the teacher gives every token mass",
                },
            ),
        ),
        True,
        "1/(α−1) log Σ p^α q^(1−α)",
    ),
}


@dataclass(frozen=True)
class KDSpec:
    """One divergence with its parameters.

    ``coef`` is α for the skew divergences, alpha_beta and renyi, β for JSD, and unused (0.0) otherwise; ``coef2``
    is β of alpha_beta. ``interpolation`` is TAID's λ ∈ (0, 1]: the teacher's tempered logits become
    ``λ t̃ + (1 − λ) sg(s̃)`` before the divergence (1 = off).
    """

    divergence: Divergence
    coef: float = 0.0
    coef2: float = 0.0
    temperature: float = 1.0
    interpolation: float = 1.0

    @staticmethod
    def make(
        divergence: str | Divergence,
        *,
        alpha: float | None = None,
        beta: float | None = None,
        temperature: float = 1.0,
        interpolation: float = 1.0,
    ) -> KDSpec:
        """Validate the public options. ``alpha`` / ``beta`` None: the divergence's default; a value given to a
        divergence without that parameter is ignored."""
        d = Divergence.parse(divergence)
        check_temperature(temperature)
        check_interpolation(interpolation)
        given = {"alpha": alpha, "beta": beta}
        coefs = [0.0, 0.0]
        for i, p in enumerate(d.info.params):
            value = given[p.keyword]
            coefs[i] = p.default if value is None else p.check(value, d)
        return KDSpec(d, coefs[0], coefs[1], float(temperature), float(interpolation))

    def params(self) -> dict[str, float]:
        """The divergence's parameters by keyword, e.g. ``{"alpha": 0.1}``."""
        return {p.keyword: c for p, c in zip(self.divergence.info.params, (self.coef, self.coef2))}


def describe_divergences() -> str:
    """The divergences with their parameters' defaults, for docstrings: ``forward_kl``, …,
    ``skew_forward_kl`` (``alpha`` = 0.1 by default), …"""
    parts = []
    for d, info in DIVERGENCES.items():
        params = ", ".join(f"``{p.keyword}`` = {p.default:g}" for p in info.params)
        parts.append(f"``{d.label}``" + (f" ({params} by default)" if params else ""))
    return ", ".join(parts)


CE_LABELS_HINT = "pass the next-token ids (-100 = ignore)"


def check_ce_weight(
    ce_weight: object, *, has_labels: bool | None = None, labels_hint: str = CE_LABELS_HINT
) -> float:
    """The hard-label cross-entropy coefficient, checked the same way by every entry point that
    takes one: a real number, finite, ≥ 0 and at most the largest fp32 (the loss is formed in fp32,
    a larger weight would make it inf). ``has_labels=False``: a nonzero weight is an error (the CE
    needs labels; ``labels_hint`` says which); None: not known yet (a module's construction)."""
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)):
        raise TypeError(f"ce_weight must be a float >= 0, got {type(ce_weight).__name__}")
    # Comparisons only: NaN fails them, and so do ±inf and values past fp32.
    if not (0 <= ce_weight <= FP32_MAX):
        raise ValueError(
            f"ce_weight={ce_weight} must be a finite number >= 0 that fits in float32 "
            "(0 disables the CE term)"
        )
    if ce_weight != 0 and has_labels is False:
        raise ValueError(f"ce_weight={ce_weight} needs labels=...; {labels_hint}")
    return float(ce_weight)


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


def check_interpolation(interpolation: float) -> None:
    if isinstance(interpolation, bool) or not isinstance(interpolation, (int, float)):
        raise TypeError(
            f"interpolation must be a float in (0, 1], got {type(interpolation).__name__}"
        )
    if not (0.0 < float(interpolation) <= 1.0):
        hint = (
            "; interpolation=0 makes the teacher the student itself (the loss is identically 0)"
            if interpolation == 0
            else ""
        )
        raise ValueError(
            f"interpolation={interpolation} is outside (0, 1]: the teacher's tempered logits become "
            f"λ·t/T + (1−λ)·s/T with λ = interpolation (1 = the plain teacher){hint}"
        )
