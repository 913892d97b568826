// kd_rows.cuh — the fused loss + gradient row kernel of every divergence, and its typed launcher.
//
// Math: docs/MATH.md; every divergence is its one definition in kd_math.h (DivDef, stats_*, stream_grad,
// center_terms, center_grad), shared with the CPU kernels; the passes below are derived from it.
// Per row i with weight w_i (0 = masked: not read, loss 0, gradient row 0), temperature T:
//   loss[i] = L_i (unweighted, fp32),   grad row i = (w_i / T) · ∂L_i/∂s̃  (student dtype, may alias s).
//
// Work split: one block per row, or, on Hopper, one *cluster* of C blocks per row where block r owns the
// column slice [r·G, (r+1)·G) in groups of 8 columns (G groups per block). Passes over a row:
//   streaming kinds (forward_kl, reverse_kl, jeffreys, renyi)   A: RowStats in one online pass   B: gradient
//   centered kinds (skew_*, jsd, tvd, alpha_beta)   A: LSE_s, LSE_t   B: loss and A = Σ a_v   C: gradient
// A row that is not a pair of distributions (kd_math.h row_valid) gets loss NaN and a NaN gradient row.
// The interpolated teacher (λ t̃ + (1−λ) s̃) is formed as the groups are converted (pair_to_float).
// Between passes the per-block partials are reduced warp (shuffles) → block (shared memory) → cluster
// (distributed shared memory), merged in the same order in every block, so all blocks agree bit for bit.
//
// RESIDENT = true keeps the block's slice of s and t in shared memory (raw dtype) from pass A on, so HBM sees
// each input once: bytes = N·V·(|s| + |t| + |grad|), 6 bytes per element pair in bf16. RESIDENT = false
// re-reads global memory in every pass (for rows too long for a cluster's shared memory, or when forced):
// 2 (streaming) or 3 (centered) reads of s and t.
//
// Loads: a group of 8 columns is one 16-byte vector per 16-bit tensor (two for fp32), when the host found
// every row 16-byte aligned (base pointer and row stride) and the group lies inside the row; else element by
// element, padding the columns past V with −inf (weight 0 in every formula: q = p = 0, and 0·log 0 = 0).
// All offsets are 64-bit.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kd_group_math.h"

