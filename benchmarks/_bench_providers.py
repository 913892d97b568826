"""The implementations the suite times, each behind the same two calls.

``unavailable(case)`` says why a provider cannot run a case (or None); ``build(case, inputs)`` returns a
zero-argument callable giving ``(loss, [gradients])``: the gradients of the student logits for logits-level
ops, of the student hidden states and lm_head weight for fused-linear ops, none for forward-only ops.

Providers:
- ``kd_kernels``: one per backend (``backend`` column); the fused-linear ops run ``fused_linear_kd`` /
  ``fused_linear_logprobs``.
- ``torch``: the eager code a user writes (log_softmax in fp32, ``F.kl_div`` / ``logaddexp`` mixtures, a full
  ``(N, V)`` logits GEMM for the fused-linear ops).
- ``torch_compile``: ``torch.compile`` of exactly that code (default mode; the first calls compile and are
  excluded from timing).
- ``kd_launcher``: one kd_kernels backend's ``loss_grad`` alone (``backend`` column) into a preallocated
  gradient, logits-level ops only: the kernel without autograd, validation or the custom op.
- ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` / ``LigerJSD`` (logits level, Triton) and
  ``LigerFusedLinearJSDLoss`` (chunked torch, compiled by default), mapped to our divergences below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _bench_common import ALPHA, BETA, TEMPERATURE, Case, is_fused, is_fwd_only

Result = tuple[torch.Tensor, list[torch.Tensor]]
Runner = Callable[[], Result]

PROVIDERS = ("kd_kernels", "kd_launcher", "torch", "torch_compile", "liger")
KD_BACKENDS = ("torch", "cpu", "triton", "cuda")
# "triton_autotune": the triton launcher with its triton.autotune sweep instead of the fixed heuristic
LAUNCHER_BACKENDS = ("cpu", "triton", "triton_autotune", "cuda")


@dataclass(frozen=True)
class Provider:
    name: str
    backend: str = ""  # kd_kernels backend; "" for the others
    # Liger's fused-linear loss runs its chunk loop under torch.compile unless told otherwise.
    liger_compiled: bool = True
    # torch_compile: dynamic=None is the suite's default (dynamic on CPU, torch's default on CUDA); the
    # ratio report compiles with dynamic=False (one static graph per shape, compiled before timing).
    dynamic: bool | None = None

    @property
    def label(self) -> str:
        return f"{self.name}[{self.backend}]" if self.backend else self.name

    def unavailable(self, case: Case) -> str | None:
        return _UNAVAILABLE[self.name](self, case)

    def applies(self, case: Case) -> bool:
        """Whether this provider has a row for ``case`` at all. ``fused_linear_logprobs`` takes no backend
        argument, so it is run once as ``kd_kernels[auto]``; the KD ops run once per named backend."""
        if self.name == "kd_launcher":
            return case.op.startswith("kd_logits")
        if self.name != "kd_kernels":
            return True
        return (self.backend == "auto") == case.op.startswith("fl_logprobs")

    def build(self, case: Case, inputs: dict[str, torch.Tensor]) -> Runner:
        return _BUILD[self.name](self, case, inputs)

    @property
    def note(self) -> str:
        if self.name == "liger":
            return f"fused linear: compiled={self.liger_compiled}"
        if self.name == "torch_compile" and self.dynamic is not None:
            return f"fp32 softmax math (inputs upcast), dynamic={self.dynamic}"
        if self.name == "torch" or self.name == "torch_compile":
            return "fp32 softmax math (inputs upcast)"
        return ""


def _run(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], fwd_only: bool) -> Runner:
    """A runner: the loss under no_grad, or the loss and ``torch.autograd.grad`` of it w.r.t. ``params``."""
    if fwd_only:

        def run() -> Result:
            with torch.no_grad():
                return loss_fn(), []

        return run

    def run() -> Result:
        loss = loss_fn()
        # logprobs are per token: their objective is the sum (as a policy-gradient loss would be)
        objective = loss if loss.dim() == 0 else loss.sum()
        return loss.detach(), list(torch.autograd.grad(objective, params))

    return run


def _params(
    case: Case, inputs: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Fresh leaves for the differentiable inputs (student logits, or student hidden + weight)."""
    x = dict(inputs)
    names = ["h_s", "w_s"] if is_fused(case.op) else ["s"]
    if is_fwd_only(case.op):
        return x, []
    for k in names:
        x[k] = inputs[k].detach().requires_grad_()
    return x, [x[k] for k in names]


