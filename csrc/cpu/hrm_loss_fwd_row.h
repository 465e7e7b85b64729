// One row of the CPU forward (fwd_row), shared by hrm_loss_fwd.cpp and hrm_loss_fwd_bwd.cpp.
//
// The math: csrc/hrm_loss_math.h; blocks, staging and threads: hrm_loss_vec.h.
//
// The KL (beta = 0 or 1) in ONE pass over each row: per block, the maxima of z and u (a vector
// max), then one exp2 per stream and element (z, a = z/T and b = u/T; two streams when T = 1)
// accumulated in vector lanes with the entropy and KL sums, reduced and merged into the row's
// state (math::FwdState::merge). The JSD: a second pass for kl_pm and kl_qm, with the
// log-sum-exps known. The vector body leaves out the guards of masked (-inf) entries: a block
// that holds one turns a sum into NaN (0 * inf) and is folded again with the guards.
//
// Bytes per element (bf16): reads z and u, 4 B (JSD: 8 B). Per row: a label, four outputs and
// five stats. Work per element: 3 exp2 (2 when T = 1).
#pragma once

#include <cmath>

#include "hrm_loss_vec.h"

namespace hrmkernels {
namespace cpu {
namespace detail {

using namespace math;

// The options in the kernels' type F.
template <class F> Options<F> typed_options(const Options<double>& od) {
  return {static_cast<F>(od.hrm), static_cast<F>(od.temperature),
          static_cast<F>(od.label_smoothing), static_cast<F>(od.beta), od.ignore_index};
}

// Elements [0, n), one at a time, with the guarded scalar fold (a row's tail).
template <class F>
void fold_scalar(FwdState<F>& st, const F* z, const F* u, int64_t n, const FwdParams<F>& p) {
  for (int64_t i = 0; i < n; ++i) {
    const F zi[1] = {z[i]}, ui[1] = {u[i]};
    fwd_fold<1>(st, zi, ui, p);
    st.sum_z += z[i];
  }
}

// e w as math::fold_stream guards it: 0 where x = -inf (e = 0 there, w infinite or NaN), +inf
// where w = +inf (the other distribution is 0), even where e underflows.
template <class F>
Vec<F> kl_term(const Vec<F>& e, const Vec<F>& x, const Vec<F>& w) {
  const Vec<F> inf(math::inf<F>()), zero(0);
  return Vec<F>::blendv(Vec<F>::blendv(e * w, zero, x == -inf), inf, w == inf);
}

// Where the one-sweep path (hrm_loss_fwd_bwd.cpp, the KLs) keeps a row's exponentials for its
// gradient pass, so that the pass multiplies instead of exponentiating again: per element the
// streams' exp2 shifted by their block's max (ez = 2^(z log2 e - sz), ea = 2^(z ka - sa),
// eb = 2^(u ka - sb); at T = 1 ez is ea), per block the three shifts. Null: not kept.
template <class F>
struct Exps {
  F *ez = nullptr, *ea = nullptr, *eb = nullptr;   // (V,) each
  F *sz = nullptr, *sa = nullptr, *sb = nullptr;   // one per block of kBlock elements
};

// The state of z[0, n), u[0, n) (n a multiple of the vector width): the block's maxima first,
// so that each element costs one exp2 per stream, then the sums in vector lanes. Without
// kGuarded, a masked (-inf) entry turns ha, ta or tb into NaN (0 * inf).
template <class F, Div kDiv, bool kUnitT, bool kGuarded, bool kStore = false>
FwdState<F> block_state(const F* z, const F* u, int64_t n, const FwdParams<F>& p,
                        const Ahead& ahead, const Exps<F>& ex = {}, int64_t c0 = 0) {
  using V = Vec<F>;
  using at::vec::fmadd;
  const F l2e = static_cast<F>(kLog2e);
  V vmz(-inf<F>()), vmu(-inf<F>());
  for (int64_t i = 0; i < n; i += V::size()) {
    vmz = at::vec::maximum(vmz, V::loadu(z + i));
    vmu = at::vec::maximum(vmu, V::loadu(u + i));
  }
  FwdState<F> blk = FwdState<F>::identity();
  const F mz = hmax(vmz), mu = hmax(vmu);
  blk.ma = mz * p.ka;       // = max(z ka): rounding is monotonic
  blk.mb = mu * p.ka;
  if (!kUnitT) blk.mz = mz * l2e;
  const V L2E(l2e), KA(p.ka), ZS(finite_or_zero(blk.mz)), AS(finite_or_zero(blk.ma)),
      BS(finite_or_zero(blk.mb)), NEG_INF(-inf<F>()), ZERO(0);
  V sz(0), sa(0), ha(0), ta(0), sb(0), tb(0), sum_z(0);
  for (int64_t i = 0; i < n; i += V::size()) {
    ahead(i);
    const V zv = V::loadu(z + i), uv = V::loadu(u + i);
    const V xa = fmadd(zv, KA, -AS);
    const V ea = xa.exp2();
    if constexpr (kStore) ea.store(ex.ea + c0 + i);
    sa = sa + ea;
    ha = kGuarded ? ha + V::blendv(ea * xa, ZERO, zv == NEG_INF) : fmadd(ea, xa, ha);
    if (!kUnitT) {
      const V ez = fmadd(zv, L2E, -ZS).exp2();
      if constexpr (kStore) ez.store(ex.ez + c0 + i);
      sz = sz + ez;
    }
    const V eb = fmadd(uv, KA, -BS).exp2();
    if constexpr (kStore) eb.store(ex.eb + c0 + i);
    sb = sb + eb;
    if (kDiv == Div::kForward)
      tb = kGuarded ? tb + kl_term(eb, uv, uv - zv) : fmadd(eb, uv - zv, tb);
    if (kDiv == Div::kReverse)
      ta = kGuarded ? ta + kl_term(ea, zv, zv - uv) : fmadd(ea, zv - uv, ta);
    sum_z = sum_z + zv;
  }
  if constexpr (kStore) {
    const int64_t b = c0 / kBlock;
    ex.sz[b] = finite_or_zero(blk.mz);
    ex.sa[b] = finite_or_zero(blk.ma);
    ex.sb[b] = finite_or_zero(blk.mb);
  }
  blk.sz = hsum(sz);
  blk.sa = hsum(sa);
  blk.ha = hsum(ha);
  blk.ta = hsum(ta);
  blk.sb = hsum(sb);
  blk.tb = hsum(tb);
  blk.sum_z = hsum(sum_z);
  return blk;
}

// Fold z[0, n), u[0, n) (n a multiple of the vector width) into st. Blocks with masked
// entries are rare, so the guards are paid only where the unguarded sums came out NaN (or on
// NaN logits, which stay NaN).
template <class F, Div kDiv, bool kUnitT, bool kStore>
void fold_block(FwdState<F>& st, const F* z, const F* u, int64_t n, const FwdParams<F>& p,
                const Ahead& ahead, const Exps<F>& ex, int64_t c0) {
  FwdState<F> blk = block_state<F, kDiv, kUnitT, false, kStore>(z, u, n, p, ahead, ex, c0);
  if (std::isnan(blk.ha + blk.ta + blk.tb))
    blk = block_state<F, kDiv, kUnitT, true, kStore>(z, u, n, p, ahead, ex, c0);
  st = FwdState<F>::merge(st, blk);
}

// JSD pass 2: the vector sums of jsd_terms over z[0, n), u[0, n) (n a multiple of the width).
template <class F>
void jsd_block(const F* z, const F* u, int64_t n, const JsdParams<F>& j, Vec<F>& tp,
               Vec<F>& tq, const Ahead& ahead) {
  using V = Vec<F>;
  const V KA(j.ka), LA2(j.la2), LB2(j.lb2), LOG2B(j.log2_beta), LOG2_1MB(j.log2_1mb),
      L2E(static_cast<F>(kLog2e)), ZERO(0), NEG_INF(-inf<F>());
  for (int64_t i = 0; i < n; i += V::size()) {
    ahead(i);
    const V lp = at::vec::fmadd(V::loadu(u + i), KA, -LB2);
    const V lq = at::vec::fmadd(V::loadu(z + i), KA, -LA2);
    const V x = lp + LOG2B, y = lq + LOG2_1MB;
    const V hi = at::vec::maximum(x, y), lo = at::vec::minimum(x, y);
    const V lm = at::vec::fmadd((lo - hi).exp2().log1p(), L2E, hi);
    const V p = lp.exp2(), q = lq.exp2();
    tp = tp + V::blendv(p * (lp - lm), ZERO, lp == NEG_INF);
    tq = tq + V::blendv(q * (lq - lm), ZERO, lq == NEG_INF);
  }
}

template <class F>
struct FwdJob {
  Rows z, u;
  const at::Tensor& labels;
  Options<F> o;
  FwdParams<F> p;
  StageFn<F> stage_z, stage_u;
  F *loss, *ce, *div, *entropy, *stats;
  int64_t V;

