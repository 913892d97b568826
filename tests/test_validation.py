"""Bad input raises a typed error that names the argument and the fix; never a crash or a silent NaN."""

from __future__ import annotations

import pytest
import torch

import kd_kernels

S, T = torch.randn(4, 10), torch.randn(4, 10)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"student_logits": torch.randn(4, 10).long()}, TypeError, "student_logits.*float32"),
        ({"teacher_logits": torch.randn(4, 10).double()}, TypeError, "teacher_logits.*float32"),
        ({"student_logits": [1.0, 2.0]}, TypeError, "student_logits must be a torch.Tensor"),
        (
            {"student_logits": torch.tensor(1.0), "teacher_logits": torch.tensor(1.0)},
            ValueError,
            "0-d",
        ),
        ({"teacher_logits": torch.randn(5, 10)}, ValueError, "leading"),
        (
            {"teacher_logits": torch.randn(4, 12)},
            ValueError,
            r"vocabulary mismatch.*teacher_logits\[\.\.\., :10\]",
        ),
        ({"teacher_logits": torch.randn(4, 8)}, ValueError, "vocabulary mismatch.*pad"),
        (
            {"student_logits": torch.randn(4, 0), "teacher_logits": torch.randn(4, 0)},
            ValueError,
            "V=0",
        ),
        ({"mask": torch.ones(4)}, TypeError, "mask.*bool"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask has shape"),
        ({"mask": [True] * 4}, TypeError, "mask must be a torch.Tensor"),
        ({"token_weights": torch.ones(4, dtype=torch.long)}, TypeError, "token_weights.*floating"),
        ({"token_weights": torch.ones(3)}, ValueError, "token_weights has shape"),
        ({"reduction": "avg"}, ValueError, "reduction='avg'.*'mean', 'sum' or 'none'"),
        ({"backend": "cudnn"}, ValueError, "backend='cudnn' is unknown"),
        ({"temperature": 0.0}, ValueError, "temperature=0.0 must be"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "2"}, TypeError, "temperature"),
        ({"divergence": "kl"}, ValueError, "divergence='kl' is unknown"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"student_logits": S, "teacher_logits": T}
    args.update(kwargs)
    s, t = args.pop("student_logits"), args.pop("teacher_logits")
    with pytest.raises(exc, match=match):
        kd_kernels.kd_loss(s, t, **args)


@pytest.mark.parametrize(
    "fn, name",
    [
        (kd_kernels.skew_forward_kl, "alpha"),
        (kd_kernels.skew_reverse_kl, "alpha"),
        (kd_kernels.jsd, "beta"),
    ],
)
@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_coefficient_outside_open_interval(fn, name, value):
    with pytest.raises(ValueError, match=f"{name}={value}.*open interval"):
        fn(S, T, **{name: value})


@pytest.mark.parametrize(
    "fn, hint",
    [
        (kd_kernels.skew_forward_kl, "kd_kernels.forward_kl"),
        (kd_kernels.skew_reverse_kl, "kd_kernels.reverse_kl"),
    ],
)
def test_coefficient_endpoint_names_the_function_to_call(fn, hint):
    with pytest.raises(ValueError, match=hint):
        fn(S, T, alpha=0)


def test_coefficient_type():
    with pytest.raises(TypeError, match="beta"):
        kd_kernels.jsd(S, T, beta="0.5")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="alpha"):
        kd_kernels.KDLoss("skew_forward_kl", alpha=1.0)
    with pytest.raises(ValueError, match="reduction"):
        kd_kernels.KDLoss("forward_kl", reduction="avg")


def test_unavailable_backend_says_why():
    with pytest.raises(kd_kernels.BackendUnavailableError, match="'cuda' cannot run.*Usable here"):
        kd_kernels.reverse_kl(S, T, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_devices_differ():
    with pytest.raises(ValueError, match="move both to one device"):
        kd_kernels.reverse_kl(S.cuda(), T)


def test_mask_on_other_device_is_named():
    # 'meta' stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="mask is on meta"):
        kd_kernels.reverse_kl(S, T, mask=torch.ones(4, dtype=torch.bool, device="meta"))


def test_build_info_and_backends():
    info = kd_kernels.build_info()
    for key in ("version", "cpu", "cuda", "cuda_archs", "torch", "triton"):
        assert key in info
    assert isinstance(info["cpu"], bool) and isinstance(info["cuda"], bool)
    assert info["version"] == kd_kernels.__version__
    assert "torch" in kd_kernels.available_backends()


def test_logits_on_different_devices():
    with pytest.raises(ValueError, match="move both to one device"):
        kd_kernels.reverse_kl(S, torch.randn(4, 10, device="meta"))
