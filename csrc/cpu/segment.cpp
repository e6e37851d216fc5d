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

template <typename T>
void seg_forward_kernel(const T* v, const T* w, const int64_t* c, int64_t S, bool average, T* o, T* k) {
  at::parallel_for(0, S, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      T acc = 0, cnt = 0;
      if (w) {
        for (int64_t i = c[s]; i < c[s + 1]; ++i) {
          acc += v[i] * w[i];
          cnt += w[i] != T(0) ? T(1) : T(0);
        }
      } else {
        for (int64_t i = c[s]; i < c[s + 1]; ++i) acc += v[i];
        cnt = static_cast<T>(c[s + 1] - c[s]);
      }
      k[s] = cnt;
      o[s] = average ? (cnt > T(0) ? acc / cnt : T(0)) : acc;
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
