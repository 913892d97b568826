"""Builds kd_kernels._C with CMake + ninja (pybind11, no torch headers). Metadata lives in pyproject.toml.

Knobs (environment variables, read at build time):

- ``KD_KERNELS_CUDA=auto|0|1``: compile ``csrc/cuda/*.cu``. ``auto`` (default) = on iff nvcc is found;
  ``1`` = fail if it is not found; ``0`` = CPU only.
- ``KD_KERNELS_CUDA_ARCHS``: CUDA architectures, ``;`` or ``,`` separated (default ``90`` to keep CI builds
  short; e.g. ``80;86;89;90;100;120`` for a release).
- ``CUDACXX`` (path of nvcc) or ``CUDA_HOME`` / ``CUDA_PATH`` (``$CUDA_HOME/bin/nvcc``); else ``nvcc`` on PATH,
  else ``/usr/local/cuda/bin/nvcc``. The GPU itself is never probed.
- ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
- ``KD_KERNELS_BUILD_TYPE``: CMake build type (default ``Release``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_setting() -> str | None:
    """The nvcc to build with, or None for a CPU-only build."""
    mode = os.environ.get("KD_KERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"KD_KERNELS_CUDA={mode!r} is not understood; use auto, 0 or 1")
    if mode == "0":
        return None
    nvcc = _find_nvcc()
    if nvcc is None and mode == "1":
        raise SystemExit(
            "KD_KERNELS_CUDA=1 but nvcc was not found; set CUDACXX=/path/to/nvcc or CUDA_HOME, "
            "or build CPU-only with KD_KERNELS_CUDA=0"
        )
    return nvcc


def _cuda_archs() -> str:
    raw = os.environ.get("KD_KERNELS_CUDA_ARCHS", "90")
    archs = [a for a in re.split(r"[;,\s]+", raw) if a]
    if not archs:
        raise SystemExit("KD_KERNELS_CUDA_ARCHS is empty; use e.g. 90 or 80;86;89;90")
    return ";".join(archs)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("KD_KERNELS_BUILD_TYPE", "Release")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if shutil.which("ninja") or _ninja_from_pip():
            args += ["-G", "Ninja"]
            if _ninja_from_pip():
                args.append(f"-DCMAKE_MAKE_PROGRAM={_ninja_from_pip()}")
        nvcc = _cuda_setting()
        if nvcc is not None:
            args += [
                "-DKD_KERNELS_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DKD_KERNELS_CUDA_ARCHS={_cuda_archs()}",
            ]
        else:
            args.append("-DKD_KERNELS_CUDA=OFF")

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        cmake = _cmake()
        # A cache from another configuration (say, CUDA on) would keep stale settings: start fresh.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists():
            cache.unlink()
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


def _cmake() -> str:
    try:  # the `cmake` wheel from [build-system] requires
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if found is None:
            raise SystemExit("cmake not found; `pip install cmake`") from None
        return found


def _ninja_from_pip() -> str | None:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        return path if os.path.isfile(path) else None
    except ImportError:
        return None


setup(ext_modules=[CMakeExtension("kd_kernels._C")], cmdclass={"build_ext": CMakeBuild})
