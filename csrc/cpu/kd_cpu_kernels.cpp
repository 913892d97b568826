// kd_cpu_kernels.cpp — fused KD loss + student-logit gradient on the CPU, one row per OpenMP work item.
//
// Compiled once per x86-64 level with -DKD_CPU_ISA=<namespace> and the matching -march (see kd_cpu.h and
// CMakeLists.txt). Implements the Backend contract (kd_args.h / kd_kernels/_backends/__init__.py):
//   loss[i] = L_i (unweighted, fp32);  grad row i = row_weight[i] / T · ∂L_i/∂s̃_i in the student's dtype;
//   rows with row_weight[i] == 0 are not read (loss 0, gradient row zero-filled); grad may alias s.
//
// The math is docs/MATH.md, through the one definition per divergence in kd_math.h (DivDef,
// stats_*, stream_grad, center_terms, center_grad: the same the CUDA kernels run). Two row functions follow
// from it, one per kind of divergence:
//
// stream_row: forward_kl, reverse_kl, jeffreys, renyi ("How many passes": one streaming pass + one gradient
//   pass). Pass 1 walks the row in blocks of kBlock entries held in L1 as fp32 s̃ = s/T and the teacher logit
//   t̃ (λ t̃ + (1−λ) s̃ with interpolation, fused into the load); renyi adds r̃ = α t̃ + (1−α) s̃. Per block:
//   the block maxima, then vectorized sums Z_s, Z_t (Z_r) and the X sums DivDef asks for — a RowStats merged
//   into the running one with stats_merge (which rescales to the new maxima); stats_finish gives L, row_logs
//   each max and log Z (kept apart: the precision does not depend on where the logits sit). Pass 2 writes
//   stream_grad. The weights e^(s̃ − m_s(block)) and the second weight (p or ρ) are
//   cached in a per-thread row buffer, so pass 2 costs no exp; reverse_kl / jeffreys re-read s and t there.
//   Traffic per row: 1 read of s and t from memory, a second from L2 for reverse_kl / jeffreys (a 32k-entry
//   fp32 row is 128 KiB), 1 write of the gradient.
//
// center_row: skew_forward_kl, skew_reverse_kl, jsd, tvd, alpha_beta (three passes). Pass 1: LSE_s, LSE_t
//   (block-wise, caching the weights). Pass 2: center_terms gives q_j, a_j and the loss term from
//   ℓq_j = (s̃_j − m_s) − log Z_s, ℓp_j likewise (s and t re-read, from L2; tvd reads only the cache);
//   L = Σ loss terms and A = Σ a_j. q_j and a_j go to the row cache so that pass 3, ∂L/∂s̃_j = a_j − q_j A
//   (center_grad), costs no exp or log.
//
// A row that is not a pair of distributions (row_valid: a NaN, a +inf, an all −inf side) gets loss NaN and a
// NaN gradient row. Within a block everything is fp32 (as on the GPU); block partials of L and A are added in
// double. Rows go to threads with schedule(dynamic) because skipped (masked) rows cost nothing.

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <limits>
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

// s̃ and the teacher logit (teacher_logit: the interpolation fused into the load) of one block.
template <int SDT, int TDT>
inline void load_pair(const void* s, const void* t, int64_t j0, int64_t n, float inv_t, const DivCoef& c,
                      float* __restrict sb, float* __restrict tb) {
  load_block<SDT>(s, j0, n, inv_t, sb);
  if (c.interp) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) tb[j] = teacher_logit(load_as_float<TDT>(t, j0 + j) * inv_t, sb[j], c);
  } else {
    load_block<TDT>(t, j0, n, inv_t, tb);
  }
}

// Maxima of a block (−inf for an empty or all −inf block; NaN entries are ignored here — they reach the
// sums through kd_exp instead). With GCC / clang vector types: as an `omp simd reduction(max)` loop, or as
// plain independent lanes, GCC left it scalar once inlined into the row functions (~5% of a skew row).
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