# ------------------------------------------------------------------------------------- eager PyTorch


def _log_softmax32(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return (x / TEMPERATURE if TEMPERATURE != 1.0 else x).log_softmax(-1)


def _kl(log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """Σ_v exp(target) (target − input) per row: F.kl_div with log_target=True."""
    return F.kl_div(log_input, log_target, log_target=True, reduction="none").sum(-1)


def eager_kd_rows(s: torch.Tensor, t: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-token divergence as a user would write it: fp32 log_softmax, mixtures with logaddexp."""
    lq, lp = _log_softmax32(s), _log_softmax32(t)
    if divergence == "forward_kl":
        return _kl(lp, lq)
    if divergence == "reverse_kl":
        return _kl(lq, lp)
    if divergence == "skew_forward_kl":
        return _kl(lp, torch.logaddexp(lp + math.log(ALPHA), lq + math.log1p(-ALPHA)))
    if divergence == "skew_reverse_kl":
        return _kl(lq, torch.logaddexp(lp + math.log1p(-ALPHA), lq + math.log(ALPHA)))
    if divergence == "jsd":
        lm = torch.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
        return BETA * _kl(lp, lm) + (1 - BETA) * _kl(lq, lm)
    if divergence == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if divergence == "jeffreys":
        return _kl(lp, lq) + _kl(lq, lp)
    if divergence == "alpha_beta":
        ab = ALPHA + BETA
        terms = (
            (ALPHA * lp + BETA * lq).exp()
            - ALPHA / ab * (ab * lp).exp()
            - BETA / ab * (ab * lq).exp()
        )
        return -terms.sum(-1) / (ALPHA * BETA)
    if divergence == "renyi":
        mix = torch.where(lp == -math.inf, -math.inf, ALPHA * lp + (1 - ALPHA) * lq)
        return torch.logsumexp(mix, -1) / (ALPHA - 1)
    raise ValueError(f"divergence={divergence!r} is unknown")


def eager_kd_loss(s: torch.Tensor, t: torch.Tensor, divergence: str) -> torch.Tensor:
    return eager_kd_rows(s, t, divergence).mean()


def eager_fl_kd(
    h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, divergence: str
) -> torch.Tensor:
    """Full (N, V) logits of both models, then the eager loss."""
    return eager_kd_loss(h_s @ w_s.T, h_t @ w_t.T, divergence)


def eager_fl_logprobs(h: torch.Tensor, w: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return _log_softmax32(h @ w.T).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _eager_runner(
    case: Case, inputs: dict[str, torch.Tensor], compile_fn: Callable | None
) -> Runner:
    x, params = _params(case, inputs)
    wrap = compile_fn or (lambda f: f)
    if case.op.startswith("kd_logits"):
        f = wrap(eager_kd_loss)
        return _run(lambda: f(x["s"], x["t"], case.divergence), params, is_fwd_only(case.op))
    if case.op.startswith("fl_kd"):
        f = wrap(eager_fl_kd)
        return _run(
            lambda: f(x["h_s"], x["w_s"], x["h_t"], x["w_t"], case.divergence),
            params,
            is_fwd_only(case.op),
        )
    f = wrap(eager_fl_logprobs)
    return _run(lambda: f(x["h_s"], x["w_s"], x["tokens"]), params, is_fwd_only(case.op))


def _torch_unavailable(p: Provider, case: Case) -> str | None:
    return None


def _torch_build(p: Provider, case: Case, inputs: dict[str, torch.Tensor]) -> Runner:
    return _eager_runner(case, inputs, None)


_COMPILED: dict[str, Callable] = {}


def _compile(f: Callable, device: str, dynamic: bool | None = None) -> Callable:
    # One compiled wrapper per function for the whole process, as a user would hold one. On CUDA, torch's
    # default: the first shape compiles static, the next recompiles with dynamic shapes. On CPU, dynamic from
    # the start: every compilation costs tens of seconds there, and all shapes but the first would run the
    # dynamic graph anyway. ``dynamic=False`` forces one static graph per shape.
    if dynamic is None:
        dynamic = True if device == "cpu" else None
    key = f"{f.__name__}-{dynamic}"
    if key not in _COMPILED:
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        _COMPILED[key] = torch.compile(f, dynamic=dynamic)
    return _COMPILED[key]


def _compile_unavailable(p: Provider, case: Case) -> str | None:
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any import failure means the same thing here)
        return f"torch.compile unusable: {type(e).__name__}: {e}"
    return None


def _compile_build(p: Provider, case: Case, inputs: dict[str, torch.Tensor]) -> Runner:
    return _eager_runner(case, inputs, lambda f: _compile(f, case.device, p.dynamic))


# ---------------------------------------------------------------------------------------- kd_kernels


def _kd_unavailable(p: Provider, case: Case) -> str | None:
    import kd_kernels
    from kd_kernels._backends import get_backend

    if case.op.startswith("fl_kd") and not hasattr(kd_kernels, "fused_linear_kd"):
        return "kd_kernels.fused_linear_kd is not in this checkout yet"
    if case.op.startswith("fl_logprobs"):
        if not hasattr(kd_kernels, "fused_linear_logprobs"):
            return "kd_kernels.fused_linear_logprobs is not in this checkout yet"
        return None
    try:
        reasons = get_backend(p.backend).unsupported_reasons(torch.device(case.device))
    except KeyError:
        return f"backend {p.backend!r} is not registered in this checkout"
    return "; ".join(reasons) or None


def _kd_build(p: Provider, case: Case, inputs: dict[str, torch.Tensor]) -> Runner:
    import kd_kernels

    x, params = _params(case, inputs)
    fwd = is_fwd_only(case.op)
    coef = {
        "alpha": ALPHA,
        "beta": BETA,
    }  # each divergence takes the ones it has (kd_kernels._spec)
    if case.op.startswith("kd_logits"):
        return _run(
            lambda: kd_kernels.kd_loss(
                x["s"],
                x["t"],
                divergence=case.divergence,
                temperature=TEMPERATURE,
                backend=p.backend,
                **coef,
            ),
            params,
            fwd,
        )
    if case.op.startswith("fl_kd"):
        return _run(
            lambda: kd_kernels.fused_linear_kd(
                x["h_s"],
                x["w_s"],
                x["h_t"],
                x["w_t"],
                divergence=case.divergence,
                temperature=TEMPERATURE,
                backend=p.backend,
                **coef,
            ),
            params,
            fwd,
        )
    return _run(
        lambda: kd_kernels.fused_linear_logprobs(
            x["h_s"], x["w_s"], x["tokens"], temperature=TEMPERATURE
        ),
        params,
        fwd,
    )


def _launcher_unavailable(p: Provider, case: Case) -> str | None:
    if not case.op.startswith("kd_logits"):
        return "the launcher alone exists for the logits-level ops only"
    if p.backend == "triton_autotune":
        return _kd_unavailable(Provider("kd_kernels", "triton"), case)
    return _kd_unavailable(p, case)


def _launcher_build(p: Provider, case: Case, inputs: dict[str, torch.Tensor]) -> Runner:
    """``get_backend(b).loss_grad`` into a preallocated gradient; the loss is Σ_i c_i L_i with c_i = 1/N."""
    from kd_kernels._backends import get_backend
    from kd_kernels._spec import KDSpec

    s, t = inputs["s"].detach(), inputs["t"]
    spec = KDSpec.make(case.divergence, alpha=ALPHA, beta=BETA, temperature=TEMPERATURE)
    w = torch.full((case.n,), 1.0 / case.n, device=s.device)
    if p.backend == "triton_autotune":
        from kd_kernels._backends.triton_backend import launch

        def loss_grad(s, t, w, spec, grad):
            return launch(s, t, w, spec, grad, autotune=True)
    else:
        loss_grad = get_backend(p.backend).loss_grad
    grad = None if is_fwd_only(case.op) else torch.empty_like(s)

    def run() -> Result:
        loss = loss_grad(s, t, w, spec, grad)
        return (loss * w).sum(), [] if grad is None else [grad]

    return run


# --------------------------------------------------------------------------------------------- liger

# Our divergence -> Liger's, for each Liger entry point. Liger's JSD(β) is β·KL(P‖M) + (1−β)·KL(Q‖M) with
# M = βP + (1−β)Q, P the teacher: our jsd(β). Its β = 0 / β = 1 special cases are KL(P‖Q) (our forward_kl) and
# KL(Q‖P) (our reverse_kl). LigerKLDIVLoss(log_target=True, "batchmean") is F.kl_div: our forward_kl. Every
# mapping is also checked against kd_kernels.reference at run time before anything is timed.
LIGER_LOGITS = {
    "forward_kl": ("LigerKLDIVLoss", None),
    "reverse_kl": ("LigerJSD", 1.0),
    "jsd": ("LigerJSD", BETA),
}
LIGER_FUSED = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}


def _liger_import_error() -> str | None:
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"liger-kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel"
    return None


_LIGER_PROBE: dict[str, str | None] = {}


def _liger_triton_probe(device: str) -> str | None:
    """Why Liger's Triton kernels cannot run on ``device`` (from a tiny real call), or None."""
    if device not in _LIGER_PROBE:
        from liger_kernel.transformers.jsd import LigerJSD

        reason = None
        if os.environ.get("TRITON_INTERPRET") == "1":
            reason = "TRITON_INTERPRET=1 is set: interpreter timings are meaningless"
        else:
            try:
                x = torch.randn(2, 8, device=device).log_softmax(-1).requires_grad_()
                LigerJSD(beta=0.5)(x, torch.randn(2, 8, device=device).log_softmax(-1)).backward()
            except Exception as e:  # noqa: BLE001  (record whatever stops it)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reason = f"Liger's Triton kernels cannot run on {device}: {type(e).__name__}: {msg[:160]}"
        _LIGER_PROBE[device] = reason
    return _LIGER_PROBE[device]


def _liger_unavailable(p: Provider, case: Case) -> str | None:
    err = _liger_import_error()
    if err:
        return err
    if case.op.startswith("fl_logprobs"):
        return "no Liger counterpart mapped for token log-probs"
    if is_fwd_only(case.op):
        return (
            "Liger's KD losses compute the gradient inside forward; no forward-only path to compare"
        )
    if is_fused(case.op):
        if case.divergence not in LIGER_FUSED:
            return f"LigerFusedLinearJSDLoss has no {case.divergence} (it covers forward_kl, reverse_kl, jsd)"
        return None
    if case.divergence not in LIGER_LOGITS:
        return f"Liger has no logits-level {case.divergence} kernel (it has KL-div and JSD)"
    return _liger_triton_probe(case.device)


def _liger_build(p: Provider, case: Case, inputs: dict[str, torch.Tensor]) -> Runner:
    x, params = _params(case, inputs)
    if is_fused(case.op):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Soft loss only (no CE term), Σ_tokens / #tokens = our reduction="mean".
        loss_mod = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=LIGER_FUSED[case.divergence],
            temperature=TEMPERATURE,
            compiled=p.liger_compiled,
        )
        labels = torch.zeros(
            case.n, dtype=torch.long, device=case.device
        )  # no ignore_index: all count
        return _run(lambda: loss_mod(x["h_s"], x["w_s"], x["h_t"], x["w_t"], labels), params, False)

    from liger_kernel.transformers.jsd import LigerJSD
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    kind, beta = LIGER_LOGITS[case.divergence]
    if kind == "LigerKLDIVLoss":
        mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return _run(lambda: mod(_log_softmax32(x["s"]), _log_softmax32(x["t"])), params, False)
    mod = LigerJSD(beta=beta)
    return _run(lambda: mod(_log_softmax32(x["s"]), _log_softmax32(x["t"])), params, False)


_UNAVAILABLE = {
    "kd_kernels": _kd_unavailable,
    "kd_launcher": _launcher_unavailable,
    "torch": _torch_unavailable,
    "torch_compile": _compile_unavailable,
    "liger": _liger_unavailable,
}
_BUILD = {
    "kd_kernels": _kd_build,
    "kd_launcher": _launcher_build,
    "torch": _torch_build,
    "torch_compile": _compile_build,
    "liger": _liger_build,
}


def all_providers(*, liger_compiled: bool = True) -> list[Provider]:
    """Every provider, kd_kernels once per backend plus ``auto`` (used by the log-prob ops only)."""
    kd = [Provider("kd_kernels", b) for b in (*KD_BACKENDS, "auto")]
    kd += [Provider("kd_launcher", b) for b in LAUNCHER_BACKENDS]
    return [
        *kd,
        Provider("torch"),
        Provider("torch_compile"),
        Provider("liger", liger_compiled=liger_compiled),
    ]
