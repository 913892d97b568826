// kd_math.h — the per-element math of every kd_kernels divergence, written once.
//
// Included by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda): every function is an inline
// host-device function with no dependency on torch, so the CPU tests exercise the very formulas the GPU runs.
// Notation and formulas follow shared/docs/MATH.md:
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
enum Divergence : int { FORWARD_KL = 0, REVERSE_KL = 1, SKEW_FORWARD_KL = 2, SKEW_REVERSE_KL = 3, JSD = 4 };
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

// e^x for any float x: 0 for x < −87.3 (including −inf), +inf above 88.7, < 1 ulp elsewhere on the CPU.
KD_HD float kd_exp(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * kLog2e);
#else
  // x = n ln2 + r, |r| ≤ ln2/2; e^r by its Taylor series to r^7 (truncation < 6e-9 relative).
  // Clamp with compares and round with the 1.5·2^23 trick (exact round-to-nearest for |v| < 2^22) rather
  // than fminf / fmaxf / rintf: GCC does not vectorize those calls without -ffast-math-style flags.
  float xc = x > -87.3f ? x : -87.3f;
  xc = xc < 88.7f ? xc : 88.7f;
  float n = (xc * kLog2e + 12582912.f) - 12582912.f;
  float r = kd_fmaf(n, -0.693145751953125f, xc);  // ln2 split in a short high part and the rest,
  r = kd_fmaf(n, -1.428606765330187e-06f, r);     // so n·ln2_hi is exact
  float p = 1.f / 5040.f;
  p = kd_fmaf(p, r, 1.f / 720.f);
  p = kd_fmaf(p, r, 1.f / 120.f);
  p = kd_fmaf(p, r, 1.f / 24.f);
  p = kd_fmaf(p, r, 1.f / 6.f);
  p = kd_fmaf(p, r, 0.5f);
  p = kd_fmaf(p, r, 1.f);
  p = kd_fmaf(p, r, 1.f);
  float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float y = p * scale;
  y = x < -87.3f ? 0.f : y;
  return x > 88.7f ? kInf : y;
#endif
}