inline float block_max1(const float* __restrict a, int64_t n) {
  float m, unused;
  block_max2(a, a, n, &m, &unused);
  return m;
}

template <int DT>
inline void fill_nan(void* g, int64_t V) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t j = 0; j < V; ++j) store_from_float<DT>(g, j, nan);
}

// Per-thread row cache (see the layout in `run`): the weights of the first pass, e^(s̃_j − m_s(block)) and a
// second one (e^(t̃_j − m_t(block)), or renyi's e^(r̃_j − m_r(block))), with each block's maxima, so later
// passes get q_j = es_j · e^((m_s(block) − m_s) − log Z_s) with one multiply instead of an exp. es_j
// underflows to 0 only where q_j < e^−87 as well (LSE_s ≥ m_s(block)). Centered kinds overwrite es, e2 with
// q_j, a_j in pass 2.
struct RowCache {
  float* es;  // (V,)
  float* e2;  // (V,)
  float* ms;  // (number of blocks,)
  float* m2;  // (number of blocks,)
};

// ---------------------------------------------------------------------------------------------------------
// Streaming kinds (forward_kl, reverse_kl, jeffreys, renyi): one streaming pass + one gradient pass.
// ---------------------------------------------------------------------------------------------------------
// Pass 1 of a streaming row (also the vocabulary-parallel local statistics, vp_stats_row): the row's RowStats
// (maxima, Z_s, Z_t and the sums DivDef<DIV> asks for), block by block. With a cache, the weights and block
// maxima are kept for the gradient pass. renyi with `relative`: r̃ against the row's first entry (RowStats
// rs0, rt0), so that its precision does not depend on where the logits sit.
template <int DIV, int SDT, int TDT>
inline RowStats stream_stats(const void* s, const void* t, const RowCache* cache, int64_t V, float inv_t,
                             const DivCoef& c, bool relative) {
  using D = DivDef<DIV>;
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];
  alignas(64) float rb[D::kR ? kBlock : 1];
  RowStats st = stats_empty();
  if (D::kR && relative && V > 0) {
    load_pair<SDT, TDT>(s, t, 0, 1, inv_t, c, sb, tb);
    st.rs0 = sb[0] - sb[0] == 0.f ? sb[0] : 0.f;  // a NaN or ±inf entry: 0 (the row is not valid anyway)
    st.rt0 = tb[0] - tb[0] == 0.f ? tb[0] : 0.f;
  }
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    load_pair<SDT, TDT>(s, t, j0, n, inv_t, c, sb, tb);
    RowStats bs = stats_empty();
    block_max2(sb, tb, n, &bs.s.m, &bs.t.m);
    if constexpr (D::kR) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) rb[j] = renyi_logit(sb[j] - st.rs0, tb[j] - st.rt0, c);
      bs.r.m = block_max1(rb, n);
    }
    const float ms = exp_base(bs.s.m), mt = exp_base(bs.t.m), mr = exp_base(bs.r.m);
    float zs = 0.f, zt = 0.f, zr = 0.f, xs = 0.f, xt = 0.f;
    if (cache != nullptr) {
      float* __restrict es = cache->es + j0;
      float* __restrict e2 = cache->e2 + j0;
      cache->ms[b] = bs.s.m;
      cache->m2[b] = D::kR ? bs.r.m : bs.t.m;
#pragma omp simd reduction(+ : zs, zt, zr, xs, xt)
      for (int64_t j = 0; j < n; ++j) {
        const float ws = kd_exp(sb[j] - ms), wt = kd_exp(tb[j] - mt);
        zs += ws;
        zt += wt;
        xs += stats_xs<DIV>(ws, sb[j], tb[j]);
        xt += stats_xt<DIV>(wt, sb[j], tb[j]);
        es[j] = ws;
        if constexpr (D::kR) {
          const float wr = kd_exp(rb[j] - mr);
          zr += wr;
          e2[j] = wr;
        } else if constexpr (D::kGradW2) {
          e2[j] = wt;
        }
      }
    } else {
#pragma omp simd reduction(+ : zs, zt, zr, xs, xt)
      for (int64_t j = 0; j < n; ++j) {
        const float ws = kd_exp(sb[j] - ms), wt = kd_exp(tb[j] - mt);
        zs += ws;
        zt += wt;
        xs += stats_xs<DIV>(ws, sb[j], tb[j]);
        xt += stats_xt<DIV>(wt, sb[j], tb[j]);
        if constexpr (D::kR) zr += kd_exp(rb[j] - mr);
      }
    }
    bs.s.z = zs;
    bs.t.z = zt;
    bs.r.z = zr;
    bs.xs = xs;
    bs.xt = xt;
    st = stats_merge<DIV>(st, bs);
  }
  return st;
}

