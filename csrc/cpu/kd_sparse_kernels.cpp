// kd_sparse_kernels.cpp — sparse-teacher KD loss + student-logit gradient on the CPU, one row per OpenMP
// work item. Compiled once per x86-64 level (-DKD_CPU_ISA=<namespace>, the matching -march) like
// kd_cpu_kernels.cpp. Contract: kd_sparse.h / kd_kernels/_sparse_impl.py.
//
// Math (docs/MATH.md, "Sparse teachers"). Row: student s̃ = s/T (dense, V entries), teacher ids i_k
// with log-probs ℓ_k (−inf = padding), support S = the valid ids. Categories c (the K ids, plus the tail for
// "bucket"), student / teacher log-probs ℓq̄_c, ℓp̄_c; D(p̄, q̄); a_c = ∂D/∂ℓq̄_c = q̄_c u_c, A = Σ_c a_c:
//   bucket       ∂D/∂s̃_j = a_k − q_j A  (j = i_k ∈ S),   q_j (u_tail − A)  (j ∉ S)
//   renormalize  ∂D/∂s̃_j = a_k − q̂_k A  (j ∈ S),        0                 (j ∉ S)
//   ignore       ∂L/∂s̃_j = q_j P − Σ_{k: i_k = j} p_k
// u per divergence: see category_terms below (and _sparse_impl.py's table).
//
// Plan: pass A reads the row for its max (and flags NaN / +inf / all −inf: such a row is not a distribution,
// loss and gradient row NaN). The support is marked in a per-thread byte mask. Pass B reads the row again
// (from L2) for e_j = e^(s̃_j − m), summing the off-support entries directly (Z_tail: no Z − Z_S
// cancellation when the support holds almost all the mass) and caching e_j for the gradient. The support
// entries and everything per category are O(K) in double. Pass C writes the gradient: gscale · e_j · const
// densely, then the K support entries. "renormalize" needs no pass B. No teacher row is read.

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kd_kernels/kd_math.h"
#include "kd_sparse.h"

#ifdef _OPENMP
#include <omp.h>
#else
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

constexpr int64_t kBlock = 512;
constexpr int64_t kMinParallelElems = 1 << 15;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

#if defined(__GNUC__)
#define KD_SPARSE_FLATTEN __attribute__((flatten))
#else
#define KD_SPARSE_FLATTEN
#endif

template <int DT>
constexpr int64_t esize() {
  return DT == F32 ? 4 : 2;
}

// Per-thread scratch: the e_j cache (V floats), the support mask (V bytes), the "ignore" accumulator
// (V floats, kept all zero between rows) and the per-category arrays (K + 1 doubles each).
struct Scratch {
  float* cache;
  float* acc;
  uint8_t* mask;
  double* lq;   // category student log-probs
  double* lp;   // category teacher log-probs
  double* a;    // ∂D/∂ℓq̄_c
  double* u;    // a_c / q̄_c
  double* sk;   // s̃ at each valid id
  int64_t* pos; // category c → entry k
};

// D and (a, u) for C categories (MATH.md "Sparse teachers"; a_c = ∂D/∂ log q̄_c, u_c = a_c / q̄_c).
// Empty categories (both log-probs −inf) contribute 0. Returns D.
double renyi_terms(double al, const double* lq, const double* lp, int64_t C, double* a, double* u);

