// ops.h -- declarations of the CPU ops exposed by prefopt._C (see docs/design.md for the contracts).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>
#include <tuple>

namespace prefopt {
namespace cpu {

// logits [n, V] (fp32/bf16/fp16/fp64), labels [n] int64. softcap <= 0 means no cap.
// Returns (logp, lse, entropy | empty, log_sum_p2 | empty), [n] in the accumulation dtype
// (float64 for float64 logits, else float32; like the torch backend).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_forward(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, double logit_scale,
    double softcap, double temperature, bool want_entropy, bool want_sqsum);

// Gradient wrt raw logits; written into `out` when given (out may alias logits).
at::Tensor row_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                        const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                        const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index,
                        double logit_scale, double softcap, double temperature,
                        const std::optional<at::Tensor>& out);

// Gradient filter of the CPU head (csrc/cpu/filter.cpp): grad [n, V] float32/float64 with unit column stride,
// threshold [n]. -> bool [ceil(n / block_rows), ceil(V / block_cols)]: true where a block holds an entry with
// !(|grad| <= threshold of its row) (NaN included); blocks aligned at row 0 and column 0. zero_skipped: also set
// every other block of grad to 0, in place, while it is in cache.
at::Tensor kept_blocks(const at::Tensor& grad, const at::Tensor& threshold, int64_t block_rows, int64_t block_cols,
                       bool zero_skipped);
// Sets every block of grad where mask [row blocks, column blocks] is true to 0, in place.
void zero_blocks(const at::Tensor& grad, const at::Tensor& mask, int64_t block_rows, int64_t block_cols);

// values [N], weights [N] | None, cu_seqlens [S+1] int64 -> (out [S], counts [S]); float64 values stay
// float64, everything else is computed and returned in float32.
std::tuple<at::Tensor, at::Tensor> segment_forward(const at::Tensor& values,
                                                   const std::optional<at::Tensor>& weights,
                                                   const at::Tensor& cu_seqlens, bool average);

// -> grad_values [N] (dtype of grad_out: float64 or float32)
at::Tensor segment_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& weights,
                            const at::Tensor& cu_seqlens, const at::Tensor& counts, bool average,
                            int64_t N);

// Per-pair loss table (csrc/pair_loss_math.h, mirror of prefopt/losses/table.py; ids = table.INDEX).
// a = h | c | x, b = r | s | None (see pair_loss_math.h), params = table.PARAM_NAMES values (>= 9).
// float64 arguments compute in float64, anything else in float32.
std::vector<std::string> pair_loss_names();
at::Tensor pair_loss_forward(int64_t loss_id, const at::Tensor& a, const std::optional<at::Tensor>& b,
                             const at::Tensor& params);
// -> (df/da * grad_out, df/db * grad_out | empty); grad_out None means 1.
std::tuple<at::Tensor, at::Tensor> pair_loss_backward(int64_t loss_id, const at::Tensor& a,
                                                      const std::optional<at::Tensor>& b, const at::Tensor& params,
                                                      const std::optional<at::Tensor>& grad_out);

// Name of the instruction-set clone the row kernels use right now ("default", "avx2", "avx512").
std::string row_isa();

}  // namespace cpu
}  // namespace prefopt