template <int DIV, int SDT, int TDT>
KD_FLATTEN float stream_row(const void* s,    // (V,) student logits of this row, dtype SDT
                            const void* t,    // (V,) teacher logits, dtype TDT
                            void* g,          // (V,) gradient, dtype SDT, or nullptr (loss only); may equal s
                            RowCache cache,   // used only when g != nullptr
                            float gscale,     // row_weight / T
                            int64_t V, float inv_t, const DivCoef& c) {
  using D = DivDef<DIV>;
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];
  const RowStats st = stream_stats<DIV, SDT, TDT>(s, t, g != nullptr ? &cache : nullptr, V, inv_t, c, true);
  const RowFinal f = stats_finish<DIV>(st, c);
  if (!row_valid(f)) {
    if (g != nullptr) fill_nan<SDT>(g, V);
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (g == nullptr) return f.loss;

  // Pass 2: q_j = es_j · e^((m_s(block) − m_s) − log Z_s), the second weight likewise (rescale_log: the max
  // and log Z kept apart, so the shift of the logits does not round the probabilities); stream_grad.
  const RowLogs l = row_logs<DIV>(st);
  const float m2 = D::kR ? l.mr : l.mt, lz2 = D::kR ? l.lzr : l.lzt;
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    const float fs = rescale_log(cache.ms[b], l.ms, l.lzs);
    const float f2 = D::kGradW2 ? rescale_log(cache.m2[b], m2, lz2) : 0.f;
    const float* __restrict es = cache.es + j0;
    const float* __restrict e2 = cache.e2 + j0;
    if constexpr (D::kGradLogits) {
      // s̃, t̃ again. The block is read before any of it is written, so g == s (in place) is safe.
      load_pair<SDT, TDT>(s, t, j0, n, inv_t, c, sb, tb);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float w2 = D::kGradW2 ? e2[j] * f2 : 0.f;
        store_from_float<SDT>(g, j0 + j, gscale * stream_grad<DIV>(es[j] * fs, w2, (sb[j] - tb[j]) - f.gshift));
      }
    } else {  // s and t are not read again
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        store_from_float<SDT>(g, j0 + j, gscale * stream_grad<DIV>(es[j] * fs, e2[j] * f2, 0.f));
      }
    }
  }
  return f.loss;
}

// ---------------------------------------------------------------------------------------------------------
// Centered kinds (skew_forward_kl, skew_reverse_kl, jsd, tvd, alpha_beta): LSE pass, loss + A pass,
// gradient pass.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
KD_FLATTEN float center_row(const void* s,    // (V,) student logits, dtype SDT
                            const void* t,    // (V,) teacher logits, dtype TDT
                            void* g,          // (V,) gradient, dtype SDT, or nullptr; may equal s
                            RowCache cache,   // always used
                            float gscale,     // row_weight / T
                            int64_t V, float inv_t, const DivCoef& c) {
  using D = DivDef<DIV>;
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];

  // Pass 1: LSE_s, LSE_t, caching the weights.
  RowStats st = stats_empty();
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    load_pair<SDT, TDT>(s, t, j0, n, inv_t, c, sb, tb);
    RowStats bs = stats_empty();
    block_max2(sb, tb, n, &bs.s.m, &bs.t.m);
    cache.ms[b] = bs.s.m;
    cache.m2[b] = bs.t.m;
    const float ms = exp_base(bs.s.m), mt = exp_base(bs.t.m);
    float* __restrict es = cache.es + j0;
    float* __restrict et = cache.e2 + j0;
    float zs = 0.f, zt = 0.f;
