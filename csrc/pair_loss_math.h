// pair_loss_math.h -- the per-pair preference-loss formulas of prefopt/losses/table.py, mirrored once
// for C++ (CPU) and CUDA: one forward and its derivative(s) per table entry, elementwise.
//
// Ids follow table.ENTRIES order (table.INDEX); tests/test_cpp_kernels.py checks names and order against
// the table and every value/derivative against the table's torch evaluation (TorchOps).
// Arguments per kind (composition -- divergences, length normalisation, loss weights, WPO weights -- stays
// in python, table.pair_terms):
//   delta / delta_norm / aot / aot_unpaired:  a = h            -> f(h),   (df/dh)
//   cr / cr_norm:                              a = c, b = r     -> f(c,r), (df/dc, df/dr)
//   signed (kto):                              a = x, b = s     -> f(x,s), (df/dx)
// Parameters: a pointer to table.PARAM_NAMES values (beta, ls, tau, gamma, fa1, clamp, bco_delta, kl, ln2),
// read in the kernel so device-side batch statistics (bco_delta, kl) need no host sync.
#pragma once

#include <cmath>

#include "prefopt_math.h"

namespace prefopt {
namespace pairloss {

enum LossId : int {
  kSigmoid = 0, kHinge, kIpo, kExoPair, kNcaPair, kRobust, kBcoPair, kSppoHard, kAot, kAotUnpaired, kApoZero,
  kApoDown, kDiscopop, kSft, kSigmoidNorm, kCpo, kCpoHinge, kCpoIpo, kSimpo, kOrpo, kKto, kNumLosses
};

// Names in id order (must equal [e.name for e in table.ENTRIES]).
#define PREFOPT_PAIR_LOSS_NAMES                                                                                 \
  {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", \
   "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "cpo", "cpo_hinge", "cpo_ipo", "simpo", "orpo",  \
   "kto"}

// Number of per-pair arguments (0: no per-pair term) and of derivatives of each entry.
PREFOPT_HD int n_args(int id) {
  switch (id) {
    case kNcaPair: case kBcoPair: case kSppoHard: case kApoZero: case kApoDown: case kOrpo: case kKto: return 2;
    case kSft: return 0;
    default: return id >= 0 && id < kNumLosses ? 1 : -1;
  }
}
PREFOPT_HD int n_grads(int id) { return id == kKto ? 1 : n_args(id); }

template <typename T>
struct Params {
  T beta, ls, tau, gamma, fa1, clamp, bco_delta, kl, ln2;
};
template <typename T>
PREFOPT_HD Params<T> load_params(const T* p) {
  Params<T> r;
  r.beta = p[0]; r.ls = p[1]; r.tau = p[2]; r.gamma = p[3]; r.fa1 = p[4];
  r.clamp = p[5]; r.bco_delta = p[6]; r.kl = p[7]; r.ln2 = p[8];
  return r;
}

// ---- elementwise ops (TorchOps) -----------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
PREFOPT_HD float q_exp(float x) { return expf(x); }
PREFOPT_HD double q_exp(double x) { return ::exp(x); }
PREFOPT_HD float q_log(float x) { return logf(x); }
PREFOPT_HD double q_log(double x) { return ::log(x); }
PREFOPT_HD float q_log1p(float x) { return log1pf(x); }
PREFOPT_HD double q_log1p(double x) { return ::log1p(x); }
PREFOPT_HD float q_expm1(float x) { return expm1f(x); }
PREFOPT_HD double q_expm1(double x) { return ::expm1(x); }
#else
template <typename T> inline T q_exp(T x) { return std::exp(x); }
template <typename T> inline T q_log(T x) { return std::log(x); }
template <typename T> inline T q_log1p(T x) { return std::log1p(x); }
template <typename T> inline T q_expm1(T x) { return std::expm1(x); }
#endif

template <typename T> PREFOPT_HD T sigmoid(T x) { return T(1) / (T(1) + q_exp(-x)); }
// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))   (torch's formulation)
template <typename T> PREFOPT_HD T logsigmoid(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x < T(0) ? x : T(0)) - q_log1p(q_exp(-ax));
}
template <typename T> PREFOPT_HD T relu(T x) { return x > T(0) ? x : T(0); }
// log(1 - exp(x)), x <= 0; same switch point as table.LOG1MEXP_SWITCH
template <typename T> PREFOPT_HD T log1mexp(T x) {
  const T sw = T(-0.693359375);
  return x < sw ? q_log1p(-q_exp(x < T(0) ? x : T(0))) : q_log(-q_expm1(x));
}

// ---- building blocks ---------------------------------------------------------------------------------
template <typename T> PREFOPT_HD T sig_ls(const Params<T>& p, T x) {
  return -(T(1) - p.ls) * logsigmoid(x) - p.ls * logsigmoid(-x);
}
template <typename T> PREFOPT_HD T dsig_ls(const Params<T>& p, T x) {
  return -(T(1) - p.ls) * sigmoid(-x) + p.ls * sigmoid(x);
}
template <typename T> PREFOPT_HD T orpo_log_odds(T c, T r) { return (c - r) - (log1mexp(c) - log1mexp(r)); }

// ---- forward -----------------------------------------------------------------------------------------
template <typename T>
PREFOPT_HD T forward(int id, const Params<T>& p, T a, T b) {
  switch (id) {
    case kSigmoid: case kAot: case kAotUnpaired: case kCpo: return sig_ls(p, p.beta * a);
    case kHinge: case kCpoHinge: return relu(T(1) - p.beta * a);
    case kIpo: case kCpoIpo: { const T t = a - T(0.5) / p.beta; return t * t; }
    case kExoPair: {
      const T x = p.beta * a;
      return sigmoid(x) * (logsigmoid(x) - q_log1p(-p.ls)) + sigmoid(-x) * (logsigmoid(-x) - q_log(p.ls));
    }
    case kNcaPair: {
      const T x = p.beta * a, y = p.beta * b;
      return -logsigmoid(x) - T(0.5) * logsigmoid(-x) - T(0.5) * logsigmoid(-y);
    }
    case kRobust: {
      const T x = p.beta * a;
      return (-(T(1) - p.ls) * logsigmoid(x) + p.ls * logsigmoid(-x)) / (T(1) - T(2) * p.ls);
    }
    case kBcoPair: return -logsigmoid(p.beta * a - p.bco_delta) - logsigmoid(p.bco_delta - p.beta * b);
    case kSppoHard: { const T u = a - T(0.5) / p.beta, v = b + T(0.5) / p.beta; return u * u + v * v; }
    case kApoZero: return T(1) - sigmoid(p.beta * a) + sigmoid(p.beta * b);
    case kApoDown: return sigmoid(p.beta * a) + T(1) - sigmoid(p.beta * (a - b));
    case kDiscopop: {
      const T x = p.beta * a;
      return -logsigmoid(x) * sigmoid(-x / p.tau) + q_exp(logsigmoid(x / p.tau) - x);
    }
    case kSigmoidNorm: return -logsigmoid(p.beta * a);
    case kSimpo: return sig_ls(p, p.beta * a - p.gamma);
    case kOrpo: return -p.beta * logsigmoid(orpo_log_odds(a, b));
    case kKto: return T(1) - sigmoid(p.beta * b * (a - p.kl));
    default: return T(0);  // kSft: no per-pair term
  }
}

// ---- derivatives: *da = df/da, *db = df/db (cr kinds only) ------------------------------------------------
template <typename T>
PREFOPT_HD void grads(int id, const Params<T>& p, T a, T b, T* da, T* db) {
  *db = T(0);
  switch (id) {
    case kSigmoid: case kAot: case kAotUnpaired: case kCpo: *da = p.beta * dsig_ls(p, p.beta * a); return;
    case kHinge: case kCpoHinge: *da = (T(1) - p.beta * a > T(0)) ? -p.beta : T(0); return;
    case kIpo: case kCpoIpo: *da = T(2) * (a - T(0.5) / p.beta); return;
    case kExoPair: {
      const T x = p.beta * a;
      *da = p.beta * sigmoid(x) * sigmoid(-x) * (x - q_log1p(-p.ls) + q_log(p.ls));
      return;
    }
    case kNcaPair: {
      const T x = p.beta * a;
      *da = p.beta * (T(0.5) * sigmoid(x) - sigmoid(-x));
      *db = T(0.5) * p.beta * sigmoid(p.beta * b);
      return;
    }
    case kRobust: {
      const T x = p.beta * a;
      *da = -p.beta * ((T(1) - p.ls) * sigmoid(-x) + p.ls * sigmoid(x)) / (T(1) - T(2) * p.ls);
      return;
    }
    case kBcoPair:
      *da = -p.beta * sigmoid(p.bco_delta - p.beta * a);
      *db = p.beta * sigmoid(p.beta * b - p.bco_delta);
      return;
    case kSppoHard: *da = T(2) * (a - T(0.5) / p.beta); *db = T(2) * (b + T(0.5) / p.beta); return;
    case kApoZero: {
      const T x = p.beta * a, y = p.beta * b;
      *da = -p.beta * sigmoid(x) * sigmoid(-x);
      *db = p.beta * sigmoid(y) * sigmoid(-y);
      return;
    }
    case kApoDown: {
      const T x = p.beta * a, z = p.beta * (a - b);
      *da = p.beta * (sigmoid(x) * sigmoid(-x) - sigmoid(z) * sigmoid(-z));
      *db = p.beta * sigmoid(z) * sigmoid(-z);
      return;
    }
    case kDiscopop: {
      const T x = p.beta * a, u = x / p.tau;
      const T dmm = sigmoid(u) * sigmoid(-u);
      const T em = q_exp(logsigmoid(u) - x);
      const T emm = q_exp(logsigmoid(u) + logsigmoid(-u) - x);
      *da = p.beta * (-sigmoid(-x) * sigmoid(-u) + (emm + logsigmoid(x) * dmm) / p.tau - em);
      return;
    }
    case kSigmoidNorm: *da = -p.beta * sigmoid(-p.beta * a); return;
    case kSimpo: *da = p.beta * dsig_ls(p, p.beta * a - p.gamma); return;
    case kOrpo: {
      const T s = sigmoid(-orpo_log_odds(a, b));
      *da = p.beta * s / q_expm1(a);
      *db = -p.beta * s / q_expm1(b);
      return;
    }
    case kKto: {
      const T z = p.beta * b * (a - p.kl);
      *da = -p.beta * b * sigmoid(z) * sigmoid(-z);
      return;
    }
    default: *da = T(0); return;
  }
}

}  // namespace pairloss
}  // namespace prefopt
