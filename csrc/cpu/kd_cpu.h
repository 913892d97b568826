// kd_cpu.h — the CPU side of the extension: fused loss + gradient row kernels, one build per x86-64 level.
//
// csrc/cpu/kd_cpu_kernels.cpp is compiled once per instruction-set level (CMake sets KD_CPU_ISA to the
// namespace name and -march to the level), so the header's inline math (kd_math.h) is compiled and
// vectorized for each level; csrc/cpu/kd_cpu_dispatch.cpp picks one at run time from the CPU's features.
// Why separate builds rather than GCC target_clones: the default clone (plain x86-64, no FMA) would turn
// every fmaf of kd_exp / kd_log into a scalar libm call, and runtime selection lets the tests run every
// level this machine can execute (kd_kernels._C._set_cpu_isa).
#pragma once

#include <stdint.h>

#include "kd_kernels/kd_args.h"

namespace kd {
namespace cpu {

// One entry point per compiled level. Arguments are already checked (kd_cpu_dispatch.cpp).
// num_threads > 0: OpenMP team size; the kernel uses fewer for small problems.
namespace generic {
void loss_grad(const RowArgs& args, int num_threads);
}
namespace x86_64_v3 {
void loss_grad(const RowArgs& args, int num_threads);
}
namespace x86_64_v4 {
void loss_grad(const RowArgs& args, int num_threads);
}

// Checks `args` (throws std::invalid_argument naming the field) and runs the best compiled level.
// num_threads <= 0 means the OpenMP default.
void loss_grad(const RowArgs& args, int num_threads);

// Names of the levels compiled in (e.g. "x86-64,x86-64-v3,x86-64-v4"), the one loss_grad runs now,
// and a way to force one ("auto" = best the CPU supports). set_isa throws std::invalid_argument for a
// name that is not compiled in or that this CPU cannot run.
// Asks the OS for transparent huge pages on the 2 MiB-aligned interior of a buffer about to be written for the
// first time (no-op below 8 MiB, off Linux, or where THP is disabled). Only a hint: contents are unaffected.
void advise_huge_pages(void* p, int64_t bytes);
const char* compiled_isas();
const char* active_isa();
void set_isa(const char* name);

bool has_openmp();
int openmp_version();

}  // namespace cpu
}  // namespace kd
