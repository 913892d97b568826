// kd_cuda.cu — the glue behind kd::cuda_loss_grad (kd_cuda_api.h): argument checks, the launch plan
// (resident in a cluster's shared memory, or streaming), dtype / divergence dispatch, launch checks.
//
// Framework-free: raw device pointers in, cudaError_t out, the message in the caller's buffer. The bindings
// (csrc/bindings.cpp) turn a non-zero return into a Python RuntimeError carrying that message.
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "kd_kernels/kd_cuda_api.h"
#include "kd_rows.cuh"

namespace kd {
namespace cuda_detail {
namespace {

// Resident slices up to this size leave room for 3 blocks per SM on Hopper (228 KB of shared memory per SM),
// so one block's loads overlap another's arithmetic. Larger slices are used (up to the per-block opt-in
// limit) only when no cluster size gets under it.
constexpr size_t kPreferredSmem = 72 * 1024;
constexpr unsigned kMaxClustersInGrid = 1u << 20;  // rows beyond grid / C loop inside the kernel

void set_err(char* err, int err_len, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
void set_err(char* err, int err_len, const char* fmt, ...) {
  if (err == nullptr || err_len <= 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, static_cast<size_t>(err_len), fmt, ap);
  va_end(ap);
}

int threads_for(int64_t groups) {
  // ~4-16 groups (32-128 columns) per thread on long rows, fewer threads on short ones. The kernels use
  // ~90-125 registers, so 256 threads let 2 blocks share an SM (one block's loads overlap the other's
  // arithmetic); 512 only for rows long enough to need them (the streaming path on huge vocabularies).
  if (groups >= 8192) return 512;
  if (groups >= 1024) return 256;
  if (groups >= 256) return 128;
  return groups >= 64 ? 64 : 32;
}

struct DeviceInfo {
  int sms = 0;
  int cc_major = 0;
  int smem_optin = 0;  // bytes of shared memory a block may opt in to
  int cluster_launch = 0;
};

cudaError_t device_info(int dev, DeviceInfo* out) {
  cudaError_t e;
  if ((e = cudaDeviceGetAttribute(&out->sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&out->cc_major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) {
    return e;
  }
  if ((e = cudaDeviceGetAttribute(&out->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) !=
      cudaSuccess) {
    return e;
  }
  return cudaDeviceGetAttribute(&out->cluster_launch, cudaDevAttrClusterLaunch, dev);
}

// Plans are cached per (device, kernel, vocabulary, request): the occupancy queries cost microseconds.
using PlanKey = std::tuple<int, const void*, int64_t, int, int>;
std::mutex g_mutex;
std::map<PlanKey, Plan>& plan_cache() {
  static std::map<PlanKey, Plan> cache;
  return cache;
}

unsigned grid_for(int64_t n_rows, int cluster) {
  const int64_t clusters = n_rows < static_cast<int64_t>(kMaxClustersInGrid) ? n_rows : kMaxClustersInGrid;
  return static_cast<unsigned>(clusters * cluster);
}

// Can `kernel` run with this cluster size / shared memory on this device? Sets its attributes as a side
// effect. Returns false (not an error) when the hardware cannot co-schedule the cluster.
cudaError_t try_resident(const void* kernel, const DeviceInfo& dev, int cluster, int64_t ngroups,
                         int bytes_pair, size_t static_smem, size_t smem_cap, bool allow_empty, Plan* plan,
                         bool* ok) {
  *ok = false;
  const int64_t gpb = (ngroups + cluster - 1) / cluster;
  // In automatic choice, no block of the cluster may own nothing (the kernel copes; it is just waste).
  if (!allow_empty && cluster > 1 && (cluster - 1) * gpb >= ngroups) return cudaSuccess;
  // 16-byte vectors per group: 8 columns × (|s| + |t|) bytes.
  const size_t smem = static_cast<size_t>(gpb) * kGroup * static_cast<size_t>(bytes_pair);
  if (smem + static_smem > smem_cap) return cudaSuccess;
  if (cluster > 1 && (dev.cc_major < 9 || !dev.cluster_launch)) return cudaSuccess;
  // The resident kernel's launch bounds allow kResidentThreads (kd_rows.cuh); gpb ≤ 7100 groups (the opt-in
  // limit at 32 bytes a group) keeps threads_for() at or under it anyway.
  const int threads = threads_for(gpb) < kResidentThreads ? threads_for(gpb) : kResidentThreads;
  // The permission is set to the device's limit, not to this plan's size: plans for other vocabularies
  // share the kernel and stay cached.
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       dev.smem_optin - static_cast<int>(static_smem));
  if (e != cudaSuccess) return e;
  if (cluster > 8) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) {
      cudaGetLastError();  // not supported here: clear the error and try another size
      return cudaSuccess;
    }
  }
  if (cluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(cluster * dev.sms));  // any multiple of the cluster
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int n = 0;
    e = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg);
    if (e != cudaSuccess) {
      cudaGetLastError();  // an unsupported cluster shape reads as an error here: try another
      return cudaSuccess;
    }
    if (n < 1) return cudaSuccess;
  } else {
    int n = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    if (e != cudaSuccess) return e;
    if (n < 1) return cudaSuccess;
  }
  plan->resident = true;
  plan->cluster = cluster;
  plan->threads = threads;
  plan->groups_per_block = gpb;
  plan->smem_bytes = smem;
  *ok = true;
  return cudaSuccess;
}

cudaError_t plan_uncached(const void* resident_kernel, int bytes_s, int bytes_t, const KernelParams& p,
                          const PathRequest& req, int dev_id, Plan* plan, char* err, int err_len) {
  DeviceInfo dev;
  cudaError_t e = device_info(dev_id, &dev);
  if (e != cudaSuccess) {
    set_err(err, err_len, "kd_kernels CUDA: reading device %d attributes failed: %s", dev_id,
            cudaGetErrorString(e));
    return e;
  }
  // The streaming plan: one block per row, no dynamic shared memory.
  Plan streaming;
  streaming.resident = false;
  streaming.cluster = 1;
  streaming.threads = threads_for(p.ngroups);
  streaming.groups_per_block = p.ngroups;
  streaming.smem_bytes = 0;
  if (req.mode == 1) {
    *plan = streaming;
    return cudaSuccess;
  }

  cudaFuncAttributes attrs;
  e = cudaFuncGetAttributes(&attrs, resident_kernel);
  if (e != cudaSuccess) {
    set_err(err, err_len, "kd_kernels CUDA: cudaFuncGetAttributes failed: %s (was the extension built for "
            "this GPU's architecture? see KD_KERNELS_CUDA_ARCHS)", cudaGetErrorString(e));
    return e;
  }
  const int pair = bytes_s + bytes_t;
  const size_t optin = static_cast<size_t>(dev.smem_optin);
  bool ok = false;
  if (req.mode == 2) {
    e = try_resident(resident_kernel, dev, req.cluster, p.ngroups, pair, attrs.sharedSizeBytes, optin,
                     true, plan, &ok);
    if (e == cudaSuccess && !ok) {
      set_err(err, err_len, "kd_kernels CUDA: KD_KERNELS_CUDA_PATH asks for cluster:%d, which cannot run "
              "V=%lld here (shared memory or cluster scheduling); unset it or use 'stream'", req.cluster,
              static_cast<long long>(p.vocab));
      return cudaErrorInvalidConfiguration;
    }
  } else {
    // The smallest portable cluster (≤ 8 blocks) whose slice fits the preferred budget; failing that, the
    // smallest that fits the opt-in limit; failing that, stream. No non-portable 16-block cluster in automatic
    // choice: V = 151936 in bf16 (76 KB a block at 8) then takes 8 blocks at 2 per SM rather than 16 blocks
    // that not every part can co-schedule. KD_KERNELS_CUDA_PATH=cluster:16 still asks for one explicitly.
    const int order[] = {1, 2, 3, 4, 5, 6, 7, 8};
    for (size_t cap : {kPreferredSmem, optin}) {
      for (int c : order) {
        e = try_resident(resident_kernel, dev, c, p.ngroups, pair, attrs.sharedSizeBytes, cap, false, plan,
                         &ok);
        if (e != cudaSuccess || ok) break;
      }
      if (e != cudaSuccess || ok) break;
    }
  }
  if (e != cudaSuccess) {
    set_err(err, err_len, "kd_kernels CUDA: configuring the resident kernel failed: %s",
            cudaGetErrorString(e));
    return e;
  }
  if (!ok) *plan = streaming;
  return cudaSuccess;
}

bool parse_request(PathRequest* req, char* err, int err_len) {
  const char* env = getenv("KD_KERNELS_CUDA_PATH");
  req->mode = 0;
  req->cluster = 0;
  if (env == nullptr || env[0] == '\0' || strcmp(env, "auto") == 0) return true;
  if (strcmp(env, "stream") == 0) {
    req->mode = 1;
    return true;
  }
  int c = 0;
  char tail = 0;
  if (sscanf(env, "cluster:%d%c", &c, &tail) == 1 && c >= 1 && c <= 16) {
    req->mode = 2;
    req->cluster = c;
    return true;
  }
  set_err(err, err_len, "kd_kernels CUDA: KD_KERNELS_CUDA_PATH=%s is not understood; use auto, stream or "
          "cluster:C with C in 1..16", env);
  return false;
}

}  // namespace

cudaError_t make_plan(const void* resident_kernel, const void* stream_kernel, int bytes_s, int bytes_t,
                      const KernelParams& p, const PathRequest& req, Plan* plan, char* err, int err_len) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) {
    set_err(err, err_len, "kd_kernels CUDA: cudaGetDevice failed: %s", cudaGetErrorString(e));
    return e;
  }
  const PlanKey key{dev, resident_kernel, p.ngroups, req.mode, req.cluster};
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = plan_cache().find(key);
    if (it != plan_cache().end()) {
      *plan = it->second;
      return cudaSuccess;
    }
  }
  (void)stream_kernel;  // needs no attributes: no dynamic shared memory, no clusters
  std::lock_guard<std::mutex> lock(g_mutex);  // attribute setting and the cache update stay together
  e = plan_uncached(resident_kernel, bytes_s, bytes_t, p, req, dev, plan, err, err_len);
  if (e == cudaSuccess) plan_cache()[key] = *plan;
  return e;
}