#pragma omp simd reduction(+ : zs, zt)
    for (int64_t j = 0; j < n; ++j) {
      const float ws = kd_exp(sb[j] - ms), wt = kd_exp(tb[j] - mt);
      zs += ws;
      zt += wt;
      es[j] = ws;
      et[j] = wt;
    }
    bs.s.z = zs;
    bs.t.z = zt;
    st = stats_merge<DIV>(st, bs);
  }
  const RowFinal f = stats_finish<DIV>(st, c);
  if (!row_valid(f)) {
    if (g != nullptr) fill_nan<SDT>(g, V);
    return std::numeric_limits<float>::quiet_NaN();
  }
  // ℓq = (s̃ − m_s) − log Z_s and ℓp likewise, the max and log Z apart (kd_math.h, RowLogs).
  const RowLogs l = row_logs<DIV>(st);

  // Pass 2: L = Σ loss terms, A = Σ a; q and a overwrite the cache (es, e2) for pass 3.
  double loss = 0.0, A = 0.0;
  for (int64_t j0 = 0, b = 0; j0 < V; j0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - j0);
    const float fs = rescale_log(cache.ms[b], l.ms, l.lzs), ft = rescale_log(cache.m2[b], l.mt, l.lzt);
    if constexpr (D::kCenterLogs) load_pair<SDT, TDT>(s, t, j0, n, inv_t, c, sb, tb);
    float* __restrict es = cache.es + j0;
    float* __restrict et = cache.e2 + j0;
    float bl = 0.f, bA = 0.f;
    if (g != nullptr) {
#pragma omp simd reduction(+ : bl, bA)
      for (int64_t j = 0; j < n; ++j) {
        const float lq = D::kCenterLogs ? (sb[j] - l.ms) - l.lzs : 0.f;
        const float lp = D::kCenterLogs ? (tb[j] - l.mt) - l.lzt : 0.f;
        const CenterTerms e = center_terms<DIV>(lq, lp, es[j] * fs, et[j] * ft, c);
        bl += e.loss;
        bA += e.a;
        es[j] = e.q;
        et[j] = e.a;
      }
    } else {
#pragma omp simd reduction(+ : bl)
      for (int64_t j = 0; j < n; ++j) {
        const float lq = D::kCenterLogs ? (sb[j] - l.ms) - l.lzs : 0.f;
        const float lp = D::kCenterLogs ? (tb[j] - l.mt) - l.lzt : 0.f;
        bl += center_terms<DIV>(lq, lp, es[j] * fs, et[j] * ft, c).loss;
      }
    }
    loss += bl;
    A += bA;
  }
  if (g == nullptr) return static_cast<float>(loss);

  // Pass 3: ∂L/∂s̃_j = a_j − q_j A, from the cache only (s is not read again, so g == s is safe).
  // A plain loop over __restrict rows (auto-vectorized).
  const float Af = static_cast<float>(A);
  const float* __restrict qr = cache.es;
  const float* __restrict ar = cache.e2;
  for (int64_t j = 0; j < V; ++j) store_from_float<SDT>(g, j, gscale * center_grad(qr[j], ar[j], Af));
  return static_cast<float>(loss);
}

