// kd_group_math.h — per-group (8 columns) helpers of the CUDA row kernels, host-device like kd_math.h.
//
// Kept apart from kd_rows.cuh (which needs the CUDA runtime and cooperative groups) so that a host program,
// host_check/kd_group_host_check.cpp, can run the kernels' per-group passes and merge logic on the CPU against
// float64 (no GPU here), in the kernels' log units (bits: it is built with KD_LOG2_UNITS). Only kd_math.h
// definitions are used (one per divergence: DivDef, stats_*, stream_grad, center_terms).
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
KD_HD void group_to_float(const RawGroup<DT>& r, float out[kGroup]) {
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) out[j] = group_elem<DT>(r, j);
}

// The student logits and the teacher logits the divergence sees (kd_math.h teacher_logit: the interpolation,
// linear, fused into the load) of one group, unscaled. Every pass scales them into log units inside the
// subtraction that uses them, x · k − m as one FMA with k = kUnitsPerNat / T (log2 e / T in the kernels):
// no separate multiply, and each pass forms the very same (exactly rounded) values, so the sums of pass A
// and the terms of the later passes agree.
template <int SD, int TD>
KD_HD void pair_to_float(const RawGroup<SD>& rs, const RawGroup<TD>& rt, const DivCoef& c, float sv[kGroup],
                         float tv[kGroup]) {
  group_to_float<SD>(rs, sv);
  group_to_float<TD>(rt, tv);
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

// The empty RowStats of a row whose first group is (sv, tv) (pair_to_float): renyi's point (rs0, rt0) is the
// row's first column in log units, x · k rounded (0 where not finite: such a row is not valid anyway). Every
// thread of every block of the row forms the same point; the mixed logits are then α (t̃ − rt0) + (1−α)
// (s̃ − rs0) with each difference one FMA, exact to one rounding (never α t̃ + (1−α) s̃, which rounds at the
// size of the logits: 1/16 at 1e6), and stats_finish takes LSE_r relative to the same point.
template <int DIV>
KD_HD RowStats stats_start(const float sv[kGroup], const float tv[kGroup], float k) {
  RowStats st = stats_empty();
  if (DivDef<DIV>::kR) {
    const float s0 = sv[0] * k, t0 = tv[0] * k;
    st.rs0 = s0 - s0 == 0.f ? s0 : 0.f;
    st.rt0 = t0 - t0 == 0.f ? t0 : 0.f;
  }
  return st;
}

// renyi's mixed logit of one element in log units, relative to the point (rs0, rt0) of stats_start.
KD_HD float group_renyi_logit(float sv, float tv, float k, float rs0, float rt0, const DivCoef& c) {
  return renyi_logit(fmaf(sv, k, -rs0), fmaf(tv, k, -rt0), c);
}

KD_HD float group_max(const float x[kGroup]) {
  float m = x[0];
KD_UNROLL
  for (int j = 1; j < kGroup; ++j) m = fmaxf(m, x[j]);
  return m;
}

// sv, tv unscaled (pair_to_float), k = kUnitsPerNat / T > 0: the group max in log units is group_max(x) · k
// (rounding is monotonic, so it is the max of the rounded x · k). The X terms are summed over the group
// unscaled and scaled once.
template <int DIV>
KD_HD void stats_push_group(RowStats& st, const float sv[kGroup], const float tv[kGroup], float k,
                            const DivCoef& c) {
  using D = DivDef<DIV>;
  const float ms = fmaxf(st.s.m, group_max(sv) * k);
  const float mt = fmaxf(st.t.m, group_max(tv) * k);
  const float ks = rescale(st.s.m, ms), kt = rescale(st.t.m, mt);
  float zs = st.s.z * ks, zt = st.t.z * kt;
  float xs = D::kXs ? st.xs * ks : 0.f, xt = D::kXt ? st.xt * kt : 0.f;
  float rv[kGroup];
  float mr = st.r.m, zr = st.r.z;
  if (D::kR) {
KD_UNROLL
    for (int j = 0; j < kGroup; ++j) rv[j] = group_renyi_logit(sv[j], tv[j], k, st.rs0, st.rt0, c);
    mr = fmaxf(st.r.m, group_max(rv));
    zr = st.r.z * rescale(st.r.m, mr);
  }
  // One −inf guard per group, not per element: against exp_base(m) (0 when the max is −inf, i.e. the group
  // and everything before it is −inf) every element's e^(x − base) is 0 for x = −inf and never −inf − (−inf).
  // A NaN or +inf element makes its sum NaN either way (+inf: base = +inf, +inf − +inf), as rescale() did.
  const float bs = exp_base(ms), bt = exp_base(mt), br = exp_base(mr);
  float gxs = 0.f, gxt = 0.f;
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) {
    const float es = kd_expu(fmaf(sv[j], k, -bs)), et = kd_expu(fmaf(tv[j], k, -bt));
    zs += es;
    zt += et;
    gxs += stats_xs<DIV>(es, sv[j], tv[j]);
    gxt += stats_xt<DIV>(et, sv[j], tv[j]);
    if (D::kR) zr += kd_expu(rv[j] - br);
  }
  st.s = {ms, zs};
  st.t = {mt, zt};
  st.r = {mr, zr};
  st.xs = D::kXs ? fmaf(gxs, k, xs) : 0.f;
  st.xt = D::kXt ? fmaf(gxt, k, xt) : 0.f;
}

