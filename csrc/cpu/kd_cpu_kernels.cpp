// kd_cpu_kernels.cpp — fused KD loss + student-logit gradient on the CPU, one row per OpenMP work item.
//
// Compiled once per x86-64 level with -DKD_CPU_ISA=<namespace> and the matching -march (see kd_cpu.h and
// CMakeLists.txt). Implements the Backend contract (kd_args.h / kd_kernels/_backends/__init__.py):
//   loss[i] = L_i (unweighted, fp32);  grad row i = row_weight[i] / T · ∂L_i/∂s̃_i in the student's dtype;
//   rows with row_weight[i] == 0 are not read (loss 0, gradient row zero-filled); grad may alias s.
//
// The math is shared/docs/MATH.md, through the helpers of kd_math.h (the same the CUDA kernels run):
//
// forward_kl / reverse_kl ("How many passes": one streaming pass + one gradient pass).
//   Pass 1 walks the row in blocks of kBlock entries held in L1 as fp32 s̃ = s/T, t̃ = t/T. Per block:
//   the block maxima (m_s, m_t), then vectorized sums Z_s = Σ e^(s̃−m_s), Z_t = Σ e^(t̃−m_t) and
//   X = Σ e^(t̃−m_t)(t̃−s̃) (forward) or Σ e^(s̃−m_s)(s̃−t̃) (reverse) — a KLState merged into the running
//   one with kl_merge (which rescales to the new maxima). kl_finish gives L, lse_value the two LSEs.
//   Pass 2 writes ∂L/∂s̃_j = q_j − p_j (forward) or q_j (ℓq_j − ℓp_j − L) (reverse) via kl_grad.
//   Traffic per row: 2 reads of s and t (the second mostly from L2: a 32k-entry fp32 row is 128 KiB),
//   1 write of the gradient.
//
// skew_forward_kl / skew_reverse_kl / jsd (three passes). Pass 1: LSE_s, LSE_t (block-wise LSEState).
//   Pass 2: skew_terms gives q_j, v_j and the loss term from ℓq_j, ℓp_j; L = Σ loss terms and the centering
//   sum S = Σ q_j v_j. With a gradient wanted, q_j and v_j go to a per-thread fp32 scratch row (2·V floats)
//   so that pass 3, ∂L/∂s̃_j = k q_j (v_j − S) (skew_grad), costs no exp or log: recomputing skew_terms
//   there would run its four exps and one log a second time.
//
// Within a block everything is fp32 (as on the GPU); block partials of L and S are added in double.
// Rows go to threads with schedule(dynamic) because skipped (masked) rows cost nothing.

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kd_cpu.h"
#include "kd_kernels/kd_math.h"

#ifdef _OPENMP
#include <omp.h>
#else  // a compiler without OpenMP (e.g. Apple clang): one thread, same code
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

#ifndef KD_CPU_ISA
#error "compile with -DKD_CPU_ISA=<generic|x86_64_v3|x86_64_v4> (CMakeLists.txt does)"
#endif

