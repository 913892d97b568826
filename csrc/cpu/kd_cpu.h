// kd_cpu.h — the CPU side of the extension: fused loss + gradient row kernels, one build per x86-64 level.
//
// csrc/cpu/kd_cpu_kernels.cpp is compiled once per instruction-set level (CMake sets KD_CPU_ISA to the
// namespace name and -march to the level), so the header's inline math (kd_math.h) is compiled and
// vectorized for each level; csrc/cpu/kd_cpu_dispatch.cpp picks one at run time from the CPU's features.
// Why separate builds rather than GCC target_clones: the default clone (plain x86-64, no FMA) would turn
// every fmaf of kd_exp / kd_log into a scalar libm call, and runtime selection lets the tests run every
// level this machine can execute (kd_kernels._C._set_cpu_isa).
#pragma once

#include <stdint.h>

#include "kd_kernels/kd_args.h"
#include "kd_kernels/kd_math.h"

namespace kd {
namespace cpu {

// The vocabulary-parallel shard passes (kd_kernels/_backends/_vocab_parallel.py documents the protocol and
// the column layouts; kd_kernels.parallel does the exchanges between them). Each row of s, t is one rank's
// shard of the vocabulary.
//   VP_STATS: out (N, K) = the shard's local statistics [m_s, Z_s, m_t, Z_t, then A (forward_kl), B
//             (reverse_kl) or m_u, Z_u (renyi)]; K = 5, 5, 6, else 4.
//   VP_SUMS:  out (N, 2) = [Σ loss terms, A = Σ a_v] over the shard given the global statistics `stats`
//             (skew_*, jsd, tvd, jeffreys, alpha_beta only).
//   VP_GRAD:  grad row i = row_weight[i] / T · ∂L_i/∂s̃ on the shard given the global statistics (L and A / C
//             already in them); rows with row_weight 0 are not read and get a zero row; grad may alias s.
enum VpMode : int { VP_STATS = 0, VP_SUMS = 1, VP_GRAD = 2 };
// Columns of the global statistics (the same as _vocab_parallel.py's LSE_S, ...).
enum VpColumn : int { VP_LSE_S, VP_LSE_T, VP_LOSS, VP_CENTER, VP_MAX_S, VP_LOGZ_S, VP_MAX_T, VP_LOGZ_T, VP_MAX_U };
constexpr int kVpGlobal = 9;

struct VpArgs {
  int mode;                 // VpMode
  const void* s;            // (N, V) student shard logits, dtype s_dtype, row stride stride_s, unit column stride
  const void* t;            // (N, V) teacher shard logits, dtype t_dtype (= s_dtype, or float32), row stride stride_t
  const float* stats;       // (N, kVpGlobal) global statistics, contiguous (VP_SUMS, VP_GRAD)
  float* out;               // (N, K) or (N, 2) fp32, contiguous (VP_STATS, VP_SUMS)
  void* grad;               // (N, V) dtype s_dtype, row stride stride_g (VP_GRAD)
  const float* row_weight;  // (N,) fp32 (VP_GRAD)
  int64_t n_rows;
  int64_t vocab;
  int64_t stride_s;
  int64_t stride_t;
  int64_t stride_g;
  int s_dtype;
  int t_dtype;
  int divergence;
  double coef;
  double coef2;
  double temperature;
};

// The number of local statistics VP_STATS writes per row for a divergence.
inline int vp_local_stats(int divergence) {
  return divergence == RENYI ? 6 : (divergence == FORWARD_KL || divergence == REVERSE_KL ? 5 : 4);
}

// One entry point per compiled level. Arguments are already checked (kd_cpu_dispatch.cpp).
// num_threads > 0: OpenMP team size; the kernel uses fewer for small problems.
namespace generic {
void loss_grad(const RowArgs& args, int num_threads);
void vp_rows(const VpArgs& args, int num_threads);
}
namespace x86_64_v3 {
void loss_grad(const RowArgs& args, int num_threads);
void vp_rows(const VpArgs& args, int num_threads);
}
namespace x86_64_v4 {
void loss_grad(const RowArgs& args, int num_threads);
void vp_rows(const VpArgs& args, int num_threads);
}

// Checks `args` (throws std::invalid_argument naming the field) and runs the best compiled level.
// num_threads <= 0 means the OpenMP default.
void loss_grad(const RowArgs& args, int num_threads);
void vp_rows(const VpArgs& args, int num_threads);  // same, for the vocabulary-parallel passes

// Names of the levels compiled in (e.g. "x86-64,x86-64-v3,x86-64-v4"), the one loss_grad runs now,
// and a way to force one ("auto" = best the CPU supports). set_isa throws std::invalid_argument for a
// name that is not compiled in or that this CPU cannot run.
// Asks the OS for transparent huge pages on the 2 MiB-aligned interior of a buffer about to be written for the
// first time (no-op below 8 MiB, off Linux, or where THP is disabled). Only a hint: contents are unaffected.
void advise_huge_pages(void* p, int64_t bytes);
const char* compiled_isas();
const char* active_isa();
void set_isa(const char* name);

bool has_openmp();
int openmp_version();

}  // namespace cpu
}  // namespace kd
