"""@triton.jit helpers shared by every Triton kernel of prefopt: each formula lives here once.

* ``to_acc``      : cast a loaded tile to the accumulator dtype (fp32; fp64 for fp64 inputs).
* ``transform``   : raw logits -> z (logit_scale, optional tanh softcap, temperature) and dz/draw;
  ``transform_params`` turns the launch's float64 scalars into its arguments.
* ``block_stats`` / ``merge`` / ``finish`` : the online log-sum-exp fold. A fold state is
  ``(m, s, sz, s2)`` with ``m`` the running max of z and, relative to it,
  ``s = sum exp(z - m)``, ``sz = sum exp(z - m) * (z - m)``, ``s2 = sum exp(2 (z - m))``.
  ``sz`` is kept relative to ``m`` (not ``sum exp*z``) so the entropy ``log s - sz / s`` has no
  cancellation between two numbers of the size of the logits (|z| ~ 1e4 stays exact in fp32).
* ``label_logp``  : log p of the label entry from the state (<= 0 exactly).
* ``dlogits``     : d(loss)/dz of one tile given lse/entropy and the two upstream gradients.
* ``negligible_tile`` : the gradient-filtering test of a backward tile (docs/design.md, "Gradient filtering").
Non-finite logits follow eager float64 log_softmax: -inf entries have p = 0 and add nothing (no 0 * -inf);
a row holding +inf or NaN, or only -inf, folds to NaN statistics.
"""
import triton
import triton.language as tl

from prefopt._source_tree import require_prefopt_name

require_prefopt_name(__name__)