// log(x) for x ≥ 0 (−inf at 0, +inf at +inf); ~1 ulp on the CPU for normal x.
KD_HD float kd_log(float x) {
#if defined(__CUDA_ARCH__)
  return __log2f(x) * kLn2;
#else
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
  return x == kInf ? kInf : y;  // subnormal x is not needed here (callers pass x ≥ 1 or row sums)
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
KD_HD float rescale(float from, float to) { return from == -kInf ? 0.f : kd_exp(from - to); }

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

KD_HD float lse_value(LSEState st) { return st.m == -kInf ? -kInf : st.m + kd_log(st.z); }

// Forward / reverse KL in one pass (MATH.md, "How many passes"): both LSE states plus
//   forward: X = Σ e^(t̃−m_t)(t̃ − s̃)   reverse: X = Σ e^(s̃−m_s)(s̃ − t̃),
// X kept relative to the max of the distribution that weights it (m_t forward, m_s reverse).
struct KLState {
  LSEState s;
  LSEState t;
  float x;
};

KD_HD KLState kl_empty() { return {lse_empty(), lse_empty(), 0.f}; }

// The weighted term e^(a − m)(a − b) with the 0·log 0 convention: a weight of 0 (a = −inf) contributes 0
// even when b = −inf too (where a − b would be NaN).
KD_HD float kl_term(float a, float m, float b) {
  float w = kd_exp(a - m);
  return w == 0.f ? 0.f : w * (a - b);
}

template <int DIV>
KD_HD KLState kl_merge(KLState a, KLState b) {
  KLState out;
  out.s = lse_merge(a.s, b.s);
  out.t = lse_merge(a.t, b.t);
  float ma = DIV == FORWARD_KL ? a.t.m : a.s.m;
  float mb = DIV == FORWARD_KL ? b.t.m : b.s.m;
  float m = DIV == FORWARD_KL ? out.t.m : out.s.m;
  out.x = a.x * rescale(ma, m) + b.x * rescale(mb, m);
  return out;
}

// The per-token KL from the final state: FKL = A/Z_t − LSE_t + LSE_s, RKL = B/Z_s − LSE_s + LSE_t.
// The LSE difference is formed as (m_s − m_t) + (log Z_s − log Z_t) to keep large maxima from cancelling.
template <int DIV>
KD_HD float kl_finish(KLState st) {
  float dm = st.s.m - st.t.m;
  float dlz = kd_log(st.s.z) - kd_log(st.t.z);
  if (DIV == FORWARD_KL) return st.x / st.t.z + dm + dlz;
  return st.x / st.s.z - dm - dlz;
}

// ∂L/∂s̃_j for forward / reverse KL (second pass). `lse_s`, `lse_t` are the row LSEs of s̃, t̃; `loss` is L.
//   forward: q_j − p_j          reverse: q_j (ℓq_j − ℓp_j − L), 0 where q_j = 0
// kl_grad_qp takes q_j (and p_j for forward KL; ignored for reverse) already computed, for kernels that keep
// the exponentials of the first pass (the CPU kernel caches them in a row buffer).
template <int DIV>
KD_HD float kl_grad_qp(float q, float p, float st_j, float tt_j, float lse_s, float lse_t, float loss) {
  if (DIV == FORWARD_KL) return q - p;
  float g = q * ((st_j - tt_j) - (lse_s - lse_t) - loss);
  return q == 0.f ? 0.f : g;
}

template <int DIV>
KD_HD float kl_grad(float st_j, float tt_j, float lse_s, float lse_t, float loss) {
  float q = kd_exp(st_j - lse_s);
  float p = DIV == FORWARD_KL ? kd_exp(tt_j - lse_t) : 0.f;
  return kl_grad_qp<DIV>(q, p, st_j, tt_j, lse_s, lse_t, loss);
}

// ---------------------------------------------------------------------------------------------------------
// Skew KL and JSD: need ℓq, ℓp inside a log, hence three passes (LSEs; loss + centering sum; gradient).
// Every one of them has a gradient of the form  ∂L/∂s̃_j = k · q_j · (v_j − S),  S = Σ_v q_v v_v:
//   skew_forward_kl  v = r = p/m,                 k = −(1−α)     m  = α p + (1−α) q
//   skew_reverse_kl  v = u = ℓq − log m' − α q/m', k = 1          m' = (1−α) p + α q
//   jsd              v = w = ℓq − log M,           k = 1 − β      M  = β p + (1−β) q
// ---------------------------------------------------------------------------------------------------------

// The coefficient a (α or β) with its logs, computed once per launch.
struct MixCoef {
  float a;
  float log_a;
  float log_1ma;
};

inline MixCoef make_mix_coef(double a) {
  return {static_cast<float>(a), static_cast<float>(std::log(a)), static_cast<float>(std::log1p(-a))};
}

// log(w·x + (1−w)·y) from log x, log y in log space (MATH.md: never in probability space).
KD_HD float log_mix(float lx, float ly, float log_w, float log_1mw) {
  float a = lx + log_w, b = ly + log_1mw;
  // Compares, not fmaxf / fminf: those calls keep GCC from vectorizing the CPU loops (equal for non-NaN).
  float hi = a > b ? a : b, lo = a > b ? b : a;
  float out = hi + kd_log(1.f + kd_exp(lo - hi));
  return hi == -kInf ? -kInf : out;
}

// The per-element pieces of a skew / JSD divergence at one vocabulary entry: q_j, v_j and the loss term.
struct SkewTerms {
  float q;
  float v;
  float loss;
};

// skew_terms_qp takes q = e^ℓq and p = e^ℓp already computed (see kl_grad_qp); skew_terms computes them.
template <int DIV>
KD_HD SkewTerms skew_terms_qp(float lq, float lp, float q, float p, MixCoef c) {
  SkewTerms out;
  out.q = q;
  if (DIV == SKEW_FORWARD_KL) {
    float lm = log_mix(lp, lq, c.log_a, c.log_1ma);  // α p + (1−α) q
    float d = lp - lm;
    out.loss = p == 0.f ? 0.f : p * d;
    out.v = p == 0.f ? 0.f : kd_exp(d);
  } else if (DIV == SKEW_REVERSE_KL) {
    float lm = log_mix(lq, lp, c.log_a, c.log_1ma);  // α q + (1−α) p
    float d = lq - lm;
    out.loss = q == 0.f ? 0.f : q * d;
    out.v = q == 0.f ? 0.f : d - c.a * kd_exp(d);
  } else {  // JSD, c.a = β
    float lm = log_mix(lp, lq, c.log_a, c.log_1ma);  // β p + (1−β) q
    float dp = lp - lm, dq = lq - lm;
    out.loss = c.a * (p == 0.f ? 0.f : p * dp) + (1.f - c.a) * (q == 0.f ? 0.f : q * dq);
    out.v = q == 0.f ? 0.f : dq;
  }
  return out;
}

template <int DIV>
KD_HD SkewTerms skew_terms(float lq, float lp, MixCoef c) {
  return skew_terms_qp<DIV>(lq, lp, kd_exp(lq), kd_exp(lp), c);
}

template <int DIV>
KD_HD float skew_grad_coef(MixCoef c) {
  return DIV == SKEW_FORWARD_KL ? -(1.f - c.a) : (DIV == SKEW_REVERSE_KL ? 1.f : 1.f - c.a);
}

// ∂L/∂s̃_j = k q_j (v_j − S); 0 where q_j = 0.
template <int DIV>
KD_HD float skew_grad(SkewTerms e, float S, MixCoef c) {
  return e.q == 0.f ? 0.f : skew_grad_coef<DIV>(c) * e.q * (e.v - S);
}

}  // namespace kd