namespace kd {
namespace cpu {
namespace KD_CPU_ISA {
namespace {

// fp32 working block: 2 KiB per operand, so s̃ and t̃ of one block sit in L1 across the block's loops.
constexpr int64_t kBlock = 512;

// Problems smaller than this many logits run on one thread (a parallel region costs a few µs).
constexpr int64_t kMinParallelElems = 1 << 15;

template <int DT>
constexpr int64_t elem_size() {
  return DT == F32 ? 4 : 2;
}

template <int DT>
inline const void* row_ptr(const void* base, int64_t row, int64_t stride) {
  return static_cast<const char*>(base) + row * stride * elem_size<DT>();
}

template <int DT>
inline void* row_ptr(void* base, int64_t row, int64_t stride) {
  return static_cast<char*>(base) + row * stride * elem_size<DT>();
}

// out[j] = x[j0 + j] / T in fp32, j < n.
template <int DT>
inline void load_block(const void* row, int64_t j0, int64_t n, float inv_t, float* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = load_as_float<DT>(row, j0 + j) * inv_t;
}

// Maxima of a block (−inf for an empty or all −inf block).
inline void block_max2(const float* __restrict a, const float* __restrict b, int64_t n, float* ma,
                       float* mb) {
  float xa = -kInf, xb = -kInf;
#pragma omp simd reduction(max : xa, xb)
  for (int64_t j = 0; j < n; ++j) {
    xa = std::max(xa, a[j]);
    xb = std::max(xb, b[j]);
  }
  *ma = xa;
  *mb = xb;
}

// Σ e^(a_j − m) for a block whose max is m; 0 when m = −inf (then every a_j is −inf and a_j − m is NaN).
inline float block_expsum(const float* __restrict a, int64_t n, float m) {
  if (m == -kInf) return 0.f;
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) z += kd_exp(a[j] - m);
  return z;
}

// ---------------------------------------------------------------------------------------------------------
// forward_kl / reverse_kl: one streaming pass + one gradient pass.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
float kl_row(const void* s,  // (V,) student logits of this row, dtype SDT
             const void* t,  // (V,) teacher logits, dtype TDT
             void* g,        // (V,) gradient, dtype SDT, or nullptr; may equal s
             float gscale,   // row_weight / T
             int64_t V, float inv_t) {
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];
  KLState st = kl_empty();
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
    KLState b;
    block_max2(sb, tb, n, &b.s.m, &b.t.m);
    // The distribution weighting X (teacher for forward, student for reverse) and its block max.
    const float* wa = DIV == FORWARD_KL ? tb : sb;
    const float* wb = DIV == FORWARD_KL ? sb : tb;
    const float mw = DIV == FORWARD_KL ? b.t.m : b.s.m;
    const float mo = DIV == FORWARD_KL ? b.s.m : b.t.m;
    float zw = 0.f, x = 0.f;
    if (mw != -kInf) {
#pragma omp simd reduction(+ : zw, x)
      for (int64_t j = 0; j < n; ++j) {
        zw += kd_exp(wa[j] - mw);
        x += kl_term(wa[j], mw, wb[j]);
      }
    }
    const float zo = block_expsum(DIV == FORWARD_KL ? sb : tb, n, mo);
    b.s.z = DIV == FORWARD_KL ? zo : zw;
    b.t.z = DIV == FORWARD_KL ? zw : zo;
    b.x = x;
    st = kl_merge<DIV>(st, b);
  }
  const float loss = kl_finish<DIV>(st);
  if (g == nullptr) return loss;

  const float lse_s = lse_value(st.s), lse_t = lse_value(st.t);
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    // The whole block is read before any of it is written, so g == s (in place) is safe.
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      store_from_float<SDT>(g, j0 + j, gscale * kl_grad<DIV>(sb[j], tb[j], lse_s, lse_t, loss));
    }
  }
  return loss;
}

// ---------------------------------------------------------------------------------------------------------
// skew_forward_kl / skew_reverse_kl / jsd: LSE pass, loss + centering pass, gradient pass.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
float skew_row(const void* s,       // (V,) student logits, dtype SDT
               const void* t,       // (V,) teacher logits, dtype TDT
               void* g,             // (V,) gradient, dtype SDT, or nullptr; may equal s
               float* scratch,      // (2·V,) fp32 per-thread scratch (q then v); used only when g != nullptr
               float gscale,        // row_weight / T
               int64_t V, float inv_t, MixCoef c) {
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];

  // Pass 1: LSE_s, LSE_t.
  LSEState ls = lse_empty(), lt = lse_empty();
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
    LSEState bs, bt;
    block_max2(sb, tb, n, &bs.m, &bt.m);
    bs.z = block_expsum(sb, n, bs.m);
    bt.z = block_expsum(tb, n, bt.m);
    ls = lse_merge(ls, bs);
    lt = lse_merge(lt, bt);
  }
  const float lse_s = lse_value(ls), lse_t = lse_value(lt);

  // Pass 2: L = Σ loss terms, S = Σ q v; q and v kept for pass 3.
  float* qrow = scratch;
  float* vrow = scratch == nullptr ? nullptr : scratch + V;
  double loss = 0.0, S = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
    float bl = 0.f, bS = 0.f;
    if (g != nullptr) {
      float* __restrict qo = qrow + j0;
      float* __restrict vo = vrow + j0;
#pragma omp simd reduction(+ : bl, bS)
      for (int64_t j = 0; j < n; ++j) {
        const SkewTerms e = skew_terms<DIV>(sb[j] - lse_s, tb[j] - lse_t, c);
        bl += e.loss;
        bS += e.q * e.v;
        qo[j] = e.q;
        vo[j] = e.v;
      }
    } else {
#pragma omp simd reduction(+ : bl)
      for (int64_t j = 0; j < n; ++j) bl += skew_terms<DIV>(sb[j] - lse_s, tb[j] - lse_t, c).loss;
    }
    loss += bl;
    S += bS;
  }
  if (g == nullptr) return static_cast<float>(loss);

  // Pass 3: ∂L/∂s̃_j = k q_j (v_j − S), from the scratch row only (s is not read again, so g == s is safe).
  // No `omp simd` here: GCC privatizes the SkewTerms temporary per SIMD lane and then gives up; the plain
  // loop over __restrict rows is auto-vectorized.
  const float Sf = static_cast<float>(S);
  const float* __restrict qr = qrow;
  const float* __restrict vr = vrow;
  for (int64_t j = 0; j < V; ++j) {
    const SkewTerms e{qr[j], vr[j], 0.f};
    store_from_float<SDT>(g, j, gscale * skew_grad<DIV>(e, Sf, c));
  }
  return static_cast<float>(loss);
}

