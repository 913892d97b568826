"""The "cuda" backend (csrc/cuda) against the float64 reference. Needs a CUDA GPU and an extension built with
nvcc; skipped otherwise (the per-element math it runs is kd_math.h, exercised on the CPU by the cpu tests).

Every check draws fresh random inputs, pre-fills the gradient with NaN (every element the kernel must write),
fills masked rows of *both inputs* with NaN (the kernel must not read them), and compares with float64 on the
very same rounded inputs. Error rule (norm-wise relative, gradient): no worse than the eager "torch" backend's
error at the same dtypes plus a small per-dtype slack; losses are fp32 in both.

``KD_KERNELS_CUDA_PATH`` forces the kernel variant: ``stream`` (rows re-read from global memory),
``cluster:C`` (the row kept in the shared memory of a C-block cluster), ``auto``.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from _common import DIVERGENCES

import kd_kernels
from kd_kernels import _ext
from kd_kernels import reference as R
from kd_kernels._backends import get_backend
from kd_kernels._spec import Divergence, KDSpec

HAS_CUDA = torch.cuda.is_available() and "cuda" in kd_kernels.available_backends("cuda")
needs_gpu = pytest.mark.skipif(
    not HAS_CUDA,
    reason="needs a CUDA GPU and kd_kernels._C built with CUDA kernels (no GPU on this machine)",
)
REPO = Path(__file__).resolve().parent.parent

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COEF = {"skew_forward_kl": 0.1, "skew_reverse_kl": 0.3, "jsd": 0.4}
# Slack on top of the eager error (norm-wise relative gradient error), per student dtype.
SLACK = {torch.float32: 5e-6, torch.bfloat16: 2e-4, torch.float16: 5e-5}
LOSS_ATOL, LOSS_RTOL = 1e-4, 1e-4
PATHS = ("auto", "stream", "cluster:1", "cluster:2", "cluster:3", "cluster:8")


def spec_of(divergence: str, temperature: float = 1.0) -> KDSpec:
    return KDSpec(Divergence.parse(divergence), COEF.get(divergence, 0.0), temperature=temperature)


def gen_for(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: every case sees its own random inputs."""
    g = torch.Generator(device="cuda")
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def make_case(n, v, s_dtype, t_dtype, gen, *, scale=2.0, masked=(1,), neg_inf_teacher_row=None):
    """Student / teacher logits, row weights with zeros at `masked` (those rows NaN in both inputs)."""
    s = (torch.randn(n, v, generator=gen, device="cuda", dtype=torch.float32) * scale).to(s_dtype)
    t = (torch.randn(n, v, generator=gen, device="cuda", dtype=torch.float32) * scale).to(t_dtype)
    w = torch.rand(n, generator=gen, device="cuda", dtype=torch.float32) + 0.5
    for i in masked:
        if i < n:
            w[i] = 0.0
            s[i] = float("nan")
            t[i] = float("nan")
    if neg_inf_teacher_row is not None and neg_inf_teacher_row < n and v > 3:
        t[neg_inf_teacher_row, : v // 3] = float("-inf")  # p = 0 there: the 0·log 0 convention
    return s, t, w


def reference(divergence, s, t, w, temperature=1.0):
    """float64 per-token loss (0 on skipped rows) and w_i ∂L_i/∂s_i, on the very same rounded inputs."""
    keep = w != 0
    s64 = torch.where(
        keep[:, None], s.double(), torch.zeros((), dtype=torch.float64, device=s.device)
    )
    t64 = torch.where(
        keep[:, None], t.double(), torch.zeros((), dtype=torch.float64, device=s.device)
    )
    s64.requires_grad_()
    a = COEF.get(divergence, 0.1)
    per = R.per_token(divergence, s64 / temperature, t64 / temperature, alpha=a, beta=a)
    (g,) = torch.autograd.grad((per * w.double()).sum(), s64)
    return torch.where(keep, per.detach(), torch.zeros_like(per.detach())), g


def run_backend(name, divergence, s, t, w, temperature=1.0, *, with_grad=True):
    grad = torch.full_like(s, float("nan")) if with_grad else None
    loss = get_backend(name).loss_grad(s, t, w, spec_of(divergence, temperature), grad)
    return loss, grad


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_reference(divergence, s, t, w, temperature=1.0, *, loss=None, grad=None):
    ref_loss, ref_grad = reference(divergence, s, t, w, temperature)
    if loss is None:
        loss, grad = run_backend("cuda", divergence, s, t, w, temperature)
    torch.cuda.synchronize()
    masked = w == 0
    assert loss.dtype == torch.float32 and loss.shape == w.shape
    assert torch.isfinite(loss).all(), f"non-finite loss: {loss}"
    assert (loss[masked] == 0).all(), "masked rows must have loss exactly 0"
    torch.testing.assert_close(loss.double(), ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    if grad is not None:
        assert grad.dtype == s.dtype
        assert not torch.isnan(grad).any(), "gradient left unwritten (NaN poison) or NaN computed"
        assert (grad[masked] == 0).all(), "masked rows must have a gradient of exactly 0"
        _, eager_grad = run_backend("torch", divergence, s, t, w, temperature)
        bound = rel_err(eager_grad, ref_grad) + SLACK[s.dtype]
        err = rel_err(grad, ref_grad)
        assert err <= bound, f"gradient error {err:.3e} > eager error + slack {bound:.3e}"
    return loss, grad


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("KD_KERNELS_CUDA_PATH", request.param)
    return request.param


@needs_gpu
@pytest.mark.parametrize("s_dtype,t_dtype", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_dtype_pair(divergence, s_dtype, t_dtype):
    s, t, w = make_case(
        6,
        4099,
        s_dtype,
        t_dtype,
        gen_for(divergence, s_dtype, t_dtype),
        masked=(1, 4),
        neg_inf_teacher_row=2,
    )
    check_against_reference(divergence, s, t, w)


@needs_gpu
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("v", [1, 7, 8, 9, 1031, 32003])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_kernel_variant(divergence, v, path):
    """Resident (several cluster sizes, including clusters with idle blocks on short rows) and streaming."""
    s, t, w = make_case(
        9, v, torch.bfloat16, torch.float32, gen_for(divergence, v, path), masked=(0, 5)
    )
    check_against_reference(divergence, s, t, w)


@needs_gpu
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature(divergence, temperature):
    s, t, w = make_case(5, 1031, torch.float16, torch.float16, gen_for(divergence, temperature))
    check_against_reference(divergence, s, t, w, temperature)


@needs_gpu
@pytest.mark.parametrize("path", ("auto", "stream", "cluster:4"), indirect=True)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_in_place(divergence, path):
    s, t, w = make_case(
        7, 4099, torch.bfloat16, torch.bfloat16, gen_for("inplace", divergence, path), masked=(3,)
    )
    ref_loss, ref_grad = reference(divergence, s, t, w)
    _, eager_grad = run_backend("torch", divergence, s, t, w)
    buf = s.clone()
    loss = get_backend("cuda").loss_grad(buf, t, w, spec_of(divergence), buf)  # grad aliases s
    torch.cuda.synchronize()
    torch.testing.assert_close(loss.double(), ref_loss, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    assert not torch.isnan(buf).any() and (buf[3] == 0).all()
    assert rel_err(buf, ref_grad) <= rel_err(eager_grad, ref_grad) + SLACK[torch.bfloat16]


@needs_gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_only(divergence):
    s, t, w = make_case(6, 32003, torch.bfloat16, torch.bfloat16, gen_for("loss_only", divergence))
    loss, _ = run_backend("cuda", divergence, s, t, w, with_grad=False)
    check_against_reference(divergence, s, t, w, loss=loss, grad=None)


@needs_gpu
@pytest.mark.parametrize("path", ("auto", "stream"), indirect=True)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_unaligned_rows(divergence, path):
    """Row strides and base pointers that are not 16-byte aligned: the element-wise load / store path."""
    n, v = 5, 1031
    gen = gen_for("unaligned", divergence, path)
    s_base, t_base, w = make_case(n, v + 3, torch.bfloat16, torch.float16, gen, masked=(2,))
    s, t = s_base[:, 1 : v + 1], t_base[:, 3 : v + 3]  # row stride v + 3, odd element offsets
    g_base = torch.full((n, v + 5), float("nan"), dtype=torch.bfloat16, device="cuda")
    grad = g_base[:, 1 : v + 1]
    loss = get_backend("cuda").loss_grad(s, t, w, spec_of(divergence), grad)
    check_against_reference(divergence, s, t, w, loss=loss, grad=grad)
    assert torch.isnan(g_base[:, 0]).all() and torch.isnan(g_base[:, v + 1 :]).all(), (
        "wrote outside rows"
    )


@needs_gpu
def test_large_vocab_rows_beyond_shared_memory():
    """fp32 rows of 600k columns (4.8 MB per row pair): no cluster holds them, so the streaming path runs."""
    s, t, w = make_case(3, 600_000, torch.float32, torch.float32, gen_for("big_v"), masked=(1,))
    for divergence in ("reverse_kl", "skew_reverse_kl"):
        check_against_reference(divergence, s, t, w)


@needs_gpu
def test_public_api_matches_reference():
    """kd_loss through autograd with mask, token weights and every reduction."""
    gen = gen_for("public")
    s0 = (torch.randn(3, 5, 4099, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    t = (torch.randn(3, 5, 4099, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    mask = torch.rand(3, 5, generator=gen, device="cuda") > 0.3
    tw = torch.rand(3, 5, generator=gen, device="cuda") + 0.5
    for divergence, reduction in itertools.product(DIVERGENCES, ("mean", "sum", "none")):
        s = s0.clone().requires_grad_()
        out = kd_kernels.kd_loss(
            s,
            t,
            divergence=divergence,
            alpha=0.1,
            beta=0.4,
            mask=mask,
            token_weights=tw,
            reduction=reduction,
            backend="cuda",
            temperature=1.5,
        )
        s64 = s0.double().requires_grad_()
        ref = R.kd_loss(
            divergence,
            s64,
            t.double(),
            alpha=0.1,
            beta=0.4,
            temperature=1.5,
            mask=mask,
            token_weights=tw,
            reduction=reduction,
        )
        up = torch.randn_like(ref) if reduction == "none" else torch.ones_like(ref)
        (out * up.to(out.dtype)).sum().backward()
        (ref * up).sum().backward()
        torch.testing.assert_close(out.double(), ref.detach(), atol=LOSS_ATOL, rtol=LOSS_RTOL)
        assert rel_err(s.grad, s64.grad) < 1e-2, (divergence, reduction)


@needs_gpu
def test_torch_compile_graph():
    """The custom op keeps a kd_kernels loss inside a compiled graph; same numbers as eager."""
    gen = gen_for("compile")
    s0 = torch.randn(16, 1031, generator=gen, device="cuda")
    t = torch.randn(16, 1031, generator=gen, device="cuda")

    def f(x):
        return kd_kernels.jsd(x * 1.0, t, beta=0.4, backend="cuda")

    compiled = torch.compile(f, fullgraph=True)
    s1 = s0.clone().requires_grad_()
    s2 = s0.clone().requires_grad_()
    f(s1).backward()
    compiled(s2).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@needs_gpu
def test_errors_come_back_as_runtime_error(monkeypatch):
    s, t, w = make_case(2, 64, torch.float32, torch.float32, gen_for("errors"), masked=())
    monkeypatch.setenv("KD_KERNELS_CUDA_PATH", "sideways")
    with pytest.raises(RuntimeError, match="KD_KERNELS_CUDA_PATH"):
        run_backend("cuda", "forward_kl", s, t, w)
    monkeypatch.setenv("KD_KERNELS_CUDA_PATH", "cluster:3")
    with pytest.raises(
        RuntimeError, match="cluster:3"
    ):  # 32 MB of fp32 per row pair: no 3-block cluster
        big_s, big_t, big_w = make_case(
            1, 4_000_000, torch.float32, torch.float32, gen_for("e2"), masked=()
        )
        run_backend("cuda", "forward_kl", big_s, big_t, big_w)
    monkeypatch.delenv("KD_KERNELS_CUDA_PATH")
    loss = torch.empty(2, device="cuda")
    with pytest.raises(RuntimeError, match="dtype codes"):
        _ext._C.cuda_loss_grad(
            s.data_ptr(),
            t.data_ptr(),
            0,
            w.data_ptr(),
            loss.data_ptr(),
            2,
            64,
            64,
            64,
            64,
            7,
            0,
            0,
            0.0,
            1.0,
            torch.cuda.current_stream().cuda_stream,
        )


@needs_gpu
def test_launcher_rejects_bad_layouts():
    s, t, w = make_case(4, 64, torch.float32, torch.float32, gen_for("layouts"), masked=())
    with pytest.raises(ValueError, match="contiguous last dim"):
        get_backend("cuda").loss_grad(s.t().contiguous().t(), t, w, spec_of("forward_kl"), None)
    with pytest.raises(TypeError, match="student's dtype"):
        get_backend("cuda").loss_grad(
            s, t, w, spec_of("forward_kl"), torch.empty_like(s, dtype=torch.half)
        )
    with pytest.raises(ValueError, match="row_weight"):
        get_backend("cuda").loss_grad(s, t, w.double(), spec_of("forward_kl"), None)


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("path", ("auto", "stream"), indirect=True)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_more_than_2_31_elements(divergence, path):
    """N·V ≥ 2^31 in bf16 (about 13 GB on the GPU): 64-bit offsets. Rows on both sides of element 2^31 are
    compared with float64; every row is checked for NaN and for the masked rows' exact zeros."""
    v = 128_256
    n = 2**31 // v + 8
    gen = gen_for("huge", divergence, path)
    s = torch.randn(n, v, generator=gen, device="cuda", dtype=torch.bfloat16).mul_(2)
    t = torch.randn(n, v, generator=gen, device="cuda", dtype=torch.bfloat16).mul_(2)
    w = torch.ones(n, device="cuda")
    boundary = 2**31 // v  # the row holding element 2^31
    masked = [3, boundary + 2]
    for i in masked:
        w[i] = 0.0
        s[i] = float("nan")
        t[i] = float("nan")
    grad = torch.full_like(s, float("nan"))
    loss = get_backend("cuda").loss_grad(s, t, w, spec_of(divergence), grad)
    torch.cuda.synchronize()
    assert not torch.isnan(grad).any() and torch.isfinite(loss).all()
    assert (loss[masked] == 0).all() and all((grad[i] == 0).all() for i in masked)
    rows = torch.tensor(
        [0, boundary - 1, boundary, boundary + 1, boundary + 2, n - 1], device="cuda"
    )
    check_against_reference(divergence, s[rows], t[rows], w[rows], loss=loss[rows], grad=grad[rows])
    del s, t, grad
    torch.cuda.empty_cache()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_kernel_reduction_logic_on_host(tmp_path):
    """Runs on any machine: csrc/cuda/host_check replays the kernel's per-group accumulation, its warp /
    block / cluster merges and its loss and gradient formulas on the CPU for many (V, C, threads, T), and
    compares with float64 (see the program's header)."""
    exe = tmp_path / "kd_group_host_check"
    src = REPO / "csrc" / "cuda" / "host_check" / "kd_group_host_check.cpp"
    subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O2",
            "-I",
            str(REPO / "csrc" / "include"),
            "-I",
            str(REPO / "csrc" / "cuda"),
            str(src),
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-2000:]
    # 1548 rows: the (V, C, threads, T) grid, plus fp32 rows shifted by +1e6 for every divergence
    assert "1548 / 1548 rows within tolerance" in out.stdout
