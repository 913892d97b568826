// kd_group_math.h — per-group (8 columns) helpers of the CUDA row kernels, host-device like kd_math.h.
//
// Kept apart from kd_rows.cuh (which needs the CUDA runtime and cooperative groups) so that a host program,
// host_check/kd_group_host_check.cpp, can run the kernels' accumulation and merge logic on the CPU against
// float64 (no GPU here). Only kd_math.h formulas are used.
#pragma once

#include <stdint.h>

#include "kd_kernels/kd_math.h"

namespace kd {
namespace cuda_detail {

// `KD_UNROLL` for nvcc only (host compilers warn on it; they unroll these fixed 8-trip loops anyway).
#if defined(__CUDACC__)
#define KD_UNROLL _Pragma("unroll")
#else
#define KD_UNROLL
#endif

constexpr int kGroup = 8;  // columns per group (16 bytes of a 16-bit dtype)

template <int DT>
struct DTypeInfo {
  static constexpr int kBytes = DT == F32 ? 4 : 2;
  static constexpr int kPlanes = kBytes * kGroup / 16;  // 16-byte vectors per group
  static constexpr uint32_t kNegInfBits = DT == F32 ? 0xff800000u : (DT == BF16 ? 0xff80u : 0xfc00u);
};

// 8 consecutive columns of one tensor in its storage dtype, as 32-bit words (little-endian packing).
template <int DT>
struct RawGroup {
  uint32_t w[4 * DTypeInfo<DT>::kPlanes];
};

template <int SD, int TD>
struct RawPair {
  RawGroup<SD> s;
  RawGroup<TD> t;
};

// Column j (0..7) of a group, as fp32 (j is a compile-time constant after unrolling).
template <int DT>
KD_HD float group_elem(const RawGroup<DT>& r, int j) {
  if (DT == F32) return bits_to_float(r.w[j]);
  uint32_t word = r.w[j >> 1];
  uint16_t h = static_cast<uint16_t>((j & 1) ? (word >> 16) : (word & 0xffffu));
  return DT == BF16 ? bf16_to_float(h) : f16_to_float(h);
}

template <int DT>
KD_HD void group_to_float(const RawGroup<DT>& r, float inv_t, float out[kGroup]) {
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) out[j] = group_elem<DT>(r, j) * inv_t;
}

// ---------------------------------------------------------------------------------------------------------
// Online accumulation of one group: one exponential per element (plus one rescale per group), built from
// kd_math's rescale(): e^(x − m), 0 for x = −inf, so an all −inf prefix (m = −inf) never forms −inf − (−inf).
// ---------------------------------------------------------------------------------------------------------

KD_HD float group_max(const float x[kGroup]) {
  float m = x[0];
KD_UNROLL
  for (int j = 1; j < kGroup; ++j) m = fmaxf(m, x[j]);
  return m;
}

KD_HD void lse_push_group(LSEState& st, const float x[kGroup]) {
  const float m = fmaxf(st.m, group_max(x));
  float z = st.z * rescale(st.m, m);
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) z += rescale(x[j], m);
  st = {m, z};
}

// KLState update (kd_math.h: forward X = Σ e^(t̃−m_t)(t̃ − s̃), reverse X = Σ e^(s̃−m_s)(s̃ − t̃)), with the
// 0·log 0 convention of kl_term: a zero weight contributes 0 even when the difference is ±inf or NaN.
template <int DIV>
KD_HD void kl_push_group(KLState& st, const float sv[kGroup], const float tv[kGroup]) {
  const float ms = fmaxf(st.s.m, group_max(sv));
  const float mt = fmaxf(st.t.m, group_max(tv));
  const float ks = rescale(st.s.m, ms), kt = rescale(st.t.m, mt);
  float zs = st.s.z * ks, zt = st.t.z * kt;
  float x = st.x * (DIV == FORWARD_KL ? kt : ks);
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) {
    const float es = rescale(sv[j], ms), et = rescale(tv[j], mt);
    zs += es;
    zt += et;
    if (DIV == FORWARD_KL) {
      x += et == 0.f ? 0.f : et * (tv[j] - sv[j]);
    } else {
      x += es == 0.f ? 0.f : es * (sv[j] - tv[j]);
    }
  }
  st.s = {ms, zs};
  st.t = {mt, zt};
  st.x = x;
}

}  // namespace cuda_detail
}  // namespace kd
