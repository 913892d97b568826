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

// Everything a row function calls (kd_math.h included) is inlined into it: GCC otherwise keeps kd_exp as an
// out-of-line scalar call inside the simd loops, which measured ~10x slower.
#if defined(__GNUC__)
#define KD_FLATTEN __attribute__((flatten))
#else
#define KD_FLATTEN
#endif

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

// Maxima of a block (−inf for an empty or all −inf block). With GCC / clang vector types: as an
// `omp simd reduction(max)` loop, or as plain independent lanes, GCC left it scalar once inlined into the row
// functions (it measured ~5% of a skew row).
#if defined(__GNUC__)
typedef float v8f __attribute__((vector_size(32)));
inline void block_max2(const float* __restrict a, const float* __restrict b, int64_t n, float* ma,
                       float* mb) {
  v8f xa, xb;
  for (int k = 0; k < 8; ++k) xa[k] = xb[k] = -kInf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f va, vb;
    memcpy(&va, a + j, sizeof(va));
    memcpy(&vb, b + j, sizeof(vb));
    xa = va > xa ? va : xa;
    xb = vb > xb ? vb : xb;
  }
  float ra = -kInf, rb = -kInf;
  for (int k = 0; k < 8; ++k) {
    ra = xa[k] > ra ? xa[k] : ra;
    rb = xb[k] > rb ? xb[k] : rb;
  }
  for (; j < n; ++j) {
    ra = a[j] > ra ? a[j] : ra;
    rb = b[j] > rb ? b[j] : rb;
  }
  *ma = ra;
  *mb = rb;
}
#else
inline void block_max2(const float* a, const float* b, int64_t n, float* ma, float* mb) {
  float ra = -kInf, rb = -kInf;
  for (int64_t j = 0; j < n; ++j) {
    ra = a[j] > ra ? a[j] : ra;
    rb = b[j] > rb ? b[j] : rb;
  }
  *ma = ra;
  *mb = rb;
}
#endif

// The base the block's exponentials are taken against: its max, or 0 for an all −inf block, so that
// e^(x − base) is exactly 0 there instead of e^(−inf − (−inf)) = e^NaN.
inline float exp_base(float m) { return m == -kInf ? 0.f : m; }

// Per-thread row cache (see the layout in `run`): e^(s̃_j − m_s(block)) and e^(t̃_j − m_t(block)) kept from
// the first pass, with each block's maxima, so later passes get q_j = es_j · e^(m_s(block) − LSE_s) with one
// multiply instead of an exp. es_j underflows to 0 only where q_j < e^−87 as well (LSE_s ≥ m_s(block)).
struct RowCache {
  float* es;  // (V,)
  float* et;  // (V,)
  float* ms;  // (number of blocks,)
  float* mt;  // (number of blocks,)
};

// ---------------------------------------------------------------------------------------------------------
// forward_kl / reverse_kl: one streaming pass + one gradient pass.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
KD_FLATTEN float kl_row(const void* s,  // (V,) student logits of this row, dtype SDT
                        const void* t,  // (V,) teacher logits, dtype TDT
                        void* g,        // (V,) gradient, dtype SDT, or nullptr (loss only); may equal s
                        RowCache cache,  // used only when g != nullptr
                        float gscale,    // row_weight / T
                        int64_t V, float inv_t) {
  constexpr bool kFwd = DIV == FORWARD_KL;
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];
  KLState st = kl_empty();
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
    KLState bs;
    block_max2(sb, tb, n, &bs.s.m, &bs.t.m);
    const float ms = exp_base(bs.s.m), mt = exp_base(bs.t.m);
    float zs = 0.f, zt = 0.f, x = 0.f;
    if (g != nullptr) {
      float* __restrict es = cache.es + j0;
      float* __restrict et = cache.et + j0;
      cache.ms[b] = bs.s.m;
      cache.mt[b] = bs.t.m;
#pragma omp simd reduction(+ : zs, zt, x)
      for (int64_t j = 0; j < n; ++j) {
        const float ws = kd_exp(sb[j] - ms), wt = kd_exp(tb[j] - mt);
        zs += ws;
        zt += wt;
        x += kFwd ? kl_term(tb[j], mt, sb[j]) : kl_term(sb[j], ms, tb[j]);  // its exp is ws / wt
        es[j] = ws;
        if (kFwd) et[j] = wt;
      }
    } else {
#pragma omp simd reduction(+ : zs, zt, x)
      for (int64_t j = 0; j < n; ++j) {
        zs += kd_exp(sb[j] - ms);
        zt += kd_exp(tb[j] - mt);
        x += kFwd ? kl_term(tb[j], mt, sb[j]) : kl_term(sb[j], ms, tb[j]);
      }
    }
    bs.s.z = zs;
    bs.t.z = zt;
    bs.x = x;
    st = kl_merge<DIV>(st, bs);
  }
  const float loss = kl_finish<DIV>(st);
  if (g == nullptr) return loss;

  // Pass 2: q_j = es_j · e^(m_s(block) − LSE_s), p_j likewise; the gradient by kl_grad_qp.
  const float lse_s = lse_value(st.s), lse_t = lse_value(st.t);
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    const float fs = rescale(cache.ms[b], lse_s), ft = rescale(cache.mt[b], lse_t);
    const float* __restrict es = cache.es + j0;
    const float* __restrict et = cache.et + j0;
    if (kFwd) {  // q − p: s and t are not read again
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float gj = kl_grad_qp<DIV>(es[j] * fs, et[j] * ft, 0.f, 0.f, lse_s, lse_t, loss);
        store_from_float<SDT>(g, j0 + j, gscale * gj);
      }
    } else {  // q (s̃ − t̃ − (LSE_s − LSE_t) − L): s̃, t̃ again. The block is read before any of it is
              // written, so g == s (in place) is safe.
      load_block<SDT>(s, j0, n, inv_t, sb);
      load_block<TDT>(t, j0, n, inv_t, tb);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float gj = kl_grad_qp<DIV>(es[j] * fs, 0.f, sb[j], tb[j], lse_s, lse_t, loss);
        store_from_float<SDT>(g, j0 + j, gscale * gj);
      }
    }
  }
  return loss;
}

