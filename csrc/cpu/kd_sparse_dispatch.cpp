// kd_sparse_dispatch.cpp — argument checks of the sparse-teacher CPU kernel and the choice of its compiled
// level: the one kd::cpu::active_isa() reports (so KD_KERNELS_CPU_ISA and _set_cpu_isa apply to it too).

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kd_cpu.h"
#include "kd_kernels/kd_math.h"
#include "kd_sparse.h"

namespace kd {
namespace cpu {
namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace

void sparse_loss_grad(const SparseArgs& a, int num_threads) {
  require(a.n_rows >= 0, "n_rows must be >= 0, got " + std::to_string(a.n_rows));
  if (a.n_rows == 0) return;
  require(a.vocab > 0, "vocab must be > 0, got " + std::to_string(a.vocab));
  require(a.k > 0, "k must be > 0, got " + std::to_string(a.k));
  require(a.s != nullptr && a.ids != nullptr && a.logprobs != nullptr,
          "s, ids and logprobs must be non-null data pointers");
  require(a.row_weight != nullptr && a.loss != nullptr, "row_weight and loss must be non-null pointers");
  require(a.stride_s >= a.vocab, "stride_s must be >= vocab, got " + std::to_string(a.stride_s));
  require(a.grad == nullptr || a.stride_g >= a.vocab,
          "stride_g must be >= vocab, got " + std::to_string(a.stride_g));
  require(a.s_dtype >= F32 && a.s_dtype <= F16,
          "s_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(a.s_dtype));
  require(a.divergence >= FORWARD_KL && a.divergence <= RENYI,
          "divergence must be 0..8, got " + std::to_string(a.divergence));
  require(a.tail >= TAIL_BUCKET && a.tail <= TAIL_IGNORE,
          "tail must be 0 (bucket), 1 (renormalize) or 2 (ignore), got " + std::to_string(a.tail));
  require(a.tail != TAIL_IGNORE || a.divergence == FORWARD_KL, "tail=ignore needs divergence forward_kl");
  require(std::isfinite(a.temperature) && a.temperature > 0,
          "temperature must be a finite number > 0, got " + std::to_string(a.temperature));
  require(a.tail_floor > 0 && a.tail_floor < 1, "tail_floor must lie in (0, 1)");
  if (a.divergence == SKEW_FORWARD_KL || a.divergence == SKEW_REVERSE_KL || a.divergence == JSD) {
    require(a.coef > 0 && a.coef < 1, "coef (alpha / beta) must lie in (0, 1), got " + std::to_string(a.coef));
  } else if (a.divergence == ALPHA_BETA) {
    require(a.coef > 0 && a.coef2 > 0, "alpha_beta needs coef (alpha) > 0 and coef2 (beta) > 0");
  } else if (a.divergence == RENYI) {
    require(a.coef > 0 && a.coef != 1, "renyi needs coef (alpha) > 0 and != 1, got " + std::to_string(a.coef));
  }
  if (a.grad != nullptr && a.grad != a.s) {
    advise_huge_pages(a.grad, ((a.n_rows - 1) * a.stride_g + a.vocab) * (a.s_dtype == F32 ? 4 : 2));
  }
  const char* isa = active_isa();
#ifdef KD_CPU_HAVE_V4
  if (std::strcmp(isa, "x86-64-v4") == 0) return x86_64_v4::sparse_loss_grad(a, num_threads);
#endif
#ifdef KD_CPU_HAVE_V3
  if (std::strcmp(isa, "x86-64-v3") == 0) return x86_64_v3::sparse_loss_grad(a, num_threads);
#endif
  (void)isa;
  generic::sparse_loss_grad(a, num_threads);
}

}  // namespace cpu
}  // namespace kd
