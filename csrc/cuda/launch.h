// launch.h -- host launchers of the CUDA kernels (csrc/cuda/*_kernels.cu). Torch-free on purpose: the
// kernel files include only this, prefopt_math.h and CUDA headers, so CI can compile them with nvcc
// against any torch wheel (even a CPU one). bindings.cpp (torch) calls these in the real CUDA build.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prefopt {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Row statistics, one block per row. Output vectors are in the accumulation type: double for kFloat64
// logits, float otherwise. ent / lsp2 may be null.
cudaError_t launch_row_forward(DType dtype, const void* logits, int64_t row_stride, int64_t n, int64_t V,
                               const int64_t* labels, int64_t ignore_index, double logit_scale, double softcap,
                               double temperature, void* logp, void* lse, void* ent, void* lsp2,
                               cudaStream_t stream);

// Gradient wrt raw logits, one block per row. out has dtype out_dtype (the logits dtype or kFloat32) and
// may alias logits exactly. lse/ent/g_logp/g_ent are in the accumulation type; ent/g_ent may be null.
cudaError_t launch_row_backward(DType dtype, DType out_dtype, const void* logits, int64_t row_stride, int64_t n,
                                int64_t V, const int64_t* labels, int64_t ignore_index, double logit_scale,
                                double softcap, double temperature, const void* lse, const void* ent,
                                const void* g_logp, const void* g_ent, void* out, int64_t out_row_stride,
                                cudaStream_t stream);

// Segment sums (dtype kFloat32 or kFloat64 for values / weights / outputs). weights may be null.
cudaError_t launch_segment_forward(DType dtype, const void* values, const void* weights, const int64_t* cu,
                                   int64_t S, bool average, void* out, void* counts, cudaStream_t stream);
cudaError_t launch_segment_backward(DType dtype, const void* grad_out, const void* weights, const int64_t* cu,
                                    const void* counts, int64_t S, bool average, void* grad_values,
                                    cudaStream_t stream);

// Per-pair loss table (../pair_loss_math.h): dtype kFloat32 or kFloat64 for a, b, params, grad_out and
// outputs; b / grad_out / db may be null. params is a device pointer (table.PARAM_NAMES values).
cudaError_t launch_pair_loss_forward(DType dtype, int loss_id, const void* a, const void* b, const void* params,
                                     int64_t n, void* out, cudaStream_t stream);
cudaError_t launch_pair_loss_backward(DType dtype, int loss_id, const void* a, const void* b, const void* params,
                                      const void* grad_out, int64_t n, void* da, void* db, cudaStream_t stream);

}  // namespace cuda
}  // namespace prefopt
