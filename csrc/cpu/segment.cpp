// segment.cpp -- masked per-sequence sums (design.md "Segment sums") for prefopt._C.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../prefopt_math.h"

namespace prefopt {
namespace cpu {

namespace {

void check_cu(const at::Tensor& cu, int64_t N) {
  TORCH_CHECK(cu.device().is_cpu() && cu.dim() == 1 && cu.size(0) >= 1 && cu.scalar_type() == at::kLong,
              "prefopt._C: cu_seqlens must be a 1-D int64 CPU tensor [S+1]");
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t S = cu.size(0) - 1;
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(c[s] <= c[s + 1], "prefopt._C: cu_seqlens must be non-decreasing");
  TORCH_CHECK(c[0] >= 0 && c[S] <= N, "prefopt._C: cu_seqlens must lie in [0, ", N, "], got [", c[0], ", ",
              c[S], "]");
}

// float64 values stay float64 (tight float64 tests, like the torch backend); everything else is float32.
at::ScalarType seg_type(const at::Tensor& values) {
  return values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor vec_1d(const at::Tensor& t, int64_t n, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n, "prefopt._C: ", name,
              " must be a 1-D CPU tensor of size ", n, ", got ", t.sizes());
  return t.to(dt).contiguous();
}

// Accumulates in double whatever T is and rounds once at the end: a float32 sum of 131072 log-probs around -10
// is then within one float32 spacing of the exact sum (a float accumulator drifts by up to 8 nats there). A
// token with weight 0 is skipped, not multiplied by 0, so -inf / NaN at masked positions never reach the sum.
// Mirrors prefopt/cpu/segment_torch.py; tests/test_core_ops.py (test_sequence_logps_long_sum_is_exact,
// test_sequence_logps_masked_nonfinite_are_excluded) checks both.
template <typename T>
void seg_forward_kernel(const T* v, const T* w, const int64_t* c, int64_t S, bool average, T* o, T* k) {
  at::parallel_for(0, S, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      double acc = 0, cnt = 0;
      if (w) {
        for (int64_t i = c[s]; i < c[s + 1]; ++i) {
          if (w[i] != T(0)) {
            acc += static_cast<double>(v[i]) * static_cast<double>(w[i]);
            cnt += 1;
          }
        }
      } else {
        for (int64_t i = c[s]; i < c[s + 1]; ++i) acc += static_cast<double>(v[i]);
        cnt = static_cast<double>(c[s + 1] - c[s]);
      }
      k[s] = static_cast<T>(cnt);
      o[s] = static_cast<T>(average ? (cnt > 0 ? acc / cnt : 0.0) : acc);
    }
  });
}

template <typename T>
void seg_backward_kernel(const T* g, const T* w, const int64_t* c, const T* k, int64_t S, bool average, T* out) {
  at::parallel_for(0, S, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const T cnt = k[s];
      const T gs = average ? (cnt > T(0) ? g[s] / cnt : T(0)) : g[s];
      if (w) {
        for (int64_t i = c[s]; i < c[s + 1]; ++i) out[i] = gs * w[i];
      } else {
        for (int64_t i = c[s]; i < c[s + 1]; ++i) out[i] = gs;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_forward(const at::Tensor& values_in,
                                                   const std::optional<at::Tensor>& weights_in,
                                                   const at::Tensor& cu_in, bool average) {
  TORCH_CHECK(values_in.dim() == 1, "prefopt._C: values must be 1-D [N]");
  const int64_t N = values_in.size(0);
  const at::ScalarType dt = seg_type(values_in);
  const at::Tensor values = vec_1d(values_in, N, dt, "values");
  const bool has_w = weights_in.has_value() && weights_in->defined();
  const at::Tensor weights = has_w ? vec_1d(*weights_in, N, dt, "weights") : at::Tensor();
  const at::Tensor cu = cu_in.contiguous();
  check_cu(cu, N);
  const int64_t S = cu.size(0) - 1;
  at::Tensor out = at::empty({S}, values.options());
  at::Tensor counts = at::empty({S}, values.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "prefopt_segment_forward", [&] {
    seg_forward_kernel<scalar_t>(values.const_data_ptr<scalar_t>(),
                                 has_w ? weights.const_data_ptr<scalar_t>() : nullptr, cu.const_data_ptr<int64_t>(),
                                 S, average, out.data_ptr<scalar_t>(), counts.data_ptr<scalar_t>());
  });
  return {out, counts};
}

at::Tensor segment_backward(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& weights_in,
                            const at::Tensor& cu_in, const at::Tensor& counts_in, bool average, int64_t N) {
  const at::Tensor cu = cu_in.contiguous();
  check_cu(cu, N);
  const int64_t S = cu.size(0) - 1;
  const at::ScalarType dt = seg_type(grad_out_in);
  const at::Tensor g = vec_1d(grad_out_in, S, dt, "grad_out");
  const at::Tensor counts = vec_1d(counts_in, S, dt, "counts");
  const bool has_w = weights_in.has_value() && weights_in->defined();
  const at::Tensor weights = has_w ? vec_1d(*weights_in, N, dt, "weights") : at::Tensor();
  at::Tensor grad = at::zeros({N}, g.options());  // tokens outside every segment get 0
  AT_DISPATCH_FLOATING_TYPES(dt, "prefopt_segment_backward", [&] {
    seg_backward_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), has_w ? weights.const_data_ptr<scalar_t>() : nullptr,
                                  cu.const_data_ptr<int64_t>(), counts.const_data_ptr<scalar_t>(), S, average,
                                  grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace cpu
}  // namespace prefopt
