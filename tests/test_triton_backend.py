"""Triton-specific behaviour of the "triton" backend, against the float64 reference.

Without a GPU, conftest.py switches on TRITON_INTERPRET=1 and these run the Triton kernels on CPU tensors; on a
GPU machine they run the compiled kernels on CUDA tensors. Most tests call the launcher with a small ``block_v`` so
a short row still takes many vocabulary blocks with a ragged tail. The error rule: the kernel's error against
float64 is no worse than the eager "torch" backend's at the same dtypes, plus a small per-dtype slack (both round
the gradient to the student dtype once).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from _common import DIVERGENCES

import kd_kernels
from kd_kernels import reference as R
from kd_kernels._backends import get_backend
from kd_kernels._spec import Divergence, KDSpec

# CPU tensors under the interpreter (conftest.py switches it on when there is no GPU), else the compiled kernels.
DEVICE = (
    "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
)
HAVE_TRITON = "triton" in kd_kernels.available_backends(DEVICE)
pytestmark = pytest.mark.skipif(
    not HAVE_TRITON, reason=f"the triton backend cannot run on {DEVICE} here"
)

if HAVE_TRITON:
    from kd_kernels._backends.triton_backend import launch


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor a test makes lands on DEVICE; the float64 reference runs there too."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


COEF = {"skew_forward_kl": 0.1, "skew_reverse_kl": 0.3, "jsd": 0.4}
# Slack on top of the eager error (norm-wise relative), per student dtype.
SLACK = {torch.float32: 2e-6, torch.bfloat16: 2e-4, torch.float16: 5e-5}


def spec_of(divergence: str, temperature: float = 1.0) -> KDSpec:
    return KDSpec(Divergence.parse(divergence), COEF.get(divergence, 0.0), temperature=temperature)


def logits(shape, dtype, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(divergence, s, t, w, temperature=1.0):
    """float64 (per-token loss with skipped rows 0, w_i ∂L_i/∂s_i) on the very same (rounded) inputs."""
    s64 = s.double().requires_grad_()
    a = COEF.get(divergence, 0.1)
    per = R.per_token(divergence, s64 / temperature, t.double() / temperature, alpha=a, beta=a)
    (g,) = torch.autograd.grad((per * w.double()).sum(), s64)
    return torch.where(w != 0, per.detach(), torch.zeros_like(per.detach())), g


def eager(divergence, s, t, w, temperature=1.0):
    grad = torch.empty_like(s)
    loss = get_backend("torch").loss_grad(s, t, w, spec_of(divergence, temperature), grad)
    return loss, grad


def check_against_reference(divergence, s, t, w, loss, grad, temperature=1.0):
    ref_loss, ref_grad = reference(divergence, s, t, w, temperature)
    e_loss, e_grad = eager(divergence, s, t, w, temperature)
    slack = SLACK[s.dtype]
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) <= 1.5 * rel_err(e_loss, ref_loss) + 2e-6
    assert rel_err(grad, ref_grad) <= 1.5 * rel_err(e_grad, ref_grad) + slack


def weights(n: int) -> torch.Tensor:
    w = torch.rand(n, dtype=torch.float32) + 0.25
    w[1] = 0.0
    return w


# ------------------------------------------------------------------------------------- vocabulary blocking


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "dtype, v, block",
    [
        (torch.float32, 1031, 256),  # 5 blocks, the last one 7 columns
        (torch.bfloat16, 1031, 256),
        (torch.float16, 1031, 256),
        (torch.float32, 100, 128),  # a single block, mostly masked
        (torch.bfloat16, 256, 128),  # 2 full blocks, no tail
    ],
    ids=["fp32-1031", "bf16-1031", "fp16-1031", "fp32-100", "bf16-256"],
)
def test_blocks_match_reference(divergence, dtype, v, block):
    n, temp = 4, 1.7
    s, t, w = logits((n, v), dtype), logits((n, v), dtype), weights(n)
    grad = torch.full_like(s, 7.0)  # garbage: every element must be overwritten
    loss = launch(s, t, w, spec_of(divergence, temp), grad, block_v=block)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    check_against_reference(divergence, s, t, w, loss, grad, temp)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_only_launch(divergence):
    """grad=None (HAS_GRAD=False) gives the very same loss and needs no gradient buffer."""
    s, t, w = logits((3, 700), torch.bfloat16), logits((3, 700), torch.float32), weights(3)
    loss = launch(s, t, w, spec_of(divergence), torch.empty_like(s), block_v=256)
    loss_only = launch(s, t, w, spec_of(divergence), None, block_v=256)
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_public_api_default_config(divergence):
    """Through kd_loss(backend="triton") with the interpreter's default block, leading dims, mask and T."""
    s = logits((2, 3, 2500), torch.float32).requires_grad_()  # 2 blocks of 2048, ragged
    t = logits((2, 3, 2500), torch.float32)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    a = COEF.get(divergence, 0.1)
    kw = {"divergence": divergence, "temperature": 2.0, "mask": mask, "reduction": "sum"}
    loss = kd_kernels.kd_loss(s, t, backend="triton", alpha=a, beta=a, **kw)
    (g,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = R.kd_loss(s=s64, t=t.double(), alpha=a, beta=a, **kw)
    (g_ref,) = torch.autograd.grad(ref, s64)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-5
    assert torch.all(g[0, 1] == 0)


@pytest.mark.parametrize("divergence", ("forward_kl", "jsd"))
def test_vocab_262144(divergence):
    """The largest vocabulary the issue names, by looping over blocks (one row: the interpreter is slow)."""
    s, t, w = logits((1, 262144), torch.float32), logits((1, 262144), torch.float32), torch.ones(1)
    grad = torch.empty_like(s)
    loss = launch(s, t, w, spec_of(divergence), grad, block_v=8192)
    ref_loss, ref_grad = reference(divergence, s, t, w)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


# ------------------------------------------------------------------------------------------ memory layout


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_in_place_equals_out_of_place(divergence):
    n, v, dtype = 4, 777, torch.bfloat16
    s, t, w = logits((n, v), dtype), logits((n, v), dtype), weights(n)
    s[1] = math.nan  # skipped row: zeroed in place without being read
    grad = torch.empty_like(s)
    loss = launch(s, t, w, spec_of(divergence), grad, block_v=256)
    s_inplace = s.clone()
    loss_inplace = launch(s_inplace, t, w, spec_of(divergence), s_inplace, block_v=256)
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0)
    torch.testing.assert_close(s_inplace, grad, rtol=0, atol=0)  # bitwise the same gradient
    assert torch.all(s_inplace[1] == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float32),
    ],
    ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}",
)
def test_mixed_dtypes(divergence, dtypes):
    n, v = 4, 1031
    s, t, w = logits((n, v), dtypes[0]), logits((n, v), dtypes[1]), weights(n)
    grad = torch.empty_like(s)
    loss = launch(s, t, w, spec_of(divergence, 1.3), grad, block_v=256)
    assert grad.dtype == dtypes[0]
    check_against_reference(divergence, s, t, w, loss, grad, 1.3)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_strides(divergence):
    """s, t and grad each with their own row stride (views into wider buffers); unit column stride."""
    n, v = 4, 531
    s_buf, t_buf = logits((n, v + 45), torch.float32), logits((n, v + 13), torch.float32)
    g_buf = torch.full((n, v + 29), 5.0)
    s, t, grad = s_buf[:, 3 : 3 + v], t_buf[:, :v], g_buf[:, 29:]
    assert not s.is_contiguous() and s.stride(0) != t.stride(0) != grad.stride(0)
    w = weights(n)
    loss = launch(s, t, w, spec_of(divergence), grad, block_v=128)
    ref_loss = launch(
        s.contiguous(), t.contiguous(), w, spec_of(divergence), g2 := torch.empty(n, v), block_v=128
    )
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, g2, rtol=0, atol=0)
    assert torch.all(g_buf[:, :29] == 5.0)  # nothing written outside the view
    check_against_reference(divergence, s, t, w, loss, grad)


