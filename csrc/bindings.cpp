// bindings.cpp — the Python module kd_kernels._C: exports only. No torch headers: tensors arrive as raw data
// pointers (Python ints) from the launchers in kd_kernels/_backends/, which validate shapes, dtypes and devices.
//
// dtype codes: 0 float32, 1 bfloat16, 2 float16 (kd::DType); divergence codes: kd::Divergence. coef, coef2 and
// interpolation: kd::RowArgs (kd_args.h).
// std::invalid_argument raised by the checks in csrc/cpu/kd_cpu_dispatch.cpp becomes a Python ValueError.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "kd_cpu.h"
#include "kd_kernels/kd_args.h"
#include "kd_sparse.h"

#ifdef KD_KERNELS_WITH_CUDA
#include "kd_kernels/kd_cuda_api.h"
#endif

namespace py = pybind11;

#ifndef KD_KERNELS_CUDA_ARCHS
#define KD_KERNELS_CUDA_ARCHS ""
#endif
#ifndef KD_KERNELS_CUDA_VERSION
#define KD_KERNELS_CUDA_VERSION ""
#endif
#ifndef KD_KERNELS_BUILD_TYPE
#define KD_KERNELS_BUILD_TYPE ""
#endif

namespace {

kd::RowArgs make_args(std::uintptr_t s, std::uintptr_t t, std::uintptr_t grad, std::uintptr_t row_weight,
                      std::uintptr_t loss, int64_t n_rows, int64_t vocab, int64_t stride_s, int64_t stride_t,
                      int64_t stride_g, int s_dtype, int t_dtype, int divergence, double coef,
                      double coef2, double interpolation, double temperature) {
  kd::RowArgs a;
  a.s = reinterpret_cast<const void*>(s);
  a.t = reinterpret_cast<const void*>(t);
  a.grad = reinterpret_cast<void*>(grad);
  a.row_weight = reinterpret_cast<const float*>(row_weight);
  a.loss = reinterpret_cast<float*>(loss);
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.stride_s = stride_s;
  a.stride_t = stride_t;
  a.stride_g = stride_g;
  a.s_dtype = s_dtype;
  a.t_dtype = t_dtype;
  a.divergence = divergence;
  a.coef = coef;
  a.coef2 = coef2;
  a.interpolation = interpolation;
  a.temperature = temperature;
  return a;
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict d;
  d["cpu"] = true;
#ifdef KD_KERNELS_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = std::string(KD_KERNELS_CUDA_ARCHS);
  d["cuda_version"] = std::string(KD_KERNELS_CUDA_VERSION);
  d["compiler"] = compiler_name();
  d["openmp"] = kd::cpu::has_openmp();
  d["openmp_version"] = kd::cpu::openmp_version();
  py::list targets;
  std::string all = kd::cpu::compiled_isas();
  size_t start = 0;
  while (start <= all.size()) {
    size_t comma = all.find(',', start);
    if (comma == std::string::npos) comma = all.size();
    if (comma > start) targets.append(all.substr(start, comma - start));
    start = comma + 1;
  }
  d["cpu_targets"] = targets;
  d["cpu_isa"] = std::string(kd::cpu::active_isa());
  d["build_type"] = std::string(KD_KERNELS_BUILD_TYPE);
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                  "." + std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kd_kernels compiled kernels (framework-free; pointers are passed as integers)";

  m.def("build_info", &build_info, "How this extension was built: cpu, cuda, cuda_archs, compiler, openmp, ...");

  m.def(
      "cpu_loss_grad",
      [](std::uintptr_t s, std::uintptr_t t, std::uintptr_t grad, std::uintptr_t row_weight,
         std::uintptr_t loss, int64_t n_rows, int64_t vocab, int64_t stride_s, int64_t stride_t,
         int64_t stride_g, int s_dtype, int t_dtype, int divergence, double coef, double coef2,
         double interpolation, double temperature, int num_threads) {
        const kd::RowArgs a = make_args(s, t, grad, row_weight, loss, n_rows, vocab, stride_s, stride_t,
                                        stride_g, s_dtype, t_dtype, divergence, coef, coef2,
                                        interpolation, temperature);
        py::gil_scoped_release nogil;
        kd::cpu::loss_grad(a, num_threads);
      },
      py::arg("s"), py::arg("t"), py::arg("grad"), py::arg("row_weight"), py::arg("loss"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("stride_s"), py::arg("stride_t"), py::arg("stride_g"), py::arg("s_dtype"),
      py::arg("t_dtype"), py::arg("divergence"), py::arg("coef"), py::arg("coef2"), py::arg("interpolation"),
      py::arg("temperature"),
      py::arg("num_threads"),
      "Fused per-row loss + gradient on host memory (kd::RowArgs). grad = 0: loss only; grad may equal s.");

  m.def(
      "cpu_sparse_loss_grad",
      [](std::uintptr_t s, std::uintptr_t ids, std::uintptr_t logprobs, std::uintptr_t grad,
         std::uintptr_t row_weight, std::uintptr_t loss, int64_t n_rows, int64_t vocab, int64_t k,
         int64_t stride_s, int64_t stride_g, int s_dtype, int divergence, int tail, double coef,
         double coef2, double temperature, double tail_floor, int num_threads) {
        kd::cpu::SparseArgs a;
        a.s = reinterpret_cast<const void*>(s);
        a.ids = reinterpret_cast<const int64_t*>(ids);
        a.logprobs = reinterpret_cast<const float*>(logprobs);
        a.grad = reinterpret_cast<void*>(grad);
        a.row_weight = reinterpret_cast<const float*>(row_weight);
        a.loss = reinterpret_cast<float*>(loss);
        a.n_rows = n_rows;
        a.vocab = vocab;
        a.k = k;
        a.stride_s = stride_s;
        a.stride_g = stride_g;
        a.s_dtype = s_dtype;
        a.divergence = divergence;
        a.tail = tail;
        a.coef = coef;
        a.coef2 = coef2;
        a.temperature = temperature;
        a.tail_floor = tail_floor;
        py::gil_scoped_release nogil;
        kd::cpu::sparse_loss_grad(a, num_threads);
      },
      py::arg("s"), py::arg("ids"), py::arg("logprobs"), py::arg("grad"), py::arg("row_weight"),
      py::arg("loss"), py::arg("n_rows"), py::arg("vocab"), py::arg("k"), py::arg("stride_s"),
      py::arg("stride_g"), py::arg("s_dtype"), py::arg("divergence"), py::arg("tail"), py::arg("coef"),
      py::arg("coef2"), py::arg("temperature"), py::arg("tail_floor"), py::arg("num_threads"),
      "Sparse-teacher loss + gradient on host memory (kd::cpu::SparseArgs, csrc/cpu/kd_sparse.h).");

  m.def(
      "cpu_vp_rows",
      [](int mode, std::uintptr_t s, std::uintptr_t t, std::uintptr_t stats, std::uintptr_t out,
         std::uintptr_t grad, std::uintptr_t row_weight, int64_t n_rows, int64_t vocab, int64_t stride_s,
         int64_t stride_t, int64_t stride_g, int s_dtype, int t_dtype, int divergence, double coef, double coef2,
         double temperature, int num_threads) {
        kd::cpu::VpArgs a;
        a.mode = mode;
        a.s = reinterpret_cast<const void*>(s);
        a.t = reinterpret_cast<const void*>(t);
        a.stats = reinterpret_cast<const float*>(stats);
        a.out = reinterpret_cast<float*>(out);
        a.grad = reinterpret_cast<void*>(grad);
        a.row_weight = reinterpret_cast<const float*>(row_weight);
        a.n_rows = n_rows;
        a.vocab = vocab;
        a.stride_s = stride_s;
        a.stride_t = stride_t;
        a.stride_g = stride_g;
        a.s_dtype = s_dtype;
        a.t_dtype = t_dtype;
        a.divergence = divergence;
        a.coef = coef;
        a.coef2 = coef2;
        a.temperature = temperature;
        py::gil_scoped_release nogil;
        kd::cpu::vp_rows(a, num_threads);
      },
      py::arg("mode"), py::arg("s"), py::arg("t"), py::arg("stats"), py::arg("out"), py::arg("grad"),
      py::arg("row_weight"), py::arg("n_rows"), py::arg("vocab"), py::arg("stride_s"), py::arg("stride_t"),
      py::arg("stride_g"), py::arg("s_dtype"), py::arg("t_dtype"), py::arg("divergence"), py::arg("coef"),
      py::arg("coef2"), py::arg("temperature"), py::arg("num_threads"),
      "Vocabulary-parallel shard passes on host memory (kd::cpu::VpArgs, csrc/cpu/kd_cpu.h): 0 local "
      "statistics, 1 row sums, 2 gradient given the global statistics.");

  m.def(
      "_set_cpu_isa", [](const std::string& name) { kd::cpu::set_isa(name.c_str()); }, py::arg("name"),
      "Force one compiled x86-64 level ('auto' = the best this CPU runs); for tests and benchmarks.");
  m.def("_cpu_isa", []() { return std::string(kd::cpu::active_isa()); }, "The level cpu_loss_grad runs now.");

#ifdef KD_KERNELS_WITH_CUDA
  m.def(
      "cuda_loss_grad",
      [](std::uintptr_t s, std::uintptr_t t, std::uintptr_t grad, std::uintptr_t row_weight,
         std::uintptr_t loss, int64_t n_rows, int64_t vocab, int64_t stride_s, int64_t stride_t,
         int64_t stride_g, int s_dtype, int t_dtype, int divergence, double coef, double coef2,
         double interpolation, double temperature, std::uintptr_t stream) {
        const kd::RowArgs a = make_args(s, t, grad, row_weight, loss, n_rows, vocab, stride_s, stride_t,
                                        stride_g, s_dtype, t_dtype, divergence, coef, coef2,
                                        interpolation, temperature);
        char err[512] = {0};
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = kd::cuda_loss_grad(a, reinterpret_cast<void*>(stream), err, static_cast<int>(sizeof(err)));
        }
        if (rc != 0) {
          throw std::runtime_error("kd_kernels CUDA kernel failed (error " + std::to_string(rc) +
                                   "): " + std::string(err));
        }
      },
      py::arg("s"), py::arg("t"), py::arg("grad"), py::arg("row_weight"), py::arg("loss"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("stride_s"), py::arg("stride_t"), py::arg("stride_g"), py::arg("s_dtype"),
      py::arg("t_dtype"), py::arg("divergence"), py::arg("coef"), py::arg("coef2"), py::arg("interpolation"),
      py::arg("temperature"), py::arg("stream"),
      "Fused per-row loss + gradient on device memory, enqueued on `stream` (a cudaStream_t as int).");
#endif
}
