// rowops_kernels.cu -- CUDA row ops: one block per row, online log-sum-exp per thread, warp-shuffle +
// shared-memory merge of the LSE states; the backward writes the gradient in one pass.
// Torch-free (see launch.h): includes only CUDA headers and the shared math in prefopt_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../prefopt_math.h"
#include "launch.h"

namespace prefopt {
namespace cuda {
namespace {

namespace pm = prefopt::math;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

constexpr int kMaxWarps = 32;

template <typename acc_t>
__device__ __forceinline__ pm::LseState<acc_t> shfl_xor_state(const pm::LseState<acc_t>& st, int lane_mask) {
  pm::LseState<acc_t> o;
  o.m = __shfl_xor_sync(0xffffffffu, st.m, lane_mask);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, lane_mask);
  o.t = __shfl_xor_sync(0xffffffffu, st.t, lane_mask);
  o.s2 = __shfl_xor_sync(0xffffffffu, st.s2, lane_mask);
  return o;
}

template <typename acc_t>
__device__ __forceinline__ pm::LseState<acc_t> warp_merge(pm::LseState<acc_t> st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = pm::lse_merge(st, shfl_xor_state(st, off));
  return st;
}

// Block-wide merge; every thread gets the row's state.
template <typename acc_t>
__device__ pm::LseState<acc_t> block_merge(pm::LseState<acc_t> st) {
  __shared__ pm::LseState<acc_t> warp_states[kMaxWarps];
  __shared__ pm::LseState<acc_t> result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  st = warp_merge(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? warp_states[lane] : pm::lse_init<acc_t>();
    st = warp_merge(st);
    if (lane == 0) result = st;
  }
  __syncthreads();
  return result;
}

template <typename scalar_t, bool kCap>
__global__ void row_forward_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t V,
                                   const int64_t* __restrict__ labels, int64_t ignore_index,
                                   pm::Transform<typename AccOf<scalar_t>::type> tf,
                                   typename AccOf<scalar_t>::type* __restrict__ logp,
                                   typename AccOf<scalar_t>::type* __restrict__ lse_out,
                                   typename AccOf<scalar_t>::type* __restrict__ ent_out,
                                   typename AccOf<scalar_t>::type* __restrict__ lsp2_out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t row = blockIdx.x;
  const scalar_t* __restrict__ x = logits + row * row_stride;
  pm::LseState<acc_t> st = pm::lse_init<acc_t>();
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) pm::lse_fold(st, pm::transform<kCap>(tf, to_acc(x[i])));
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const acc_t lse = pm::lse_value(st);
    lse_out[row] = lse;
    if (ent_out) ent_out[row] = pm::lse_entropy(st);
    if (lsp2_out) lsp2_out[row] = pm::lse_log_sum_p2(st);
    const int64_t lab = labels[row];
    logp[row] = (lab == ignore_index || lab < 0 || lab >= V)
                    ? acc_t(0)
                    : pm::lse_logp(st, pm::transform<kCap>(tf, to_acc(x[lab])));  // <= 0 exactly
  }
}

template <typename scalar_t, typename out_t, bool kCap>
__global__ void row_backward_kernel(const scalar_t* logits, int64_t row_stride, int64_t V,
                                    const int64_t* __restrict__ labels, int64_t ignore_index,
                                    pm::Transform<typename AccOf<scalar_t>::type> tf,
                                    const typename AccOf<scalar_t>::type* __restrict__ lse_in,
                                    const typename AccOf<scalar_t>::type* __restrict__ ent_in,
                                    const typename AccOf<scalar_t>::type* __restrict__ g_logp_in,
                                    const typename AccOf<scalar_t>::type* __restrict__ g_ent_in, out_t* out,
                                    int64_t out_row_stride) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;
  out_t* o = out + row * out_row_stride;
  const int64_t lab = labels[row];
  const bool has_label = lab != ignore_index && lab >= 0 && lab < V;
  const acc_t g_logp = has_label ? g_logp_in[row] : acc_t(0);
  const acc_t g_ent = g_ent_in ? g_ent_in[row] : acc_t(0);
  const acc_t H = ent_in ? ent_in[row] : acc_t(0);
  const acc_t lse = lse_in[row];
  // No upstream gradient (every ignored row): exactly 0 whatever the row holds, as the CPU kernels
  // (p * 0 would be NaN on a row holding +inf). Uniform per block: no divergence.
  const bool live = g_logp != acc_t(0) || g_ent != acc_t(0);
  // Each element is read and written by the same thread, so out may alias logits.
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    if (!live) {
      o[i] = from_acc<out_t>(acc_t(0));
      continue;
    }
    acc_t dz;
    const acc_t z = pm::transform_d<kCap>(tf, to_acc(x[i]), &dz);
    o[i] = from_acc<out_t>(pm::elem_grad(z, dz, i == lab && has_label, lse, H, g_logp, g_ent));
  }
}