  // Block c0 (n elements) of the rows zr, ur staged as F, and where the next block starts.
  struct Block {
    const F *z, *u;
    Ahead ahead;
  };
  Block block(const char* zr, const char* ur, int64_t c0, int64_t n, F* zbuf, F* ubuf) const {
    return {stage_z(zr + c0 * z.elem, n, zbuf), stage_u(ur + c0 * u.elem, n, ubuf),
            Ahead{zr + (c0 + kBlock) * z.elem, ur + (c0 + kBlock) * u.elem, z.elem, u.elem}};
  }
};

// kStore: keep the exponentials in ex (the KLs; the JSD's gradient needs its logs instead).
template <class F, Div kDiv, bool kUnitT, bool kStore = false>
void fwd_row(const FwdJob<F>& job, int64_t r, F* zbuf, F* ubuf, const Exps<F>& ex = {}) {
  const int64_t V = job.V, y = load_label(job.labels, r);
  if (y == job.o.ignore_index) {
    job.loss[r] = job.ce[r] = job.div[r] = job.entropy[r] = F(0);
    for (int k = 0; k < 5; ++k) job.stats[5 * r + k] = F(0);
    return;
  }
  const char *zr = job.z.row(r), *ur = job.u.row(r);
  constexpr int64_t W = Vec<F>::size();
  FwdState<F> st = FwdState<F>::identity();
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t n = std::min(kBlock, V - c0), nv = n - n % W;
    const auto [zb, ub, ahead] = job.block(zr, ur, c0, n, zbuf, ubuf);
    fold_block<F, kDiv, kUnitT, kStore>(st, zb, ub, nv, job.p, ahead, ex, c0);
    fold_scalar(st, zb + nv, ub + nv, n - nv, job.p);
  }
  const bool valid = y >= 0 && y < V;   // an out-of-range label is never dereferenced
  const F z_y = valid ? load_elem<F>(job.z, r, y) : nan<F>();
  FwdResult<F> res = fwd_finish(st, job.o, V, z_y);
  if (kDiv == Div::kJsd) {   // pass 2: the two sums, with the log-sum-exps known
    const JsdParams<F> j = jsd_params(job.o, res.stats[1], res.stats[2]);
    Vec<F> tp(0), tq(0);
    F sp = 0, sq = 0;
    for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
      const int64_t n = std::min(kBlock, V - c0), nv = n - n % W;
      const auto [zb, ub, ahead] = job.block(zr, ur, c0, n, zbuf, ubuf);
      jsd_block(zb, ub, nv, j, tp, tq, ahead);
      for (int64_t i = nv; i < n; ++i) {
        F a, b;
        jsd_terms(zb[i], ub[i], j, a, b);
        sp += a;
        sq += b;
      }
    }
    jsd_finish(res, job.o, sp + hsum(tp), sq + hsum(tq));
  }
  job.loss[r] = res.loss;
  job.ce[r] = res.ce;
  job.div[r] = res.div;
  job.entropy[r] = res.entropy;
  for (int k = 0; k < 5; ++k) job.stats[5 * r + k] = res.stats[k];
}

template <class F>
FwdJob<F> make_fwd_job(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                       const Options<double>& od, const at::Tensor& loss, const at::Tensor& ce,
                       const at::Tensor& div, const at::Tensor& entropy, const at::Tensor& stats) {
  const Options<F> o = typed_options<F>(od);
  return {Rows(z), Rows(u), labels, o, fwd_params(o),
          stage_fn<F>(z.scalar_type()), stage_fn<F>(u.scalar_type()),
          loss.data_ptr<F>(), ce.data_ptr<F>(), div.data_ptr<F>(),
          entropy.data_ptr<F>(), stats.data_ptr<F>(), z.size(2)};
}

}  // namespace detail
}  // namespace cpu
}  // namespace hrmkernels