cudaError_t launch_planned(const void* kernel, const Plan& plan, const KernelParams& p, cudaStream_t stream,
                           char* err, int err_len) {
  cudaLaunchConfig_t cfg = {};
  const unsigned grid = grid_for(p.n_rows, plan.resident ? plan.cluster : 1);
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(plan.threads);
  cfg.dynamicSmemBytes = plan.smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  if (plan.resident && plan.cluster > 1) {
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  void* args[] = {const_cast<KernelParams*>(&p)};
  cudaError_t e = cudaLaunchKernelExC(&cfg, kernel, args);
  if (e == cudaSuccess) e = cudaGetLastError();
  if (e != cudaSuccess) {
    set_err(err, err_len,
            "kd_kernels CUDA: kernel launch failed (%s, grid %u, block %d, cluster %d, %zu B shared): %s",
            plan.resident ? "resident" : "streaming", grid, plan.threads, plan.cluster, plan.smem_bytes,
            cudaGetErrorString(e));
  }
  return e;
}

}  // namespace cuda_detail

namespace {

bool aligned16(const void* ptr, int64_t stride, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride * bytes) % 16 == 0;
}

int dtype_bytes(int code) { return code == F32 ? 4 : 2; }

}  // namespace

int cuda_loss_grad(const RowArgs& a, void* stream, char* err, int err_len) {
  using cuda_detail::set_err;
  if (err != nullptr && err_len > 0) err[0] = '\0';
  const auto bad = [&](const char* what) {
    set_err(err, err_len, "kd_kernels CUDA: invalid argument: %s", what);
    return static_cast<int>(cudaErrorInvalidValue);
  };
  if (a.n_rows < 0) return bad("n_rows must be >= 0");
  if (a.vocab < 1) return bad("vocab must be >= 1");
  // The kernels index columns and groups within a row in 32 bits (rows themselves in 64).
  if (a.vocab > INT32_MAX - 64) return bad("vocab must be < 2^31 - 64 (column indices are 32-bit)");
  if (a.s_dtype < F32 || a.s_dtype > F16 || a.t_dtype < F32 || a.t_dtype > F16) {
    return bad("dtype codes must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  }
  if (const char* why = divergence_args_error(a.divergence, a.coef, a.coef2, a.interpolation)) return bad(why);
  if (!(std::isfinite(a.temperature) && a.temperature > 0)) return bad("temperature must be finite and > 0");
  if (a.n_rows == 0) return 0;
  if (a.s == nullptr || a.t == nullptr || a.row_weight == nullptr || a.loss == nullptr) {
    return bad("s, t, row_weight and loss must be non-null device pointers");
  }
  if (a.stride_s < a.vocab || a.stride_t < a.vocab || (a.grad != nullptr && a.stride_g < a.vocab)) {
    return bad("row strides must be >= vocab (rows may not overlap)");
  }
  if (a.grad != nullptr && a.grad == a.s && a.stride_g != a.stride_s) {
    return bad("in place (grad == s) needs stride_g == stride_s");
  }

  cuda_detail::PathRequest req;
  if (!cuda_detail::parse_request(&req, err, err_len)) return static_cast<int>(cudaErrorInvalidValue);

  cuda_detail::KernelParams p;
  p.s = static_cast<const char*>(a.s);
  p.t = static_cast<const char*>(a.t);
  p.grad = static_cast<char*>(a.grad);
  p.row_weight = a.row_weight;
  p.loss = a.loss;
  p.n_rows = a.n_rows;
  p.vocab = a.vocab;
  p.stride_s = a.stride_s;
  p.stride_t = a.stride_t;
  p.stride_g = a.stride_g;
  p.ngroups = (a.vocab + cuda_detail::kGroup - 1) / cuda_detail::kGroup;
  p.groups_per_block = p.ngroups;
  p.inv_t = static_cast<float>(1.0 / a.temperature);
  p.coef = make_div_coef(a.divergence, a.coef, a.coef2, a.interpolation);
  p.cluster = 1;
  const int bs = dtype_bytes(a.s_dtype), bt = dtype_bytes(a.t_dtype);
  p.vec_s = aligned16(a.s, a.stride_s, bs);
  p.vec_t = aligned16(a.t, a.stride_t, bt);
  p.vec_g = a.grad != nullptr && aligned16(a.grad, a.stride_g, bs);

  cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaErrorInvalidValue;
  switch (a.divergence) {
    case FORWARD_KL:
      e = cuda_detail::launch_forward_kl(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case REVERSE_KL:
      e = cuda_detail::launch_reverse_kl(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case SKEW_FORWARD_KL:
      e = cuda_detail::launch_skew_forward_kl(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case SKEW_REVERSE_KL:
      e = cuda_detail::launch_skew_reverse_kl(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case JSD:
      e = cuda_detail::launch_jsd(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case TVD:
      e = cuda_detail::launch_tvd(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case JEFFREYS:
      e = cuda_detail::launch_jeffreys(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    case ALPHA_BETA:
      e = cuda_detail::launch_alpha_beta(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
    default:
      e = cuda_detail::launch_renyi(p, a.s_dtype, a.t_dtype, req, st, err, err_len);
      break;
  }
  if (e != cudaSuccess && err != nullptr && err_len > 0 && err[0] == '\0') {
    set_err(err, err_len, "kd_kernels CUDA: %s", cudaGetErrorString(e));
  }
  return static_cast<int>(e);
}

}  // namespace kd