# ----------------------------------------------------------------------------------------------- skipping


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_weight_rows_are_not_read(divergence):
    n, v = 6, 700
    s, t = logits((n, v), torch.bfloat16), logits((n, v), torch.float32)
    w = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.0])
    skipped = w == 0
    for row, poison in zip((1, 3, 5), (math.nan, math.inf, -math.inf)):
        s[row] = poison
        t[row] = poison
    grad = torch.full_like(s, math.nan)  # a row left unwritten would stay NaN
    loss = launch(s, t, w, spec_of(divergence), grad, block_v=256)
    assert torch.all(loss[skipped] == 0) and torch.all(grad[skipped] == 0)
    kept = ~skipped
    check_against_reference(divergence, s[kept], t[kept], w[kept], loss[kept], grad[kept])


def test_all_rows_skipped_and_empty_batch():
    s, t = logits((3, 300), torch.float32), logits((3, 300), torch.float32)
    grad = torch.full_like(s, 1.0)
    loss = launch(s, t, torch.zeros(3), spec_of("jsd"), grad, block_v=128)
    assert torch.all(loss == 0) and torch.all(grad == 0)
    empty = torch.empty(0, 300)
    out = launch(empty, empty, torch.empty(0), spec_of("reverse_kl"), torch.empty(0, 300))
    assert out.shape == (0,) and out.dtype == torch.float32
    s0 = torch.randn(0, 300, requires_grad=True)
    loss0 = kd_kernels.skew_reverse_kl(s0, torch.randn(0, 300), backend="triton")
    loss0.backward()
    assert loss0.item() == 0.0 and s0.grad.shape == (0, 300)


