// kd_args.h — the framework-free call interface of the fused row kernels (CPU and CUDA alike).
//
// Python validates everything and passes raw pointers; these structs carry them to the kernels.
// Contract (same as kd_kernels/_backends/__init__.py, Backend.loss_grad):
//   row i is skipped (not read; loss 0; gradient row 0) when row_weight[i] == 0;
//   grad row i = row_weight[i] / T · ∂L_i/∂s̃_i, in the student's dtype; grad may alias s (in place);
//   loss[i] = L_i, unweighted, fp32.
#pragma once

#include <stdint.h>

namespace kd {

struct RowArgs {
  const void* s;            // (N, V) student logits, dtype s_dtype, row stride stride_s, unit column stride
  const void* t;            // (N, V) teacher logits, dtype t_dtype, row stride stride_t
  void* grad;               // (N, V) gradient, dtype s_dtype, row stride stride_g; nullptr = loss only
  const float* row_weight;  // (N,) fp32 row factors c_i
  float* loss;              // (N,) fp32 per-token divergence, written
  int64_t n_rows;
  int64_t vocab;
  int64_t stride_s;
  int64_t stride_t;
  int64_t stride_g;
  int s_dtype;     // kd::DType
  int t_dtype;     // kd::DType
  int divergence;  // kd::Divergence
  double coef;     // α (skew_*, alpha_beta, renyi) or β (jsd); unused by forward_kl, reverse_kl, tvd, jeffreys
  double coef2;    // β of alpha_beta; unused otherwise
  double interpolation;  // TAID λ in (0, 1]: teacher logits λ t̃ + (1−λ) s̃ (1 = plain teacher)
  double temperature;
};

}  // namespace kd