@triton.jit
def to_acc(x, USE_FP64: tl.constexpr):
    if USE_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def transform(raw, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(raw * logit_scale / softcap) / temperature (cap optional); also dz/draw.

    tanh is built from exp(-2|u|) so it is exact-ish near 0 and saturates without inf/NaN;
    1 - tanh^2 is written as 4e / (1 + e)^2 (no cancellation when |u| is large).
    """
    x = raw * logit_scale
    if HAS_SOFTCAP:
        u = x / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
        z = softcap * t * inv_temp
        one_pe = 1.0 + e
        dz = (logit_scale * inv_temp) * (4.0 * e / (one_pe * one_pe))
    else:
        z = x * inv_temp
        dz = tl.zeros_like(x) + logit_scale * inv_temp
    return z, dz


@triton.jit
def transform_params(logit_scale, softcap, temperature, USE_FP64: tl.constexpr):
    """(logit_scale, softcap, 1 / temperature) of ``transform`` in the accumulator dtype.

    The kernels annotate the three as tl.float64: compiled Triton binds a plain Python float as fp32, so a
    float64 kernel would otherwise scale by temperature 0.8 rounded to fp32 (1.5e-8 relative error; the
    interpreter keeps the double, so only a GPU showed it). The reciprocal is taken in float64 too.
    """
    one = tl.full((), 1.0, tl.float64)  # a float64 tensor also where the interpreter passes plain floats
    return to_acc(one * logit_scale, USE_FP64), to_acc(one * softcap, USE_FP64), to_acc(one / temperature, USE_FP64)


@triton.jit
def block_stats(z, mask, AXIS: tl.constexpr, WANT_ENT: tl.constexpr, WANT_SQ: tl.constexpr):
    """Fold state of one tile (reduced along AXIS); masked entries do not count.

    Every reduced row must hold at least one unmasked entry (the launchers guarantee it)."""
    zm = tl.where(mask, z, float("-inf"))
    m = tl.max(zm, axis=AXIS)
    # A row of the tile that is all -inf (masked vocabulary entries) has m = -inf: shift by 0 instead, so its
    # entries give exp(-inf) = 0 (s = 0, the identity of ``merge``) and not exp(-inf - -inf) = NaN.
    # tl.max drops NaN on some targets: a NaN entry still reaches s through exp(NaN - m).
    shift = tl.where(m == float("-inf"), 0.0, m)
    d = tl.where(mask, zm - tl.expand_dims(shift, AXIS), 0.0)
    e = tl.where(mask, tl.exp(d), 0.0)
    s = tl.sum(e, axis=AXIS)
    if WANT_ENT:
        # e * d with e = 0, d = -inf is an entry of probability 0: it adds 0, never 0 * -inf
        sz = tl.sum(tl.where(e == 0.0, 0.0, e * d), axis=AXIS)
    else:
        sz = tl.zeros_like(s)
    if WANT_SQ:
        s2 = tl.sum(e * e, axis=AXIS)
    else:
        s2 = tl.zeros_like(s)
    return m, s, sz, s2


@triton.jit
def merge(m, s, sz, s2, mb, sb, szb, s2b):
    """Merge two fold states (elementwise). A state with s == 0 (m = -inf) is the identity."""
    mn = tl.maximum(m, mb)
    da = tl.where(s > 0, m - mn, 0.0)
    db = tl.where(sb > 0, mb - mn, 0.0)
    a = tl.where(s > 0, tl.exp(da), 0.0)
    b = tl.where(sb > 0, tl.exp(db), 0.0)
    # shift sz from "relative to m" to "relative to mn": sum e' (z - mn) = a * (sz + (m - mn) * s)
    sz_new = a * (sz + da * s) + b * (szb + db * sb)
    return mn, s * a + sb * b, sz_new, s2 * (a * a) + s2b * (b * b)


@triton.jit
def fold(m, s, sz, s2, z, mask, AXIS: tl.constexpr, WANT_ENT: tl.constexpr, WANT_SQ: tl.constexpr):
    """Online log-sum-exp update of state (m, s, sz, s2) with tile z."""
    mb, sb, szb, s2b = block_stats(z, mask, AXIS, WANT_ENT, WANT_SQ)
    return merge(m, s, sz, s2, mb, sb, szb, s2b)


@triton.jit
def finish(m, s, sz, s2):
    """-> (lse, entropy, log_sum_p2) of the folded row(s)."""
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - sz / s
    log_sum_p2 = tl.log(s2) - 2.0 * log_s
    return lse, entropy, log_sum_p2


@triton.jit
def label_logp(z_label, m, s):
    """log p of z_label, an entry of the folded row: (z_label - m) - log s, not z_label - lse.

    z_label <= m and s >= 1 (the max contributes exp(0)), so it is <= 0, where z_label - lse rounds above 0 at
    large |z| (temperature 1e-3) or V = 1. A GPU build may contract the transform's product into the subtraction
    (FMA), leaving a rounding residual of either sign, so positive results are clamped (NaN passes: NaN > 0 is
    false). Rows with +inf/NaN (m = +inf or s = NaN) or all -inf (m = -inf) give NaN, as log_softmax does."""
    lp = (z_label - m) - tl.log(s)
    return tl.where(lp > 0.0, 0.0, lp)


@triton.jit
def dlogits(z, is_label, lse, mean_z, g_logp, g_ent, HAS_ENT: tl.constexpr):
    """dL/dz of a tile: g_logp * (onehot - p) + g_ent * (-p * (z - mean_z)).

    mean_z = lse - entropy = sum_v p_v z_v. Row quantities (lse, mean_z, g_*) arrive broadcastable
    to z; g_logp is already 0 for ignored rows."""
    p = tl.exp(z - lse)
    coef = g_logp
    if HAS_ENT:
        coef = coef + g_ent * (z - mean_z)
    # p = 0 (z = -inf, a masked entry) contributes 0, never 0 * -inf; a NaN p (non-finite row) stays NaN
    return tl.where(is_label, g_logp, 0.0) - tl.where(p == 0.0, 0.0, p * coef)


@triton.jit
def negligible_tile(grad, threshold):
    """True when every entry of a [rows, cols] gradient tile (dL/draw) is negligible, |grad| <= threshold of its row
    (docs/design.md, "Gradient filtering"; the CPU twin is prefopt/cpu/rowops_torch.py `kept_blocks`). A NaN entry is
    never negligible, so a non-finite row keeps its tile and its NaN gradient."""
    big = tl.where(tl.abs(grad) <= threshold[:, None], 0, 1)
    return tl.max(tl.max(big, axis=1), axis=0) == 0


def transform_args(logit_scale, softcap, temperature):
    """Launcher arguments of ``transform``: (logit_scale, softcap, temperature, HAS_SOFTCAP).

    The public edge has settled the options (prefopt/_validation.py: softcap 0 -> None, finite, non-zero), so
    this only asserts them. A missing cap passes 1.0, a value the kernels never read."""
    assert softcap is None or softcap > 0, softcap
    assert temperature > 0 and logit_scale != 0, (temperature, logit_scale)
    has_softcap = softcap is not None
    return float(logit_scale), float(softcap) if has_softcap else 1.0, float(temperature), has_softcap