# ------------------------------------------------------------------------------------------ edge values


# −inf on one side only: not for reverse KL with p = 0 < q, nor forward KL with q = 0 < p (both infinite).
_NEG_INF_CASES = [
    (d, where)
    for where in ("both", "teacher", "student")
    for d in DIVERGENCES
    if (where, d) not in (("teacher", "reverse_kl"), ("student", "forward_kl"))
]


@pytest.mark.parametrize("divergence, where", _NEG_INF_CASES)
def test_neg_inf_columns(divergence, where):
    """−inf in both tensors is an absent column; −inf on one side is a zero probability there."""
    n, v = 4, 600
    s, t = logits((n, v), torch.float32), logits((n, v), torch.float32)
    # Weights above 1/ln 2: the last pass multiplies a floored log ratio by ln 2·w/T before its weight 0.
    w = torch.tensor([0.5, 1.0, 3.0, 40.0])
    cols = torch.tensor([0, 5, 127, 128, 129, 333, 599])  # across block edges at block_v=128
    if where in ("both", "student"):
        s[:, cols] = -math.inf
    if where in ("both", "teacher"):
        t[:, cols] = -math.inf
    grad = torch.empty_like(s)
    loss = launch(s, t, w, spec_of(divergence), grad, block_v=128)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # float64 autograd through log_softmax turns −inf inputs into NaN gradients, so the reference gets −1e4
    # instead: e^(−1e4) is exactly 0 in float64, the same zero probability.
    s, t = s.masked_fill(s == -math.inf, -1e4), t.masked_fill(t == -math.inf, -1e4)
    if where == "both":
        keep = torch.ones(v, dtype=torch.bool)
        keep[cols] = False
        check_against_reference(divergence, s[:, keep], t[:, keep], w, loss, grad[:, keep])
    else:
        check_against_reference(divergence, s, t, w, loss, grad)
    if where != "teacher":
        assert torch.all(grad[:, cols] == 0)  # q = 0 there


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(divergence):
    """Logits up to ±3e3 (nearly one-hot rows, e^(−6e3) underflows): finite, and as close as eager fp32."""
    n, v = 4, 513
    s = (torch.rand(n, v, dtype=torch.float64) * 6e3 - 3e3).float()
    t = (torch.rand(n, v, dtype=torch.float64) * 6e3 - 3e3).float()
    s[:, 7], t[:, 7] = 3e3, 3e3  # a shared top entry, so every divergence stays finite
    s[:, 300], t[:, 301] = -3e3, -3e3
    w = torch.ones(n)
    grad = torch.empty_like(s)
    loss = launch(s, t, w, spec_of(divergence), grad, block_v=128)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference(divergence, s, t, w)
    e_loss, e_grad = eager(divergence, s, t, w)
    assert (loss.double() - ref_loss).abs().max() <= 2 * (
        e_loss.double() - ref_loss
    ).abs().max() + 1e-4
    assert (grad.double() - ref_grad).abs().max() <= 2 * (
        e_grad.double() - ref_grad
    ).abs().max() + 1e-6


# ------------------------------------------------------------------------------------- launch and contract


