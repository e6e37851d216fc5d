// bindings.cpp -- Python module prefopt._C_cuda: torch glue (checks, allocation, stream) around the
// torch-free launchers of rowops_kernels.cu / segment_kernels.cu. Compiled only by the real CUDA build
// (setup.py with a CUDA torch); the same Python-level contract as prefopt._C (docs/design.md).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../pair_loss_math.h"
#include "launch.h"

namespace {

using prefopt::cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "prefopt._C_cuda: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "prefopt._C_cuda.", what, ": ", cudaGetErrorString(err));
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.size(1) > 0, "prefopt._C_cuda: logits must be a "
              "CUDA tensor [n, V>0]");
  TORCH_CHECK(labels.is_cuda() && labels.dim() == 1 && labels.size(0) == logits.size(0) &&
                  labels.scalar_type() == at::kLong,
              "prefopt._C_cuda: labels must be an int64 CUDA tensor [n] on the logits' device");
  TORCH_CHECK(logits.size(0) <= 0x7fffffff, "prefopt._C_cuda: too many rows for one grid");
}

at::Tensor acc_vec(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "prefopt._C_cuda: ", name, " must have shape [", n, "]");
  return t.to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_forward(const at::Tensor& logits_in,
                                                                       const at::Tensor& labels_in,
                                                                       int64_t ignore_index, double logit_scale,
                                                                       double softcap, double temperature,
                                                                       bool want_entropy, bool want_sqsum) {
  check_rows(logits_in, labels_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(acc_type(logits));
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor ent = at::empty({want_entropy ? n : 0}, opts), lsp2 = at::empty({want_sqsum ? n : 0}, opts);
  check_cuda(prefopt::cuda::launch_row_forward(
                 dtype_of(logits), logits.data_ptr(), logits.stride(0), n, V, labels.data_ptr<int64_t>(),
                 ignore_index, logit_scale, softcap, temperature, logp.data_ptr(), lse.data_ptr(),
                 want_entropy ? ent.data_ptr() : nullptr, want_sqsum ? lsp2.data_ptr() : nullptr,
                 c10::cuda::getCurrentCUDAStream().stream()),
             "row_forward");
  return {logp, lse, ent, lsp2};
}

at::Tensor row_backward(const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse_in,
                        const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                        const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index, double logit_scale,
                        double softcap, double temperature, const std::optional<at::Tensor>& out_in) {
  check_rows(logits_in, labels_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t n = logits_in.size(0), V = logits_in.size(1);
  const auto acc = acc_type(logits_in);
  const bool has_gent = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!has_gent || (entropy.has_value() && entropy->defined()),
              "prefopt._C_cuda.row_backward: grad_entropy needs entropy");
  const at::Tensor lse = acc_vec(lse_in, n, acc, "lse"), g_logp = acc_vec(grad_logp, n, acc, "grad_logp");
  const at::Tensor ent = has_gent ? acc_vec(*entropy, n, acc, "entropy") : at::Tensor();
  const at::Tensor g_ent = has_gent ? acc_vec(*grad_entropy, n, acc, "grad_entropy") : at::Tensor();
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor logits = logits_in, out;
  if (out_in.has_value() && out_in->defined()) {
    out = *out_in;
    TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.size(0) == n && out.size(1) == V && out.stride(1) == 1,
                "prefopt._C_cuda.row_backward: out must be a CUDA tensor [n, V] with unit inner stride");
    TORCH_CHECK(out.scalar_type() == logits.scalar_type() || out.scalar_type() == at::kFloat,
                "prefopt._C_cuda.row_backward: out dtype must be float32 or the logits dtype");
    const bool aliases = out.data_ptr() == logits.data_ptr();
    TORCH_CHECK(!aliases || (out.strides() == logits.strides() && out.scalar_type() == logits.scalar_type()),
                "prefopt._C_cuda.row_backward: out may alias logits only exactly");
    if (!aliases && logits.stride(1) != 1) logits = logits.contiguous();
  } else {
    if (logits.stride(1) != 1) logits = logits.contiguous();
    out = at::empty({n, V}, logits.options());
  }
  check_cuda(prefopt::cuda::launch_row_backward(
                 dtype_of(logits), dtype_of(out), logits.data_ptr(), logits.stride(0), n, V,
                 labels.data_ptr<int64_t>(), ignore_index, logit_scale, softcap, temperature, lse.data_ptr(),
                 has_gent ? ent.data_ptr() : nullptr, g_logp.data_ptr(), has_gent ? g_ent.data_ptr() : nullptr,
                 out.data_ptr(), out.stride(0), c10::cuda::getCurrentCUDAStream().stream()),
             "row_backward");
  return out;
}

