// kd_math.h — the per-element math of every kd_kernels divergence, written once.
//
// Included by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda): every function is an inline
// host-device function with no dependency on torch, so the CPU tests exercise the very formulas the GPU runs.
// Notation and formulas follow docs/MATH.md:
//   s̃ = s/T, t̃ = t/T, ℓq = s̃ − LSE_s, ℓp = t̃ − LSE_t, q = e^ℓq, p = e^ℓp, 0·log 0 = 0.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kd {

// Numbering shared with kd_kernels/_spec.py (Divergence) and the dtype codes of the Python launchers.
enum Divergence : int {
  FORWARD_KL = 0,
  REVERSE_KL = 1,
  SKEW_FORWARD_KL = 2,
  SKEW_REVERSE_KL = 3,
  JSD = 4,
  TVD = 5,
  JEFFREYS = 6,
  ALPHA_BETA = 7,
  RENYI = 8,
};
constexpr int kNumDivergences = 9;
enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

constexpr float kInf = INFINITY;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

KD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

KD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

// a·b + c: fused where the target has an FMA unit (GPU; CPU code compiled with FMA, e.g. -march=x86-64-v3),
// else a plain multiply-add. A CPU build without FMA would otherwise turn every fmaf into a scalar libm call
// (software-emulated, and it stops the loop from vectorizing); the polynomials below need no fused rounding.
KD_HD float kd_fmaf(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__FMA4__) || defined(__aarch64__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// exp and log. On the GPU the hardware units (ex2 / lg2, ~2 ulp); on the CPU branch-free polynomials that
// vectorize under `#pragma omp simd` (glibc's vector expf is only declared under -ffast-math, which would
// also break the −inf handling below).
// ---------------------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__)
// The GPU's special-function unit, without the denormal handling that exp2f / __log2f add around it (an FSETP
// and two predicated FMULs per call): one MUFU instruction each. ex2.approx.ftz: max error 2 ulp over the
// full range, results below 2^-126 flushed to 0 (e^x for x < −87.3, where the CPU kernels return 0 too),
// ex2(−inf) = 0, ex2(+inf) = +inf, ex2(NaN) = NaN. lg2.approx.ftz: max absolute error 2^-22.6 for x in
// [0.5, 2], 2 ulp elsewhere; lg2(0) = −inf (a subnormal argument counts as 0: the callers pass row sums ≥ 1
// or 1 + u ≥ 1), lg2(+inf) = +inf, NaN stays NaN. Against the GPU tests' tolerances (fp32 rtol 1e-4 on the
// loss and gradient; bf16 / fp16 bounded by the 2^-8 / 2^-11 rounding of the stored gradient) a 2-ulp
// (2.4e-7 relative) exponential and a 2^-22 absolute log are two orders of magnitude inside: the loss is a
// sum of V such terms whose errors do not add coherently, and the host replay (csrc/cuda/host_check) bounds
// the accumulation logic at 2e-5 (loss) / 1e-4 (gradient) with the CPU's own ~1-ulp polynomials.
__device__ __forceinline__ float kd_ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float kd_lg2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// The CPU's e^x and ln x (the CUDA kernels work in bits and call the hardware's 2^x and log2 x through kd_expu
// and kd_logu below). e^x for any float x: 0 for x < −87.3 (including −inf), +inf above 88.7, NaN for NaN (a NaN
// logit must reach the row sums: that is how a row with a NaN is recognised, see row_valid), < 1 ulp elsewhere.
KD_HD float kd_exp(float x) {
  // x = n ln2 + r, |r| ≤ ln2/2; e^r by a degree-6 polynomial fitted for least maximum relative error
  // (approximation error 1.9e-9; ~1 ulp after fp32 evaluation), one FMA fewer than the degree-7 Taylor series.
  // Clamp with compares and round with the 1.5·2^23 trick (exact round-to-nearest for |v| < 2^22) rather
  // than fminf / fmaxf / rintf: GCC does not vectorize those calls without -ffast-math-style flags.
  float xc = x > -87.3f ? x : -87.3f;
  xc = xc < 88.7f ? xc : 88.7f;
  float n = (xc * kLog2e + 12582912.f) - 12582912.f;
  // r from x itself, not xc: equal in range; out of range the selects below discard it, and a NaN x makes
  // r, hence the result, NaN (n comes from the NaN-free xc, so the int conversion below never sees a NaN).
  float r = kd_fmaf(n, -0.693145751953125f, x);   // ln2 split in a short high part and the rest,
  r = kd_fmaf(n, -1.428606765330187e-06f, r);     // so n·ln2_hi is exact
  float p = 1.3836842263117433e-03f;
  p = kd_fmaf(p, r, 8.374815806746483e-03f);
  p = kd_fmaf(p, r, 4.166822507977486e-02f);
  p = kd_fmaf(p, r, 1.6666419804096222e-01f);
  p = kd_fmaf(p, r, 4.9999991059303284e-01f);
  p = kd_fmaf(p, r, 1.f);
  p = kd_fmaf(p, r, 1.f);
  float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float y = p * scale;
  y = x < -87.3f ? 0.f : y;
  return x > 88.7f ? kInf : y;
}

// log(x) for x ≥ 0 (−inf at 0, +inf at +inf, NaN for NaN); ~1 ulp for normal x.
KD_HD float kd_log(float x) {
  // x = 2^e · m with m in [√½, √2); log m = 2·atanh(f), f = (m−1)/(m+1), |f| ≤ 0.172, series to f^9.
  uint32_t u = float_to_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 127;
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // in [1, 2)
  bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  float f = (m - 1.f) / (m + 1.f);
  float f2 = f * f;
  float p = 1.f / 9.f;
  p = kd_fmaf(p, f2, 1.f / 7.f);
  p = kd_fmaf(p, f2, 1.f / 5.f);
  p = kd_fmaf(p, f2, 1.f / 3.f);
  p = kd_fmaf(p, f2, 1.f);
  float y = kd_fmaf(static_cast<float>(e), kLn2, 2.f * f * p);
  y = x == 0.f ? -kInf : y;
  return x < kInf ? y : x;  // +inf and NaN pass through; subnormal x is not needed (callers pass x ≥ 1 or sums)
}

// ---------------------------------------------------------------------------------------------------------
// Log units. Everything below keeps its logarithms (s̃, t̃, ℓq, ℓp, the maxima, LSEs, log α, the mixture
// logs) in one unit per build: nats on the CPU, whose polynomials are e^x and ln x, and bits in the CUDA
// kernels, whose hardware computes 2^x and log2 x, so that no exponential there pays a multiplication by
// log2 e (the logits are scaled by log2 e / T once, where they are converted). Probabilities, ratios and the
// Z sums are the same numbers in both. A loss or gradient term that is a logarithm (every KL-type term) is
// converted to nats with kNatsPerUnit where it leaves the log domain; on the CPU that factor is 1 and folds
// away. KD_LOG2_UNITS selects bits in a host build (csrc/cuda/host_check, the host replay of the kernels).
// ---------------------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) || defined(KD_LOG2_UNITS)
#define KD_UNITS_ARE_BITS 1
#else
#define KD_UNITS_ARE_BITS 0
#endif
constexpr float kNatsPerUnit = KD_UNITS_ARE_BITS ? kLn2 : 1.f;
constexpr float kUnitsPerNat = KD_UNITS_ARE_BITS ? kLog2e : 1.f;

// e^(x nats) / 2^(x bits) and ln x / log2 x: the exponential and logarithm of the build's unit.
KD_HD float kd_expu(float x) {
#if defined(__CUDA_ARCH__)
  return kd_ex2_approx(x);
#elif KD_UNITS_ARE_BITS
  return std::exp2(x);
#else
  return kd_exp(x);
#endif
}
KD_HD float kd_logu(float x) {
#if defined(__CUDA_ARCH__)
  return kd_lg2_approx(x);
#elif KD_UNITS_ARE_BITS
  return std::log2(x);
#else
  return kd_log(x);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Storage dtypes → fp32 and back (round to nearest even).
// ---------------------------------------------------------------------------------------------------------

KD_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

KD_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if (f != f) return 0x7fc0;  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half ↔ float by bit manipulation (branch-free, vectorizes; exact for every half including subnormals).
KD_HD float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));  // one hardware conversion; exact, like the bit path below
#endif
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // Re-bias: a half with exponent field E becomes 2^(E−15); shifting by 13 and scaling by 2^112 does it,
  // and the float multiply handles subnormal halves too.
  float mag = bits_to_float(em << 13) * 5.192296858534828e33f;  // 2^112
  uint32_t u = float_to_bits(mag);
  u = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : u;  // inf / NaN
  return bits_to_float(u | sign);
}

