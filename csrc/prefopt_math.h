// prefopt_math.h -- the per-row math of the row ops, written once.
//
// Included by the CPU kernels (csrc/cpu/*.cpp, plain C++) and the CUDA kernels (csrc/cuda/*.cu).
// Nothing here depends on torch: only <cmath> (host) or the CUDA math library (device).
//
// Contract (docs/design.md):
//   logit transform  x = raw * logit_scale; if softcap: x = softcap * tanh(x / softcap); z = x / temperature
//   dz/draw          = logit_scale / temperature * (1 - tanh(raw * logit_scale / softcap)^2)   (no tanh factor w/o cap)
//   logp             = z[label] - lse
//   entropy          = lse - sum_v p_v z_v
//   log_sum_p2       = log sum_v p_v^2
//   dlogp/dz         = onehot(label) - p
//   dH/dz            = -p * (z - (lse - H)) = -p * (log p + H)
//
// Online log-sum-exp state (all relative to the running max m, which keeps every term <= 1 and makes
// the entropy term exact for logits of magnitude 1e4):
//   s  = sum exp(z - m)
//   t  = sum exp(z - m) * (z - m)           -> entropy  = log s - t / s
//   s2 = sum exp(2 (z - m))                 -> log_sum_p2 = log s2 - 2 log s
//   lse = m + log s
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PREFOPT_HD __host__ __device__ __forceinline__
#define PREFOPT_HOST_ONLY_INLINE __host__ inline
#else
#define PREFOPT_HD inline
#define PREFOPT_HOST_ONLY_INLINE inline
#endif

namespace prefopt {
namespace math {

// ---------------------------------------------------------------------------------------------
// Scalar math dispatch. Device: the CUDA math library. Host float: a Cephes-style polynomial exp
// (max error ~2 ulp over the range used here) written in plain arithmetic so that `omp simd` loops
// vectorize it without -ffast-math; host double: std::exp (float64 results stay tight).
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDA_ARCH__)
PREFOPT_HOST_ONLY_INLINE float fast_expf(float x) {
  const float hi = 88.0f;               // exp(88) = 1.65e38 < FLT_MAX; we only ever call with x <= ~0
  const float lo = -87.33654475f;       // below this exp underflows to (near) denormals: return 0
  // Branch-free on purpose (clamps are selects, the underflow mask a multiply) so that GCC cannot
  // jump-thread it into control flow that blocks vectorization of the calling loop.
  float xc = x > hi ? hi : x;           // NaN compares false: NaN propagates
  xc = xc < lo ? lo : xc;
  // n = round(x / ln2) with the 1.5*2^23 trick (no -ffast-math, so the compiler keeps it)
  float n = xc * 1.44269504088896341f + 12582912.0f;
  n = n - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * (-2.12194440e-4f);
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  const float keep = static_cast<float>(x >= lo);  // 0 below the underflow threshold (and for -inf)
  return (y * scale) * keep;                       // NaN: keep = 0 but y is NaN -> NaN
}
#endif

PREFOPT_HD float p_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return fast_expf(x);
#endif
}
PREFOPT_HD double p_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
PREFOPT_HD float p_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
PREFOPT_HD double p_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
PREFOPT_HD float p_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}
PREFOPT_HD double p_tanh(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}
// Products that must round exactly like every other evaluation of the same z. nvcc contracts a*b - c into one
// FMA by default, which makes z[label] - max(z) the (possibly positive) rounding residual of z instead of 0;
// __fmul_rn/__dmul_rn are never contracted. On the host the row kernels read z back from a buffer instead
// (csrc/cpu/row_impl.h), because setup.py builds with -ffp-contract=fast.
PREFOPT_HD float p_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PREFOPT_HD double p_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
template <typename T>
PREFOPT_HD T p_max(T a, T b) { return a > b ? a : b; }
template <typename T>
PREFOPT_HD T p_neg_inf() { return -std::numeric_limits<T>::infinity(); }