at::ScalarType seg_type(const at::Tensor& v) { return v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> segment_forward(const at::Tensor& values_in,
                                                   const std::optional<at::Tensor>& weights,
                                                   const at::Tensor& cu_in, bool average) {
  TORCH_CHECK(values_in.is_cuda() && values_in.dim() == 1, "prefopt._C_cuda: values must be a 1-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(values_in.device());
  const auto dt = seg_type(values_in);
  const at::Tensor values = values_in.to(dt).contiguous();
  const bool has_w = weights.has_value() && weights->defined();
  const at::Tensor w = has_w ? weights->to(dt).contiguous() : at::Tensor();
  const at::Tensor cu = cu_in.to(values.device(), at::kLong).contiguous();
  const int64_t S = cu.size(0) - 1;
  at::Tensor out = at::empty({S}, values.options()), counts = at::empty({S}, values.options());
  check_cuda(prefopt::cuda::launch_segment_forward(dtype_of(values), values.data_ptr(), has_w ? w.data_ptr() : nullptr,
                                                   cu.data_ptr<int64_t>(), S, average, out.data_ptr(),
                                                   counts.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
             "segment_forward");
  return {out, counts};
}

at::Tensor segment_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& weights,
                            const at::Tensor& cu_in, const at::Tensor& counts_in, bool average, int64_t N) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.dim() == 1, "prefopt._C_cuda: grad_out must be a 1-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto dt = seg_type(grad_out);
  const at::Tensor g = grad_out.to(dt).contiguous(), counts = counts_in.to(dt).contiguous();
  const bool has_w = weights.has_value() && weights->defined();
  const at::Tensor w = has_w ? weights->to(dt).contiguous() : at::Tensor();
  const at::Tensor cu = cu_in.to(g.device(), at::kLong).contiguous();
  const int64_t S = cu.size(0) - 1;
  at::Tensor grad = at::zeros({N}, g.options());
  check_cuda(prefopt::cuda::launch_segment_backward(dtype_of(g), g.data_ptr(), has_w ? w.data_ptr() : nullptr,
                                                    cu.data_ptr<int64_t>(), counts.data_ptr(), S, average,
                                                    grad.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
             "segment_backward");
  return grad;
}

std::vector<std::string> pair_loss_names() { return PREFOPT_PAIR_LOSS_NAMES; }

at::ScalarType pair_type(const at::Tensor& a) { return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The validated, contiguous arguments of one pair-loss call (forward and backward share the checks).
struct PairArgs {
  at::Tensor a, b, params;
  bool has_b;
};

PairArgs pair_args(int64_t loss_id, const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                   const at::Tensor& params_in) {
  TORCH_CHECK(loss_id >= 0 && loss_id < prefopt::pairloss::kNumLosses &&
                  prefopt::pairloss::n_args(static_cast<int>(loss_id)) > 0,
              "prefopt._C_cuda: pair loss id ", loss_id, " has no per-pair term");
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() == 1, "prefopt._C_cuda: pair-loss arguments must be 1-D CUDA tensors");
  PairArgs args;
  const auto dt = pair_type(a_in);
  args.a = a_in.to(dt).contiguous();
  args.has_b = b_in.has_value() && b_in->defined();
  TORCH_CHECK(args.has_b == (prefopt::pairloss::n_args(static_cast<int>(loss_id)) == 2),
              "prefopt._C_cuda: wrong number of pair-loss arguments for id ", loss_id);
  args.b = args.has_b ? b_in->to(dt).contiguous() : at::Tensor();
  TORCH_CHECK(!args.has_b || args.b.numel() == args.a.numel(),
              "prefopt._C_cuda: pair-loss arguments must have equal size");
  TORCH_CHECK(params_in.dim() == 1 && params_in.numel() >= 9, "prefopt._C_cuda: params must hold >= 9 values");
  args.params = params_in.to(args.a.device(), dt).contiguous();
  return args;
}

at::Tensor pair_loss_forward(int64_t loss_id, const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                             const at::Tensor& params_in) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const PairArgs args = pair_args(loss_id, a_in, b_in, params_in);
  at::Tensor out = at::empty_like(args.a);
  check_cuda(prefopt::cuda::launch_pair_loss_forward(dtype_of(args.a), static_cast<int>(loss_id), args.a.data_ptr(),
                                                     args.has_b ? args.b.data_ptr() : nullptr,
                                                     args.params.data_ptr(), args.a.numel(), out.data_ptr(),
                                                     c10::cuda::getCurrentCUDAStream().stream()),
             "pair_loss_forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward(int64_t loss_id, const at::Tensor& a_in,
                                                      const std::optional<at::Tensor>& b_in,
                                                      const at::Tensor& params_in,
                                                      const std::optional<at::Tensor>& grad_out) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const PairArgs args = pair_args(loss_id, a_in, b_in, params_in);
  const at::Tensor& a = args.a;
  const bool has_g = grad_out.has_value() && grad_out->defined();
  const at::Tensor g = has_g ? grad_out->to(a.scalar_type()).contiguous() : at::Tensor();
  TORCH_CHECK(!has_g || g.numel() == a.numel(), "prefopt._C_cuda: grad_out must have the size of the arguments");
  const bool two = prefopt::pairloss::n_grads(static_cast<int>(loss_id)) == 2;
  at::Tensor da = at::empty_like(a), db = at::empty({two ? a.numel() : 0}, a.options());
  check_cuda(prefopt::cuda::launch_pair_loss_backward(
                 dtype_of(a), static_cast<int>(loss_id), a.data_ptr(), args.has_b ? args.b.data_ptr() : nullptr,
                 args.params.data_ptr(), has_g ? g.data_ptr() : nullptr, a.numel(), da.data_ptr(),
                 two ? db.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream()),
             "pair_loss_backward");
  return {da, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefopt CUDA kernels (row ops, segment sums); see docs/design.md";
  m.def("row_forward", &row_forward, py::arg("logits"), py::arg("labels"), py::arg("ignore_index"),
        py::arg("logit_scale"), py::arg("softcap"), py::arg("temperature"), py::arg("want_entropy"),
        py::arg("want_sqsum"));
  m.def("row_backward", &row_backward, py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"),
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("ignore_index"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("temperature"), py::arg("out"));
  m.def("segment_forward", &segment_forward, py::arg("values"), py::arg("weights"), py::arg("cu_seqlens"),
        py::arg("average"));
  m.def("segment_backward", &segment_backward, py::arg("grad_out"), py::arg("weights"), py::arg("cu_seqlens"),
        py::arg("counts"), py::arg("average"), py::arg("N"));
  m.def("pair_loss_names", &pair_loss_names);
  m.def("pair_loss_forward", &pair_loss_forward, py::arg("loss_id"), py::arg("a"), py::arg("b"), py::arg("params"));
  m.def("pair_loss_backward", &pair_loss_backward, py::arg("loss_id"), py::arg("a"), py::arg("b"),
        py::arg("params"), py::arg("grad_out"));
}