// ---------------------------------------------------------------------------------------------------------
// The row loop.
// ---------------------------------------------------------------------------------------------------------
template <int DIV, int SDT, int TDT>
void run(const RowArgs& a, int num_threads) {
  constexpr bool kCentered = !DivDef<DIV>::kStreaming;
  const int64_t N = a.n_rows, V = a.vocab;
  const float inv_t = static_cast<float>(1.0 / a.temperature);
  const DivCoef c = make_div_coef(DIV, a.coef, a.coef2, a.interpolation);
  const bool want_grad = a.grad != nullptr;

  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (N * V < kMinParallelElems) nt = 1;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
  // Enough rows per work item that scheduling costs nothing next to the row (≥ ~16k logits).
  const int chunk = static_cast<int>(std::max<int64_t>(1, (1 << 14) / V));

  // Per-thread RowCache: es (V) | e2 (V) | ms (blocks) | m2 (blocks), rounded up to a cache line.
  // Allocated before the parallel region, because an exception must not escape an OpenMP region.
  const int64_t nblk = (V + kBlock - 1) / kBlock;
  const int64_t per_thread = ((2 * V + 2 * nblk) + 15) / 16 * 16;
  std::vector<float> scratch(kCentered || want_grad ? static_cast<size_t>(nt * per_thread) : 0);

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
      if constexpr (kCentered) {
        a.loss[i] = center_row<DIV, SDT, TDT>(s, t, g, cache, gscale, V, inv_t, c);
      } else {
        a.loss[i] = stream_row<DIV, SDT, TDT>(s, t, g, cache, gscale, V, inv_t, c);
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

// ---------------------------------------------------------------------------------------------------------
// Vocabulary-parallel shard passes (kd_cpu.h, VpArgs; the protocol is kd_kernels/_backends/_vocab_parallel.py).
// The same row functions' math on one rank's shard of a row: the local statistics are pass 1 of a streaming
// row (stream_stats), and the other two passes take ℓq = (s̃ − M_s) − log Z_s, ℓp = (t̃ − M_t) − log Z_t from
// the global statistics (global max and log Z: exact at the max, like log_softmax) and apply the divergence's
// one definition: stream_grad for forward_kl / reverse_kl / renyi, center_terms + center_grad for the others
// (jeffreys included: its loss is a sum over the shards here).
// ---------------------------------------------------------------------------------------------------------

// The statistics kind of a divergence: its own streaming sums for forward_kl, reverse_kl and renyi, the
// plain (max, Z) pair of both sides (TVD's DivDef asks for nothing else) for the others.
template <int DIV>
constexpr int vp_stats_kind() {
  return DIV == FORWARD_KL || DIV == REVERSE_KL || DIV == RENYI ? DIV : TVD;
}

inline bool vp_finite(float x) { return x - x == 0.f; }

// out[0..K) = [m_s, Z_s, m_t, Z_t, (X_t | X_s | m_r, Z_r)], each max 0 where the shard row is all −inf (its
// sums are 0 there), so that no −inf − (−inf) reaches the exchange. renyi's m_r is relative to the shard's
// (m_s, m_t), the max of α (t̃ − m_t) + (1−α) (s̃ − m_s) (_vocab_parallel.py moves it to the global maxima):
// formed from differences to the shard's first entry, never α t̃ + (1−α) s̃, which rounds at the size of the
// logits. An infinite (or NaN) m_r is sent as is (−inf as 0).
template <int DIV, int SDT, int TDT>
KD_FLATTEN void vp_stats_row(const void* s, const void* t, float* out, int64_t V, float inv_t,
                             const DivCoef& c) {
  constexpr int K = vp_stats_kind<DIV>();
  const RowStats st = stream_stats<K, SDT, TDT>(s, t, nullptr, V, inv_t, c, true);
  out[0] = exp_base(st.s.m);
  out[1] = st.s.z;
  out[2] = exp_base(st.t.m);
  out[3] = st.t.z;
  if (K == FORWARD_KL) out[4] = st.xt;
  if (K == REVERSE_KL) out[4] = st.xs;
  if (K == RENYI) {
    out[4] = vp_finite(st.r.m) ? renyi_max_at_maxima(st, c) : exp_base(st.r.m);
    out[5] = st.r.z;
  }
}

// kGrad = false: sums[0..2) = [Σ loss terms, A = Σ a_v] over the shard (centered kinds; block partials added
// in double as in center_row). kGrad = true: g = gscale · ∂L/∂s̃ over the shard. A row whose global LSEs
// are not finite (a NaN, a +inf or an all −inf row on some rank) gets NaN sums / a NaN gradient row.
template <int DIV, int SDT, int TDT, bool kGrad>
KD_FLATTEN void vp_given_row(const void* s, const void* t, const float* st, float* sums, void* g, float gscale,
                             int64_t V, float inv_t, const DivCoef& c) {
  constexpr bool kStream = DIV == FORWARD_KL || DIV == REVERSE_KL || DIV == RENYI;
  if (!(vp_finite(st[VP_LSE_S]) && vp_finite(st[VP_LSE_T]))) {
    if (kGrad) {
      fill_nan<SDT>(g, V);
    } else {
      sums[0] = sums[1] = std::numeric_limits<float>::quiet_NaN();
    }
    return;
  }
  alignas(64) float sb[kBlock];
  alignas(64) float tb[kBlock];
  const float ms = st[VP_MAX_S], lzs = st[VP_LOGZ_S], mt = st[VP_MAX_T], lzt = st[VP_LOGZ_T];
  const float A = st[VP_CENTER];                    // centered kinds: A = Σ_v a_v over the whole row
  // renyi: max and log Z of the mixed logits α (t̃ − M_t) + (1−α) (s̃ − M_s), relative to the global maxima
  const float mu = st[VP_MAX_U], lzu = st[VP_CENTER];
  // stream_grad's ℓq − ℓp − L from ℓq, ℓp directly (exact ℓq − ℓp): the gradient shift is the reverse KL alone.
  RowFinal f = {};
  f.loss = st[VP_LOSS];
  f.gshift = st[VP_LOSS] * kUnitsPerNat;
  double loss = 0.0, asum = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    load_pair<SDT, TDT>(s, t, j0, n, inv_t, c, sb, tb);  // read before written: g == s is safe
    if constexpr (kGrad) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float lq = (sb[j] - ms) - lzs, lp = (tb[j] - mt) - lzt;
        const float q = kd_exp(lq), p = kd_exp(lp);
        float gj;
        if constexpr (kStream) {
          // renyi's second weight ρ = e^((r̃ − M_r) − log Z_r), r̃ = α (t̃ − M_t) + (1−α) (s̃ − M_s); p for
          // forward_kl; unused by reverse_kl
          const float w2 = DIV == RENYI ? kd_exp((renyi_logit(sb[j] - ms, tb[j] - mt, c) - mu) - lzu) : p;
          gj = stream_grad<DIV>(q, w2, (lq - lp) - f.gshift);
        } else {
          gj = center_grad(q, center_terms<DIV>(lq, lp, q, p, c).a, A);
        }
        store_from_float<SDT>(g, j0 + j, gscale * gj);
      }
    } else {
      float bl = 0.f, bA = 0.f;
#pragma omp simd reduction(+ : bl, bA)
      for (int64_t j = 0; j < n; ++j) {
        const float lq = (sb[j] - ms) - lzs, lp = (tb[j] - mt) - lzt;
        const CenterTerms e = center_terms<DIV>(lq, lp, kd_exp(lq), kd_exp(lp), c);
        bl += e.loss;
        bA += e.a;
      }
      loss += bl;
      asum += bA;
    }
  }
  if (!kGrad) {
    sums[0] = static_cast<float>(loss);
    sums[1] = static_cast<float>(asum);
  }
}