double category_terms(int div, double c, double c2, const double* lq, const double* lp, int64_t C,
                      double* a, double* u) {
  if (div == RENYI) return renyi_terms(c, lq, lp, C, a, u);
  double D = 0.0;
  const double lc = std::log(c), l1c = std::log1p(-c);
  for (int64_t i = 0; i < C; ++i) {
    const double q = std::exp(lq[i]), p = std::exp(lp[i]);
    double ui = 0.0, ai = 0.0;
    switch (div) {
      case FORWARD_KL:
        if (p > 0) {
          D += p * (lp[i] - lq[i]);
          ui = -std::exp(lp[i] - lq[i]);
        }
        ai = -p;
        break;
      case REVERSE_KL:
        if (q > 0) {
          D += q * (lq[i] - lp[i]);
          ui = lq[i] - lp[i] + 1.0;
        }
        ai = q > 0 ? q * ui : 0.0;
        break;
      case SKEW_FORWARD_KL: {  // m = α p + (1−α) q
        const double lm = std::max(lc + lp[i], l1c + lq[i]) +
                          std::log1p(std::exp(-std::fabs((lc + lp[i]) - (l1c + lq[i]))));
        if (p > 0) {
          D += p * (lp[i] - lm);
          ui = -(1.0 - c) * std::exp(lp[i] - lm);
        }
        ai = q > 0 ? q * ui : 0.0;
        break;
      }
      case SKEW_REVERSE_KL: {  // m' = (1−α) p + α q
        const double lm = std::max(lc + lq[i], l1c + lp[i]) +
                          std::log1p(std::exp(-std::fabs((lc + lq[i]) - (l1c + lp[i]))));
        if (q > 0) {
          D += q * (lq[i] - lm);
          ui = lq[i] - lm + 1.0 - c * std::exp(lq[i] - lm);
        }
        ai = q > 0 ? q * ui : 0.0;
        break;
      }
      case TVD:  // ½ Σ |q − p|
        D += 0.5 * std::fabs(q - p);
        ui = q > p ? 0.5 : (q < p ? -0.5 : 0.0);
        ai = q * ui;
        break;
      case JEFFREYS:  // KL(p‖q) + KL(q‖p): a = q (log q − log p) − p
        if (p > 0) D += p * (lp[i] - lq[i]);
        if (q > 0) {
          D += q * (lq[i] - lp[i]);
          ui = (lq[i] - lp[i]) - std::exp(lp[i] - lq[i]);
        }
        ai = (q > 0 ? q * (lq[i] - lp[i]) : 0.0) - p;
        break;
      case ALPHA_BETA: {  // −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]; α = c, β = c2
        const double ab = c + c2;
        const double pq = std::exp(c * lp[i] + c2 * lq[i]), qq = std::exp(ab * lq[i]);
        D += pq - (c / ab) * std::exp(ab * lp[i]) - (c2 / ab) * qq;
        ai = (qq - pq) / c;  // (1/α) q^β (q^α − p^α)
        if (q > 0) ui = (std::exp((ab - 1.0) * lq[i]) - std::exp(c * lp[i] + (c2 - 1.0) * lq[i])) / c;
        break;
      }
      default: {  // JSD, M = β p + (1−β) q
        const double lm = std::max(lc + lp[i], l1c + lq[i]) +
                          std::log1p(std::exp(-std::fabs((lc + lp[i]) - (l1c + lq[i]))));
        if (p > 0) D += c * p * (lp[i] - lm);
        if (q > 0) {
          D += (1.0 - c) * q * (lq[i] - lm);
          ui = (1.0 - c) * (lq[i] - lm);
        }
        ai = q > 0 ? q * ui : 0.0;
        break;
      }
    }
    // NaN inputs must reach the result: the p > 0 / q > 0 tests above are false for NaN.
    if (std::isnan(lq[i]) || std::isnan(lp[i])) D = ai = ui = kNaN;
    a[i] = ai;
    u[i] = ui;
  }
  return div == ALPHA_BETA ? D / -(c * c2) : D;
}

// Rényi, 1/(α−1) log Σ p^α q^(1−α): not a sum of per-category terms, so two passes over the categories.
// a_c = q_c − r_c with r = p^α q^(1−α) / Σ (the multiple of q makes Σ a = 0), u_c = 1 − r_c / q_c.
double renyi_terms(double al, const double* lq, const double* lp, int64_t C, double* a, double* u) {
  double mx = -kInf;
  bool nan = false;
  for (int64_t i = 0; i < C; ++i) {
    nan = nan || std::isnan(lq[i]) || std::isnan(lp[i]);
    const double mix = lp[i] == -kInf ? -kInf : al * lp[i] + (1.0 - al) * lq[i];
    a[i] = mix;  // stash
    mx = std::max(mx, mix);
  }
  if (nan) {
    for (int64_t i = 0; i < C; ++i) a[i] = u[i] = kNaN;
    return kNaN;
  }
  if (C == 0) return 0.0;
  double R = 0.0;
  if (mx != -kInf && mx != kInf) {
    for (int64_t i = 0; i < C; ++i) R += std::exp(a[i] - mx);
  }
  const double lse = mx == -kInf || mx == kInf ? mx : mx + std::log(R);
  for (int64_t i = 0; i < C; ++i) {
    const double q = std::exp(lq[i]);
    const double lr = mx == -kInf ? -kInf : a[i] - lse;  // log r_c (a[i] holds the mix)
    a[i] = q - std::exp(lr);
    u[i] = q > 0 ? 1.0 - std::exp(lr - lq[i]) : 0.0;
  }
  return lse / (al - 1.0);
}

