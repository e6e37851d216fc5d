// pair_loss.cpp -- per-pair loss table (csrc/pair_loss_math.h, mirror of prefopt/losses/table.py) on CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "../pair_loss_math.h"
#include "ops.h"

namespace prefopt {
namespace cpu {

namespace pl = prefopt::pairloss;

std::vector<std::string> pair_loss_names() { return PREFOPT_PAIR_LOSS_NAMES; }

namespace {

struct PairInputs {
  at::Tensor a, b, params;
  int64_t n;
};

PairInputs prepare(int64_t loss_id, const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                   const at::Tensor& params_in) {
  TORCH_CHECK(loss_id >= 0 && loss_id < pl::kNumLosses, "prefopt._C: unknown pair loss id ", loss_id);
  const int nargs = pl::n_args(static_cast<int>(loss_id));
  TORCH_CHECK(nargs > 0, "prefopt._C: pair loss id ", loss_id, " has no per-pair term");
  TORCH_CHECK(a_in.device().is_cpu() && a_in.dim() == 1, "prefopt._C: pair-loss arguments must be 1-D CPU tensors");
  const at::ScalarType dt = a_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  PairInputs in;
  in.n = a_in.size(0);
  in.a = a_in.to(dt).contiguous();
  const bool has_b = b_in.has_value() && b_in->defined();
  TORCH_CHECK(has_b == (nargs == 2), "prefopt._C: pair loss id ", loss_id, " takes ", nargs, " argument(s)");
  if (has_b) {
    TORCH_CHECK(b_in->dim() == 1 && b_in->size(0) == in.n, "prefopt._C: pair-loss arguments must have equal size");
    in.b = b_in->to(dt).contiguous();
  }
  TORCH_CHECK(params_in.dim() == 1 && params_in.size(0) >= 9,
              "prefopt._C: params must be a 1-D tensor of at least 9 values (table.PARAM_NAMES)");
  in.params = params_in.to(at::kCPU, dt).contiguous();
  return in;
}

}  // namespace

at::Tensor pair_loss_forward(int64_t loss_id, const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                             const at::Tensor& params_in) {
  const PairInputs in = prepare(loss_id, a_in, b_in, params_in);
  at::Tensor out = at::empty({in.n}, in.a.options());
  AT_DISPATCH_FLOATING_TYPES(in.a.scalar_type(), "prefopt_pair_loss_forward", [&] {
    const auto p = pl::load_params(in.params.const_data_ptr<scalar_t>());
    const scalar_t* a = in.a.const_data_ptr<scalar_t>();
    const scalar_t* b = in.b.defined() ? in.b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const int id = static_cast<int>(loss_id);
    at::parallel_for(0, in.n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = pl::forward(id, p, a[i], b ? b[i] : scalar_t(0));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward(int64_t loss_id, const at::Tensor& a_in,
                                                      const std::optional<at::Tensor>& b_in,
                                                      const at::Tensor& params_in,
                                                      const std::optional<at::Tensor>& grad_out_in) {
  const PairInputs in = prepare(loss_id, a_in, b_in, params_in);
  const bool two = pl::n_grads(static_cast<int>(loss_id)) == 2;
  const bool has_g = grad_out_in.has_value() && grad_out_in->defined();
  at::Tensor g;
  if (has_g) {
    TORCH_CHECK(grad_out_in->dim() == 1 && grad_out_in->size(0) == in.n, "prefopt._C: grad_out must be [n]");
    g = grad_out_in->to(in.a.scalar_type()).contiguous();
  }
  at::Tensor da = at::empty({in.n}, in.a.options());
  at::Tensor db = at::empty({two ? in.n : 0}, in.a.options());
  AT_DISPATCH_FLOATING_TYPES(in.a.scalar_type(), "prefopt_pair_loss_backward", [&] {
    const auto p = pl::load_params(in.params.const_data_ptr<scalar_t>());
    const scalar_t* a = in.a.const_data_ptr<scalar_t>();
    const scalar_t* b = in.b.defined() ? in.b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = has_g ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* oa = da.data_ptr<scalar_t>();
    scalar_t* ob = two ? db.data_ptr<scalar_t>() : nullptr;
    const int id = static_cast<int>(loss_id);
    at::parallel_for(0, in.n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t ga, gb;
        pl::grads(id, p, a[i], b ? b[i] : scalar_t(0), &ga, &gb);
        const scalar_t s = gp ? gp[i] : scalar_t(1);
        oa[i] = ga * s;
        if (ob) ob[i] = gb * s;
      }
    });
  });
  return {da, db};
}

}  // namespace cpu
}  // namespace prefopt
