// segment_kernels.cu -- CUDA masked per-segment sums (design.md "Segment sums"): one block per segment.
// Torch-free (see launch.h).
#include <cuda_runtime.h>

#include "../prefopt_math.h"
#include "launch.h"

namespace prefopt {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Accumulates in double for every T and rounds once: a float32 sum of 131072 log-probs is then within one
// float32 spacing of the exact sum (design.md "Segment sums"). The sums are over tokens, not the vocabulary, so
// the double adds cost nothing next to the head. A token with weight 0 is skipped, not multiplied by 0, so
// -inf / NaN at masked positions never reach the sum. Mirrors prefopt/cpu/segment_torch.py.
template <typename T>
__global__ void segment_forward_kernel(const T* __restrict__ v, const T* __restrict__ w,
                                       const int64_t* __restrict__ cu, bool average, T* __restrict__ out,
                                       T* __restrict__ counts) {
  __shared__ double s_sum[kThreads / 32], s_cnt[kThreads / 32];
  const int64_t s = blockIdx.x, b = cu[s], e = cu[s + 1];
  double acc = 0, cnt = 0;
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    const T wi = w ? w[i] : T(1);
    if (wi != T(0)) {
      acc += static_cast<double>(v[i]) * static_cast<double>(wi);
      cnt += 1.0;
    }
  }
  acc = warp_sum(acc);
  cnt = warp_sum(cnt);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    s_sum[warp] = acc;
    s_cnt[warp] = cnt;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double tot = 0, c = 0;
    for (int k = 0; k < kThreads / 32; ++k) {
      tot += s_sum[k];
      c += s_cnt[k];
    }
    counts[s] = static_cast<T>(c);
    out[s] = static_cast<T>(average ? (c > 0.0 ? tot / c : 0.0) : tot);
  }
}

template <typename T>
__global__ void segment_backward_kernel(const T* __restrict__ g, const T* __restrict__ w,
                                        const int64_t* __restrict__ cu, const T* __restrict__ counts, bool average,
                                        T* __restrict__ grad) {
  const int64_t s = blockIdx.x, b = cu[s], e = cu[s + 1];
  const T c = counts[s];
  const T gs = average ? (c > T(0) ? g[s] / c : T(0)) : g[s];
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) grad[i] = w ? gs * w[i] : gs;
}

}  // namespace

cudaError_t launch_segment_forward(DType dtype, const void* values, const void* weights, const int64_t* cu,
                                   int64_t S, bool average, void* out, void* counts, cudaStream_t stream) {
  if (S == 0) return cudaSuccess;
  if (dtype == DType::kFloat32) {
    segment_forward_kernel<float><<<static_cast<unsigned>(S), kThreads, 0, stream>>>(
        static_cast<const float*>(values), static_cast<const float*>(weights), cu, average, static_cast<float*>(out),
        static_cast<float*>(counts));
  } else if (dtype == DType::kFloat64) {
    segment_forward_kernel<double><<<static_cast<unsigned>(S), kThreads, 0, stream>>>(
        static_cast<const double*>(values), static_cast<const double*>(weights), cu, average,
        static_cast<double*>(out), static_cast<double*>(counts));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// grad_values must be zero-filled by the caller (tokens outside every segment keep 0).
cudaError_t launch_segment_backward(DType dtype, const void* grad_out, const void* weights, const int64_t* cu,
                                    const void* counts, int64_t S, bool average, void* grad_values,
                                    cudaStream_t stream) {
  if (S == 0) return cudaSuccess;
  if (dtype == DType::kFloat32) {
    segment_backward_kernel<float><<<static_cast<unsigned>(S), kThreads, 0, stream>>>(
        static_cast<const float*>(grad_out), static_cast<const float*>(weights), cu,
        static_cast<const float*>(counts), average, static_cast<float*>(grad_values));
  } else if (dtype == DType::kFloat64) {
    segment_backward_kernel<double><<<static_cast<unsigned>(S), kThreads, 0, stream>>>(
        static_cast<const double*>(grad_out), static_cast<const double*>(weights), cu,
        static_cast<const double*>(counts), average, static_cast<double*>(grad_values));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace prefopt
