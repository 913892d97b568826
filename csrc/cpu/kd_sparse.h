// kd_sparse.h — sparse-teacher KD on the CPU: the teacher is K ids and their log-probs per row.
//
// Math: docs/MATH.md, "Sparse teachers"; the launcher is kd_kernels/_sparse_impl.py (same
// contract as its torch backend). csrc/cpu/kd_sparse_kernels.cpp is compiled once per x86-64 level like
// kd_cpu_kernels.cpp; kd_sparse_dispatch.cpp checks the arguments and runs the level kd::cpu::active_isa()
// names, so _set_cpu_isa switches both kernels.
#pragma once

#include <stdint.h>

namespace kd {
namespace cpu {

// Tail conventions, numbered as kd_kernels/_sparse_impl.py (Tail) numbers them.
enum SparseTail : int { TAIL_BUCKET = 0, TAIL_RENORMALIZE = 1, TAIL_IGNORE = 2 };

struct SparseArgs {
  const void* s;            // (N, V) student logits, dtype s_dtype, row stride stride_s, unit column stride
  const int64_t* ids;       // (N, K) teacher ids, contiguous; an entry with logprob −inf is padding (id unread)
  const float* logprobs;    // (N, K) teacher log-probs, fp32, contiguous
  void* grad;               // (N, V) gradient, dtype s_dtype, row stride stride_g; nullptr = loss only; may be s
  const float* row_weight;  // (N,) fp32 row factors; 0 = row skipped (not read, loss 0, gradient row 0)
  float* loss;              // (N,) fp32 per-token divergence, written (unweighted)
  int64_t n_rows;
  int64_t vocab;
  int64_t k;
  int64_t stride_s;
  int64_t stride_g;
  int s_dtype;        // kd::DType
  int divergence;     // kd::Divergence (0..8)
  int tail;           // SparseTail
  double coef;        // α (skew, alpha_beta, renyi) or β (jsd)
  double coef2;       // β (alpha_beta); unused otherwise
  double temperature; // divides the student logits only
  double tail_floor;  // the teacher's tail 1 − P is clamped to this (> 0)
};

namespace generic {
void sparse_loss_grad(const SparseArgs& args, int num_threads);
}
namespace x86_64_v3 {
void sparse_loss_grad(const SparseArgs& args, int num_threads);
}
namespace x86_64_v4 {
void sparse_loss_grad(const SparseArgs& args, int num_threads);
}

// Checks `args` (std::invalid_argument naming the field) and runs the active compiled level.
void sparse_loss_grad(const SparseArgs& args, int num_threads);

}  // namespace cpu
}  // namespace kd