namespace kd {
namespace cuda_detail {

namespace cg = cooperative_groups;

constexpr int kMaxThreads = 512;  // block size upper bound (launch bounds; reduction scratch is sized by it)
constexpr int kMaxWarps = kMaxThreads / 32;
// The resident kernel: at most 256 threads (kd_cuda.cu clamps its plans to it), and registers for 3 blocks per
// SM (65536 / (3 · 256) → ≤ 85, ptxas rounds to 80), the occupancy the 72 KB shared-memory slice budget
// (kPreferredSmem: 3 × 72 KB of an SM's 228 KB) is sized for. The streaming kernel runs up to 512 threads, 1
// block per SM at that size.
constexpr int kResidentThreads = 256;
constexpr int kResidentBlocksPerSM = 3;

// Everything a kernel needs, passed by value. Strides are in elements of the tensor they belong to.
struct KernelParams {
  const char* s;            // (N, V) student logits, row stride stride_s
  const char* t;            // (N, V) teacher logits, row stride stride_t
  char* grad;               // (N, V) gradient in the student dtype, row stride stride_g; nullptr = loss only
  const float* row_weight;  // (N,) fp32 row factors w_i
  float* loss;              // (N,) fp32 per-token divergence (written)
  int64_t n_rows;
  int64_t vocab;
  int64_t stride_s;
  int64_t stride_t;
  int64_t stride_g;
  int64_t ngroups;           // ceil(V / 8)
  int64_t groups_per_block;  // G: groups owned by one block of a cluster (= ngroups when C = 1)
  float inv_t;               // 1 / T
  DivCoef coef;              // the divergence's parameters and the interpolation (kd_math.h make_div_coef)
  int cluster;               // C, blocks per row (RESIDENT only; 1 otherwise)
  bool vec_s, vec_t, vec_g;  // every row of that tensor is 16-byte aligned: vector loads / stores allowed
};

// Group g of a row (row points at column 0), from global memory: one 16-byte vector per plane for the groups
// below vec_end (the full groups of a 16-byte aligned row, or 0), else column by column. Group and column
// indices within a row are 32-bit (V < 2^31, checked by the host), so the address of a group is one IMAD.
template <int DT>
__device__ __forceinline__ RawGroup<DT> load_group(const char* row, int g, int vec_end, int vocab) {
  RawGroup<DT> r;
  if (g < vec_end) {
    const uint4* p = reinterpret_cast<const uint4*>(row) + g * DTypeInfo<DT>::kPlanes;
#pragma unroll
    for (int k = 0; k < DTypeInfo<DT>::kPlanes; ++k) {
      uint4 v = p[k];
      r.w[4 * k] = v.x;
      r.w[4 * k + 1] = v.y;
      r.w[4 * k + 2] = v.z;
      r.w[4 * k + 3] = v.w;
    }
    return r;
  }
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const int c = g * kGroup + j;
    uint32_t bits = DTypeInfo<DT>::kNegInfBits;
    if (c < vocab) {
      bits = DT == F32 ? reinterpret_cast<const uint32_t*>(row)[c]
                       : static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[c]);
    }
    if (DT == F32) {
      r.w[j] = bits;
    } else if (j & 1) {
      r.w[j >> 1] |= bits << 16;
    } else {
      r.w[j >> 1] = bits;
    }
  }
  return r;
}

// Shared memory holds a slice plane by plane (plane k of local group l at [k·G + l]): a warp reading 32
// consecutive groups touches 32 consecutive 16-byte vectors, free of bank conflicts for fp32 too.
template <int DT>
__device__ __forceinline__ void put_smem(uint4* base, int G, int l, const RawGroup<DT>& r) {
#pragma unroll
  for (int k = 0; k < DTypeInfo<DT>::kPlanes; ++k) {
    base[k * G + l] = make_uint4(r.w[4 * k], r.w[4 * k + 1], r.w[4 * k + 2], r.w[4 * k + 3]);
  }
}

template <int DT>
__device__ __forceinline__ RawGroup<DT> get_smem(const uint4* base, int G, int l) {
  RawGroup<DT> r;
#pragma unroll
  for (int k = 0; k < DTypeInfo<DT>::kPlanes; ++k) {
    uint4 v = base[k * G + l];
    r.w[4 * k] = v.x;
    r.w[4 * k + 1] = v.y;
    r.w[4 * k + 2] = v.z;
    r.w[4 * k + 3] = v.w;
  }
  return r;
}

// Writes the columns of group g that lie inside the row (vectors below vec_end, as load_group).
template <int DT>
__device__ __forceinline__ void store_group(char* row, int g, int vec_end, int vocab, const float v[kGroup]) {
  if (g < vec_end) {
    uint32_t w[4 * DTypeInfo<DT>::kPlanes];
    if (DT == F32) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) w[j] = __float_as_uint(v[j]);
    } else {
      // Two columns per hardware conversion (F2FP ... PACK_AB: round to nearest even, NaN stays NaN, the
      // values float_to_bf16 / float_to_f16 give up to the NaN payload) instead of the bit-level rounding,
      // ~6 integer instructions a column.
#pragma unroll
      for (int j = 0; j < kGroup; j += 2) {
        if (DT == BF16) {
          const __nv_bfloat162 h = __floats2bfloat162_rn(v[j], v[j + 1]);
          w[j >> 1] = *reinterpret_cast<const uint32_t*>(&h);
        } else {
          const __half2 h = __floats2half2_rn(v[j], v[j + 1]);
          w[j >> 1] = *reinterpret_cast<const uint32_t*>(&h);
        }
      }
    }
    uint4* p = reinterpret_cast<uint4*>(row) + g * DTypeInfo<DT>::kPlanes;
