// kd_group_math.h — per-group (8 columns) helpers of the CUDA row kernels, host-device like kd_math.h.
//
// Kept apart from kd_rows.cuh (which needs the CUDA runtime and cooperative groups) so that a host program,
// host_check/kd_group_host_check.cpp, can run the kernels' accumulation and merge logic on the CPU against
// float64 (no GPU here). Only kd_math.h definitions are used (one per divergence: DivDef, stats_*,
// stream_grad, center_terms).
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

// s̃ and the teacher logit (kd_math.h teacher_logit: the interpolation fused into the load) of one group.
template <int SD, int TD>
KD_HD void pair_to_float(const RawGroup<SD>& rs, const RawGroup<TD>& rt, float inv_t, const DivCoef& c,
                         float sv[kGroup], float tv[kGroup]) {
  group_to_float<SD>(rs, inv_t, sv);
  group_to_float<TD>(rt, inv_t, tv);
  if (c.interp) {
KD_UNROLL
    for (int j = 0; j < kGroup; ++j) tv[j] = teacher_logit(tv[j], sv[j], c);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Online accumulation of one group into a RowStats (kd_math.h): the running maxima grow, the sums kept so
// far are rescaled (kd_math's rescale(): 0 for an empty −inf prefix), then each element adds its weight
// e^(x − base), base = exp_base(max), and the X terms DivDef<DIV> asks for. One exponential per element and
// sum (plus one rescale per group and sum); the −inf guard is paid once per group (exp_base), not per element.
// Centered kinds keep only Z_s, Z_t here.
// ---------------------------------------------------------------------------------------------------------

KD_HD float group_max(const float x[kGroup]) {
  float m = x[0];
KD_UNROLL
  for (int j = 1; j < kGroup; ++j) m = fmaxf(m, x[j]);
  return m;
}

template <int DIV>
KD_HD void stats_push_group(RowStats& st, const float sv[kGroup], const float tv[kGroup], const DivCoef& c) {
  using D = DivDef<DIV>;
  const float ms = fmaxf(st.s.m, group_max(sv));
  const float mt = fmaxf(st.t.m, group_max(tv));
  const float ks = rescale(st.s.m, ms), kt = rescale(st.t.m, mt);
  float zs = st.s.z * ks, zt = st.t.z * kt;
  float xs = D::kXs ? st.xs * ks : 0.f, xt = D::kXt ? st.xt * kt : 0.f;
  float rv[kGroup];
  float mr = st.r.m, zr = st.r.z;
  if (D::kR) {
KD_UNROLL
    for (int j = 0; j < kGroup; ++j) rv[j] = renyi_logit(sv[j], tv[j], c);
    mr = fmaxf(st.r.m, group_max(rv));
    zr = st.r.z * rescale(st.r.m, mr);
  }
  // One −inf guard per group, not per element: against exp_base(m) (0 when the max is −inf, i.e. the group
  // and everything before it is −inf) every element's e^(x − base) is 0 for x = −inf and never −inf − (−inf).
  // A NaN or +inf element makes its sum NaN either way (+inf: base = +inf, +inf − +inf), as rescale() did.
  const float bs = exp_base(ms), bt = exp_base(mt), br = exp_base(mr);
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) {
    const float es = kd_exp(sv[j] - bs), et = kd_exp(tv[j] - bt);
    zs += es;
    zt += et;
    xs += stats_xs<DIV>(es, sv[j], tv[j]);
    xt += stats_xt<DIV>(et, sv[j], tv[j]);
    if (D::kR) zr += kd_exp(rv[j] - br);
  }
  st.s = {ms, zs};
  st.t = {mt, zt};
  st.r = {mr, zr};
  st.xs = xs;
  st.xt = xt;
}

}  // namespace cuda_detail
}  // namespace kd