// ---------------------------------------------------------------------------------------------------------
// The passes after A, one group at a time. Logs are in log units (kd_math.h: bits in the kernels, and in the
// host replay built with KD_LOG2_UNITS), ℓq = (s̃ − m_s) − log Z_s and ℓp = (t̃ − m_t) − log Z_t from the merged
// row statistics: not s̃ − LSE_s, which is rounded at the size of m_s (at logits ~1e3, ~1e-4 relative);
// s̃ − m_s (one FMA from the unscaled logit) is exact to rounding, and log Z is small.
// ---------------------------------------------------------------------------------------------------------

// RowLogs, row_logs: kd_math.h (the CPU kernels use the same).

// Streaming kinds, pass B: out = scale · ∂L/∂s̃ (stream_grad). sv, tv unscaled, k as in stats_push_group;
// st: renyi's point (rs0, rt0), so that ρ_j = e^((r̃_j − m_r) − log Z_r) is formed as pass A formed Z_r.
template <int DIV>
KD_HD void group_stream_grad(const float sv[kGroup], const float tv[kGroup], float k, const RowLogs& l,
                             const RowFinal& f, const RowStats& st, const DivCoef& c, float scale,
                             float out[kGroup]) {
  using D = DivDef<DIV>;
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) {
    float w2 = 0.f;
    if (D::kR) {
      w2 = kd_expu((group_renyi_logit(sv[j], tv[j], k, st.rs0, st.rt0, c) - l.mr) - l.lzr);
    } else if (D::kGradW2) {
      w2 = kd_expu(fmaf(tv[j], k, -l.mt) - l.lzt);
    }
    const float dqp = D::kGradLogits ? fmaf(sv[j] - tv[j], k, -f.gshift) : 0.f;  // ℓq − ℓp − KL(q‖p)
    out[j] = stream_grad<DIV>(kd_expu(fmaf(sv[j], k, -l.ms) - l.lzs), w2, dqp) * scale;
  }
}

// ℓq, ℓp of one element from its unscaled logits.
KD_HD float group_lq(float sv, float k, const RowLogs& l) { return fmaf(sv, k, -l.ms) - l.lzs; }
KD_HD float group_lp(float tv, float k, const RowLogs& l) { return fmaf(tv, k, -l.mt) - l.lzt; }

// Centered kinds, pass B: adds the group's loss terms and a_j to loss, asum.
template <int DIV>
KD_HD void group_center_sums(const float sv[kGroup], const float tv[kGroup], float k, const RowLogs& l,
                             const DivCoef& c, float& loss, float& asum) {
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) {
    const float lq = group_lq(sv[j], k, l), lp = group_lp(tv[j], k, l);
    const CenterTerms e = center_terms<DIV>(lq, lp, kd_expu(lq), kd_expu(lp), c);
    loss += e.loss;
    asum += e.a;
  }
}

// Centered kinds, pass C: out = scale · (a_j − q_j A).
template <int DIV>
KD_HD void group_center_grad(const float sv[kGroup], const float tv[kGroup], float k, const RowLogs& l,
                             const DivCoef& c, float A, float scale, float out[kGroup]) {
KD_UNROLL
  for (int j = 0; j < kGroup; ++j) {
    const float lq = group_lq(sv[j], k, l), lp = group_lp(tv[j], k, l);
    const CenterTerms e = center_terms<DIV>(lq, lp, kd_expu(lq), kd_expu(lp), c);
    out[j] = center_grad(e.q, e.a, A) * scale;
  }
}

}  // namespace cuda_detail
}  // namespace kd