#pragma unroll
    for (int k = 0; k < DTypeInfo<DT>::kPlanes; ++k) {
      p[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (g * kGroup + j < vocab) store_from_float<DT>(row, g * kGroup + j, v[j]);
  }
}

// Writes v into every column of this thread's groups of [g0, g1) (masked rows: 0; invalid rows: NaN). Out of
// line: rare rows, and kept apart from the vocabulary passes so that their stores are not merged with these.
template <int DT>
__device__ __noinline__ void fill_groups(char* row, int g0, int g1, int vec_end, int vocab, float v) {
  float vals[kGroup];
#pragma unroll
  for (int j = 0; j < kGroup; ++j) vals[j] = v;
  for (int g = g0 + static_cast<int>(threadIdx.x); g < g1; g += blockDim.x) {
    store_group<DT>(row, g, vec_end, vocab, vals);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reductions: warp butterfly, then one slot per warp in shared memory, then (clusters) one slot per block
// read through distributed shared memory. Every merge runs in a fixed order, so all threads of all blocks
// of a cluster end with the same bits.
// ---------------------------------------------------------------------------------------------------------

struct Sum2 {
  float a;
  float b;
};

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ LSEState shfl_xor(LSEState v, int o) {
  return {shfl_xor(v.m, o), shfl_xor(v.z, o)};
}
__device__ __forceinline__ RowStats shfl_xor(RowStats v, int o) {
  // renyi's point (rs0, rt0) is the same in every thread of the row (stats_start): kept, not exchanged
  return {shfl_xor(v.s, o), shfl_xor(v.t, o), shfl_xor(v.r, o), shfl_xor(v.xs, o), shfl_xor(v.xt, o), v.rs0, v.rt0};
}
__device__ __forceinline__ Sum2 shfl_xor(Sum2 v, int o) { return {shfl_xor(v.a, o), shfl_xor(v.b, o)}; }

template <int DIV>
struct MergeStats {
  __device__ RowStats operator()(RowStats a, RowStats b) const { return stats_merge<DIV>(a, b); }
};
struct MergeSum2 {
  __device__ Sum2 operator()(Sum2 a, Sum2 b) const { return {a.a + b.a, a.b + b.b}; }
};

// Scratch shared memory of the reductions (static, small).
struct ReduceScratch {
  RowStats warp[kMaxWarps];
  RowStats slot;   // this block's partial, read by the cluster's other blocks
  RowStats bcast;  // the merged value, for the whole block
};

template <class T, class Merge>
__device__ __forceinline__ T block_allreduce(T v, ReduceScratch& sc, Merge merge) {
  static_assert(sizeof(T) <= sizeof(RowStats), "scratch slot too small");
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
  T* warp = reinterpret_cast<T*>(sc.warp);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) warp[wid] = v;
  __syncthreads();
  T acc = warp[0];
  for (int w = 1; w < nw; ++w) acc = merge(acc, warp[w]);
  __syncthreads();  // the slots are rewritten by the next reduction
  return acc;
}

// Merges the block values of all C blocks of the cluster (C > 1); every block gets the same result.
template <class T, class Merge>
__device__ __forceinline__ T cluster_allreduce(T v, ReduceScratch& sc, int C, Merge merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  T* slot = reinterpret_cast<T*>(&sc.slot);
  T* bcast = reinterpret_cast<T*>(&sc.bcast);
  if (threadIdx.x == 0) *slot = v;
  cluster.sync();  // every block's slot is written and visible cluster-wide
  if (threadIdx.x == 0) {
    T acc = *cluster.map_shared_rank(slot, 0);
    for (int r = 1; r < C; ++r) acc = merge(acc, *cluster.map_shared_rank(slot, r));
    *bcast = acc;
  }
  cluster.sync();  // no block rewrites its slot before all peers read it; bcast visible in the block
  return *bcast;
#else
  (void)sc;
  (void)C;
  (void)merge;
  return v;  // the host never launches clusters before sm_90
#endif
}

template <class T, class Merge>
__device__ __forceinline__ T row_allreduce(T v, ReduceScratch& sc, int C, Merge merge) {
  v = block_allreduce(v, sc, merge);
  return C > 1 ? cluster_allreduce(v, sc, C, merge) : v;
}

// Runs body(g, raw) over groups g in [g0, g1) owned by this thread (stride blockDim), with U groups loaded
// before the first is used (independent loads in flight).
template <int U, class Load, class Body>
__device__ __forceinline__ void for_groups(int g0, int g1, Load load, Body body) {
  const int step = blockDim.x;
  for (int base = g0 + static_cast<int>(threadIdx.x); base < g1; base += U * step) {
    decltype(load(base)) raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * step < g1) raw[u] = load(base + u * step);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * step < g1) body(base + u * step, raw[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------------------

template <int DIV, int SD, int TD, bool RESIDENT>
__global__ void __launch_bounds__(RESIDENT ? kResidentThreads : kMaxThreads, RESIDENT ? kResidentBlocksPerSM : 1)
    kd_rows_kernel(const KernelParams p) {
  using D = DivDef<DIV>;
  // Groups in flight per thread: 4 × 32 bytes for 16-bit pairs, 2 × 48-64 bytes when one side is fp32. The
  // resident kernel loads one: with 24 warps per SM (3 blocks) there is latency hiding enough, and with two
  // ptxas ran out of its 80 registers and recomputed the row addresses inside the loop (~6 instructions a load).
  constexpr int U = RESIDENT ? 1 : ((SD == F32 || TD == F32) ? 2 : 4);
  // Shared-memory rereads have short latency: one group at a time keeps the register count down.
  constexpr int U2 = RESIDENT ? 1 : U;
  constexpr int kBS = DTypeInfo<SD>::kBytes, kBT = DTypeInfo<TD>::kBytes;

  extern __shared__ uint4 smem[];  // RESIDENT: the slice, s planes then t planes
  __shared__ ReduceScratch sc;

  const int C = RESIDENT ? p.cluster : 1;
  int rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (RESIDENT && C > 1) rank = static_cast<int>(cg::this_cluster().block_rank());
#endif
  const int G = static_cast<int>(p.groups_per_block);
  const int ngroups = static_cast<int>(p.ngroups);
  const int g0 = min(ngroups, rank * G);
  const int g1 = min(ngroups, g0 + G);
  uint4* sm_s = smem;
  uint4* sm_t = smem + DTypeInfo<SD>::kPlanes * G;
  const int V = static_cast<int>(p.vocab);
  const int full = V / kGroup;  // groups with all 8 columns inside the row
  const int vec_s = p.vec_s ? full : 0, vec_t = p.vec_t ? full : 0, vec_g = p.vec_g ? full : 0;
  const float inv_t = p.inv_t;
  const float uscale = inv_t * kUnitsPerNat;  // logits → log units (bits): log2 e / T
  const DivCoef c = p.coef;

  for (int64_t row = blockIdx.x / C; row < p.n_rows; row += gridDim.x / C) {
    const float w = p.row_weight[row];
    char* grow = p.grad == nullptr ? nullptr : p.grad + row * p.stride_g * kBS;

    if (w == 0.f) {  // masked: s and t are not read (same branch in every block of the cluster)
      if (grow != nullptr) fill_groups<SD>(grow, g0, g1, vec_g, V, 0.f);
      if (rank == 0 && threadIdx.x == 0) p.loss[row] = 0.f;
      continue;
    }

    const char* srow = p.s + row * p.stride_s * kBS;
    const char* trow = p.t + row * p.stride_t * kBT;
    auto load_global = [&](int g) {
      return RawPair<SD, TD>{load_group<SD>(srow, g, vec_s, V), load_group<TD>(trow, g, vec_t, V)};
    };
    // Later passes read what pass A read: from shared memory (RESIDENT) or again from global memory.
    // Each thread reads back exactly the groups it stored itself, so no barrier is needed in between.
    auto load_again = [&](int g) {
      if constexpr (RESIDENT) {
        return RawPair<SD, TD>{get_smem<SD>(sm_s, G, g - g0), get_smem<TD>(sm_t, G, g - g0)};
      } else {
        return load_global(g);
      }
    };
    const float scale = w * inv_t;  // grad = (w / T) · ∂L/∂s̃

    // Pass A: the row statistics (streaming kinds: everything the loss needs), staging the slice in shared
    // memory.
    RowStats st = stats_empty();
    if constexpr (D::kR) {  // renyi's point: the row's first column (stats_start), the same for every thread
      const RawPair<SD, TD> r0 = load_global(0);
      float sv[kGroup], tv[kGroup];
      pair_to_float<SD, TD>(r0.s, r0.t, c, sv, tv);
      st = stats_start<DIV>(sv, tv, uscale);
    }
    for_groups<U>(g0, g1, load_global, [&](int g, const RawPair<SD, TD>& r) {
      if constexpr (RESIDENT) {
        put_smem<SD>(sm_s, G, g - g0, r.s);
        put_smem<TD>(sm_t, G, g - g0, r.t);
      }
      float sv[kGroup], tv[kGroup];
      pair_to_float<SD, TD>(r.s, r.t, c, sv, tv);
      stats_push_group<DIV>(st, sv, tv, uscale, c);
    });
    st = row_allreduce(st, sc, C, MergeStats<DIV>());
    const RowFinal f = stats_finish<DIV>(st, c);

    if (!row_valid(f)) {  // the same in every block of the cluster (merged values agree bit for bit)
      if (rank == 0 && threadIdx.x == 0) p.loss[row] = __int_as_float(0x7fc00000);
      if (grow != nullptr) fill_groups<SD>(grow, g0, g1, vec_g, V, __int_as_float(0x7fc00000));
      continue;
    }

    const RowLogs lg = row_logs<DIV>(st);  // the row is valid here, so m_s, m_t (and m_r) are finite

    if constexpr (D::kStreaming) {
      if (rank == 0 && threadIdx.x == 0) p.loss[row] = f.loss;
      if (grow == nullptr) continue;
      // Pass B: gradient.
      for_groups<U2>(g0, g1, load_again, [&](int g, const RawPair<SD, TD>& r) {
        float sv[kGroup], tv[kGroup], out[kGroup];
        pair_to_float<SD, TD>(r.s, r.t, c, sv, tv);
        group_stream_grad<DIV>(sv, tv, uscale, lg, f, st, c, scale, out);
        store_group<SD>(grow, g, vec_g, V, out);
      });
    } else {
      // Pass B: loss and A = Σ a_v.
      Sum2 acc = {0.f, 0.f};
      for_groups<U2>(g0, g1, load_again, [&](int, const RawPair<SD, TD>& r) {
        float sv[kGroup], tv[kGroup];
        pair_to_float<SD, TD>(r.s, r.t, c, sv, tv);
        group_center_sums<DIV>(sv, tv, uscale, lg, c, acc.a, acc.b);
      });
      acc = row_allreduce(acc, sc, C, MergeSum2());
      if (rank == 0 && threadIdx.x == 0) p.loss[row] = acc.a;
      if (grow == nullptr) continue;
      const float A = acc.b;
      // Pass C: gradient.
      for_groups<U2>(g0, g1, load_again, [&](int g, const RawPair<SD, TD>& r) {
        float sv[kGroup], tv[kGroup], out[kGroup];
        pair_to_float<SD, TD>(r.s, r.t, c, sv, tv);
        group_center_grad<DIV>(sv, tv, uscale, lg, c, A, scale, out);
        store_group<SD>(grow, g, vec_g, V, out);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: the launch plan (kd_cuda.cu) and the typed launcher (instantiated once per divergence file).
// ---------------------------------------------------------------------------------------------------------

// KD_KERNELS_CUDA_PATH: "" / "auto" (default), "stream" (never resident), "cluster:C" (resident, C blocks).
struct PathRequest {
  int mode;     // 0 auto, 1 stream, 2 cluster
  int cluster;  // for mode 2
};

struct Plan {
  bool resident;
  int cluster;
  int threads;
  int64_t groups_per_block;
  size_t smem_bytes;  // dynamic shared memory
};

// Chooses resident (with its cluster size) or streaming for one kernel pair; sets the kernels' attributes.
// Returns cudaSuccess or an error with a message in err.
cudaError_t make_plan(const void* resident_kernel, const void* stream_kernel, int bytes_s, int bytes_t,
                      const KernelParams& p, const PathRequest& req, Plan* plan, char* err, int err_len);

// Launches `kernel` under `plan`, checking the launch; fills err on failure.
cudaError_t launch_planned(const void* kernel, const Plan& plan, const KernelParams& p, cudaStream_t stream,
                           char* err, int err_len);

template <int DIV, int SD, int TD>
cudaError_t launch_typed(KernelParams p, const PathRequest& req, cudaStream_t stream, char* err,
                         int err_len) {
  const void* resident = reinterpret_cast<const void*>(&kd_rows_kernel<DIV, SD, TD, true>);
  const void* streaming = reinterpret_cast<const void*>(&kd_rows_kernel<DIV, SD, TD, false>);
  Plan plan;
  cudaError_t e = make_plan(resident, streaming, DTypeInfo<SD>::kBytes, DTypeInfo<TD>::kBytes, p, req, &plan,
                            err, err_len);
  if (e != cudaSuccess) return e;
  p.cluster = plan.resident ? plan.cluster : 1;
  p.groups_per_block = plan.groups_per_block;
  return launch_planned(plan.resident ? resident : streaming, plan, p, stream, err, err_len);
}

// One divergence, all 9 (student, teacher) dtype pairs.
template <int DIV>
cudaError_t launch_divergence(const KernelParams& p, int s_dtype, int t_dtype, const PathRequest& req,
                              cudaStream_t stream, char* err, int err_len) {
#define KD_CASE(SD, TD) \
  if (s_dtype == SD && t_dtype == TD) return launch_typed<DIV, SD, TD>(p, req, stream, err, err_len);
  KD_CASE(F32, F32)
  KD_CASE(F32, BF16)
  KD_CASE(F32, F16)
  KD_CASE(BF16, F32)
  KD_CASE(BF16, BF16)
  KD_CASE(BF16, F16)
  KD_CASE(F16, F32)
  KD_CASE(F16, BF16)
  KD_CASE(F16, F16)
#undef KD_CASE
  return cudaErrorInvalidValue;  // dtype codes are checked by the caller
}

// Defined in kd_forward_kl.cu, kd_reverse_kl.cu, ... (one translation unit each, so builds run in parallel).
cudaError_t launch_forward_kl(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);
cudaError_t launch_reverse_kl(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);
cudaError_t launch_skew_forward_kl(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*,
                                   int);
cudaError_t launch_skew_reverse_kl(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*,
                                   int);
cudaError_t launch_jsd(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);
cudaError_t launch_tvd(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);
cudaError_t launch_jeffreys(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);
cudaError_t launch_alpha_beta(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);
cudaError_t launch_renyi(const KernelParams&, int, int, const PathRequest&, cudaStream_t, char*, int);

}  // namespace cuda_detail
}  // namespace kd