int block_for(int64_t V) {
  if (V >= 65536) return 1024;
  if (V >= 8192) return 512;
  if (V >= 1024) return 256;
  return 128;
}

template <typename scalar_t>
cudaError_t row_forward_typed(const void* logits, int64_t row_stride, int64_t n, int64_t V, const int64_t* labels,
                              int64_t ignore_index, double logit_scale, double softcap, double temperature,
                              void* logp, void* lse, void* ent, void* lsp2, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (n == 0) return cudaSuccess;
  const auto tf = pm::make_transform<acc_t>(logit_scale, softcap, temperature);
  const dim3 grid(static_cast<unsigned>(n)), block(block_for(V));
  auto args = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(static_cast<const scalar_t*>(logits), row_stride, V, labels, ignore_index,
                                       tf, static_cast<acc_t*>(logp), static_cast<acc_t*>(lse),
                                       static_cast<acc_t*>(ent), static_cast<acc_t*>(lsp2));
  };
  if (tf.has_cap) args(row_forward_kernel<scalar_t, true>);
  else args(row_forward_kernel<scalar_t, false>);
  return cudaGetLastError();
}

template <typename scalar_t, typename out_t>
cudaError_t row_backward_typed(const void* logits, int64_t row_stride, int64_t n, int64_t V, const int64_t* labels,
                               int64_t ignore_index, double logit_scale, double softcap, double temperature,
                               const void* lse, const void* ent, const void* g_logp, const void* g_ent, void* out,
                               int64_t out_row_stride, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (n == 0) return cudaSuccess;
  const auto tf = pm::make_transform<acc_t>(logit_scale, softcap, temperature);
  const dim3 grid(static_cast<unsigned>(n)), block(block_for(V));
  auto args = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(static_cast<const scalar_t*>(logits), row_stride, V, labels, ignore_index,
                                       tf, static_cast<const acc_t*>(lse), static_cast<const acc_t*>(ent),
                                       static_cast<const acc_t*>(g_logp), static_cast<const acc_t*>(g_ent),
                                       static_cast<out_t*>(out), out_row_stride);
  };
  if (tf.has_cap) args(row_backward_kernel<scalar_t, out_t, true>);
  else args(row_backward_kernel<scalar_t, out_t, false>);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_forward(DType dtype, const void* logits, int64_t row_stride, int64_t n, int64_t V,
                               const int64_t* labels, int64_t ignore_index, double logit_scale, double softcap,
                               double temperature, void* logp, void* lse, void* ent, void* lsp2,
                               cudaStream_t stream) {
#define PREFOPT_FWD(T) \
  row_forward_typed<T>(logits, row_stride, n, V, labels, ignore_index, logit_scale, softcap, temperature, logp, lse, \
                       ent, lsp2, stream)
  switch (dtype) {
    case DType::kFloat32: return PREFOPT_FWD(float);
    case DType::kFloat64: return PREFOPT_FWD(double);
    case DType::kBFloat16: return PREFOPT_FWD(__nv_bfloat16);
    case DType::kFloat16: return PREFOPT_FWD(__half);
  }
#undef PREFOPT_FWD
  return cudaErrorInvalidValue;
}

cudaError_t launch_row_backward(DType dtype, DType out_dtype, const void* logits, int64_t row_stride, int64_t n,
                                int64_t V, const int64_t* labels, int64_t ignore_index, double logit_scale,
                                double softcap, double temperature, const void* lse, const void* ent,
                                const void* g_logp, const void* g_ent, void* out, int64_t out_row_stride,
                                cudaStream_t stream) {
#define PREFOPT_BWD(T, O)                                                                                        \
  row_backward_typed<T, O>(logits, row_stride, n, V, labels, ignore_index, logit_scale, softcap, temperature, lse, \
                           ent, g_logp, g_ent, out, out_row_stride, stream)
  const bool f32_out = out_dtype == DType::kFloat32;
  switch (dtype) {
    case DType::kFloat32: return PREFOPT_BWD(float, float);
    case DType::kFloat64: return f32_out ? PREFOPT_BWD(double, float) : PREFOPT_BWD(double, double);
    case DType::kBFloat16: return f32_out ? PREFOPT_BWD(__nv_bfloat16, float) : PREFOPT_BWD(__nv_bfloat16, __nv_bfloat16);
    case DType::kFloat16: return f32_out ? PREFOPT_BWD(__half, float) : PREFOPT_BWD(__half, __half);
  }
#undef PREFOPT_BWD
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace prefopt
