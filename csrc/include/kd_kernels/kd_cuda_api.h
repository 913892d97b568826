// kd_cuda_api.h — what the CUDA part of the extension exports to the bindings (csrc/bindings.cpp).
//
// Plain C++ declarations with no CUDA headers, so the bindings compile with the host compiler alone.
// Implemented in csrc/cuda/ and linked in only when the build has CUDA (macro KD_KERNELS_WITH_CUDA).
#pragma once

#include "kd_args.h"

namespace kd {

// Runs the fused loss + gradient kernels for `args` (device pointers) on `stream` (a cudaStream_t as void*).
// Returns 0 on success; otherwise the cudaError_t value, with its message written into err[0..err_len).
int cuda_loss_grad(const RowArgs& args, void* stream, char* err, int err_len);

}  // namespace kd