def test_contract_errors():
    s, t, w = torch.randn(4, 64), torch.randn(4, 64), torch.ones(4)
    spec = spec_of("forward_kl")
    with pytest.raises(ValueError, match="unit stride along V"):
        launch(s.t().contiguous().t(), t, w, spec, None)
    with pytest.raises(ValueError, match="row_weight"):
        launch(s, t, w.double(), spec, None)
    with pytest.raises(ValueError, match="grad must be"):
        launch(s, t, w, spec, torch.empty(4, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="overlaps s"):
        buf = torch.randn(5, 64)
        launch(buf[1:], t, w, spec, buf[:4])


_COMPILE_SM90 = r"""
import json, sys
import kd_kernels

kd_kernels.available_backends()  # registers the triton backend
if "triton" in sys.modules:
    print(json.dumps({"fail": "import kd_kernels imported triton"}))
    sys.exit(0)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kd_kernels import _triton_kernels as K

out = {}
# One online and one three-pass divergence of the old five, and the new ones (alpha_beta with interpolation).
for name, div, online, interp in (("forward_kl", 0, True, False), ("jsd", 4, False, False), ("tvd", 5, False, False),
                                  ("jeffreys", 6, True, False), ("alpha_beta", 7, False, True),
                                  ("renyi", 8, True, False)):
    sig = {"s_ptr": "*bf16", "t_ptr": "*bf16", "w_ptr": "*fp32", "loss_ptr": "*fp32", "g_ptr": "*bf16",
           "stride_s": "i32", "stride_t": "i32", "stride_g": "i32", "V": "i32", "inv_temp": "fp32",
           "lam": "fp32", "coef": "fp32", "coef2": "fp32", "log_c": "fp32", "log_1mc": "fp32"}
    consts = {"DIV": div, "ONLINE": online, "INTERP": interp, "HAS_GRAD": True, "BF16_BY_BITS": False,
              "BLOCK_V": 4096}
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    src = ASTSource(fn=K.kd_loss_grad_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    try:
        out[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ttir"]
    except Exception as e:
        print(json.dumps({"skip": f"{type(e).__name__}: {e}"[:500]}))
        sys.exit(0)
print(json.dumps(out))
"""


def test_lazy_import_and_64_bit_offsets():
    """In a fresh process without TRITON_INTERPRET: ``import kd_kernels`` does not import triton, both kernels
    compile for sm_90 (no GPU needed: the interpreter would hide compiler-only errors), and the row offset is
    computed in int64 before it meets a pointer, so N·V ≥ 2^31 does not wrap (the real run at that size is in
    benchmarks/run.py --device cuda)."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(kd_kernels.__file__)), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "fail" not in result, result["fail"]
    if "skip" in result:
        pytest.skip(f"cannot compile for sm_90 on this host: {result['skip']}")
    for name, ttir in result.items():
        # program_id is widened to i64, multiplied by the (widened) stride in i64, then added to the pointer.
        assert re.search(r"%row_\w+ = arith\.extsi %row : i32 to i64", ttir), name
        for p in ("s", "t", "g"):
            assert re.search(rf"%{p}_row_\w+ = arith\.muli %row_\w+, %{p}_row\w* : i64", ttir), (
                name,
                p,
            )
            assert re.search(rf"tt\.addptr %{p}_ptr, %{p}_row_\w+ : !tt\.ptr<bf16>, i64", ttir), (
                name,
                p,
            )


# ------------------------------------------------------------------------- the backward's scale by a device scalar
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [1.0, 0.3710938, -2.5, 0.0, math.nan])
def test_scale_by_device_scalar(dtype, c):
    """g ← g·c in place with c read by the kernel: the fp32 product rounded once; c = 1 leaves g as it was.
    4096·3 + 17 elements over at most 4 programs: the grid-stride loop and the ragged tail both run."""
    from kd_kernels._triton_kernels import scale_by_device_scalar

    g0 = torch.randn(4096 * 3 + 17, dtype=torch.float32).to(dtype)
    g = g0.clone()
    scale_by_device_scalar(g, torch.tensor(c, dtype=torch.float32))
    want = g0.float() * c
    want = want.to(dtype)  # torch rounds fp32 → bf16 to nearest even, as the GPU's cast does
    assert torch.equal(g.isnan(), want.isnan())
    assert torch.equal(g[~g.isnan()], want[~want.isnan()])


def test_autograd_scales_through_the_device_kernel(monkeypatch):
    """The autograd glue's device path (a CUDA scalar upstream gradient) run on CPU tensors: a random scalar
    upstream gradient gives c × the gradient of loss.backward(), and a second backward still raises."""
    from kd_kernels import _autograd
    from kd_kernels._triton_kernels import scale_by_device_scalar

    used = []

    def scaler(grad, grad_out):
        if grad.is_contiguous() and grad_out.numel() == 1:
            used.append(grad.shape)
            return scale_by_device_scalar
        return None

    s0, t = torch.randn(5, 300), torch.randn(5, 300)
    s = s0.clone().requires_grad_()
    kd_kernels.reverse_kl(s, t, backend="torch").backward()
    base = s.grad.clone()
    monkeypatch.setattr(_autograd, "_device_scaler", scaler)
    c = torch.rand(()).item() * 3.0 - 1.5
    s = s0.clone().requires_grad_()
    loss = kd_kernels.reverse_kl(s * 1.0, t, backend="torch")
    (loss * c).backward(retain_graph=True)
    assert used == [(5, 300)]
    torch.testing.assert_close(s.grad, base * c, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError):
        loss.backward()


_DENSE_SASS = r"""
import json, os, re, struct, subprocess, sys, tempfile
try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.language.extra import libdevice
except Exception as e:  # pragma: no cover - triton without its NVIDIA backend
    print(json.dumps({"skip": str(e)[:300]}))
    sys.exit(0)
from kd_kernels import _triton_kernels as K
from kd_kernels._spec import Divergence

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(cuobjdump):
    print(json.dumps({"skip": "no cuobjdump next to triton's ptxas"}))
    sys.exit(0)
target = GPUTarget("cuda", 90, 32)


def build(fn, sig, consts, divisible=()):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in divisible})
    return triton.compile(src, target=target, options={"num_warps": 8})