template <int SDT>
inline void fill_row(void* g, int64_t V, float v) {
  for (int64_t j = 0; j < V; ++j) store_from_float<SDT>(g, j, v);
}

template <int SDT>
KD_SPARSE_FLATTEN float sparse_row(const void* s,       // (V,) student logits, dtype SDT
                                   const int64_t* ids,  // (K,) teacher ids
                                   const float* lpk,    // (K,) teacher log-probs
                                   void* g,             // (V,) gradient or nullptr; may equal s
                                   float gscale,        // row_weight / T
                                   int64_t V, int64_t K, float inv_t, int div, int tail, double coef, double coef2,
                                   double floor_, Scratch sc) {
  const bool bucket = tail == TAIL_BUCKET;
  if (bucket) {  // mark the support (ids of padded entries are not read)
    for (int64_t k = 0; k < K; ++k) {
      if (lpk[k] != -kInf) sc.mask[ids[k]] = 1;
    }
  }
  // Pass A: the max (and, for bucket, the max off the support), and whether the row is a distribution.
  float m = -kInf, mt = -kInf;
  int bad = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const uint8_t* __restrict mk = sc.mask + j0;
    float bm = -kInf, bt = -kInf;
    int bb = 0;
#pragma omp simd reduction(max : bm, bt) reduction(| : bb)
    for (int64_t j = 0; j < n; ++j) {
      const float x = load_as_float<SDT>(s, j0 + j) * inv_t;
      bm = x > bm ? x : bm;
      const float xt = mk[j] ? -kInf : x;
      bt = xt > bt ? xt : bt;
      bb |= (x != x) ? 1 : 0;
    }
    m = bm > m ? bm : m;
    mt = bt > mt ? bt : mt;
    bad |= bb;
  }
  if (bad || m == kInf || m == -kInf) {
    if (bucket) {
      for (int64_t k = 0; k < K; ++k) {
        if (lpk[k] != -kInf) sc.mask[ids[k]] = 0;
      }
    }
    if (g != nullptr) fill_row<SDT>(g, V, NAN);
    return NAN;
  }

  // The valid entries, their s̃ (read before anything is written: g may be s) and the teacher's log P.
  int64_t nv = 0;
  double lmax = kNegInf;
  for (int64_t k = 0; k < K; ++k) {
    if (lpk[k] == -kInf) continue;
    sc.pos[nv] = k;
    sc.sk[nv] = static_cast<double>(load_as_float<SDT>(s, ids[k]) * inv_t);
    if (static_cast<double>(lpk[k]) > lmax) lmax = lpk[k];
    ++nv;
  }
  double psum = 0.0, zs = 0.0;
  for (int64_t c = 0; c < nv; ++c) {
    const double l = lpk[sc.pos[c]];
    psum += std::exp(l - lmax);
    zs += std::exp(sc.sk[c] - m);
  }
  const double logP = nv > 0 ? lmax + std::log(psum) : kNegInf;  // NaN if any ℓ is NaN
  const double md = m;

  if (tail == TAIL_RENORMALIZE) {
    // log Q̂ against the support's own max, not the row's: the support's mass e^(s̃_k − m) underflows (even
    // in double) when its ids sit far below the row max (low T, large logits), which made log Z_S = −inf.
    double msup = kNegInf;
    for (int64_t c = 0; c < nv; ++c) msup = std::max(msup, sc.sk[c]);
    double zsup = 0.0;
    for (int64_t c = 0; c < nv; ++c) zsup += std::exp(sc.sk[c] - msup);
    const double log_zsup = std::log(zsup);  // ≥ 0: the max's own term is 1
    for (int64_t c = 0; c < nv; ++c) {
      sc.lq[c] = (sc.sk[c] - msup) - log_zsup;
      sc.lp[c] = lpk[sc.pos[c]] - logP;
    }
    const double D = category_terms(div, coef, coef2, sc.lq, sc.lp, nv, sc.a, sc.u);
    if (g != nullptr) {
      double A = 0.0;
      for (int64_t c = 0; c < nv; ++c) A += sc.a[c];
      fill_row<SDT>(g, V, static_cast<float>(gscale * 0.0 * A));  // 0, or NaN for a NaN teacher
      for (int64_t c = 0; c < nv; ++c) {
        const double v = sc.a[c] - std::exp(sc.lq[c]) * A;
        store_from_float<SDT>(g, ids[sc.pos[c]], static_cast<float>(gscale * v));
      }
    }
    return static_cast<float>(D);
  }

  // Pass B: e_j = e^(s̃_j − m); Z over all (ignore) or over the non-support entries (bucket).
  double zsum = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    float bz = 0.f;
    if (g != nullptr) {
      float* __restrict e = sc.cache + j0;
      const uint8_t* __restrict mk = sc.mask + j0;
#pragma omp simd reduction(+ : bz)
      for (int64_t j = 0; j < n; ++j) {
        const float ej = kd_exp(load_as_float<SDT>(s, j0 + j) * inv_t - m);
        e[j] = ej;
        bz += mk[j] ? 0.f : ej;
      }
    } else {
      const uint8_t* __restrict mk = sc.mask + j0;
#pragma omp simd reduction(+ : bz)
      for (int64_t j = 0; j < n; ++j) {
        const float ej = kd_exp(load_as_float<SDT>(s, j0 + j) * inv_t - m);
        bz += mk[j] ? 0.f : ej;
      }
    }
    zsum += bz;
  }
  double log_ztail = std::log(zsum);  // log Σ_{j∉S} e^(s̃_j − m)
  if (bucket && zsum == 0.0 && mt != -kInf) {
    // Every off-support e^(s̃_j − m) underflowed in fp32 (gaps > 87): sum them again against their own
    // max, so the tail keeps its (tiny) log-mass. Rare, hence a plain scalar loop.
    double zt = 0.0;
    for (int64_t j = 0; j < V; ++j) {
      if (!sc.mask[j]) zt += std::exp(static_cast<double>(load_as_float<SDT>(s, j) * inv_t) - mt);
    }
    log_ztail = (static_cast<double>(mt) - m) + std::log(zt);
  }
  if (bucket) {
    for (int64_t c = 0; c < nv; ++c) sc.mask[ids[sc.pos[c]]] = 0;
  }

  if (!bucket) {  // ignore: L = Σ p_k (ℓ_k − ℓq_k), ∂/∂s̃_j = q_j P − p_j on S
    const double logZ = std::log(zsum);
    double L = 0.0, P = 0.0;
    for (int64_t c = 0; c < nv; ++c) {
      const double l = lpk[sc.pos[c]], p = std::exp(l);
      L += p * (l - (sc.sk[c] - md - logZ));
      P += p;
      if (std::isnan(l)) L = P = kNaN;
    }
    if (g != nullptr) {
      const float f = static_cast<float>(gscale * P / zsum);
      const float* __restrict e = sc.cache;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) store_from_float<SDT>(g, j, e[j] * f);
      for (int64_t c = 0; c < nv; ++c) sc.acc[ids[sc.pos[c]]] += std::exp(lpk[sc.pos[c]]);
      for (int64_t c = 0; c < nv; ++c) {
        const int64_t id = ids[sc.pos[c]];
        const double q = std::exp(sc.sk[c] - md - logZ);
        store_from_float<SDT>(g, id, static_cast<float>(gscale * (q * P - sc.acc[id])));
      }
      for (int64_t c = 0; c < nv; ++c) sc.acc[ids[sc.pos[c]]] = 0.f;
    }
    return static_cast<float>(L);
  }

  // bucket: categories = the nv ids, plus the tail when the ids do not cover the vocabulary.
  const bool has_tail = nv < V;
  const double Z = zsum + zs, logZ = std::log(Z);
  double logZp = logP;
  double p_tail = 0.0;
  if (has_tail) {
    const double t = -std::expm1(logP);
    p_tail = std::isnan(t) ? t : std::max(t, floor_);
    logZp = std::log(std::exp(logP) + p_tail);
  }
  for (int64_t c = 0; c < nv; ++c) {
    sc.lq[c] = sc.sk[c] - md - logZ;
    sc.lp[c] = lpk[sc.pos[c]] - logZp;
  }
  int64_t C = nv;
  if (has_tail) {
    sc.lq[C] = log_ztail - logZ;
    sc.lp[C] = std::log(p_tail) - logZp;
    ++C;
  }
  const double D = category_terms(div, coef, coef2, sc.lq, sc.lp, C, sc.a, sc.u);
  if (g != nullptr) {
    double A = 0.0;
    for (int64_t c = 0; c < C; ++c) A += sc.a[c];
    // multiplies e_j (0 wherever the tail is empty or underflowed: then the tail's u may be infinite)
    const double off = has_tail && sc.lq[nv] != kNegInf ? sc.u[nv] - A : 0.0;
    const float f = static_cast<float>(gscale * off / Z);
    const float* __restrict e = sc.cache;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) store_from_float<SDT>(g, j, e[j] * f);
    for (int64_t c = 0; c < nv; ++c) {
      const double v = sc.a[c] - std::exp(sc.lq[c]) * A;
      store_from_float<SDT>(g, ids[sc.pos[c]], static_cast<float>(gscale * v));
    }
  }
  return static_cast<float>(D);
}

