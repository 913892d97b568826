// kd_group_host_check.cpp — runs the CUDA row kernels' accumulation and reduction logic on the CPU.
//
// No GPU here, so this program replays what kd_rows_kernel does for one row, on the host: the column slice
// of each cluster block, each thread's strided groups (with −inf padding past V), the per-group online
// updates of kd_group_math.h, the warp butterfly (xor 16 … 1), the block merge over warps, the cluster merge
// over blocks, then the loss and gradient formulas of kd_math.h; and compares with float64.
// Build and run (any C++17 compiler; not part of the extension):
//   g++ -std=c++17 -O2 -I csrc/include -I csrc/cuda csrc/cuda/host_check/kd_group_host_check.cpp -o /tmp/c && /tmp/c
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

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

// One row: s, t as bf16 bits; returns max errors against float64.
template <int DIV>
bool check_row(int V, int C, int threads, float T, double coef, std::mt19937& rng, double* loss_err,
               double* grad_err) {
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<uint16_t> sb(V), tb(V);
  for (int j = 0; j < V; ++j) {
    sb[j] = float_to_bf16(nd(rng));
    // Some p = 0 columns (not for reverse KL, which is then +inf wherever q > 0).
    tb[j] = float_to_bf16(DIV != REVERSE_KL && j % 7 == 3 ? -kInf : nd(rng));
  }
  const float inv_t = 1.f / T;
  const int64_t ngroups = (V + kGroup - 1) / kGroup;
  const int64_t G = (ngroups + C - 1) / C;
  auto group = [&](const std::vector<uint16_t>& b, int64_t g) {
    RawGroup<BF16> r{};
    for (int j = 0; j < kGroup; ++j) {
      int64_t c = g * kGroup + j;
      uint32_t bits = c < V ? b[c] : 0xff80u;
      r.w[j >> 1] |= (j & 1) ? bits << 16 : bits;
    }
    return r;
  };
  auto floats = [&](int64_t g, float sv[kGroup], float tv[kGroup]) {
    group_to_float<BF16>(group(sb, g), inv_t, sv);
    group_to_float<BF16>(group(tb, g), inv_t, tv);
  };
  constexpr bool kIsKL = DIV == FORWARD_KL || DIV == REVERSE_KL;
  const MixCoef mc = make_mix_coef(coef);
  // Pass A.
  std::vector<KLState> blocks;
  for (int r = 0; r < C; ++r) {
    const int64_t g0 = std::min<int64_t>(ngroups, r * G), g1 = std::min<int64_t>(ngroups, g0 + G);
    std::vector<KLState> th(threads, kl_empty());
    for (int x = 0; x < threads; ++x) {
      for (int64_t g = g0 + x; g < g1; g += threads) {
        float sv[kGroup], tv[kGroup];
        floats(g, sv, tv);
        if (kIsKL) {
          kl_push_group<DIV>(th[x], sv, tv);
        } else {
          lse_push_group(th[x].s, sv);
          lse_push_group(th[x].t, tv);
        }
      }
    }
    auto merge = [](KLState a, KLState b) {
      return kIsKL ? kl_merge<DIV>(a, b) : KLState{lse_merge(a.s, b.s), lse_merge(a.t, b.t), 0.f};
    };
    blocks.push_back(reduce_like_gpu(th, threads, merge));
  }
  KLState st = blocks[0];
  for (int r = 1; r < C; ++r) {
    st = kIsKL ? kl_merge<DIV>(st, blocks[r]) : KLState{lse_merge(st.s, blocks[r].s),
                                                         lse_merge(st.t, blocks[r].t), 0.f};
  }
  const float lse_s = lse_value(st.s), lse_t = lse_value(st.t);
  float loss = 0.f, S = 0.f;
  if (kIsKL) {
    loss = kl_finish<DIV>(st);
  } else {
    std::vector<Sum2> blk;
    for (int r = 0; r < C; ++r) {
      const int64_t g0 = std::min<int64_t>(ngroups, r * G), g1 = std::min<int64_t>(ngroups, g0 + G);
      std::vector<Sum2> th(threads, Sum2{0.f, 0.f});
      for (int x = 0; x < threads; ++x) {
        for (int64_t g = g0 + x; g < g1; g += threads) {
          float sv[kGroup], tv[kGroup];
          floats(g, sv, tv);
          for (int j = 0; j < kGroup; ++j) {
            SkewTerms e = skew_terms<DIV>(sv[j] - lse_s, tv[j] - lse_t, mc);
            th[x].a += e.loss;
            th[x].b += e.q * e.v;
          }
        }
      }
      blk.push_back(reduce_like_gpu(th, threads, [](Sum2 a, Sum2 b) { return Sum2{a.a + b.a, a.b + b.b}; }));
    }
    Sum2 acc = blk[0];
    for (int r = 1; r < C; ++r) acc = {acc.a + blk[r].a, acc.b + blk[r].b};
    loss = acc.a;
    S = acc.b;
  }
  std::vector<float> grad(V);
  for (int64_t g = 0; g < ngroups; ++g) {
    float sv[kGroup], tv[kGroup];
    floats(g, sv, tv);
    for (int j = 0; j < kGroup && g * kGroup + j < V; ++j) {
      float d = kIsKL ? kl_grad<DIV>(sv[j], tv[j], lse_s, lse_t, loss)
                      : skew_grad<DIV>(skew_terms<DIV>(sv[j] - lse_s, tv[j] - lse_t, mc), S, mc);
      grad[g * kGroup + j] = d * inv_t;
    }
  }
  // float64 reference (MATH.md tables).
  std::vector<double> ls(V), lp(V);
  double ms = -INFINITY, mt = -INFINITY;
  for (int j = 0; j < V; ++j) {
    ls[j] = bf16_to_float(sb[j]) / static_cast<double>(T);
    lp[j] = bf16_to_float(tb[j]) / static_cast<double>(T);
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
  double L = 0, Sr = 0;
  std::vector<double> v(V, 0.0);
  auto lmix = [](double x, double y, double w) {
    double a = x + std::log(w), b = y + std::log1p(-w);
    double hi = std::max(a, b);
    return hi == -INFINITY ? -INFINITY : hi + std::log(std::exp(a - hi) + std::exp(b - hi));
  };
  for (int j = 0; j < V; ++j) {
    double q = std::exp(ls[j]), p = std::exp(lp[j]);
    if (DIV == FORWARD_KL) L += p > 0 ? p * (lp[j] - ls[j]) : 0;
    if (DIV == REVERSE_KL) L += q > 0 ? q * (ls[j] - lp[j]) : 0;
    if (DIV == SKEW_FORWARD_KL) {
      double lm = lmix(lp[j], ls[j], coef);
      L += p > 0 ? p * (lp[j] - lm) : 0;
      v[j] = p > 0 ? std::exp(lp[j] - lm) : 0;
    }
    if (DIV == SKEW_REVERSE_KL) {
      double lm = lmix(ls[j], lp[j], coef);
      L += q > 0 ? q * (ls[j] - lm) : 0;
      v[j] = q > 0 ? ls[j] - lm - coef * std::exp(ls[j] - lm) : 0;
    }
    if (DIV == JSD) {
      double lm = lmix(lp[j], ls[j], coef);
      L += coef * (p > 0 ? p * (lp[j] - lm) : 0) + (1 - coef) * (q > 0 ? q * (ls[j] - lm) : 0);
      v[j] = q > 0 ? ls[j] - lm : 0;
    }
    Sr += q * v[j];
  }
  double num = 0, den = 0;
  for (int j = 0; j < V; ++j) {
    double q = std::exp(ls[j]), p = std::exp(lp[j]), d;
    if (DIV == FORWARD_KL) d = q - p;
    else if (DIV == REVERSE_KL) d = q > 0 ? q * (ls[j] - lp[j] - L) : 0;
    else if (DIV == SKEW_FORWARD_KL) d = -(1 - coef) * q * (v[j] - Sr);
    else if (DIV == SKEW_REVERSE_KL) d = q * (v[j] - Sr);
    else d = (1 - coef) * q * (v[j] - Sr);
    d /= T;
    num += (grad[j] - d) * (grad[j] - d);
    den += d * d;
  }
  *loss_err = std::fabs(loss - L) / (1 + std::fabs(L));
  *grad_err = std::sqrt(num / (den > 0 ? den : 1e-300));
  return std::isfinite(loss) && *loss_err < 2e-5 && *grad_err < 1e-4;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const int vs[] = {1, 7, 8, 9, 1031, 4099, 32003};
  const int cs[] = {1, 2, 3, 8};
  const int ths[] = {32, 128, 512};
  int fails = 0, runs = 0;
  double worst_l = 0, worst_g = 0;
  for (int V : vs) {
    for (int C : cs) {
      for (int th : ths) {
        for (float T : {1.f, 2.f}) {
          double el, eg;
          bool ok[5] = {check_row<FORWARD_KL>(V, C, th, T, 0.0, rng, &el, &eg)};
          worst_l = std::max(worst_l, el), worst_g = std::max(worst_g, eg);
          ok[1] = check_row<REVERSE_KL>(V, C, th, T, 0.0, rng, &el, &eg);
          worst_l = std::max(worst_l, el), worst_g = std::max(worst_g, eg);
          ok[2] = check_row<SKEW_FORWARD_KL>(V, C, th, T, 0.1, rng, &el, &eg);
          worst_l = std::max(worst_l, el), worst_g = std::max(worst_g, eg);
          ok[3] = check_row<SKEW_REVERSE_KL>(V, C, th, T, 0.3, rng, &el, &eg);
          worst_l = std::max(worst_l, el), worst_g = std::max(worst_g, eg);
          ok[4] = check_row<JSD>(V, C, th, T, 0.4, rng, &el, &eg);
          worst_l = std::max(worst_l, el), worst_g = std::max(worst_g, eg);
          for (int d = 0; d < 5; ++d) {
            ++runs;
            if (!ok[d]) {
              ++fails;
              std::printf("FAIL div %d V %d C %d threads %d T %g\n", d, V, C, th, T);
            }
          }
        }
      }
    }
  }
  std::printf("%d / %d rows within tolerance; worst loss err %.2e, worst grad rel err %.2e\n", runs - fails,
              runs, worst_l, worst_g);
  return fails == 0 ? 0 : 1;
}
