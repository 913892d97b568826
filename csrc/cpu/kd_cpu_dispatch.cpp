// kd_cpu_dispatch.cpp — argument checks and the run-time choice among the compiled x86-64 levels.
//
// Compiled for the baseline target only. The levels compiled in are announced by CMake through
// KD_CPU_HAVE_V3 / KD_CPU_HAVE_V4; the choice is made once from the CPU's features (cpuid + OS support,
// via __builtin_cpu_supports), can be forced with the environment variable KD_KERNELS_CPU_ISA
// (x86-64 | x86-64-v3 | x86-64-v4 | auto) or at run time with set_isa (the tests use it to cover every level
// this machine can execute).

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kd_cpu.h"
#include "kd_kernels/kd_math.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kd {
namespace cpu {
namespace {

using Fn = void (*)(const RowArgs&, int);
using VpFn = void (*)(const VpArgs&, int);

struct Level {
  const char* name;
  Fn fn;
  VpFn vp;
  bool (*supported)();
};

bool always() { return true; }

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
bool cpu_has_v3() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("movbe") && __builtin_cpu_supports("f16c");
}
bool cpu_has_v4() {
  return cpu_has_v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#define KD_BASELINE_NAME "x86-64"
#else
#define KD_BASELINE_NAME "generic"
#endif

// Best first.
const Level kLevels[] = {
#ifdef KD_CPU_HAVE_V4
    {"x86-64-v4", &x86_64_v4::loss_grad, &x86_64_v4::vp_rows, &cpu_has_v4},
#endif
#ifdef KD_CPU_HAVE_V3
    {"x86-64-v3", &x86_64_v3::loss_grad, &x86_64_v3::vp_rows, &cpu_has_v3},
#endif
    {KD_BASELINE_NAME, &generic::loss_grad, &generic::vp_rows, &always},
};
constexpr int kNumLevels = sizeof(kLevels) / sizeof(kLevels[0]);

int best_level() {
  for (int i = 0; i < kNumLevels; ++i) {
    if (kLevels[i].supported()) return i;
  }
  return kNumLevels - 1;
}

int find_level(const std::string& name) {
  if (name == "auto" || name.empty()) return best_level();
  for (int i = 0; i < kNumLevels; ++i) {
    if (name == kLevels[i].name) {
      if (!kLevels[i].supported()) {
        throw std::invalid_argument("cpu isa '" + name + "' is compiled in but this CPU cannot run it; use " +
                                    "'auto' or '" + kLevels[best_level()].name + "'");
      }
      return i;
    }
  }
  throw std::invalid_argument("cpu isa '" + name + "' is not compiled in; use 'auto' or one of: " +
                              compiled_isas());
}

int initial_level() {
  const char* env = std::getenv("KD_KERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best_level();
  try {
    return find_level(env);
  } catch (const std::invalid_argument&) {
    return best_level();  // a bad environment value must not break import; build_info shows the choice
  }
}

std::atomic<int>& level() {
  static std::atomic<int> lv{initial_level()};
  return lv;
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace

void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A fresh (N, V) gradient of a large vocabulary comes from mmap (glibc serves blocks over its mmap threshold
  // that way, and torch frees them back), so its first write takes one page fault per 4 KiB page: measured
  // 20 ms of a 52 ms loss + gradient at 1024 x 32000 fp32 on 2 cores. Asking for transparent huge pages on the
  // 2 MiB-aligned interior makes that 64 faults. A hint only: where THP is "never", or the range is already
  // resident, or madvise fails, nothing changes (its result is ignored on purpose).
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (p == nullptr || bytes < static_cast<int64_t>(4 * kHuge)) return;
  const std::uintptr_t lo = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t hi = (reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(bytes)) &
                            ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

const char* compiled_isas() {
  static const std::string names = [] {
    std::string out;
    for (int i = kNumLevels - 1; i >= 0; --i) {
      if (!out.empty()) out += ",";
      out += kLevels[i].name;
    }
    return out;
  }();
  return names.c_str();
}

const char* active_isa() { return kLevels[level().load()].name; }

void set_isa(const char* name) { level().store(find_level(name == nullptr ? "" : name)); }

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

void loss_grad(const RowArgs& a, int num_threads) {
  require(a.n_rows >= 0, "n_rows must be >= 0, got " + std::to_string(a.n_rows));
  if (a.n_rows == 0) return;
  require(a.vocab > 0, "vocab must be > 0, got " + std::to_string(a.vocab));
  require(a.s != nullptr && a.t != nullptr, "s and t must be non-null data pointers");
  require(a.row_weight != nullptr && a.loss != nullptr, "row_weight and loss must be non-null pointers");
  require(a.stride_s >= a.vocab && a.stride_t >= a.vocab,
          "row strides stride_s and stride_t must be >= vocab (rows must not overlap); got " +
              std::to_string(a.stride_s) + ", " + std::to_string(a.stride_t) + " for vocab " +
              std::to_string(a.vocab));
  require(a.grad == nullptr || a.stride_g >= a.vocab,
          "stride_g must be >= vocab, got " + std::to_string(a.stride_g));
  require(a.s_dtype >= F32 && a.s_dtype <= F16,
          "s_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(a.s_dtype));
  require(a.t_dtype >= F32 && a.t_dtype <= F16,
          "t_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(a.t_dtype));
  const char* why = divergence_args_error(a.divergence, a.coef, a.coef2, a.interpolation);
  require(why == nullptr, why == nullptr ? "" : std::string(why) + " (divergence " +
                                                   std::to_string(a.divergence) + ", coef " +
                                                   std::to_string(a.coef) + ", coef2 " +
                                                   std::to_string(a.coef2) + ", interpolation " +
                                                   std::to_string(a.interpolation) + ")");
  require(std::isfinite(a.temperature) && a.temperature > 0,
          "temperature must be a finite number > 0, got " + std::to_string(a.temperature));
  if (a.grad != nullptr && a.grad != a.s) {
    advise_huge_pages(a.grad, ((a.n_rows - 1) * a.stride_g + a.vocab) * (a.s_dtype == F32 ? 4 : 2));
  }
  kLevels[level().load()].fn(a, num_threads);
}

void vp_rows(const VpArgs& a, int num_threads) {
  require(a.mode >= VP_STATS && a.mode <= VP_GRAD,
          "mode must be 0 (stats), 1 (row sums) or 2 (gradient), got " + std::to_string(a.mode));
  require(a.n_rows >= 0, "n_rows must be >= 0, got " + std::to_string(a.n_rows));
  if (a.n_rows == 0) return;
  require(a.vocab > 0, "vocab must be > 0, got " + std::to_string(a.vocab));
  require(a.s != nullptr && a.t != nullptr, "s and t must be non-null data pointers");
  require(a.stride_s >= a.vocab && a.stride_t >= a.vocab,
          "row strides stride_s and stride_t must be >= vocab; got " + std::to_string(a.stride_s) + ", " +
              std::to_string(a.stride_t) + " for vocab " + std::to_string(a.vocab));
  require(a.s_dtype >= F32 && a.s_dtype <= F16,
          "s_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(a.s_dtype));
  require(a.t_dtype == a.s_dtype || a.t_dtype == F32,
          "t_dtype must equal s_dtype or be 0 (float32), got " + std::to_string(a.t_dtype));
  const char* why = divergence_args_error(a.divergence, a.coef, a.coef2, 1.0);
  require(why == nullptr, why == nullptr ? "" : std::string(why));
  require(std::isfinite(a.temperature) && a.temperature > 0,
          "temperature must be a finite number > 0, got " + std::to_string(a.temperature));
  const bool one_exchange = a.divergence == FORWARD_KL || a.divergence == REVERSE_KL || a.divergence == RENYI;
  if (a.mode == VP_STATS) {
    require(a.out != nullptr, "out must be a non-null pointer");
  } else {
    require(a.stats != nullptr, "stats must be a non-null pointer");
    if (a.mode == VP_SUMS) {
      require(a.out != nullptr, "out must be a non-null pointer");
      require(!one_exchange, "forward_kl, reverse_kl and renyi have no row sums (their loss is in the statistics)");
    } else {
      require(a.grad != nullptr && a.row_weight != nullptr, "grad and row_weight must be non-null pointers");
      require(a.stride_g >= a.vocab, "stride_g must be >= vocab, got " + std::to_string(a.stride_g));
    }
  }
  kLevels[level().load()].vp(a, num_threads);
}

}  // namespace cpu
}  // namespace kd
