// kd_renyi.cu — instantiates the row kernels of renyi,
// for every (student, teacher) dtype pair.
// One divergence per translation unit so that a parallel build compiles them side by side.
#include "kd_rows.cuh"

namespace kd {
namespace cuda_detail {

cudaError_t launch_renyi(const KernelParams& p, int s_dtype, int t_dtype, const PathRequest& req,
                         cudaStream_t stream, char* err, int err_len) {
  return launch_divergence<RENYI>(p, s_dtype, t_dtype, req, stream, err, err_len);
}

}  // namespace cuda_detail
}  // namespace kd