// ---------------------------------------------------------------------------------------------------------
// skew_forward_kl / skew_reverse_kl / jsd: LSE pass, loss + centering pass, gradient pass.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
KD_FLATTEN float skew_row(const void* s,    // (V,) student logits, dtype SDT
                          const void* t,    // (V,) teacher logits, dtype TDT
                          void* g,          // (V,) gradient, dtype SDT, or nullptr; may equal s
                          RowCache cache,   // always used
                          float gscale,     // row_weight / T
                          int64_t V, float inv_t, MixCoef c) {
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];

  // Pass 1: LSE_s, LSE_t, caching the exponentials.
  LSEState ls = lse_empty(), lt = lse_empty();
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
    LSEState bs, bt;
    block_max2(sb, tb, n, &bs.m, &bt.m);
    cache.ms[b] = bs.m;
    cache.mt[b] = bt.m;
    const float ms = exp_base(bs.m), mt = exp_base(bt.m);
    float* __restrict es = cache.es + j0;
    float* __restrict et = cache.et + j0;
    float zs = 0.f, zt = 0.f;
#pragma omp simd reduction(+ : zs, zt)
    for (int64_t j = 0; j < n; ++j) {
      const float ws = kd_exp(sb[j] - ms), wt = kd_exp(tb[j] - mt);
      zs += ws;
      zt += wt;
      es[j] = ws;
      et[j] = wt;
    }
    bs.z = zs;
    bt.z = zt;
    ls = lse_merge(ls, bs);
    lt = lse_merge(lt, bt);
  }
  const float lse_s = lse_value(ls), lse_t = lse_value(lt);

  // Pass 2: L = Σ loss terms, S = Σ q v; q and v overwrite the cache (es, et) for pass 3.
  double loss = 0.0, S = 0.0;
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    const float fs = rescale(cache.ms[b], lse_s), ft = rescale(cache.mt[b], lse_t);
    load_block<SDT>(s, j0, n, inv_t, sb);
    load_block<TDT>(t, j0, n, inv_t, tb);
    float* __restrict es = cache.es + j0;
    float* __restrict et = cache.et + j0;
    float bl = 0.f, bS = 0.f;
    if (g != nullptr) {
#pragma omp simd reduction(+ : bl, bS)
      for (int64_t j = 0; j < n; ++j) {
        const SkewTerms e = skew_terms_qp<DIV>(sb[j] - lse_s, tb[j] - lse_t, es[j] * fs, et[j] * ft, c);
        bl += e.loss;
        bS += e.q * e.v;
        es[j] = e.q;
        et[j] = e.v;
      }
    } else {
#pragma omp simd reduction(+ : bl)
      for (int64_t j = 0; j < n; ++j) {
        bl += skew_terms_qp<DIV>(sb[j] - lse_s, tb[j] - lse_t, es[j] * fs, et[j] * ft, c).loss;
      }
    }
    loss += bl;
    S += bS;
  }
  if (g == nullptr) return static_cast<float>(loss);

  // Pass 3: ∂L/∂s̃_j = k q_j (v_j − S), from the cache only (s is not read again, so g == s is safe).
  // No `omp simd` here: GCC privatizes the SkewTerms temporary per SIMD lane and then gives up; the plain
  // loop over __restrict rows is auto-vectorized.
  const float Sf = static_cast<float>(S);
  const float* __restrict qr = cache.es;
  const float* __restrict vr = cache.et;
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

  // Per-thread RowCache: es (V) | et (V) | ms (blocks) | mt (blocks), rounded up to a cache line.
  // Allocated before the parallel region, because an exception must not escape an OpenMP region.
  const int64_t nblk = (V + kBlock - 1) / kBlock;
  const int64_t per_thread = ((2 * V + 2 * nblk) + 15) / 16 * 16;
  std::vector<float> scratch(kSkew || want_grad ? static_cast<size_t>(nt * per_thread) : 0);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    RowCache cache{nullptr, nullptr, nullptr, nullptr};
    if (!scratch.empty()) {
      float* base = scratch.data() + omp_get_thread_num() * per_thread;
      cache = {base, base + V, base + 2 * V, base + 2 * V + nblk};
    }
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
        a.loss[i] = skew_row<DIV, SDT, TDT>(s, t, g, cache, gscale, V, inv_t, c);
      } else {
        a.loss[i] = kl_row<DIV, SDT, TDT>(s, t, g, cache, gscale, V, inv_t);
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
