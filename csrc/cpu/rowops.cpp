// rowops.cpp -- CPU row ops of prefopt._C: tensor checks, dtype/ISA dispatch, at::parallel_for over rows.
// The kernels themselves are in row_impl.h (compiled once per ISA below); the math in ../prefopt_math.h.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "../prefopt_math.h"

// ---- ISA clones of the kernels ------------------------------------------------------------------
// Portable build (no -march=native): the same source is compiled for the baseline ISA and, on x86-64
// with GCC/Clang, for AVX2+FMA and AVX-512 through `#pragma GCC target`; the clone is picked at run
// time from the CPU (override with PREFOPT_CPU_ISA=default|avx2|avx512).
#define PREFOPT_ISA_NS prefopt_isa_default
#include "row_impl.h"
#undef PREFOPT_ISA_NS

#if defined(__x86_64__) && defined(__GNUC__)
#define PREFOPT_HAVE_X86_CLONES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PREFOPT_ISA_NS prefopt_isa_avx2
#include "row_impl.h"
#undef PREFOPT_ISA_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define PREFOPT_ISA_NS prefopt_isa_avx512
#include "row_impl.h"
#undef PREFOPT_ISA_NS
#pragma GCC pop_options
#endif

namespace prefopt {
namespace cpu {

namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef PREFOPT_HAVE_X86_CLONES
  static const Isa hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  Isa isa = hw;
  if (const char* env = std::getenv("PREFOPT_CPU_ISA")) {  // may only lower the ISA
    if (std::strcmp(env, "default") == 0) isa = Isa::kDefault;
    else if (std::strcmp(env, "avx2") == 0 && hw != Isa::kDefault) isa = Isa::kAvx2;
  }
  return isa;
#else
  return Isa::kDefault;
#endif
}

// Per-row vectors (lse, entropy, grads) are tiny: normalise them to contiguous tensors of the
// accumulation dtype (float64 for float64 logits, float32 otherwise).
at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_acc_vec(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "prefopt._C: ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "prefopt._C: ", name, " must be a CPU tensor");
  return t.to(acc).contiguous();
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu(), "prefopt._C: logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, "prefopt._C: logits must be 2-D [n, V], got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "prefopt._C: logits dtype must be float32/float64/bfloat16/float16, got ", dt);
  TORCH_CHECK(logits.size(1) > 0, "prefopt._C: logits must have V > 0");
  TORCH_CHECK(labels.device().is_cpu() && labels.dim() == 1 && labels.size(0) == logits.size(0),
              "prefopt._C: labels must be a CPU tensor of shape [", logits.size(0), "]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "prefopt._C: labels must be int64, got ",
              labels.scalar_type());
}

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

constexpr int64_t kNoBad = std::numeric_limits<int64_t>::min();

void report_bad(std::atomic<int64_t>& bad, int64_t local) {
  if (local != kNoBad) bad.store(local);
}

}  // namespace

std::string row_isa() {
  switch (detect_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

// Runs the statement(s) with `K` aliased to the kernel namespace of the selected ISA clone.
#ifdef PREFOPT_HAVE_X86_CLONES
#define PREFOPT_ISA_CALL(ISA, ...)                                         \
  switch (ISA) {                                                           \
    case Isa::kAvx512: { namespace K = prefopt_isa_avx512; __VA_ARGS__; break; } \
    case Isa::kAvx2: { namespace K = prefopt_isa_avx2; __VA_ARGS__; break; }     \
    default: { namespace K = prefopt_isa_default; __VA_ARGS__; break; }          \
  }
#else
#define PREFOPT_ISA_CALL(ISA, ...) { namespace K = prefopt_isa_default; __VA_ARGS__; }
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_forward(
    const at::Tensor& logits_in, const at::Tensor& labels_in, int64_t ignore_index, double logit_scale,
    double softcap, double temperature, bool want_entropy, bool want_sqsum) {
  check_logits(logits_in, labels_in);
  TORCH_CHECK(temperature != 0.0, "prefopt._C: temperature must be non-zero");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  const auto fopts = logits.options().dtype(acc_type(logits));
  at::Tensor logp = at::empty({n}, fopts), lse = at::empty({n}, fopts);
  at::Tensor ent = want_entropy ? at::empty({n}, fopts) : at::empty({0}, fopts);
  at::Tensor lsp2 = want_sqsum ? at::empty({n}, fopts) : at::empty({0}, fopts);
  if (n == 0) return {logp, lse, ent, lsp2};
  const Isa isa = detect_isa();
  std::atomic<int64_t> bad{kNoBad};
  const int64_t row_stride = logits.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "prefopt_row_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto tf = prefopt::math::make_transform<acc_t>(logit_scale, softcap, temperature);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* logp_p = logp.data_ptr<acc_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* ent_p = want_entropy ? ent.data_ptr<acc_t>() : nullptr;
    acc_t* lsp2_p = want_sqsum ? lsp2.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, grain_for(V), [&](int64_t r0, int64_t r1) {
      int64_t local_bad = kNoBad;
      if (tf.has_cap) {
        PREFOPT_ISA_CALL(isa, K::forward_rows<scalar_t, acc_t, true>(x, row_stride, V, lab, ignore_index, tf,
                         r0, r1, logp_p, lse_p, ent_p, lsp2_p, &local_bad));
      } else {
        PREFOPT_ISA_CALL(isa, K::forward_rows<scalar_t, acc_t, false>(x, row_stride, V, lab, ignore_index, tf,
                         r0, r1, logp_p, lse_p, ent_p, lsp2_p, &local_bad));
      }
      report_bad(bad, local_bad);
    });
  });
  TORCH_CHECK(bad.load() == kNoBad, "prefopt._C.row_forward: label ", bad.load(), " out of range [0, ", V,
              ") and != ignore_index (", ignore_index, ")");
  return {logp, lse, ent, lsp2};
}

