// cpu_limits.cpp — what this CPU can do at best for the work of the compiled CPU kernel (docs/BENCHMARKS.md,
// "CPU kernel: where the time goes"). Not part of the extension; built and run by benchmarks/cpu_profile.py:
//   g++ -std=c++17 -O3 -fno-math-errno -fno-trapping-math -fopenmp -march=x86-64-v4 -mprefer-vector-width=512 \
//       -I csrc/include benchmarks/cpu_limits.cpp -o /tmp/cpu_limits && /tmp/cpu_limits ROWS VOCAB THREADS
//
// Three loops over ROWS × VOCAB fp32 elements on THREADS OpenMP threads, each the floor of one resource:
//   exp  — kd_math.h's kd_exp on L1-resident data, summed (the polynomial exp alone: compute floor per exp)
//   log  — kd_math.h's kd_log likewise
//   mem  — g = s − t over the full (ROWS, VOCAB) arrays: one read of s and t and one write of g (the kernel's
//          least possible memory traffic; the write also costs a read-for-ownership)
// Each prints the median of 5 runs in ns per element (per element of the whole problem, all threads): wall
// time, and process CPU time summed over the threads (`*_cpu_ns`: what the work costs when the machine is
// shared and a thread gets only part of a core).
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <vector>

#include "kd_kernels/kd_math.h"

using namespace kd;

namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of inputs per thread: L1-resident

struct Times {
  double wall_ns;
  double cpu_ns;
};

template <class F>
Times median_ns_per_elem(int64_t total, F body) {
  std::vector<double> ts, cs;
  for (int rep = 0; rep < 6; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    body();
    const std::clock_t c1 = std::clock();
    const auto t1 = std::chrono::steady_clock::now();
    if (rep > 0) {
      ts.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / total);
      cs.push_back(1e9 * static_cast<double>(c1 - c0) / CLOCKS_PER_SEC / total);
    }
  }
  std::sort(ts.begin(), ts.end());
  std::sort(cs.begin(), cs.end());
  return {ts[ts.size() / 2], cs[cs.size() / 2]};
}

float g_sink = 0.f;

__attribute__((flatten)) float exp_chunk(const float* __restrict x, int64_t reps) {
  float acc = 0.f;
  for (int64_t r = 0; r < reps; ++r) {
    const float shift = -1e-3f * static_cast<float>(r & 7);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < kChunk; ++j) acc += kd_exp(x[j] + shift);
  }
  return acc;
}

__attribute__((flatten)) float log_chunk(const float* __restrict x, int64_t reps) {
  float acc = 0.f;
  for (int64_t r = 0; r < reps; ++r) {
    const float shift = 1e-3f * static_cast<float>(r & 7);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < kChunk; ++j) acc += kd_log(x[j] + shift);
  }
  return acc;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? atoll(argv[1]) : 1024;
  const int64_t vocab = argc > 2 ? atoll(argv[2]) : 32000;
  const int threads = argc > 3 ? atoi(argv[3]) : 2;
  const int64_t total = rows * vocab;
  omp_set_num_threads(threads);

  const int64_t reps = total / (kChunk * threads);
  Times t_exp = median_ns_per_elem(total, [&] {
#pragma omp parallel reduction(+ : g_sink)
    {
      alignas(64) float x[kChunk];
      for (int64_t j = 0; j < kChunk; ++j) x[j] = -0.01f * static_cast<float>(j % 1000);
      g_sink += exp_chunk(x, reps);
    }
  });
  Times t_log = median_ns_per_elem(total, [&] {
#pragma omp parallel reduction(+ : g_sink)
    {
      alignas(64) float x[kChunk];
      for (int64_t j = 0; j < kChunk; ++j) x[j] = 1.f + 0.001f * static_cast<float>(j);
      g_sink += log_chunk(x, reps);
    }
  });

  std::vector<float> s(total), t(total), g(total);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total; ++i) {
    s[i] = 1e-3f * static_cast<float>(i % 977);
    t[i] = 2e-3f * static_cast<float>(i % 991);
    g[i] = 0.f;
  }
  const float* __restrict sp = s.data();
  const float* __restrict tp = t.data();
  float* __restrict gp = g.data();
  Times t_mem = median_ns_per_elem(total, [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < total; ++i) gp[i] = sp[i] - tp[i];
  });
  printf("{\"rows\": %lld, \"vocab\": %lld, \"threads\": %d, \"exp_ns\": %.4f, \"log_ns\": %.4f, "
         "\"mem_ns\": %.4f, \"mem_GBps\": %.2f, \"exp_cpu_ns\": %.4f, \"log_cpu_ns\": %.4f, "
         "\"mem_cpu_ns\": %.4f, \"sink\": %g}\n",
         static_cast<long long>(rows), static_cast<long long>(vocab), threads, t_exp.wall_ns, t_log.wall_ns,
         t_mem.wall_ns, 12.0 / t_mem.wall_ns, t_exp.cpu_ns, t_log.cpu_ns, t_mem.cpu_ns,
         static_cast<double>(g_sink) * 0.0);
  return 0;
}
