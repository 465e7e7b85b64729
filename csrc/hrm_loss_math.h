// The math of the fused HRM loss that the CPU (csrc/cpu/) and CUDA (csrc/cuda/) kernels share:
// the forward's online state (fold, merge), the row epilogues, and the backward's per-element
// gradient. No torch and no CUDA headers: plain inline C++ for the host compiler, and
// __host__ __device__ under nvcc. F is the accumulation type: float (fp32, bf16 and fp16
// inputs; CUDA and CPU) or double (float64 inputs, CPU).
//
// Notation for one row: student logits z, teacher logits u (V each), label y, a = z / T,
// b = u / T, sm = softmax(z), q = softmax(a), p = softmax(b), lse(x) = log sum_v exp(x_v).
//
// Every exponent is taken in base 2: a logit x becomes x2 = x log2(e), so that exp(x - m) is
// 2^(x2 - m2), one ex2.approx instruction on a GPU (as Triton's tl.exp); log-sum-exps and the
// row outputs are returned in natural units.
//
// Divergence D, chosen by beta (TRL's convention):
//   beta = 0  forward KL(p || q) = E_p[b - a] + lse_a - lse_b     one pass, mu = E_p[b - a]
//   beta = 1  reverse KL(q || p) = E_q[a - b] + lse_b - lse_a     one pass, mu = E_q[a - b]
//   else      JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
//             two passes: the log-sum-exps first, then kl_pm = sum p (lp - lm) and
//             kl_qm = sum q (lq - lm) with lp = b - lse_b, lq = a - lse_a and
//             lm = logaddexp(log beta + lp, log(1 - beta) + lq) (never log 0: see jsd_terms)
// CE = lse_z - (1 - eps) z_y - eps mean_v z_v,  loss = CE + hrm D (just CE when hrm == 0, even
// where D is +inf or NaN),  H = entropy of q,  D clamped at >= 0 (NaN passes through).
//
// Gradients, g the row's incoming gradient, c = hrm / T:
//   dz = g [sm - eps/V - (1 - eps) [v == y]  +  c (q - p)]                         forward KL
//                                            +  c q ((a - b) - mu)                 reverse KL
//                                            +  c (1 - beta) q (lq - lm - kl_qm)   JSD
//   du = g c p ((b - a) - mu)  forward,   g c (p - q)  reverse,   g c beta p (lp - lm - kl_pm)  JSD
// The KL's log-sum-exps cancel from log p - log q - KL = (b - a) - mu, so the forward saves mu
// rather than KL: at logits of magnitude 1e4 the lse's would cost three digits in fp32.
// The JSD's: with dq_v / da_j = q_v ([v == j] - q_j) and dm_v = (1 - beta) dq_v, the terms of
// d/da_j through log m add up to -sum_v (beta p_v + (1 - beta) q_v) / m_v dm_v = -sum_v dm_v = 0,
// so only (1 - beta) sum_v dq_v (lq_v - lm_v) is left: (1 - beta) q_j (lq_j - lm_j - kl_qm),
// and by symmetry beta p_j (lp_j - lm_j - kl_pm) for u (times 1/T for a = z / T, b = u / T).
// Saved per row, stats[5] = (lse_z, lse_a, lse_b, mu, 0) for the KL, (lse_z, lse_a, lse_b,
// kl_qm, kl_pm) for the JSD; 0 at ignored rows.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HRM_HD __host__ __device__ __forceinline__
#define HRM_UNROLL _Pragma("unroll")
#else
#define HRM_HD inline
#define HRM_UNROLL
#endif