template <int DIV, int SDT, int TDT>
void vp_run(const VpArgs& a, int num_threads) {
  constexpr bool kStream = DIV == FORWARD_KL || DIV == REVERSE_KL || DIV == RENYI;
  const int64_t N = a.n_rows, V = a.vocab;
  const float inv_t = static_cast<float>(1.0 / a.temperature);
  const DivCoef c = make_div_coef(DIV, a.coef, a.coef2, 1.0);
  const int K = vp_local_stats(DIV);
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (N * V < kMinParallelElems) nt = 1;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
  const int chunk = static_cast<int>(std::max<int64_t>(1, (1 << 14) / V));
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(dynamic, chunk)
  for (int64_t i = 0; i < N; ++i) {
    const void* s = row_ptr<SDT>(a.s, i, a.stride_s);
    const void* t = row_ptr<TDT>(a.t, i, a.stride_t);
    if (a.mode == VP_STATS) {
      vp_stats_row<DIV, SDT, TDT>(s, t, a.out + i * K, V, inv_t, c);
    } else if (a.mode == VP_SUMS) {
      if constexpr (!kStream) {
        vp_given_row<DIV, SDT, TDT, false>(s, t, a.stats + i * kVpGlobal, a.out + i * 2, nullptr, 0.f, V,
                                           inv_t, c);
      }
    } else {
      const float w = a.row_weight[i];
      void* g = row_ptr<SDT>(a.grad, i, a.stride_g);
      if (w == 0.f) {  // not read
        memset(g, 0, static_cast<size_t>(V) * elem_size<SDT>());
        continue;
      }
      vp_given_row<DIV, SDT, TDT, true>(s, t, a.stats + i * kVpGlobal, nullptr, g, w * inv_t, V, inv_t, c);
    }
  }
}