def sass(kernel):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout


def consts(ptx):
    return set(re.findall(r"0f[0-9A-F]{8}", ptx))


def coefficient(c):  # a polynomial coefficient: 0 < |value| < 0.5 (not 0, 1, log2(e), ln 2, inf, ...)
    v = abs(struct.unpack(">f", bytes.fromhex(c[2:]))[0])
    return 0.0 < v < 0.5


@triton.jit
def log_poly(x_ptr, LIB: tl.constexpr):
    o = tl.arange(0, 256)
    x = tl.load(x_ptr + o)
    tl.store(x_ptr + o, tl.log2(x) if LIB else libdevice.fast_log2f(x))


# Calibration: the coefficients of libdevice's log2 polynomial are the small constants tl.log2 adds to a kernel.
poly = {c for c in consts(build(log_poly, {"x_ptr": "*fp32"}, {"LIB": True}).asm["ptx"])
        - consts(build(log_poly, {"x_ptr": "*fp32"}, {"LIB": False}).asm["ptx"]) if coefficient(c)}
out = {"poly": sorted(poly), "kernels": {}}
for d in Divergence:
    for interp in (False, True) if d.name == "ALPHA_BETA" else (False,):
        sig = {"s_ptr": "*bf16", "t_ptr": "*bf16", "w_ptr": "*fp32", "loss_ptr": "*fp32", "g_ptr": "*bf16",
               "stride_s": "i32", "stride_t": "i32", "stride_g": "i32", "V": "i32", "inv_temp": "fp32",
               "lam": "fp32", "coef": "fp32", "coef2": "fp32", "log_c": "fp32", "log_1mc": "fp32"}
        c = {"DIV": int(d), "ONLINE": d.info.online, "INTERP": interp, "HAS_GRAD": True, "BF16_BY_BITS": False,
             "BLOCK_V": 4096}
        k = build(K.kd_loss_grad_kernel, sig, c, divisible=("s_ptr", "t_ptr", "g_ptr", "stride_s", "stride_t",
                                                              "stride_g", "V"))
        text = sass(k)
        out["kernels"][f"{d.name.lower()}{'+interp' if interp else ''}"] = {
            "ex2": len(re.findall(r"MUFU\.EX2", text)), "lg2": len(re.findall(r"MUFU\.LG2", text)),
            "poly": sorted(consts(k.asm["ptx"]) & poly), "bar": len(re.findall(r"\bBAR\.", text))}
k = build(K.scale_by_device_scalar_kernel, {"g_ptr": "*bf16", "c_ptr": "*fp32", "n": "i64"},
          {"BF16_BY_BITS": False, "BLOCK": 4096})
out["scale_compiled"] = "ptx" in k.asm
print(json.dumps(out))
"""


def test_dense_kernel_sass_for_sm90(tmp_path):
    """Every divergence's dense kernel compiled for sm_90 (a fresh process, no interpreter): the exponentials
    and logarithms are the hardware ones (MUFU.EX2 / MUFU.LG2 in the SASS) and none of the float constants of
    libdevice's log polynomial is in the PTX (calibrated in the same process against tl.log2, which is what the
    kernel used before). The in-place scale kernel of the backward compiles too."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(kd_kernels.__file__)), env.get("PYTHONPATH", "")]
    )
    script = (
        tmp_path / "dense_sass.py"
    )  # a file, not -c: triton.jit reads the source of the probe kernel
    script.write_text(_DENSE_SASS)
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res["poly"], "calibration found no polynomial constants"
    assert len(res["kernels"]) == len(Divergence) + 1
    for name, k in res["kernels"].items():
        assert k["ex2"] > 0 and k["lg2"] > 0, (name, k)
        assert not k["poly"], (name, k["poly"])
    assert res["scale_compiled"]