// ---------------------------------------------------------------------------------------------
// Logit transform raw -> z and dz/draw.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Transform {
  acc_t scale;     // logit_scale
  acc_t cap;       // softcap (only meaningful when has_cap)
  acc_t inv_cap;   // 1 / softcap
  acc_t inv_temp;  // 1 / temperature
  acc_t dz0;       // logit_scale / temperature  (dz/draw without the tanh factor)
  bool has_cap;
};

template <typename acc_t>
PREFOPT_HD Transform<acc_t> make_transform(double logit_scale, double softcap, double temperature) {
  Transform<acc_t> tf;
  tf.scale = static_cast<acc_t>(logit_scale);
  tf.has_cap = softcap > 0.0;
  tf.cap = static_cast<acc_t>(tf.has_cap ? softcap : 1.0);
  tf.inv_cap = static_cast<acc_t>(tf.has_cap ? 1.0 / softcap : 1.0);
  tf.inv_temp = static_cast<acc_t>(1.0 / temperature);
  tf.dz0 = static_cast<acc_t>(logit_scale / temperature);
  return tf;
}

// z = transform(raw). kCap is the compile-time version of tf.has_cap (keeps the no-cap loop vectorizable).
template <bool kCap, typename acc_t>
PREFOPT_HD acc_t transform(const Transform<acc_t>& tf, acc_t raw) {
  acc_t x = p_mul(raw, tf.scale);
  if (kCap) x = p_mul(tf.cap, p_tanh(x * tf.inv_cap));
  return p_mul(x, tf.inv_temp);
}

// z = transform(raw) and *dz = dz/draw, sharing the tanh.
template <bool kCap, typename acc_t>
PREFOPT_HD acc_t transform_d(const Transform<acc_t>& tf, acc_t raw, acc_t* dz) {
  acc_t x = p_mul(raw, tf.scale);
  if (kCap) {
    acc_t th = p_tanh(x * tf.inv_cap);
    *dz = tf.dz0 * (acc_t(1) - th * th);  // raw = +-inf: th = +-1, dz = 0 (eager's tanh backward gives 0 too)
    return p_mul(p_mul(tf.cap, th), tf.inv_temp);
  }
  *dz = tf.dz0;
  return p_mul(x, tf.inv_temp);
}

// Runtime-dispatch convenience (scalar call sites: the label logit, CUDA kernels).
template <typename acc_t>
PREFOPT_HD acc_t transform_rt(const Transform<acc_t>& tf, acc_t raw) {
  return tf.has_cap ? transform<true>(tf, raw) : transform<false>(tf, raw);
}
template <typename acc_t>
PREFOPT_HD acc_t transform_d_rt(const Transform<acc_t>& tf, acc_t raw, acc_t* dz) {
  return tf.has_cap ? transform_d<true>(tf, raw, dz) : transform_d<false>(tf, raw, dz);
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp state.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct LseState {
  acc_t m;   // running max of z
  acc_t s;   // sum exp(z - m)
  acc_t t;   // sum exp(z - m) * (z - m)
  acc_t s2;  // sum exp(2 (z - m))
};

template <typename acc_t>
PREFOPT_HD LseState<acc_t> lse_init() {
  LseState<acc_t> st;
  st.m = p_neg_inf<acc_t>();
  st.s = acc_t(0);
  st.t = acc_t(0);
  st.s2 = acc_t(0);
  return st;
}

// Re-express the state relative to a new max new_m >= st.m.
template <typename acc_t>
PREFOPT_HD void lse_rescale(LseState<acc_t>& st, acc_t new_m) {
  if (st.s == acc_t(0)) {  // empty state (m = -inf): nothing to rescale
    st.m = new_m;
    return;
  }
  if (!(new_m > st.m)) return;
  const acc_t d = st.m - new_m;  // < 0
  const acc_t a = p_exp(d);
  st.t = a * (st.t + d * st.s);
  st.s = a * st.s;
  st.s2 = (a * a) * st.s2;
  st.m = new_m;
}

// Contribution of one value z <= m (m fixed): e = exp(z - m), ed = e * (z - m). -inf -> (0, 0).
template <typename acc_t>
PREFOPT_HD void lse_terms(acc_t z, acc_t m, acc_t& e, acc_t& ed) {
  const acc_t d = z - m;
  e = p_exp(d);
  ed = (e == acc_t(0)) ? acc_t(0) : e * d;
}

// Online fold of one value into the running state (the CUDA per-thread loop).
template <typename acc_t>
PREFOPT_HD void lse_fold(LseState<acc_t>& st, acc_t z) {
  if (z == p_neg_inf<acc_t>()) return;
  if (z > st.m) lse_rescale(st, z);
  acc_t e, ed;
  lse_terms(z, st.m, e, ed);
  st.s += e;
  st.t += ed;
  st.s2 += e * e;
}

// Merge two states (warp shuffles, CPU blocks).
template <typename acc_t>
PREFOPT_HD LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (a.s == acc_t(0)) return b;
  if (b.s == acc_t(0)) return a;
  const acc_t m = p_max(a.m, b.m);
  lse_rescale(a, m);
  lse_rescale(b, m);
  LseState<acc_t> r;
  r.m = m;
  r.s = a.s + b.s;
  r.t = a.t + b.t;
  r.s2 = a.s2 + b.s2;
  return r;
}