namespace hrmkernels {
namespace math {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---------------------------------------------------------------------------------------------
// Scalar functions: the GPU's approximate ex2 (2 ulp, denormals flushed; 2^-inf = 0), the C
// library elsewhere.

HRM_HD float exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return ::exp2f(x);
#endif
}
HRM_HD double exp2(double x) { return ::exp2(x); }
HRM_HD float log2(float x) { return ::log2f(x); }
HRM_HD double log2(double x) { return ::log2(x); }
HRM_HD float log1p(float x) { return ::log1pf(x); }
HRM_HD double log1p(double x) { return ::log1p(x); }
HRM_HD float max(float x, float y) { return ::fmaxf(x, y); }
HRM_HD double max(double x, double y) { return ::fmax(x, y); }
HRM_HD float min(float x, float y) { return ::fminf(x, y); }
HRM_HD double min(double x, double y) { return ::fmin(x, y); }
// max and min that return a NaN operand (fmax and fmin return the other one).
template <class F> HRM_HD F max_nan(F x, F y) { return (x > y || x != x) ? x : y; }
template <class F> HRM_HD F min_nan(F x, F y) { return (x < y || x != x) ? x : y; }
HRM_HD float fma(float x, float y, float z) { return ::fmaf(x, y, z); }
HRM_HD double fma(double x, double y, double z) { return ::fma(x, y, z); }

template <class F> HRM_HD F inf() { return static_cast<F>(INFINITY); }
template <class F> HRM_HD F nan() { return static_cast<F>(NAN); }

// A running max that is still -inf (nothing seen, or only masked -inf entries) is replaced by 0
// before it is subtracted, because -inf - -inf is NaN; its sums are 0, and 2^-inf = 0 keeps them 0.
template <class F> HRM_HD F finite_or_zero(F m) { return m == -inf<F>() ? F(0) : m; }

// t * scale + add where t = +inf (a KL term with p > 0 where q = 0, the true value) stays +inf,
// even under a factor that underflows to 0 (0 * inf would be NaN).
template <class F> HRM_HD F rescale_add(F t, F scale, F add) {
  return t == inf<F>() ? t : fma(t, scale, add);
}

// ---------------------------------------------------------------------------------------------
// Options, and the divergence they select

template <class F>
struct Options {
  F hrm;                 // weight of the divergence, >= 0; 0 drops it from the loss
  F temperature;         // > 0; only the divergence sees it
  F label_smoothing;     // eps in [0, 1]
  F beta;                // 0 forward KL, 1 reverse KL, in between JSD_beta
  int64_t ignore_index;  // rows with this label contribute 0 and get a 0 gradient
};

enum class Div : int { kForward, kReverse, kJsd };

template <class F> HRM_HD Div div_kind(const Options<F>& o) {
  return o.beta == F(0) ? Div::kForward : o.beta == F(1) ? Div::kReverse : Div::kJsd;
}

// ---------------------------------------------------------------------------------------------
// Forward, pass 1: the online state of a row
//
// For the streams z2 = z log2e, a2 = z log2e / T and b2 = u log2e / T, over the elements seen:
//   m* = max x2,  s* = sum 2^(x2 - m*)                  the three log-sum-exps
//   ha = sum 2^(a2 - ma) (a2 - ma)                      entropy H = ln2 (log2 sa - ha / sa); the
//                                                       relative form stays exact at |a| ~ 1e4,
//                                                       where lse_a - E_q[a] would cancel
//   tb = sum 2^(b2 - mb) (u - z)                        forward KL: mu = tb / sb / T = E_p[b - a]
//   ta = sum 2^(a2 - ma) (z - u)                        reverse KL: mu = ta / sa / T = E_q[a - b]
//   sum_z = sum z                                       label smoothing
// With T == 1 (a = z) the z stream is not kept: finish() takes it from the a stream.
// On a new max m' >= m, sums rescale by alpha = 2^(m - m'), and h <- alpha (h + s (m - m')).
template <class F>
struct FwdState {
  F mz, sz;
  F ma, sa, ha, ta;
  F mb, sb, tb;
  F sum_z;

