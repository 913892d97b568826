// kd_group_host_check.cpp — runs the CUDA row kernels' accumulation and reduction logic on the CPU.
//
// No GPU here, so this program replays what kd_rows_kernel does for one row, on the host: the column slice
// of each cluster block, each thread's strided groups (with −inf padding past V), the per-group online
// updates of kd_group_math.h (the interpolated teacher included), the warp butterfly (xor 16 … 1), the block merge over warps, the cluster merge
// over blocks, then the loss and gradient definitions of kd_math.h, for every divergence; and compares with
// float64.
// Build and run (any C++17 compiler; not part of the extension):
//   g++ -std=c++17 -O2 -I csrc/include -I csrc/cuda csrc/cuda/host_check/kd_group_host_check.cpp -o /tmp/c && /tmp/c
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

// The kernels' log units: bits (kd_math.h "Log units"), with the host's exp2 / log2 for 2^x, log2 x.
#define KD_LOG2_UNITS 1
#include "kd_group_math.h"

using namespace kd;
using namespace kd::cuda_detail;

namespace {

template <class T, class M>
T reduce_like_gpu(std::vector<T> per_thread, int threads, M merge) {
  // warp butterfly: after xor steps every lane holds the warp value; lane 0's is used.
  const int nw = threads / 32;
  std::vector<T> warp(nw);
  for (int w = 0; w < nw; ++w) {
    std::vector<T> lanes(per_thread.begin() + 32 * w, per_thread.begin() + 32 * (w + 1));
    for (int o = 16; o > 0; o >>= 1) {
      std::vector<T> next(32);
      for (int l = 0; l < 32; ++l) next[l] = merge(lanes[l], lanes[l ^ o]);
      lanes = next;
    }
    warp[w] = lanes[0];
  }
  T acc = warp[0];
  for (int w = 1; w < nw; ++w) acc = merge(acc, warp[w]);
  return acc;
}

struct Sum2 {
  float a, b;
};

// A logit stored in dtype DT (bf16 or fp32) as bits, and back.
template <int DT>
uint32_t to_bits(float x) {
  return DT == F32 ? float_to_bits(x) : float_to_bf16(x);
}
template <int DT>
float from_bits(uint32_t b) {
  return DT == F32 ? bits_to_float(b) : bf16_to_float(static_cast<uint16_t>(b));
}

// One row: s, t as bits of dtype DT, every logit + shift (fp32 only: there, at 1e6, an ulp is 1/16); returns
// max errors against float64.
template <int DIV, int DT = BF16>
bool check_row(int V, int C, int threads, float T, double lam, double coef, double coef2, std::mt19937& rng,
               double* loss_err, double* grad_err, float shift = 0.f) {
  using D = DivDef<DIV>;
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<uint32_t> sb(V), tb(V);
  // Some p = 0 columns, except where a divergence is then +inf wherever q > 0 (reverse_kl, jeffreys).
  const bool holes = DIV != REVERSE_KL && DIV != JEFFREYS;
  for (int j = 0; j < V; ++j) {
    sb[j] = to_bits<DT>(nd(rng) + shift);
    tb[j] = to_bits<DT>(holes && j % 7 == 3 ? -kInf : nd(rng) + shift);
  }
  const float inv_t = 1.f / T, uscale = inv_t * kUnitsPerNat;
  const DivCoef dc = make_div_coef(DIV, coef, coef2, lam);
  const int64_t ngroups = (V + kGroup - 1) / kGroup;
  const int64_t G = (ngroups + C - 1) / C;
  auto group = [&](const std::vector<uint32_t>& b, int64_t g) {
    RawGroup<DT> r{};
    for (int j = 0; j < kGroup; ++j) {
      int64_t c = g * kGroup + j;
      uint32_t bits = c < V ? b[c] : DTypeInfo<DT>::kNegInfBits;
      if (DT == F32) {
        r.w[j] = bits;
      } else {
        r.w[j >> 1] |= (j & 1) ? bits << 16 : bits;
      }
    }
    return r;
  };
  auto floats = [&](int64_t g, float sv[kGroup], float tv[kGroup]) {
    pair_to_float<DT, DT>(group(sb, g), group(tb, g), dc, sv, tv);
  };
  auto merge = [](RowStats a, RowStats b) { return stats_merge<DIV>(a, b); };
  // Pass A, from every thread's stats_start (renyi's point: the row's first column).
  float sv0[kGroup], tv0[kGroup];
  floats(0, sv0, tv0);
  const RowStats start = stats_start<DIV>(sv0, tv0, uscale);
  std::vector<RowStats> blocks;
  for (int r = 0; r < C; ++r) {
    const int64_t g0 = std::min<int64_t>(ngroups, r * G), g1 = std::min<int64_t>(ngroups, g0 + G);
    std::vector<RowStats> th(threads, start);
    for (int x = 0; x < threads; ++x) {
      for (int64_t g = g0 + x; g < g1; g += threads) {
        float sv[kGroup], tv[kGroup];
        floats(g, sv, tv);
        stats_push_group<DIV>(th[x], sv, tv, uscale, dc);
      }
    }
    blocks.push_back(reduce_like_gpu(th, threads, merge));
  }
  RowStats st = blocks[0];
  for (int r = 1; r < C; ++r) st = merge(st, blocks[r]);
  const RowFinal f = stats_finish<DIV>(st, dc);
  if (!row_valid(f)) return false;
  const RowLogs rl = row_logs<DIV>(st);
  float loss = f.loss, A = 0.f;
  if (!D::kStreaming) {
    std::vector<Sum2> blk;
    for (int r = 0; r < C; ++r) {
      const int64_t g0 = std::min<int64_t>(ngroups, r * G), g1 = std::min<int64_t>(ngroups, g0 + G);
      std::vector<Sum2> th(threads, Sum2{0.f, 0.f});
      for (int x = 0; x < threads; ++x) {
        for (int64_t g = g0 + x; g < g1; g += threads) {
          float sv[kGroup], tv[kGroup];
          floats(g, sv, tv);
          group_center_sums<DIV>(sv, tv, uscale, rl, dc, th[x].a, th[x].b);
        }
      }
      blk.push_back(reduce_like_gpu(th, threads, [](Sum2 a, Sum2 b) { return Sum2{a.a + b.a, a.b + b.b}; }));
    }
    Sum2 acc = blk[0];
    for (int r = 1; r < C; ++r) acc = {acc.a + blk[r].a, acc.b + blk[r].b};
    loss = acc.a;
    A = acc.b;
  }
  std::vector<float> grad(V);
  for (int64_t g = 0; g < ngroups; ++g) {
    float sv[kGroup], tv[kGroup], out[kGroup];
    floats(g, sv, tv);
    if (D::kStreaming) {
      group_stream_grad<DIV>(sv, tv, uscale, rl, f, st, dc, inv_t, out);
    } else {
      group_center_grad<DIV>(sv, tv, uscale, rl, dc, A, inv_t, out);
    }
    for (int j = 0; j < kGroup && g * kGroup + j < V; ++j) grad[g * kGroup + j] = out[j];
  }
  // float64 reference (MATH.md tables), every gradient as a_j − q_j Σ a, a = ∂L/∂ℓq (up to multiples of q).
  std::vector<double> ls(V), lp(V);
  double ms = -INFINITY, mt = -INFINITY;
  for (int j = 0; j < V; ++j) {
    ls[j] = from_bits<DT>(sb[j]) / static_cast<double>(T);
    const double tt = from_bits<DT>(tb[j]) / static_cast<double>(T);
    lp[j] = lam == 1.0 ? tt : lam * tt + (1 - lam) * ls[j];
    ms = std::max(ms, ls[j]);
    mt = std::max(mt, lp[j]);
  }
  double zs = 0, zt = 0;
  for (int j = 0; j < V; ++j) {
    zs += std::exp(ls[j] - ms);
    zt += std::exp(lp[j] - mt);
  }
  for (int j = 0; j < V; ++j) {
    ls[j] -= ms + std::log(zs);
    lp[j] -= mt + std::log(zt);
  }
  auto lmix = [](double x, double y, double w) {
    double a = x + std::log(w), b = y + std::log1p(-w);
    double hi = std::max(a, b);
    return hi == -INFINITY ? -INFINITY : hi + std::log(std::exp(a - hi) + std::exp(b - hi));
  };
  double L = 0, Asum = 0, Zr = 0;
  std::vector<double> av(V, 0.0);
  for (int j = 0; j < V; ++j) {
    const double q = std::exp(ls[j]), p = std::exp(lp[j]);
    const double kq = q > 0 ? q * (ls[j] - lp[j]) : 0, kp = p > 0 ? p * (lp[j] - ls[j]) : 0;
    if (DIV == FORWARD_KL) {
      L += kp;
      av[j] = -p;
    } else if (DIV == REVERSE_KL) {
      L += kq;
      av[j] = kq;
    } else if (DIV == JEFFREYS) {
      L += kp + kq;
      av[j] = kq - p;
    } else if (DIV == SKEW_FORWARD_KL) {
      double lm = lmix(lp[j], ls[j], coef);
      L += p > 0 ? p * (lp[j] - lm) : 0;
      av[j] = p > 0 ? -(1 - coef) * q * std::exp(lp[j] - lm) : 0;
    } else if (DIV == SKEW_REVERSE_KL) {
      double lm = lmix(ls[j], lp[j], coef);
      L += q > 0 ? q * (ls[j] - lm) : 0;
      av[j] = q > 0 ? q * (ls[j] - lm - coef * std::exp(ls[j] - lm)) : 0;
    } else if (DIV == JSD) {
      double lm = lmix(lp[j], ls[j], coef);
      L += coef * (p > 0 ? p * (lp[j] - lm) : 0) + (1 - coef) * (q > 0 ? q * (ls[j] - lm) : 0);
      av[j] = q > 0 ? (1 - coef) * q * (ls[j] - lm) : 0;
    } else if (DIV == TVD) {
      L += 0.5 * std::fabs(p - q);
      av[j] = q > p ? 0.5 * q : (q < p ? -0.5 * q : 0.0);
    } else if (DIV == ALPHA_BETA) {
      const double a = coef, b = coef2;
      const double pa = std::pow(p, a), qb = std::pow(q, b);
      L += -1 / (a * b) * (pa * qb - a / (a + b) * std::pow(p, a + b) - b / (a + b) * std::pow(q, a + b));
      av[j] = qb * (std::pow(q, a) - pa) / a;
    } else {  // RENYI: a = −ρ
      const double rj = p > 0 ? std::exp(coef * lp[j] + (1 - coef) * ls[j]) : 0;
      Zr += rj;
      av[j] = -rj;
    }
  }
  if (DIV == RENYI) {
    L = std::log(Zr) / (coef - 1);
    for (int j = 0; j < V; ++j) av[j] /= Zr;
  }
  for (int j = 0; j < V; ++j) Asum += av[j];
  double num = 0, den = 0;
  for (int j = 0; j < V; ++j) {
    const double d = (av[j] - std::exp(ls[j]) * Asum) / T;
    num += (grad[j] - d) * (grad[j] - d);
    den += d * d;
  }
  *loss_err = std::fabs(loss - L) / (1 + std::fabs(L));
  // Relative L2 error of the gradient row, with an absolute floor (as the loss's 1 + |L|) of 1e-2 / T in the
  // norm: where the exact gradient vanishes (V = 1, or q = p) fp32 leaves ~1 ulp of the probabilities.
  *grad_err = std::sqrt(num) / (std::sqrt(den) + 1e-2 / T);
  return std::isfinite(loss) && *loss_err < 2e-5 && *grad_err < 1e-4;
}

// The running count of main's rows.
struct Tally {
  int runs = 0, fails = 0;
  double worst_l = 0, worst_g = 0;
};

// Every divergence on one row shape (in dtype DT, every logit + shift); T = 1 with the plain teacher, T = 2 with
// an interpolated one (λ = 0.6) and renyi's α > 1 (1.6 at T = 1 with a shift).
template <int DT>
void check_all(int V, int C, int th, bool t2, float shift, std::mt19937& rng, Tally& tally) {
  const float T = t2 ? 2.f : 1.f;
  const double lam = t2 ? 0.6 : 1.0, renyi_a = t2 ? 2.0 : (shift != 0.f ? 1.6 : 0.6);
  bool ok[kNumDivergences];
  double el[kNumDivergences], eg[kNumDivergences];
  ok[0] = check_row<FORWARD_KL, DT>(V, C, th, T, lam, 0.0, 0.0, rng, &el[0], &eg[0], shift);
  ok[1] = check_row<REVERSE_KL, DT>(V, C, th, T, lam, 0.0, 0.0, rng, &el[1], &eg[1], shift);
  ok[2] = check_row<SKEW_FORWARD_KL, DT>(V, C, th, T, lam, 0.1, 0.0, rng, &el[2], &eg[2], shift);
  ok[3] = check_row<SKEW_REVERSE_KL, DT>(V, C, th, T, lam, 0.3, 0.0, rng, &el[3], &eg[3], shift);
  ok[4] = check_row<JSD, DT>(V, C, th, T, lam, 0.4, 0.0, rng, &el[4], &eg[4], shift);
  ok[5] = check_row<TVD, DT>(V, C, th, T, lam, 0.0, 0.0, rng, &el[5], &eg[5], shift);
  ok[6] = check_row<JEFFREYS, DT>(V, C, th, T, lam, 0.0, 0.0, rng, &el[6], &eg[6], shift);
  ok[7] = check_row<ALPHA_BETA, DT>(V, C, th, T, lam, 0.7, t2 ? 0.5 : 0.3, rng, &el[7], &eg[7], shift);
  ok[8] = check_row<RENYI, DT>(V, C, th, T, lam, renyi_a, 0.0, rng, &el[8], &eg[8], shift);
  for (int d = 0; d < kNumDivergences; ++d) {
    ++tally.runs;
    tally.worst_l = std::max(tally.worst_l, el[d]);
    tally.worst_g = std::max(tally.worst_g, eg[d]);
    if (!ok[d]) {
      ++tally.fails;
      std::printf("FAIL div %d V %d C %d threads %d T %g lambda %g shift %g: loss err %.2e grad err %.2e\n", d,
                  V, C, th, T, lam, shift, el[d], eg[d]);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const int vs[] = {1, 7, 8, 9, 1031, 4099, 32003};
  const int cs[] = {1, 2, 3, 8};
  const int ths[] = {32, 128, 512};
  Tally tally;
  for (int V : vs) {
    for (int C : cs) {
      for (int th : ths) {
        for (int k = 0; k < 2; ++k) check_all<BF16>(V, C, th, k == 1, 0.f, rng, tally);
      }
    }
  }
  // fp32 logits at +1e6 (an ulp is 1/16 there): as accurate as near 0 (ℓ = (x − m) − log Z; renyi's mixed
  // logits from differences to its point).
  for (int V : {1031, 4099}) {
    for (int C : {1, 3}) check_all<F32>(V, C, 128, false, 1e6f, rng, tally);
  }
  std::printf("%d / %d rows within tolerance; worst loss err %.2e, worst grad rel err %.2e\n",
              tally.runs - tally.fails, tally.runs, tally.worst_l, tally.worst_g);
  return tally.fails == 0 ? 0 : 1;
}