// Student dtype × (teacher of the same dtype, or float32): the launcher upcasts any other teacher dtype to
// float32 (exact), which keeps the instantiations to five pairs.
template <int DIV>
void vp_run_s(const VpArgs& a, int nt) {
  const bool t32 = a.t_dtype == F32;
  switch (a.s_dtype) {
    case F32: return vp_run<DIV, F32, F32>(a, nt);
    case BF16: return t32 ? vp_run<DIV, BF16, F32>(a, nt) : vp_run<DIV, BF16, BF16>(a, nt);
    default: return t32 ? vp_run<DIV, F16, F32>(a, nt) : vp_run<DIV, F16, F16>(a, nt);
  }
}

}  // namespace

void loss_grad(const RowArgs& a, int num_threads) {
  switch (a.divergence) {
    case FORWARD_KL: return run_s<FORWARD_KL>(a, num_threads);
    case REVERSE_KL: return run_s<REVERSE_KL>(a, num_threads);
    case SKEW_FORWARD_KL: return run_s<SKEW_FORWARD_KL>(a, num_threads);
    case SKEW_REVERSE_KL: return run_s<SKEW_REVERSE_KL>(a, num_threads);
    case JSD: return run_s<JSD>(a, num_threads);
    case TVD: return run_s<TVD>(a, num_threads);
    case JEFFREYS: return run_s<JEFFREYS>(a, num_threads);
    case ALPHA_BETA: return run_s<ALPHA_BETA>(a, num_threads);
    default: return run_s<RENYI>(a, num_threads);
  }
}

void vp_rows(const VpArgs& a, int num_threads) {
  switch (a.divergence) {
    case FORWARD_KL: return vp_run_s<FORWARD_KL>(a, num_threads);
    case REVERSE_KL: return vp_run_s<REVERSE_KL>(a, num_threads);
    case SKEW_FORWARD_KL: return vp_run_s<SKEW_FORWARD_KL>(a, num_threads);
    case SKEW_REVERSE_KL: return vp_run_s<SKEW_REVERSE_KL>(a, num_threads);
    case JSD: return vp_run_s<JSD>(a, num_threads);
    case TVD: return vp_run_s<TVD>(a, num_threads);
    case JEFFREYS: return vp_run_s<JEFFREYS>(a, num_threads);
    case ALPHA_BETA: return vp_run_s<ALPHA_BETA>(a, num_threads);
    default: return vp_run_s<RENYI>(a, num_threads);
  }
}

}  // namespace KD_CPU_ISA
}  // namespace cpu
}  // namespace kd
