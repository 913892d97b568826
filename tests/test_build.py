"""The compiled extension kd_kernels._C: how it was built, what it links, and a correctness smoke test of the
"cpu" backend against the float64 reference for every divergence on every x86-64 level this CPU can run.

The full parametrized suite (tests/test_losses.py) runs the cpu backend too once it is available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from _common import DIVERGENCES

import kd_kernels
from kd_kernels import _ext
from kd_kernels import reference as R

needs_ext = pytest.mark.skipif(
    _ext._C is None, reason=f"kd_kernels._C not built: {_ext.load_error}"
)


def _so_path() -> str:
    return _ext._C.__file__


def _runnable_levels() -> list[str]:
    """The compiled levels this CPU can execute (probing with _set_cpu_isa, then back to auto)."""
    levels = []
    for name in kd_kernels.build_info()["cpu_targets"]:
        try:
            _ext._C._set_cpu_isa(name)
        except ValueError:
            continue
        levels.append(name)
    _ext._C._set_cpu_isa("auto")
    return levels


LEVELS = _runnable_levels() if _ext._C is not None else []


@pytest.fixture
def level(request):
    _ext._C._set_cpu_isa(request.param)
    yield request.param
    _ext._C._set_cpu_isa("auto")


# ---------------------------------------------------------------------------------------------------------
# Build metadata and linkage
# ---------------------------------------------------------------------------------------------------------


@needs_ext
def test_build_info_keys_and_types():
    info = kd_kernels.build_info()
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert info["cuda"] == bool(
        info["cuda_archs"]
    )  # archs are reported exactly when CUDA is compiled in
    if info["cuda"]:  # the default arch list (CI) and any release list must include Hopper
        assert "90" in info["cuda_archs"].replace(",", ";").split(";"), info["cuda_archs"]
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert isinstance(info["openmp"], bool)
    targets = info["cpu_targets"]
    assert isinstance(targets, list) and targets and all(isinstance(x, str) for x in targets)
    assert info["cpu_isa"] in targets
    assert info["version"] == kd_kernels.__version__
    native = _ext._C.build_info()
    assert native["cpu"] is True and native["cpu_targets"] == targets


@needs_ext
def test_cpu_backend_is_available():
    assert "cpu" in kd_kernels.available_backends()
    assert "cpu" in kd_kernels.available_backends("cpu")


@needs_ext
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_extension_does_not_link_torch():
    out = subprocess.run(
        ["readelf", "-d", _so_path()], capture_output=True, text=True, check=True
    ).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert needed, out  # the parse found the dynamic section
    for lib in needed:
        assert not lib.startswith(("libtorch", "libc10", "libcudart.so", "libcuda.so")), needed


@needs_ext
@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd not installed")
def test_extension_loads_without_torch_libraries():
    out = subprocess.run(["ldd", _so_path()], capture_output=True, text=True, check=True).stdout
    assert "not found" not in out, out
    assert "libtorch" not in out and "libc10" not in out, out


@needs_ext
def test_cpu_isa_environment_variable():
    baseline = kd_kernels.build_info()["cpu_targets"][0]  # the baseline level runs on any CPU
    env = dict(os.environ, KD_KERNELS_CPU_ISA=baseline)
    code = "import kd_kernels; print(kd_kernels.build_info()['cpu_isa'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == baseline


@needs_ext
def test_set_cpu_isa_rejects_unknown_level():
    with pytest.raises(ValueError, match="not compiled in"):
        _ext._C._set_cpu_isa("x86-64-v9")
    assert _ext._C._cpu_isa() == kd_kernels.build_info()["cpu_isa"]


# ---------------------------------------------------------------------------------------------------------
# Raw binding: bad arguments raise ValueError, never crash
# ---------------------------------------------------------------------------------------------------------


def _raw_call(s_tensor=None, t_tensor=None, **overrides):
    s = torch.randn(3, 7) if s_tensor is None else s_tensor
    t = torch.randn(3, 7) if t_tensor is None else t_tensor
    w = torch.ones(3)
    loss = torch.empty(3)
    args = {
        "s": s.data_ptr(),
        "t": t.data_ptr(),
        "grad": 0,
        "row_weight": w.data_ptr(),
        "loss": loss.data_ptr(),
        "n_rows": 3,
        "vocab": 7,
        "stride_s": 7,
        "stride_t": 7,
        "stride_g": 7,
        "s_dtype": 0,
        "t_dtype": 0,
        "divergence": 0,
        "coef": 0.0,
        "coef2": 0.0,
        "interpolation": 1.0,
        "temperature": 1.0,
        "num_threads": 0,
    }
    args.update(overrides)
    _ext._C.cpu_loss_grad(**args)
    return loss


@needs_ext
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"s_dtype": 7}, "s_dtype"),
        ({"t_dtype": -1}, "t_dtype"),
        ({"divergence": 9}, "divergence"),
        ({"divergence": 7, "coef": 0.5, "coef2": 0.0}, "coef2"),
        ({"divergence": 8, "coef": 1.0}, "renyi"),
        ({"interpolation": 0.0}, "interpolation"),
        ({"interpolation": 1.5}, "interpolation"),
        ({"vocab": 0}, "vocab"),
        ({"stride_s": 3}, "stride"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"divergence": 2, "coef": 1.0}, "coef"),
        ({"s": 0}, "non-null"),
    ],
)
def test_raw_binding_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _raw_call(**overrides)


@needs_ext
def test_raw_binding_computes_forward_kl():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    loss = _raw_call(s, t)
    ref = R.forward_kl_per_token(s.double(), t.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Correctness smoke test against the float64 reference, on every runnable level
# ---------------------------------------------------------------------------------------------------------

# Error bounds relative to the largest |reference| value: fp32 is limited by the fp32 arithmetic; bf16 / fp16
# by rounding the gradient to the student's dtype (2^-8, 2^-11 relative).
LOSS_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _check_against_reference(div, s, t, *, temperature, mask, token_weights, inplace=False):
    kw = {
        "alpha": 0.2,
        "beta": 0.3,
        "temperature": temperature,
        "mask": mask,
        "token_weights": token_weights,
    }
    s_leaf = s.detach().clone().requires_grad_()
    src = s_leaf * 1.0 if inplace else s_leaf  # inplace_grad needs a non-leaf
    out = kd_kernels.kd_loss(
        src, t, divergence=div, reduction="sum", backend="cpu", inplace_grad=inplace, **kw
    )
    out.backward()
    s64 = s.detach().double().requires_grad_()
    ref = R.kd_loss(div, s64, t.double(), reduction="sum", **kw)
    ref.backward()
    assert torch.isfinite(out) and torch.isfinite(s_leaf.grad).all()
    assert abs(out.item() - ref.item()) <= LOSS_RTOL[s.dtype] * max(1.0, abs(ref.item()))
    gref = s64.grad
    gerr = (s_leaf.grad.double() - gref).abs().max().item()
    assert gerr <= GRAD_TOL[s.dtype] * gref.abs().max().item() + 1e-7, (
        gerr,
        gref.abs().max().item(),
    )
    return s_leaf.grad


@needs_ext
@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize(
    "s_dtype, t_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_cpu_matches_reference(level, div, s_dtype, t_dtype):
    n, v = 13, 1031  # odd vocabulary: a partial last block and vector tail
    s = (torch.randn(n, v) * 3).to(s_dtype)
    t = (torch.randn(n, v) * 3).to(t_dtype)
    mask = torch.rand(n) > 0.3
    mask[0] = True
    weights = torch.rand(n) + 0.5
    _check_against_reference(div, s, t, temperature=1.7, mask=mask, token_weights=weights)


@needs_ext
@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_cpu_inplace_and_long_rows(level, div):
    # V spans several 512-entry blocks with a short last one; the gradient overwrites the logits.
    s = torch.randn(5, 4099) * 4
    t = torch.randn(5, 4099) * 4
    _check_against_reference(
        div, s, t, temperature=1.0, mask=None, token_weights=None, inplace=True
    )


@needs_ext
@pytest.mark.parametrize("div", DIVERGENCES)
def test_cpu_masked_rows_are_not_read(div):
    # NaN in masked rows: if the kernel read them, NaN would reach the loss or the gradient.
    s = torch.randn(6, 257)
    t = torch.randn(6, 257)
    mask = torch.tensor([True, False, True, False, False, True])
    s[~mask] = float("nan")
    t[~mask] = float("nan")
    s.requires_grad_()
    per_tok = kd_kernels.kd_loss(s, t, divergence=div, mask=mask, reduction="none", backend="cpu")
    per_tok.sum().backward()
    assert (
        torch.isfinite(per_tok).all() and (per_tok[~mask] == 0).all() and (per_tok[mask] > 0).all()
    )
    assert (s.grad[~mask] == 0).all() and torch.isfinite(s.grad).all()


@needs_ext
@pytest.mark.parametrize("div", ["forward_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"])
def test_cpu_teacher_minus_inf_columns(div):
    # A teacher padded with −inf columns (p = 0 there): finite loss and gradient, 0·log 0 = 0.
    s = torch.randn(4, 600)
    t = torch.randn(4, 600)
    t[:, 580:] = -float("inf")
    t[1, :512] = -float("inf")  # a whole first block of −inf
    _check_against_reference(div, s, t, temperature=1.0, mask=None, token_weights=None)


@needs_ext
def test_cpu_empty_and_single_row():
    s = torch.randn(0, 11, requires_grad=True)
    out = kd_kernels.reverse_kl(s, torch.randn(0, 11), backend="cpu", reduction="sum")
    out.backward()
    assert out.item() == 0.0 and s.grad.shape == (0, 11)
    s1 = torch.randn(1, 1)
    _check_against_reference(
        "reverse_kl", s1, torch.randn(1, 1), temperature=1.0, mask=None, token_weights=None
    )


@needs_ext
def test_cpu_strided_rows():
    # Rows taken from a wider buffer: row stride > V, unit column stride.
    base_s = torch.randn(7, 300)
    base_t = torch.randn(7, 300)
    s, t = base_s[:, :257], base_t[:, 10:267]
    assert s.stride(0) == 300 and not s.is_contiguous()
    _check_against_reference(
        "skew_reverse_kl", s, t, temperature=0.7, mask=None, token_weights=None
    )


@needs_ext
def test_cpu_threads_agree_with_one_thread():
    s = torch.randn(64, 3001)
    t = torch.randn(64, 3001)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kd_kernels.jsd(s, t, reduction="none", backend="cpu")
        torch.set_num_threads(max(2, old))
        many = kd_kernels.jsd(s, t, reduction="none", backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)  # rows are independent: bitwise the same
