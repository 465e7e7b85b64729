// One row of the CPU backward (bwd_row), shared by hrm_loss_bwd.cpp and hrm_loss_fwd_bwd.cpp.
//
// The math: csrc/hrm_loss_math.h; blocks, staging and threads: hrm_loss_vec.h.
//
// One pass over each row writing dz (and du) per element, from the forward's stats: three
// exp2 per element (sm = softmax(z), q, p; two when T = 1). The vector body leaves out the
// label's one-hot term; the label's element is rewritten afterwards by the scalar
// math::grad_elem from z_y, u_y read before the pass, so dz may alias z (every element is read
// before it is written). Ignored rows are written as exact zeros without reading anything.
//
// Bytes per element (bf16): reads z and u again and writes dz, 6 B (8 B with du). Per row:
// a label, the incoming gradient and five stats.
#pragma once

#include <cstring>
#include <optional>
#include <type_traits>

#include "hrm_loss_fwd_row.h"
#include "hrm_loss_vec.h"

namespace hrmkernels {
namespace cpu {
namespace detail {

// dz (and du when kDu) of z[0, n), u[0, n) (n a multiple of the vector width), without the
// label's one-hot term: the caller rewrites that element. Guards as in math::grad_elem.
// kStored: the exponentials come from the forward (Exps, fwd_row<..., kStore>) times the block's
// factors 2^(shift - lse2) (fz, fa, fb), one multiply instead of an exp2 each.
// nt: dz is stored past the caches (aligned; the one-sweep path, whose dz is not read again).
template <class F, bool kHasDiv, Div kDiv, bool kDu, bool kStored = false>
void grad_block(const BwdRow<F>& r, const F* z, const F* u, int64_t n, F* dz, F* du,
                const Ahead& ahead, const F* ez = nullptr, const F* ea = nullptr,
                const F* eb = nullptr, F fz = 0, F fa = 0, F fb = 0, bool nt = false) {
  using V = Vec<F>;
  using at::vec::fmadd;
  using at::vec::fmsub;
  const V L2E(static_cast<F>(kLog2e)), LN2(static_cast<F>(kLn2)), LZ2(r.lz2), EPS_V(r.eps_v),
      G(r.g), KA(r.ka), LA2(r.la2), LB2(r.lb2), INV_T(r.inv_t), MU(r.mu), CQ(r.cq), CP(r.cp),
      KL_QM(r.kl_qm), KL_PM(r.kl_pm), LOG2B(r.log2_beta), LOG2_1MB(r.log2_1mb), ZERO(0),
      NEG_INF(-inf<F>()), FZ(fz), FA(fa), FB(fb);
  for (int64_t i = 0; i < n; i += V::size()) {
    ahead(i);
    const V zv = V::loadu(z + i);
    const V sm = kStored ? V::loadu(ez + i) * FZ : fmadd(zv, L2E, -LZ2).exp2();
    V d = sm - EPS_V, e = ZERO;
    if constexpr (kHasDiv) {
      const V uv = V::loadu(u + i);
      const V lq = fmadd(zv, KA, -LA2), lp = fmadd(uv, KA, -LB2);
      const V q = r.unit_t ? sm : kStored ? V::loadu(ea + i) * FA : lq.exp2();
      const V p = kStored ? V::loadu(eb + i) * FB : lp.exp2();
      if constexpr (kDiv == Div::kForward) {
        d = fmadd(CQ, q - p, d);
        if (kDu) e = V::blendv(CP * p * fmsub(uv - zv, INV_T, MU), ZERO, uv == NEG_INF);
      } else if constexpr (kDiv == Div::kReverse) {
        d = d + V::blendv(CQ * q * fmsub(zv - uv, INV_T, MU), ZERO, zv == NEG_INF);
        if (kDu) e = CP * (p - q);
      } else {
        const V x = lp + LOG2B, y = lq + LOG2_1MB;
        const V hi = at::vec::maximum(x, y), lo = at::vec::minimum(x, y);
        const V lm = fmadd((lo - hi).exp2().log1p(), L2E, hi);
        d = d + V::blendv(CQ * q * fmsub(lq - lm, LN2, KL_QM), ZERO, zv == NEG_INF);
        if (kDu) e = V::blendv(CP * p * fmsub(lp - lm, LN2, KL_PM), ZERO, uv == NEG_INF);
      }
    }
    if (kStored && nt) store_nt(G * d, dz + i);
    else (G * d).store(dz + i);
    if (kDu) (G * e).store(du + i);
  }
}

template <class F>
struct BwdJob {
  Rows z, u, dz, du;             // du.data == nullptr: no teacher gradient
  const at::Tensor& labels;
  const F* stats;                // (N, 5)
  const char* grad;              // (N,) float32 or F, element stride grad_stride (0: a scalar)
  int64_t grad_stride;
  bool grad_fp32;
  Options<F> o;
  StageFn<F> stage_z, stage_u;
  UnstageFn<F> unstage_dz, unstage_du;
  bool dz_direct, du_direct;     // dz / du have dtype F: computed in place, without a buffer
  int64_t V;
};

// kStored: the forward kept the row's exponentials in ex (fwd_row<..., kStore>).
template <class F, bool kHasDiv, Div kDiv, bool kDu, bool kStored = false>
void bwd_row(const BwdJob<F>& job, int64_t r, F* zbuf, F* ubuf, F* dzbuf, F* dubuf,
             const Exps<F>& ex = {}) {
  const int64_t V = job.V, y = load_label(job.labels, r);
  char* dzr = job.dz.row(r);
  char* dur = job.du.data != nullptr ? job.du.row(r) : nullptr;
  const bool ignored = y == job.o.ignore_index;
  if (dur != nullptr && (ignored || !kHasDiv)) std::memset(dur, 0, V * job.du.elem);  // exact 0
  if (ignored) {   // nothing else is read
    std::memset(dzr, 0, V * job.dz.elem);
    return;
  }
  const int64_t gi = r * job.grad_stride;
  const F g = job.grad_fp32 ? static_cast<F>(reinterpret_cast<const float*>(job.grad)[gi])
                            : reinterpret_cast<const F*>(job.grad)[gi];
  const BwdRow<F> br = make_bwd_row(job.o, V, y, g, job.stats + 5 * r);
  const bool valid = y >= 0 && y < V;   // an out-of-range label is never dereferenced
  const F z_y = valid ? load_elem<F>(job.z, r, y) : F(0);   // before dz (maybe z) is written
  const F u_y = valid && kHasDiv ? load_elem<F>(job.u, r, y) : F(0);
  const char *zr = job.z.row(r), *ur = job.u.row(r);
  constexpr int64_t W = Vec<F>::size();
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t n = std::min(kBlock, V - c0), nv = n - n % W;
    const F* zb = job.stage_z(zr + c0 * job.z.elem, n, zbuf);
    const F* ub = kHasDiv ? job.stage_u(ur + c0 * job.u.elem, n, ubuf) : nullptr;
    F* dzb = job.dz_direct ? reinterpret_cast<F*>(dzr) + c0 : dzbuf;
    F* dub = !kDu ? nullptr : job.du_direct ? reinterpret_cast<F*>(dur) + c0 : dubuf;
    const Ahead ahead{zr + (c0 + kBlock) * job.z.elem,
                      ur + (kHasDiv ? c0 + kBlock : 0) * job.u.elem, job.z.elem, job.u.elem};
    // the one-sweep path writes an fp32 / fp64 dz past the caches where its row is aligned
    const bool nt = kStored && job.dz_direct && nt_aligned(dzr) && dzr != zr;
    if constexpr (kStored) {
      const int64_t b = c0 / kBlock;
      const F* ez = br.unit_t ? ex.ea : ex.ez;
      const F sz = br.unit_t ? ex.sa[b] : ex.sz[b];
      grad_block<F, kHasDiv, kDiv, kDu, true>(
          br, zb, ub, nv, dzb, dub, ahead, ez + c0, ex.ea + c0, ex.eb + c0,
          math::exp2(sz - br.lz2), math::exp2(ex.sa[b] - br.la2), math::exp2(ex.sb[b] - br.lb2),
          nt);
    } else {
      grad_block<F, kHasDiv, kDiv, kDu>(br, zb, ub, nv, dzb, dub, ahead);
    }
    for (int64_t i = nv; i < n; ++i) {
      F a, b;
      grad_elem(br, zb[i], kHasDiv ? ub[i] : F(0), c0 + i, a, b);
      dzb[i] = a;
      if (kDu) dub[i] = b;
    }
    if (!job.dz_direct) job.unstage_dz(dzb, n, dzr + c0 * job.dz.elem);
    if (kDu && !job.du_direct) job.unstage_du(dub, n, dur + c0 * job.du.elem);
  }
  if (valid) {   // the label's element, with its one-hot term
    F a, b;
    grad_elem(br, z_y, u_y, y, a, b);
    job.unstage_dz(&a, 1, dzr + y * job.dz.elem);
  }
}


// stats: (N, 5) of F, from the forward (written by it, row by row, in hrm_loss_fwd_bwd.cpp).
template <class F>
BwdJob<F> make_bwd_job(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                       const F* stats, const at::Tensor& grad, const Options<double>& od,
                       const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  Rows du_rows = du.has_value() ? Rows(*du) : Rows(dz);
  if (!du.has_value()) du_rows.data = nullptr;
  const at::ScalarType f = std::is_same_v<F, double> ? at::kDouble : at::kFloat;
  return {Rows(z), Rows(u), Rows(dz), du_rows, labels, stats,
          static_cast<const char*>(grad.const_data_ptr()), grad.stride(0),
          grad.scalar_type() == at::kFloat, typed_options<F>(od),
          stage_fn<F>(z.scalar_type()), stage_fn<F>(u.scalar_type()),
          unstage_fn<F>(dz.scalar_type()), unstage_fn<F>(du_rows.dtype),
          dz.scalar_type() == f, du_rows.dtype == f, z.size(2)};
}

}  // namespace detail
}  // namespace cpu
}  // namespace hrmkernels