  HRM_HD static FwdState identity() {
    const F n = -inf<F>();
    return {n, 0, n, 0, 0, 0, n, 0, 0, 0};
  }
  HRM_HD static FwdState merge(const FwdState& x, const FwdState& y);
};

// The common max of two streams' maxima, and each one's rescale factor to it.
template <class F>
HRM_HD F common_max(F mx, F my, F& ax, F& ay) {
  const F m = max(mx, my), ms = finite_or_zero(m);
  ax = exp2(mx - ms);
  ay = exp2(my - ms);
  return m;
}

// h of a stream with max m and sum s, moved to the frame of the larger max m' (rescaled by a).
template <class F>
HRM_HD F shift_h(F h, F s, F m, F m_new, F a) {
  return s == F(0) ? F(0) : a * (h + s * (m - finite_or_zero(m_new)));
}

template <class F>
HRM_HD FwdState<F> FwdState<F>::merge(const FwdState<F>& x, const FwdState<F>& y) {
  FwdState<F> r;
  F ax, ay;
  r.mz = common_max(x.mz, y.mz, ax, ay);
  r.sz = fma(x.sz, ax, y.sz * ay);
  r.ma = common_max(x.ma, y.ma, ax, ay);
  r.sa = fma(x.sa, ax, y.sa * ay);
  r.ha = shift_h(x.ha, x.sa, x.ma, r.ma, ax) + shift_h(y.ha, y.sa, y.ma, r.ma, ay);
  r.ta = y.ta == inf<F>() ? y.ta : rescale_add(x.ta, ax, y.ta * ay);
  r.mb = common_max(x.mb, y.mb, ax, ay);
  r.sb = fma(x.sb, ax, y.sb * ay);
  r.tb = y.tb == inf<F>() ? y.tb : rescale_add(x.tb, ax, y.tb * ay);
  r.sum_z = x.sum_z + y.sum_z;
  return r;
}

// Fold K values x into one stream (m, s) of x2 = x k (base 2), with kH its entropy sum h and
// kT its KL sum t += 2^(x2 - m) w. The exponents are fma(x, k, -m): exact before their one
// rounding, where x k - m would first round x k (at |x k| ~ 30 that costs 2e-6 of every
// probability, and 30 ulps of the KL's mean). A term with x = -inf (zero probability) is 0; a
// KL term with x finite and w = +inf (the other distribution is 0 there) is +inf, even where
// 2^(x2 - m) underflows.
template <int K, bool kH, bool kT, class F>
HRM_HD void fold_stream(F& m, F& s, F& h, F& t, const F (&x)[K], F k, const F (&w)[K]) {
  F mx = x[0];
  HRM_UNROLL
  for (int i = 1; i < K; ++i) mx = max(mx, x[i]);
  const F m_new = max(m, mx * k), ms = finite_or_zero(m_new);   // max(x k) = max(x) k, k > 0
  const F alpha = exp2(m - ms);   // 0 when m == -inf: s, h and t are 0 then
  F se = 0, he = 0, te = 0;
  HRM_UNROLL
  for (int i = 0; i < K; ++i) {
    const F xi = fma(x[i], k, -ms), e = exp2(xi);
    se += e;
    if (kH) he += x[i] == -inf<F>() ? F(0) : e * xi;
    if (kT) te += x[i] == -inf<F>() ? F(0) : (w[i] == inf<F>() ? inf<F>() : e * w[i]);
  }
  if (kH) h = shift_h(h, s, m, m_new, alpha) + he;
  if (kT) t = rescale_add(t, alpha, te);
  s = fma(s, alpha, se);
  m = m_new;
}

// The per-row constants of pass 1.
template <class F>
struct FwdParams {
  F ka;         // log2(e) / T
  bool unit_t;  // T == 1: a = z, the z stream rides on the a stream
  Div div;
};

template <class F> HRM_HD FwdParams<F> fwd_params(const Options<F>& o) {
  return {static_cast<F>(kLog2e) / o.temperature, o.temperature == F(1), div_kind(o)};
}

// Fold K elements of z and u (natural units; masked entries -inf) into the state. sum_z is left
// to the caller (padding lanes must not enter it).
template <int K, class F>
HRM_HD void fwd_fold(FwdState<F>& st, const F (&z)[K], const F (&u)[K], const FwdParams<F>& p) {
  F w[K];
  HRM_UNROLL
  for (int i = 0; i < K; ++i) w[i] = p.div == Div::kReverse ? z[i] - u[i] : u[i] - z[i];
  F unused = 0;
  if (!p.unit_t) fold_stream<K, false, false>(st.mz, st.sz, unused, unused, z, F(kLog2e), w);
  if (p.div == Div::kReverse) fold_stream<K, true, true>(st.ma, st.sa, st.ha, st.ta, z, p.ka, w);
  else fold_stream<K, true, false>(st.ma, st.sa, st.ha, st.ta, z, p.ka, w);
  if (p.div == Div::kForward) fold_stream<K, false, true>(st.mb, st.sb, unused, st.tb, u, p.ka, w);
  else fold_stream<K, false, false>(st.mb, st.sb, unused, unused, u, p.ka, w);
}

// ---------------------------------------------------------------------------------------------
// Row epilogues

template <class F>
struct FwdResult {
  F loss, ce, div, entropy;
  F stats[5];
};

template <class F> HRM_HD F lse(F m, F s) { return (m + log2(s)) * static_cast<F>(kLn2); }

// Pass 1's outputs from the row's merged state: CE, entropy and the log-sum-exps (stats[0..2]),
// and for the KL also mu (stats[3]), the divergence and the loss. z_y is NaN for a label
// outside [0, V). The JSD's divergence and loss come from jsd_finish after pass 2.
template <class F>
HRM_HD FwdResult<F> fwd_finish(FwdState<F> st, const Options<F>& o, int64_t V, F z_y) {
  if (o.temperature == F(1)) {   // the z stream rode on the a stream
    st.mz = st.ma;
    st.sz = st.sa;
  }
  FwdResult<F> r;
  const F lse_z = lse(st.mz, st.sz), lse_a = lse(st.ma, st.sa), lse_b = lse(st.mb, st.sb);
  const F eps = o.label_smoothing;
  r.ce = eps > F(0) ? lse_z - (F(1) - eps) * z_y - eps * st.sum_z / static_cast<F>(V)
                    : lse_z - z_y;
  r.entropy = (log2(st.sa) - st.ha / st.sa) * static_cast<F>(kLn2);
  r.stats[0] = lse_z;
  r.stats[1] = lse_a;
  r.stats[2] = lse_b;
  r.stats[3] = r.stats[4] = F(0);
  const Div d = div_kind(o);
  if (d == Div::kJsd) {
    r.div = r.loss = F(0);   // set by jsd_finish
    return r;
  }
  const F mu = d == Div::kForward ? st.tb / st.sb / o.temperature : st.ta / st.sa / o.temperature;
  const F kl = d == Div::kForward ? mu + lse_a - lse_b : mu + lse_b - lse_a;
  // A NaN in the logit stream that mu does not read (lse_a for the forward KL, lse_b for the
  // reverse) still makes the gradient NaN: mu carries the divergence's NaN to the backward.
  r.stats[3] = kl != kl ? kl : mu;
  r.div = kl < F(0) ? F(0) : kl;   // rounding can dip below the true KL >= 0; NaN passes
  r.loss = o.hrm > F(0) ? r.ce + o.hrm * r.div : r.ce;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Forward, pass 2 (JSD): with the log-sum-exps known

// The per-row constants of the JSD terms, base 2: lp2 = u ka - lb2, lq2 = z ka - la2.
template <class F>
struct JsdParams {
  F ka, la2, lb2, log2_beta, log2_1mb;
};

template <class F>
HRM_HD JsdParams<F> jsd_params(const Options<F>& o, F lse_a, F lse_b) {
  const F l2e = static_cast<F>(kLog2e);
  return {l2e / o.temperature, lse_a * l2e, lse_b * l2e, log2(o.beta), log2(F(1) - o.beta)};
}

// log2 m for the base-2 log-probabilities lp2, lq2: logaddexp2(log2 beta + lp2, log2(1 - beta)
// + lq2) = hi + log2(1 + 2^(lo - hi)). It is -inf only where p = q = 0 (there NaN, and unused:
// both terms are 0), so no p (lp - lm) ever meets log 0, however small p and q are (a mixture
// formed as beta p + (1 - beta) q underflows to 0 once both log-probabilities are below ~-104).
template <class F>
HRM_HD F jsd_log2_m(F lp2, F lq2, const JsdParams<F>& j) {
  const F x = lp2 + j.log2_beta, y = lq2 + j.log2_1mb;
  const F hi = max_nan(x, y), lo = min_nan(x, y);   // a NaN log-probability makes m NaN
  return hi + log1p(exp2(lo - hi)) * static_cast<F>(kLog2e);
}

// p (lp2 - lm2) and q (lq2 - lm2) of one element (base 2), each exactly 0 where its
// logit is -inf (never 0 * inf). The guards test the logits, never `p > 0`, which would also drop
// a NaN, even where p merely underflows (docs/design.md, "Non-finite inputs").
template <class F>
HRM_HD void jsd_terms(F z, F u, const JsdParams<F>& j, F& tp, F& tq) {
  const F lp2 = fma(u, j.ka, -j.lb2), lq2 = fma(z, j.ka, -j.la2);
  const F lm2 = jsd_log2_m(lp2, lq2, j);
  const F p = exp2(lp2), q = exp2(lq2);
  tp = lp2 == -inf<F>() ? F(0) : p * (lp2 - lm2);
  tq = lq2 == -inf<F>() ? F(0) : q * (lq2 - lm2);
}

// The JSD row outputs from pass 1's result and pass 2's sums (base 2) of jsd_terms.
template <class F>
HRM_HD void jsd_finish(FwdResult<F>& r, const Options<F>& o, F sum_tp, F sum_tq) {
  const F kl_pm = sum_tp * static_cast<F>(kLn2), kl_qm = sum_tq * static_cast<F>(kLn2);
  const F d = o.beta * kl_pm + (F(1) - o.beta) * kl_qm;
  r.stats[3] = kl_qm;
  r.stats[4] = kl_pm;
  r.div = d < F(0) ? F(0) : d;
  r.loss = o.hrm > F(0) ? r.ce + o.hrm * r.div : r.ce;
}

// ---------------------------------------------------------------------------------------------
// Backward

// Per-row constants of the backward; l*2 are the base-2 log-sum-exps (lse * log2 e).
template <class F>
struct BwdRow {
  F g;                   // the row's incoming gradient
  F lz2, la2, lb2, ka, inv_t;
  F mu;                  // KL: E_p[b - a] (forward) or E_q[a - b] (reverse)
  F kl_qm, kl_pm;        // JSD, natural units
  F log2_beta, log2_1mb; // JSD
  F cq, cp;              // the divergence's factors: c (KL); c (1 - beta), c beta (JSD)
  F eps_v, one_m_eps;    // label smoothing: eps / V, 1 - eps
  int64_t y;
  Div div;
  bool has_div, unit_t;
};

// stats: the row's 5 saved values from the forward.
template <class F>
HRM_HD BwdRow<F> make_bwd_row(const Options<F>& o, int64_t V, int64_t y, F g, const F* stats) {
  const F l2e = static_cast<F>(kLog2e), inv_t = F(1) / o.temperature, c = o.hrm * inv_t;
  BwdRow<F> r;
  r.g = g;
  r.lz2 = stats[0] * l2e;
  r.la2 = stats[1] * l2e;
  r.lb2 = stats[2] * l2e;
  r.ka = l2e * inv_t;
  r.inv_t = inv_t;
  r.div = div_kind(o);
  r.mu = stats[3];
  r.kl_qm = stats[3];
  r.kl_pm = stats[4];
  r.log2_beta = r.div == Div::kJsd ? log2(o.beta) : F(0);
  r.log2_1mb = r.div == Div::kJsd ? log2(F(1) - o.beta) : F(0);
  r.cq = r.div == Div::kJsd ? c * (F(1) - o.beta) : c;
  r.cp = r.div == Div::kJsd ? c * o.beta : c;
  r.eps_v = o.label_smoothing / static_cast<F>(V);
  r.one_m_eps = F(1) - o.label_smoothing;
  r.y = y;
  r.has_div = o.hrm > F(0);
  r.unit_t = o.temperature == F(1);
  return r;
}

// dz and du of element `col` with logits z, u. hrm == 0: du = 0 exactly. A masked entry
// contributes 0 (never 0 * inf); NaN passes (the guards test the logits, as in jsd_terms).
template <class F>
HRM_HD void grad_elem(const BwdRow<F>& r, F z, F u, int64_t col, F& dz, F& du) {
  const F l2e = static_cast<F>(kLog2e), ln2 = static_cast<F>(kLn2);
  const F sm = exp2(fma(z, l2e, -r.lz2));
  F d = sm - r.eps_v;
  if (col == r.y) d -= r.one_m_eps;
  F e = 0;
  if (r.has_div) {
    const F lq2 = fma(z, r.ka, -r.la2), lp2 = fma(u, r.ka, -r.lb2);
    const F q = r.unit_t ? sm : exp2(lq2), p = exp2(lp2);
    if (r.div == Div::kForward) {
      d += r.cq * (q - p);
      e = u == -inf<F>() ? F(0) : r.cp * p * ((u - z) * r.inv_t - r.mu);
    } else if (r.div == Div::kReverse) {
      d += z == -inf<F>() ? F(0) : r.cq * q * ((z - u) * r.inv_t - r.mu);
      e = r.cp * (p - q);
    } else {
      const JsdParams<F> j{r.ka, r.la2, r.lb2, r.log2_beta, r.log2_1mb};
      const F lm2 = jsd_log2_m(lp2, lq2, j);
      d += z == -inf<F>() ? F(0) : r.cq * q * ((lq2 - lm2) * ln2 - r.kl_qm);
      e = u == -inf<F>() ? F(0) : r.cp * p * ((lp2 - lm2) * ln2 - r.kl_pm);
    }
  }
  dz = r.g * d;
  du = r.g * e;
}

}  // namespace math
}  // namespace hrmkernels