// ---------------------------------------------------------------------------------------------------------
// The row loop.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
void run(const RowArgs& a, int num_threads) {
  constexpr bool kSkew = DIV != FORWARD_KL && DIV != REVERSE_KL;
  const int64_t N = a.n_rows, V = a.vocab;
  const float inv_t = static_cast<float>(1.0 / a.temperature);
  const MixCoef c = make_mix_coef(kSkew ? a.coef : 0.5);
  const bool want_grad = a.grad != nullptr;

  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (N * V < kMinParallelElems) nt = 1;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
  // Enough rows per work item that scheduling costs nothing next to the row (≥ ~16k logits).
  const int chunk = static_cast<int>(std::max<int64_t>(1, (1 << 14) / V));

  // Allocated before the parallel region: an exception must not escape an OpenMP region.
  std::vector<float> scratch(kSkew && want_grad ? static_cast<size_t>(nt) * 2 * V : 0);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* my_scratch = scratch.empty() ? nullptr : scratch.data() + omp_get_thread_num() * 2 * V;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < N; ++i) {
      const float w = a.row_weight[i];
      void* g = want_grad ? row_ptr<SDT>(a.grad, i, a.stride_g) : nullptr;
      if (w == 0.f) {  // skipped row: not read
        a.loss[i] = 0.f;
        if (g != nullptr) memset(g, 0, static_cast<size_t>(V) * elem_size<SDT>());
        continue;
      }
      const void* s = row_ptr<SDT>(a.s, i, a.stride_s);
      const void* t = row_ptr<TDT>(a.t, i, a.stride_t);
      const float gscale = w * inv_t;
      if constexpr (kSkew) {
        a.loss[i] = skew_row<DIV, SDT, TDT>(s, t, g, my_scratch, gscale, V, inv_t, c);
      } else {
        a.loss[i] = kl_row<DIV, SDT, TDT>(s, t, g, gscale, V, inv_t);
      }
    }
  }
}

template <int DIV, int SDT>
void run_t(const RowArgs& a, int nt) {
  switch (a.t_dtype) {
    case F32: return run<DIV, SDT, F32>(a, nt);
    case BF16: return run<DIV, SDT, BF16>(a, nt);
    default: return run<DIV, SDT, F16>(a, nt);
  }
}

template <int DIV>
void run_s(const RowArgs& a, int nt) {
  switch (a.s_dtype) {
    case F32: return run_t<DIV, F32>(a, nt);
    case BF16: return run_t<DIV, BF16>(a, nt);
    default: return run_t<DIV, F16>(a, nt);
  }
}

}  // namespace

void loss_grad(const RowArgs& a, int num_threads) {
  switch (a.divergence) {
    case FORWARD_KL: return run_s<FORWARD_KL>(a, num_threads);
    case REVERSE_KL: return run_s<REVERSE_KL>(a, num_threads);
    case SKEW_FORWARD_KL: return run_s<SKEW_FORWARD_KL>(a, num_threads);
    case SKEW_REVERSE_KL: return run_s<SKEW_REVERSE_KL>(a, num_threads);
    default: return run_s<JSD>(a, num_threads);
  }
}

}  // namespace KD_CPU_ISA
}  // namespace cpu
}  // namespace kd
