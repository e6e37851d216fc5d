// pair_loss.cu -- CUDA per-pair loss table: elementwise forward / derivatives of ../pair_loss_math.h
// (mirror of prefopt/losses/table.py). Torch-free (see launch.h).
#include <cuda_runtime.h>

#include "../pair_loss_math.h"
#include "launch.h"

namespace prefopt {
namespace cuda {
namespace {

namespace pl = prefopt::pairloss;
constexpr int kThreads = 256;

template <typename T>
__global__ void pair_forward_kernel(int id, const T* __restrict__ a, const T* __restrict__ b,
                                    const T* __restrict__ params, int64_t n, T* __restrict__ out) {
  const pl::Params<T> p = pl::load_params(params);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = pl::forward(id, p, a[i], b ? b[i] : T(0));
}

template <typename T>
__global__ void pair_backward_kernel(int id, const T* __restrict__ a, const T* __restrict__ b,
                                     const T* __restrict__ params, const T* __restrict__ g, int64_t n,
                                     T* __restrict__ da, T* __restrict__ db) {
  const pl::Params<T> p = pl::load_params(params);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T ga, gb;
    pl::grads(id, p, a[i], b ? b[i] : T(0), &ga, &gb);
    const T s = g ? g[i] : T(1);
    da[i] = ga * s;
    if (db) db[i] = gb * s;
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

cudaError_t launch_pair_loss_forward(DType dtype, int loss_id, const void* a, const void* b, const void* params,
                                     int64_t n, void* out, cudaStream_t stream) {
  if (loss_id < 0 || loss_id >= pl::kNumLosses || pl::n_args(loss_id) <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kFloat32) {
    pair_forward_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(
        loss_id, static_cast<const float*>(a), static_cast<const float*>(b), static_cast<const float*>(params), n,
        static_cast<float*>(out));
  } else if (dtype == DType::kFloat64) {
    pair_forward_kernel<double><<<grid_for(n), kThreads, 0, stream>>>(
        loss_id, static_cast<const double*>(a), static_cast<const double*>(b), static_cast<const double*>(params),
        n, static_cast<double*>(out));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_pair_loss_backward(DType dtype, int loss_id, const void* a, const void* b, const void* params,
                                      const void* grad_out, int64_t n, void* da, void* db, cudaStream_t stream) {
  if (loss_id < 0 || loss_id >= pl::kNumLosses || pl::n_args(loss_id) <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kFloat32) {
    pair_backward_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(
        loss_id, static_cast<const float*>(a), static_cast<const float*>(b), static_cast<const float*>(params),
        static_cast<const float*>(grad_out), n, static_cast<float*>(da), static_cast<float*>(db));
  } else if (dtype == DType::kFloat64) {
    pair_backward_kernel<double><<<grid_for(n), kThreads, 0, stream>>>(
        loss_id, static_cast<const double*>(a), static_cast<const double*>(b), static_cast<const double*>(params),
        static_cast<const double*>(grad_out), n, static_cast<double*>(da), static_cast<double*>(db));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace prefopt