template <int SDT>
void run(const SparseArgs& a, int num_threads) {
  const int64_t N = a.n_rows, V = a.vocab, K = a.k;
  const float inv_t = static_cast<float>(1.0 / a.temperature);
  const bool want_grad = a.grad != nullptr;
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (N * V < kMinParallelElems) nt = 1;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
  const int chunk = static_cast<int>(std::max<int64_t>(1, (1 << 14) / V));

  // Per thread: cache (V floats) | acc (V floats) | 5 double arrays of K+1 | pos (K+1 int64) | mask (V bytes).
  const int64_t f_count = 2 * V;
  const int64_t d_count = 5 * (K + 1) + (K + 1);  // pos stored as doubles' worth of int64
  const int64_t bytes = (f_count * 4 + d_count * 8 + V + 63) / 64 * 64;
  std::vector<uint8_t> scratch(static_cast<size_t>(nt * bytes + 64), 0);
  uint8_t* base0 = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    uint8_t* b = base0 + omp_get_thread_num() * bytes;
    Scratch sc;
    double* d = reinterpret_cast<double*>(b);
    sc.lq = d;
    sc.lp = d + (K + 1);
    sc.a = d + 2 * (K + 1);
    sc.u = d + 3 * (K + 1);
    sc.sk = d + 4 * (K + 1);
    sc.pos = reinterpret_cast<int64_t*>(d + 5 * (K + 1));
    float* f = reinterpret_cast<float*>(d + 6 * (K + 1));
    sc.cache = f;
    sc.acc = f + V;
    sc.mask = reinterpret_cast<uint8_t*>(f + 2 * V);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < N; ++i) {
      const float w = a.row_weight[i];
      void* g = want_grad ? static_cast<char*>(a.grad) + i * a.stride_g * esize<SDT>() : nullptr;
      if (w == 0.f) {
        a.loss[i] = 0.f;
        if (g != nullptr) memset(g, 0, static_cast<size_t>(V) * esize<SDT>());
        continue;
      }
      const void* s = static_cast<const char*>(a.s) + i * a.stride_s * esize<SDT>();
      a.loss[i] = sparse_row<SDT>(s, a.ids + i * K, a.logprobs + i * K, g, w * inv_t, V, K, inv_t,
                                  a.divergence, a.tail, a.coef, a.coef2, a.tail_floor, sc);
    }
  }
}

}  // namespace

void sparse_loss_grad(const SparseArgs& a, int num_threads) {
  switch (a.s_dtype) {
    case F32: return run<F32>(a, num_threads);
    case BF16: return run<BF16>(a, num_threads);
    default: return run<F16>(a, num_threads);
  }
}

}  // namespace KD_CPU_ISA
}  // namespace cpu
}  // namespace kd
