// row_impl.h -- CPU row kernels (forward / backward of log_softmax statistics over full rows).
//
// NOT a normal header: rowops.cpp includes it several times, once per ISA, inside a namespace given by
// PREFOPT_ISA_NS (and under `#pragma GCC target(...)` for the AVX2/AVX-512 clones). It must not include
// anything itself; everything it needs (prefopt_math.h, c10 types) is included by rowops.cpp first.
//
// One pass over memory per row: the row is walked in L1-sized blocks; each block is loaded/transformed
// once into a small buffer, its max taken, the running state rescaled to the new max, and the exp
// sums accumulated (`omp simd` reductions, vectorized without -ffast-math).

namespace PREFOPT_ISA_NS {

using prefopt::math::LseState;
using prefopt::math::Transform;

constexpr int64_t kBlock = 2048;

template <typename scalar_t, typename acc_t, bool kCap>
void forward_rows(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t V,
                  const int64_t* __restrict__ labels, int64_t ignore_index, const Transform<acc_t> tf,
                  int64_t r0, int64_t r1, acc_t* __restrict__ logp, acc_t* __restrict__ lse_out,
                  acc_t* __restrict__ ent_out, acc_t* __restrict__ lsp2_out, int64_t* bad_label) {
  namespace pm = prefopt::math;
  alignas(64) acc_t zbuf[kBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict__ x = logits + r * row_stride;
    LseState<acc_t> st = pm::lse_init<acc_t>();
    const int64_t lab = labels[r];
    const bool has_label = lab != ignore_index && lab >= 0 && lab < V;
    acc_t zl = pm::p_neg_inf<acc_t>();
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t nb = (V - b0) < kBlock ? (V - b0) : kBlock;
      const scalar_t* __restrict__ xb = x + b0;
      acc_t mb = pm::p_neg_inf<acc_t>();
#pragma omp simd reduction(max : mb)
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t z = pm::transform<kCap>(tf, static_cast<acc_t>(xb[i]));
        zbuf[i] = z;
        mb = z > mb ? z : mb;
      }
      // z[label] is read back from the buffer, not recomputed: the compiler may contract a recomputed
      // raw * (1/T) into the later subtraction (FMA), and then z[label] - max(z) is not 0 at the argmax.
      if (has_label && lab >= b0 && lab < b0 + nb) zl = zbuf[lab - b0];
      if (mb == pm::p_neg_inf<acc_t>()) {
        // The max drops NaN: a block of only -inf and NaN must still make the row NaN (eager log_softmax does),
        // while a block of only -inf contributes nothing. Rare path, so a scalar scan.
        bool has_nan = false;
        for (int64_t i = 0; i < nb; ++i) has_nan |= zbuf[i] != zbuf[i];
        if (has_nan) st.s = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      pm::lse_rescale(st, pm::p_max(st.m, mb));
      const acc_t m = st.m;
      acc_t s = 0, t = 0, s2 = 0;
#pragma omp simd reduction(+ : s, t, s2)
      for (int64_t i = 0; i < nb; ++i) {
        acc_t e, ed;
        pm::lse_terms(zbuf[i], m, e, ed);
        s += e;
        t += ed;
        s2 += e * e;
      }
      st.s += s;
      st.t += t;
      st.s2 += s2;
    }
    const acc_t lse = pm::lse_value(st);
    lse_out[r] = lse;
    if (ent_out) ent_out[r] = pm::lse_entropy(st);
    if (lsp2_out) lsp2_out[r] = pm::lse_log_sum_p2(st);
    if (has_label) {
      logp[r] = pm::lse_logp(st, zl);
    } else {
      if (lab != ignore_index) *bad_label = lab;
      logp[r] = acc_t(0);
    }
  }
}

// Gradient wrt raw logits. `out` may alias `logits` (same dtype, same strides): a block is read whole into the
// buffers before any of it is written.
template <typename scalar_t, typename out_t, typename acc_t, bool kCap>
void backward_rows(const scalar_t* logits, int64_t row_stride, int64_t V, const int64_t* __restrict__ labels,
                   int64_t ignore_index, const Transform<acc_t> tf, const acc_t* __restrict__ lse_in,
                   const acc_t* __restrict__ ent_in, const acc_t* __restrict__ g_logp_in,
                   const acc_t* __restrict__ g_ent_in, out_t* out, int64_t out_row_stride, int64_t r0,
                   int64_t r1, int64_t* bad_label) {
  namespace pm = prefopt::math;
  alignas(64) acc_t zbuf[kBlock];
  alignas(64) acc_t dzbuf[kBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* x = logits + r * row_stride;
    out_t* o = out + r * out_row_stride;
    const int64_t lab = labels[r];
    bool has_label = lab != ignore_index;
    if (has_label && (lab < 0 || lab >= V)) {
      *bad_label = lab;
      has_label = false;
    }
    const acc_t g_logp = has_label ? g_logp_in[r] : acc_t(0);
    const acc_t g_ent = g_ent_in ? g_ent_in[r] : acc_t(0);
    const acc_t H = ent_in ? ent_in[r] : acc_t(0);
    const acc_t lse = lse_in[r];
    if (g_logp == acc_t(0) && g_ent == acc_t(0)) {
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) o[i] = static_cast<out_t>(0.f);
      continue;
    }
    // z goes through a buffer (as in the forward) so z - lse is formed from the same rounded z the forward
    // folded: recomputed inline, raw * (1/T) - lse would be contracted into an FMA, and at temperature 1e-3 the
    // argmax would get p = exp(rounding residual of z) != 1, a gradient error of |z| * eps / T.
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t nb = (V - b0) < kBlock ? (V - b0) : kBlock;
      const bool label_here = has_label && lab >= b0 && lab < b0 + nb;
#pragma omp simd
      for (int64_t i = 0; i < nb; ++i) zbuf[i] = pm::transform_d<kCap>(tf, static_cast<acc_t>(x[b0 + i]), &dzbuf[i]);
#pragma omp simd
      for (int64_t i = 0; i < nb; ++i)
        o[b0 + i] = static_cast<out_t>(pm::softmax_grad(zbuf[i], lse, H, g_logp, g_ent) * dzbuf[i]);
      if (label_here) {  // zbuf holds z[label] even when out aliases logits
        o[lab] = static_cast<out_t>(pm::elem_grad(zbuf[lab - b0], dzbuf[lab - b0], true, lse, H, g_logp, g_ent));
      }
    }
  }
}

}  // namespace PREFOPT_ISA_NS