KD_HD uint16_t float_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t au = u & 0x7fffffffu;
  float a = bits_to_float(au);
  uint16_t out;
  if (au >= 0x7f800000u) {  // inf or NaN
    out = au > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (a >= 65520.f) {  // rounds to inf
    out = 0x7c00u;
  } else if (a < 6.103515625e-05f) {  // half subnormal range: scale so the float adder rounds for us
    out = static_cast<uint16_t>(float_to_bits(a + 0.5f) - 0x3f000000u);
  } else {  // normal: re-bias the exponent and round the 13 dropped mantissa bits to nearest even
    uint32_t r = au + 0xc8000fffu + ((au >> 13) & 1u);  // −(127−15)<<23, + rounding bias
    out = static_cast<uint16_t>(r >> 13);
  }
  return static_cast<uint16_t>(out | sign);
#endif
}

template <int DT>
KD_HD float load_as_float(const void* base, int64_t i) {
  if (DT == F32) return static_cast<const float*>(base)[i];
  if (DT == BF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  return f16_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <int DT>
KD_HD void store_from_float(void* base, int64_t i, float v) {
  if (DT == F32) {
    static_cast<float*>(base)[i] = v;
  } else if (DT == BF16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_f16(v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row statistics: online log-sum-exp, mergeable (blocks, threads, warps).
// ---------------------------------------------------------------------------------------------------------

// e^(from − to) for rescaling a partial sum kept relative to max `from` onto max `to` ≥ from;
// 0 when `from` is −inf (an empty partial sum), so −inf − (−inf) never makes a NaN.
KD_HD float rescale(float from, float to) { return from == -kInf ? 0.f : kd_expu(from - to); }

// Σ_j e^(x_j − m) together with its max m. Empty state: m = −inf, z = 0.
struct LSEState {
  float m;
  float z;
};

KD_HD LSEState lse_empty() { return {-kInf, 0.f}; }

KD_HD LSEState lse_merge(LSEState a, LSEState b) {
  float m = fmaxf(a.m, b.m);
  return {m, a.z * rescale(a.m, m) + b.z * rescale(b.m, m)};
}

KD_HD float lse_value(LSEState st) { return st.m == -kInf ? -kInf : st.m + kd_logu(st.z); }

// The base a block's (CPU) or group's (CUDA) exponentials are taken against: its max, or 0 for an all −inf
// block, so that e^(x − base) is exactly 0 there instead of e^(−inf − (−inf)) = e^NaN.
KD_HD float exp_base(float m) { return m == -kInf ? 0.f : m; }

// =========================================================================================================
// The divergences: one definition each (MATH.md "Divergences", "More divergences"). The CPU passes
// (csrc/cpu/kd_cpu_kernels.cpp), the CUDA passes (csrc/cuda/kd_rows.cuh) and the host replay of the CUDA
// reductions (csrc/cuda/host_check) are all written against what follows, nothing else.
//
// Two kinds, by what the per-token loss needs (MATH.md "How many passes over a row"):
//   streaming (forward_kl, reverse_kl, jeffreys, renyi): the loss follows from online sums with running
//     maxima (RowStats: LSE_s, LSE_t and the sums DivDef asks for), one pass over the row; a second pass
//     writes the gradient (stream_grad).
//   centered (skew_forward_kl, skew_reverse_kl, jsd, tvd, alpha_beta): per-element terms of the normalized
//     ℓq, ℓp, so pass 1 is LSE_s, LSE_t only; pass 2 sums the loss terms and A = Σ_v a_v, a_v = ∂L/∂ℓq_v
//     (center_terms); pass 3 writes ∂L/∂s̃_j = a_j − q_j A (center_grad).
// Adding a divergence: its number (Divergence here and in kd_kernels/_spec.py), its row in DivDef, its
// parameters in make_div_coef, and its case in stats_finish + stream_grad (streaming) or center_terms
// (centered); then one .cu file instantiating it (csrc/cuda/kd_<name>.cu) and its case in the dispatchers.
// =========================================================================================================

// Parameters of one launch with their derived constants (make_div_coef, once per launch on the host).
struct DivCoef {
  float a;        // α (skew_*, alpha_beta, renyi) or β (jsd)
  float oma;      // 1 − a, rounded once
  float b;                // β of alpha_beta
  float k0, k1, k2, k3;   // alpha_beta: −1/(αβ), α/(α+β), β/(α+β), 1/α;   renyi: 1/(α−1), 1 − α
  float lam, oml;         // interpolation λ and 1 − λ
  bool interp;            // λ < 1: the teacher's tempered logits become λ t̃ + (1−λ) s̃ (TAID)
};

inline DivCoef make_div_coef(int div, double coef, double coef2, double interpolation) {
  DivCoef c = {};
  c.a = static_cast<float>(coef);
  c.b = static_cast<float>(coef2);
  c.oma = static_cast<float>(1.0 - coef);
  if (div == ALPHA_BETA) {
    c.k0 = static_cast<float>(-1.0 / (coef * coef2));
    c.k1 = static_cast<float>(coef / (coef + coef2));
    c.k2 = static_cast<float>(coef2 / (coef + coef2));
    c.k3 = static_cast<float>(1.0 / coef);
  } else if (div == RENYI) {
    c.k0 = static_cast<float>(1.0 / (coef - 1.0));
    c.k1 = static_cast<float>(1.0 - coef);
  }
  c.lam = static_cast<float>(interpolation);
  c.oml = static_cast<float>(1.0 - interpolation);
  c.interp = interpolation != 1.0;
  return c;
}

// Why (divergence, coef, coef2, interpolation) cannot run, or nullptr. The Python side validates first and
// names the public argument; this is the kernels' own guard (CPU and CUDA), host only.
inline const char* divergence_args_error(int div, double coef, double coef2, double interpolation) {
  if (div < 0 || div >= kNumDivergences) {
    return "divergence must be 0..8 (forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl, jsd, tvd, "
           "jeffreys, alpha_beta, renyi)";
  }
  if ((div == SKEW_FORWARD_KL || div == SKEW_REVERSE_KL || div == JSD) && !(coef > 0 && coef < 1)) {
    return "coef (alpha of skew_*, beta of jsd) must lie in the open interval (0, 1)";
  }
  if (div == ALPHA_BETA && !(coef > 0 && std::isfinite(coef) && coef2 > 0 && std::isfinite(coef2))) {
    return "coef and coef2 (alpha, beta of alpha_beta) must be finite and > 0";
  }
  if (div == RENYI && !(coef > 0 && std::isfinite(coef) && coef != 1)) {
    return "coef (alpha of renyi) must be finite, > 0 and != 1";
  }
  if (!(interpolation > 0 && interpolation <= 1)) return "interpolation must lie in (0, 1]";
  return nullptr;
}

// The teacher logit the divergence sees: λ t̃ + (1−λ) s̃ (no gradient flows through the s̃ part: every
// gradient below treats it as the teacher's), or t̃ itself when λ = 1 (not t̃ + 0·s̃, NaN at s̃ = −inf).
// −inf in either gives −inf. Backends hoist the c.interp test out of their loops.
KD_HD float teacher_logit(float tt, float st, const DivCoef& c) {
  return c.interp ? c.lam * tt + c.oml * st : tt;
}

template <int DIV>
struct DivDef {
  static constexpr bool kStreaming =
      DIV == FORWARD_KL || DIV == REVERSE_KL || DIV == JEFFREYS || DIV == RENYI;
  // The streaming sums besides Z_s, Z_t:
  static constexpr bool kXt = DIV == FORWARD_KL || DIV == JEFFREYS;  // X_t = Σ e^(t̃−m_t)(t̃ − s̃)
  static constexpr bool kXs = DIV == REVERSE_KL || DIV == JEFFREYS;  // X_s = Σ e^(s̃−m_s)(s̃ − t̃)
  static constexpr bool kR = DIV == RENYI;                           // Z_r = Σ e^(r̃−m_r), renyi_logit
  // What stream_grad reads besides q_j: a second weight w2 (p_j, or ρ_j = e^(r̃_j − LSE_r) for renyi) and
  // the logits s̃_j, t̃_j.
  static constexpr bool kGradW2 = kXt || kR;
  static constexpr bool kGradLogits = kXs;
  // Centered terms need ℓq, ℓp (tvd only q and p).
  static constexpr bool kCenterLogs = !kStreaming && DIV != TVD;
};

// ---------------------------------------------------------------------------------------------------------
// Streaming kinds.
// ---------------------------------------------------------------------------------------------------------

// Online sums of a row (or of a part of it: mergeable across blocks, threads, warps, cluster blocks). Only
// the fields DivDef asks for are maintained; the others stay at their empty values.
struct RowStats {
  LSEState s;  // of s̃
  LSEState t;  // of t̃ (after teacher_logit)
  LSEState r;  // of r̃ (renyi), taken as α (t̃ − rt0) + (1−α) (s̃ − rs0)
  float xs;    // X_s, relative to s.m
  float xt;    // X_t, relative to t.m
  // renyi: a reference point of the row (the CPU kernel: its first entry, where finite; 0 in the CUDA kernels
  // and the vocabulary-parallel statistics, which still take absolute maxima). r̃ formed
  // from logits near 1e6 would round at that size; from their differences to a point of the row it does not.
  // stats_merge keeps the first operand's.
  float rs0, rt0;
};

KD_HD RowStats stats_empty() { return {lse_empty(), lse_empty(), lse_empty(), 0.f, 0.f, 0.f, 0.f}; }

// w·(a − b) with w = e^(a − m) and the 0·log 0 convention: a weight of 0 (a = −inf) contributes 0 even when
// b = −inf too (where a − b would be NaN).
KD_HD float x_term(float w, float a, float b) { return w == 0.f ? 0.f : w * (a - b); }

// x capped above at `hi` / below at `lo`; a NaN becomes the cap (compares, not fminf / fmaxf: GCC vectorizes
// these; nvcc makes them one FMNMX, whose NaN rule is the same).
KD_HD float cap_above(float x, float hi) { return x < hi ? x : hi; }
KD_HD float cap_below(float x, float lo) { return x > lo ? x : lo; }

// One element's contributions to X_s, X_t given its weights ws = e^(s̃ − m_s), wt = e^(t̃ − m_t).
template <int DIV>
KD_HD float stats_xs(float ws, float st, float tt) {
  return DivDef<DIV>::kXs ? x_term(ws, st, tt) : 0.f;
}
template <int DIV>
KD_HD float stats_xt(float wt, float st, float tt) {
  return DivDef<DIV>::kXt ? x_term(wt, tt, st) : 0.f;
}

// renyi's r̃ = α t̃ + (1−α) s̃, so that Σ p^α q^(1−α) = e^(LSE_r − α LSE_t − (1−α) LSE_s). −inf where p = 0
// (p^α q^(1−α) = 0 there, also for α > 1 where (1−α)·s̃ could be +inf).
KD_HD float renyi_logit(float st, float tt, const DivCoef& c) {
  const float r = c.a * tt + c.k1 * st;
  return tt == -kInf ? -kInf : r;
}

template <int DIV>
KD_HD RowStats stats_merge(RowStats a, RowStats b) {
  RowStats out;
  out.s = lse_merge(a.s, b.s);
  out.t = lse_merge(a.t, b.t);
  out.r = DivDef<DIV>::kR ? lse_merge(a.r, b.r) : a.r;
  out.xs = DivDef<DIV>::kXs ? a.xs * rescale(a.s.m, out.s.m) + b.xs * rescale(b.s.m, out.s.m) : 0.f;
  out.xt = DivDef<DIV>::kXt ? a.xt * rescale(a.t.m, out.t.m) + b.xt * rescale(b.t.m, out.t.m) : 0.f;
  out.rs0 = a.rs0;
  out.rt0 = a.rt0;
  return out;
}

// renyi: the max of the mixed logits relative to the row's maxima, α (t̃ − m_t) + (1−α) (s̃ − m_s), from the
// one relative to its point (rs0, rt0): differences of logits only, rounded at the size of the row's spread
// (stats_finish; the vocabulary-parallel statistics, whose ranks each have their own point).
KD_HD float renyi_max_at_maxima(const RowStats& st, const DivCoef& c) {
  return st.r.m - c.a * (st.t.m - st.rt0) - c.k1 * (st.s.m - st.rs0);
}

// What the gradient passes need from the first pass.
struct RowFinal {
  float lse_s, lse_t, lse_r;  // in log units
  float loss;  // L of a streaming kind, in nats (centered kinds sum theirs in pass 2)
  float rkl;   // jeffreys: its KL(q‖p) part, in nats
  // reverse_kl, jeffreys: ℓq − ℓp − KL(q‖p) = (s̃ − t̃) − gshift, in log units (one subtraction per element)
  float gshift;
};

// The row's LSEs and (streaming kinds) its loss:
//   forward_kl  X_t/Z_t − LSE_t + LSE_s          reverse_kl  X_s/Z_s − LSE_s + LSE_t
//   jeffreys    X_t/Z_t + X_s/Z_s (the LSEs cancel)
//   renyi       (LSE_r − α LSE_t − (1−α) LSE_s) / (α − 1)
// LSE differences are formed as (max differences) + (log Z differences) so large maxima do not cancel.
template <int DIV>
KD_HD RowFinal stats_finish(RowStats st, const DivCoef& c) {
  RowFinal f;
  f.lse_s = lse_value(st.s);
  f.lse_t = lse_value(st.t);
  f.lse_r = DivDef<DIV>::kR ? lse_value(st.r) : 0.f;
  f.loss = 0.f;
  f.rkl = 0.f;
  f.gshift = 0.f;
  if (DivDef<DIV>::kXt || DivDef<DIV>::kXs) {
    const float dm = st.s.m - st.t.m;
    const float dlz = kd_logu(st.s.z) - kd_logu(st.t.z);
    const float fkl = DivDef<DIV>::kXt ? st.xt / st.t.z + dm + dlz : 0.f;
    const float rkl = DivDef<DIV>::kXs ? st.xs / st.s.z - dm - dlz : 0.f;
    f.rkl = rkl * kNatsPerUnit;
    f.gshift = (dm + dlz) + rkl;  // LSE_s − LSE_t + KL(q‖p)
    f.loss = (DIV == FORWARD_KL ? fkl : (DIV == REVERSE_KL ? rkl : st.xt / st.t.z + st.xs / st.s.z)) * kNatsPerUnit;
  } else if (DIV == RENYI) {
    const float dm = renyi_max_at_maxima(st, c);
    const float dlz = kd_logu(st.r.z) - c.a * kd_logu(st.t.z) - c.k1 * kd_logu(st.s.z);
    // r̃ = +inf (α > 1, q = 0 where p > 0): the divergence is +inf.
    f.loss = st.r.m == kInf ? kInf : c.k0 * (dm + dlz) * kNatsPerUnit;
  }
  return f;
}

// The row statistics the passes after the first read: each maximum and the log of its scaled sum, kept apart.
// ℓq = (s̃ − m_s) − log Z_s, and a cached weight e^(x − m(block)) becomes a probability through
// rescale_log(m(block), m_s, log Z_s): never through s̃ − LSE_s, which rounds LSE_s at the size of m_s (at
// logits near 1e6 an ulp is 1/16, an error of 3% in every probability); x − m is exact to rounding and log Z
// is small.
struct RowLogs {
  float ms, lzs;  // m_s, log Z_s
  float mt, lzt;
  float mr, lzr;  // renyi's mixed logits
};

template <int DIV>
KD_HD RowLogs row_logs(const RowStats& st) {
  return {st.s.m, kd_logu(st.s.z), st.t.m, kd_logu(st.t.z), st.r.m, DivDef<DIV>::kR ? kd_logu(st.r.z) : 0.f};
}

// e^((from − m) − lz): a weight kept relative to max `from` as a probability of the row (m, lz); 0 when `from`
// is −inf (an empty block), as rescale().
KD_HD float rescale_log(float from, float m, float lz) {
  return from == -kInf ? 0.f : kd_expu((from - m) - lz);
}

// A counted row is a pair of distributions only if both LSEs are finite: a NaN logit makes its Z NaN (kd_exp
// propagates NaN), a +inf logit (also one from overflow in s/T) makes Z NaN or +inf, an all −inf row makes
// LSE −inf. Every backend then writes loss NaN and a NaN gradient row (the semantics decided for all).
KD_HD bool row_valid(const RowFinal& f) { return f.lse_s - f.lse_s == 0.f && f.lse_t - f.lse_t == 0.f; }

// ∂L/∂s̃_j of a streaming kind, from q_j, w2 (p_j; renyi ρ_j) and, for reverse_kl / jeffreys,
// dqp = ℓq_j − ℓp_j − KL(q‖p) in log units (the caller's (s̃ − t̃) − f.gshift; unused by the others):
//   forward_kl q − p      reverse_kl q (ℓq − ℓp − L)      jeffreys (q − p) + q (ℓq − ℓp − KL(q‖p))
//   renyi q − ρ,  ρ = p^α q^(1−α) / Σ p^α q^(1−α)
// and 0 for the q-weighted part where q_j = 0: there s̃ = −inf or ℓq underflowed, and dqp is −inf (NaN when
// t̃ = −inf too), capped at −FLT_MAX so that q · it is 0.
template <int DIV>
KD_HD float stream_grad(float q, float w2, float dqp) {
  if (DIV == FORWARD_KL || DIV == RENYI) return q - w2;
  const float d = cap_below(dqp, -3.4028234663852886e38f);
  const float gq = (q * d) * kNatsPerUnit;
  return DIV == REVERSE_KL ? gq : (q - w2) + gq;
}

// ---------------------------------------------------------------------------------------------------------
// Centered kinds.
// ---------------------------------------------------------------------------------------------------------

// The mixtures of the skew and JS divergences in log space (MATH.md: never α p + (1−α) q from probabilities
// that may have underflowed). m = α p + (1−α) q is m = p · (α + (1−α) e^(ℓq − ℓp)), so
//   ℓp − log m = −log d,   p / m = 1 / d,   d = α + (1−α) e^(ℓq − ℓp) ≥ α,
// one exponential and one logarithm of a number ≥ α: logaddexp taken against ℓp (skew_forward_kl; ℓq for
// skew_reverse_kl's m' = α q + (1−α) p, where only q-weighted terms appear), and no cancellation in what is
// used. The exponent is capped at kMaxLogGap, where e^x is still finite: beyond it the reference probability
// is below the smallest normal float, so the terms it weights are 0 (flushed) or under 1e-37, and a
// NaN gap (both −inf, e.g. padding) becomes the cap instead of spreading. jsd needs both ℓp − log M and
// ℓq − log M, so it takes the larger side as the reference (log_mix_gaps).
constexpr float kMaxLogGap = KD_UNITS_ARE_BITS ? 126.f : 87.f;

// 1 / x: the GPU's reciprocal unit (rcp.approx.ftz, 1 ulp), no IEEE division with its slow-path check.
KD_HD float kd_rcp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

// M = w·x + (1−w)·y from ℓx, ℓy: returns (ℓx − log M, ℓy − log M) against the larger of the two, so that
// each comes out without cancellation (w1 = 1 − w, rounded once by the caller).
struct MixGaps {
  float dx, dy;
};
KD_HD MixGaps log_mix_gaps(float lx, float ly, float w, float w1) {
  const float g = cap_below(cap_above(lx - ly, kMaxLogGap), -kMaxLogGap);  // NaN → the cap
  const bool xbig = g > 0.f;
  const float e = kd_expu(-fabsf(g));                  // e^(−|g|)
  const float d = xbig ? w + w1 * e : w1 + w * e;      // M / max(x, y) ∈ [min(w, 1−w), 1]
  const float ld = kd_logu(d);
  MixGaps out;
  out.dx = (g < 0.f ? g : 0.f) - ld;  // ℓx − log M
  out.dy = (g > 0.f ? -g : 0.f) - ld;  // ℓy − log M
  return out;
}

// The per-element pieces of a centered divergence at one vocabulary entry: q_j, a_j = ∂L/∂ℓq_j and the
// loss term, both in nats.
struct CenterTerms {
  float q;
  float a;
  float loss;
};

// From ℓq_j, ℓp_j (log units) and q_j = e^ℓq_j, p_j = e^ℓp_j (already computed by the caller). Loss term / a_j:
//   skew_forward_kl  p (ℓp − log m),  m = α p + (1−α) q      a = −(1−α) q p/m
//   skew_reverse_kl  q (ℓq − log m'), m' = α q + (1−α) p     a = q (ℓq − log m' − α q/m')
//   jsd   β p (ℓp − log M) + (1−β) q (ℓq − log M), M = β p + (1−β) q      a = (1−β) q (ℓq − log M)
//   tvd   ½ |p − q|                                          a = ½ q sign(q − p), sign(0) = 0
//   alpha_beta  −1/(αβ) [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]    a = (1/α) q^β (q^α − p^α)
//   jeffreys    (p − q)(ℓp − ℓq)                                 a = q (ℓq − ℓp) − p
// with 0·log 0 = 0 (p = 0 or q = 0 terms are 0). jeffreys is streaming in the dense kernels (its loss comes
// from the row sums X_s, X_t); its per-element form here serves the vocabulary-parallel shard passes
// (csrc/cpu/kd_cpu_kernels.cpp, vp_*), where the loss and A are sums over the shards.
template <int DIV>
KD_HD CenterTerms center_terms(float lq, float lp, float q, float p, const DivCoef& c) {
  CenterTerms out;
  out.q = q;
  if (DIV == SKEW_FORWARD_KL) {
    const float gap = cap_above(lq - lp, kMaxLogGap);
    const float d = c.a + c.oma * kd_expu(gap);  // m / p
    out.loss = -(p * kd_logu(d)) * kNatsPerUnit;  // 0 where p = 0: d is finite
    // a = −(1−α) q p/m, 0 at the cap (p = 0 or below the smallest normal), decided without p itself so
    // that the gradient pass needs no e^ℓp.
    out.a = gap == kMaxLogGap ? 0.f : -(c.oma * q) * kd_rcp(d);
  } else if (DIV == SKEW_REVERSE_KL) {
    const float d = c.a + c.oma * kd_expu(cap_above(lp - lq, kMaxLogGap));  // m' / q
    const float ld = kd_logu(d) * kNatsPerUnit;                            // log m' − ℓq, in nats
    out.loss = -(q * ld);
    out.a = -(q * (ld + c.a * kd_rcp(d)));
  } else if (DIV == JSD) {
    const MixGaps m = log_mix_gaps(lp, lq, c.a, c.oma);
    out.a = q * (m.dy * (c.oma * kNatsPerUnit));                      // (1−β) q (ℓq − log M)
    out.loss = (c.a * kNatsPerUnit) * (p * m.dx) + out.a;             // + β p (ℓp − log M)
  } else if (DIV == TVD) {
    out.loss = 0.5f * (p > q ? p - q : q - p);
    out.a = q > p ? 0.5f * q : (q < p ? -0.5f * q : 0.f);
  } else if (DIV == JEFFREYS) {
    const float rev = x_term(q, lq, lp) * kNatsPerUnit;  // q (ℓq − ℓp), 0 where q = 0
    out.loss = x_term(p, lp, lq) * kNatsPerUnit + rev;
    out.a = rev - p;
  } else {  // ALPHA_BETA
    const float pa = kd_expu(c.a * lp), pb = kd_expu(c.b * lp);
    const float qa = kd_expu(c.a * lq), qb = kd_expu(c.b * lq);
    out.loss = c.k0 * (pa * qb - c.k1 * (pa * pb) - c.k2 * (qa * qb));
    out.a = c.k3 * qb * (qa - pa);
  }
  return out;
}

// ∂L/∂s̃_j = a_j − q_j A, A = Σ_v a_v (the softmax chain rule, MATH.md "More divergences").
KD_HD float center_grad(float q, float a, float A) { return a - q * A; }

}  // namespace kd