template <typename acc_t>
PREFOPT_HD acc_t lse_value(const LseState<acc_t>& st) { return st.m + p_log(st.s); }
// log p of the entry z_label (rounded exactly like the z that set st.m): (z - m) - log s. z <= m and s >= 1
// (the max contributes exp(0) = 1), so the result is <= 0 exactly, where z - lse can round above 0 when
// |z| is large (temperature 1e-3) or V = 1. Non-finite rows: m = +inf or s = NaN -> NaN; all -inf -> NaN.
template <typename acc_t>
PREFOPT_HD acc_t lse_logp(const LseState<acc_t>& st, acc_t z_label) { return (z_label - st.m) - p_log(st.s); }
template <typename acc_t>
PREFOPT_HD acc_t lse_entropy(const LseState<acc_t>& st) { return p_log(st.s) - st.t / st.s; }
template <typename acc_t>
PREFOPT_HD acc_t lse_log_sum_p2(const LseState<acc_t>& st) { return p_log(st.s2) - acc_t(2) * p_log(st.s); }

// ---------------------------------------------------------------------------------------------
// Per-element gradient wrt z, WITHOUT the one-hot term (the caller adds g_logp at the label):
//   dL/dz_v = -p_v * g_logp + g_ent * (-p_v * (log p_v + H))
// with log p_v = z_v - lse (exact for |z| ~ 1e4: z and lse are close, no cancellation of sum p z).
// Multiply by dz/draw for the gradient wrt raw logits.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
PREFOPT_HD acc_t softmax_grad(acc_t z, acc_t lse, acc_t H, acc_t g_logp, acc_t g_ent) {
  const acc_t lp = z - lse;
  const acc_t p = p_exp(lp);
  const acc_t g = -p * (g_logp + g_ent * (lp + H));
  return p == acc_t(0) ? acc_t(0) : g;  // z = -inf (masked vocab entry): 0, not 0 * inf = NaN
}

// Full per-element gradient wrt raw logits: ((onehot - p) * g_logp + g_ent * dH/dz) * dz/draw.
template <typename acc_t>
PREFOPT_HD acc_t elem_grad(acc_t z, acc_t dz, bool is_label, acc_t lse, acc_t H, acc_t g_logp, acc_t g_ent) {
  acc_t g = softmax_grad(z, lse, H, g_logp, g_ent);
  if (is_label) g += g_logp;
  return g * dz;
}

// ---------------------------------------------------------------------------------------------
// Segment sums (masked per-sequence sums, design.md).
// ---------------------------------------------------------------------------------------------
// Scale applied to a segment's sum (forward) / incoming grad (backward).
template <typename acc_t>
PREFOPT_HD acc_t segment_scale(acc_t count, bool average) {
  if (!average) return acc_t(1);
  return count > acc_t(0) ? acc_t(1) / count : acc_t(0);
}

}  // namespace math
}  // namespace prefopt