at::Tensor row_backward(const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse_in,
                        const std::optional<at::Tensor>& entropy_in, const at::Tensor& grad_logp_in,
                        const std::optional<at::Tensor>& grad_entropy_in, int64_t ignore_index,
                        double logit_scale, double softcap, double temperature,
                        const std::optional<at::Tensor>& out_in) {
  check_logits(logits_in, labels_in);
  TORCH_CHECK(temperature != 0.0, "prefopt._C: temperature must be non-zero");
  const int64_t n = logits_in.size(0), V = logits_in.size(1);
  const bool has_gent = grad_entropy_in.has_value() && grad_entropy_in->defined();
  const bool has_ent = entropy_in.has_value() && entropy_in->defined();
  TORCH_CHECK(!has_gent || has_ent, "prefopt._C.row_backward: grad_entropy needs entropy");
  const at::ScalarType acc = acc_type(logits_in);
  const at::Tensor lse = as_acc_vec(lse_in, n, acc, "lse");
  const at::Tensor g_logp = as_acc_vec(grad_logp_in, n, acc, "grad_logp");
  const at::Tensor ent = has_gent ? as_acc_vec(*entropy_in, n, acc, "entropy") : at::Tensor();
  const at::Tensor g_ent = has_gent ? as_acc_vec(*grad_entropy_in, n, acc, "grad_entropy") : at::Tensor();
  const at::Tensor labels = labels_in.contiguous();

  at::Tensor out;
  at::Tensor logits = logits_in;
  if (out_in.has_value() && out_in->defined()) {
    out = *out_in;
    TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.size(0) == n && out.size(1) == V,
                "prefopt._C.row_backward: out must be a CPU tensor of shape [", n, ", ", V, "]");
    TORCH_CHECK(out.scalar_type() == logits.scalar_type() || out.scalar_type() == at::kFloat,
                "prefopt._C.row_backward: out dtype must be float32 or the logits dtype");
    TORCH_CHECK(out.stride(1) == 1, "prefopt._C.row_backward: out must have unit stride along V");
    const bool aliases = out.data_ptr() == logits.data_ptr();
    TORCH_CHECK(!aliases || (out.strides() == logits.strides() && out.scalar_type() == logits.scalar_type()),
                "prefopt._C.row_backward: out may alias logits only exactly (same dtype and strides)");
    if (!aliases && logits.stride(1) != 1) logits = logits.contiguous();
  } else {
    if (logits.stride(1) != 1) logits = logits.contiguous();
    out = at::empty({n, V}, logits.options());
  }
  if (n == 0) return out;

  const Isa isa = detect_isa();
  std::atomic<int64_t> bad{kNoBad};
  const int64_t row_stride = logits.stride(0), out_stride = out.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const bool out_f32 = out.scalar_type() == at::kFloat;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "prefopt_row_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto tf = prefopt::math::make_transform<acc_t>(logit_scale, softcap, temperature);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    const acc_t* ent_p = has_gent ? ent.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gl_p = g_logp.const_data_ptr<acc_t>();
    const acc_t* ge_p = has_gent ? g_ent.const_data_ptr<acc_t>() : nullptr;
    auto run = [&](auto* o) {
      using out_t = std::remove_pointer_t<decltype(o)>;
      at::parallel_for(0, n, grain_for(V), [&](int64_t r0, int64_t r1) {
        int64_t local_bad = kNoBad;
        if (tf.has_cap) {
          PREFOPT_ISA_CALL(isa, K::backward_rows<scalar_t, out_t, acc_t, true>(x, row_stride, V, lab, ignore_index,
                           tf, lse_p, ent_p, gl_p, ge_p, o, out_stride, r0, r1, &local_bad));
        } else {
          PREFOPT_ISA_CALL(isa, K::backward_rows<scalar_t, out_t, acc_t, false>(x, row_stride, V, lab,
                           ignore_index, tf, lse_p, ent_p, gl_p, ge_p, o, out_stride, r0, r1, &local_bad));
        }
        report_bad(bad, local_bad);
      });
    };
    if (out_f32 && !std::is_same<scalar_t, float>::value) {
      run(out.data_ptr<float>());
    } else {
      run(out.data_ptr<scalar_t>());
    }
  });
  TORCH_CHECK(bad.load() == kNoBad, "prefopt._C.row_backward: label ", bad.load(), " out of range [0, ", V,
              ") and != ignore_index (", ignore_index, ")");
  return out;
}

}  // namespace cpu
}  // namespace prefopt
