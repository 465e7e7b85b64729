// Fused HRM loss on the CPU: forward and backward, vectorised with at::vec::Vectorized (SLEEF's
// exp2) and spread over threads by rows (at::parallel_for). The math, shared with the CUDA
// kernels, is written out in csrc/hrm_loss_math.h; this file is its SIMD form.
//
// A row is processed in blocks of kBlock elements that stay in L1:
//
//   stage     the block of z and u as F (float, or double for float64 inputs): read in place when
//             the dtype is F, else converted into a buffer (bf16 / fp16 -> fp32, 16 at a time).
//   forward   KL (beta = 0 or 1), ONE pass over the row: per block, the maxima of z and u (a
//             vector max), then one exp2 per stream and element (z, a = z/T, b = u/T; two
//             when T = 1) accumulated in vector lanes, reduced and merged into the row's state
//             (math::FwdState::merge). JSD: a second pass for kl_pm and kl_qm.
//   backward  one pass writing dz (and du) per element; the label's element is rewritten by the
//             scalar math::grad_elem afterwards from z_y, u_y read before the pass (dz may alias
//             z: every element is read before it is written).
//
// The forward's vector body leaves out the guards of masked (-inf) entries: a block that holds
// one turns a sum into NaN (0 * inf), and is folded again with them. A row's tail of fewer
// than a vector's width goes through the scalar math (math::fwd_fold, math::grad_elem).
//
// Bytes per element (bf16 in and out): forward reads z and u (4 B; JSD 8 B); backward reads
// them again and writes dz (6 B; 8 B with du). Per row: a label, four outputs and five stats.
// Work per element: 3 exp2 forward, 3 backward (2 each when T = 1).
#include "hrm_loss_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace hrmkernels {
namespace cpu {
namespace {

using namespace math;
template <class F> using Vec = at::vec::Vectorized<F>;

constexpr int64_t kBlock = 1024;           // elements per block: 4 buffers of 4 KB (fp32) in L1
constexpr int64_t kGrainElements = 1 << 15; // a thread's smallest share of the work

// ---------------------------------------------------------------------------------------------
// Element access

// A (B, S, V) row view: row r starts at data + ((r / S) * sb + (r % S) * ss) elements.
struct Rows {
  char* data;
  int64_t sb, ss, S, elem;
  at::ScalarType dtype;

  explicit Rows(const at::Tensor& t)
      : data(static_cast<char*>(t.data_ptr())), sb(t.stride(0)), ss(t.stride(1)), S(t.size(1)),
        elem(t.element_size()), dtype(t.scalar_type()) {}
  char* row(int64_t r) const { return data + ((r / S) * sb + (r % S) * ss) * elem; }
};

// Elements [0, n) of src (dtype T) as F: src itself when T is F, else converted into buf.
template <class F, class T>
const F* stage(const char* src, int64_t n, F* buf) {
  const T* s = reinterpret_cast<const T*>(src);
  if constexpr (std::is_same_v<T, F>) {
    return s;
  } else {
    int64_t i = 0;
    if constexpr (std::is_same_v<F, float> && c10::is_reduced_floating_point_v<T>) {
      for (; i + Vec<float>::size() <= n; i += Vec<float>::size()) {
        Vec<float> v;
        at::vec::load_to_float(s + i, v);
        v.store(buf + i);
      }
    }
    for (; i < n; ++i) buf[i] = static_cast<F>(static_cast<float>(s[i]));
    return buf;
  }
}

// Elements [0, n) of src (F) stored into dst as T.
template <class F, class T>
void unstage(const F* src, int64_t n, char* dst) {
  T* d = reinterpret_cast<T*>(dst);
  int64_t i = 0;
  if constexpr (std::is_same_v<F, float> && c10::is_reduced_floating_point_v<T>) {
    constexpr int64_t W = Vec<float>::size();
    for (; i + 2 * W <= n; i += 2 * W)
      at::vec::convert_from_float<T>(Vec<float>::loadu(src + i), Vec<float>::loadu(src + i + W))
          .store(d + i);
  }
  for (; i < n; ++i) d[i] = static_cast<T>(src[i]);
}

template <class F> using StageFn = const F* (*)(const char*, int64_t, F*);
template <class F> using UnstageFn = void (*)(const F*, int64_t, char*);

template <class F> StageFn<F> stage_fn(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return stage<F, float>;
    case at::kBFloat16: return stage<F, c10::BFloat16>;
    case at::kHalf: return stage<F, c10::Half>;
    default: return stage<F, double>;   // float64 (F is double then; the binding checks dtypes)
  }
}

template <class F> UnstageFn<F> unstage_fn(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return unstage<F, float>;
    case at::kBFloat16: return unstage<F, c10::BFloat16>;
    case at::kHalf: return unstage<F, c10::Half>;
    default: return unstage<F, double>;
  }
}

template <class F> F load_elem(const Rows& t, int64_t r, int64_t col) {
  F x;
  return *stage_fn<F>(t.dtype)(t.row(r) + col * t.elem, 1, &x);
}

int64_t load_label(const at::Tensor& labels, int64_t r) {
  const int64_t i = r * labels.stride(0);
  return labels.scalar_type() == at::kLong ? labels.const_data_ptr<int64_t>()[i]
                                           : labels.const_data_ptr<int32_t>()[i];
}

template <class F> F hsum(const Vec<F>& v) {
  alignas(64) F x[Vec<F>::size()];
  v.store(x);
  F s = 0;
  for (int i = 0; i < Vec<F>::size(); ++i) s += x[i];
  return s;
}

template <class F> F hmax(const Vec<F>& v) {
  alignas(64) F x[Vec<F>::size()];
  v.store(x);
  F m = x[0];
  for (int i = 1; i < Vec<F>::size(); ++i) m = max(m, x[i]);
  return m;
}

// The next block of z and u, prefetched while this one computes: staging a block and its max
// pass read memory, the exp2 pass does not, so without this the two would not overlap.
struct Ahead {
  const char *z, *u;
  int64_t z_elem, u_elem;
  void operator()(int64_t i) const {   // at element i of the current block
    __builtin_prefetch(z + i * z_elem);
    __builtin_prefetch(u + i * u_elem);
  }
};

// Denormal results of exp2 (a probability below 2^-126 of the row's largest, common with peaked
// distributions) cost microcode assists on x86: measured 3x the time of the whole kernel at
// logits of scale 30. They are below 1e-38 of the sums, and the GPU's ex2.approx.ftz flushes
// them too, so each task runs with flush-to-zero and denormals-are-zero, restored after.
class FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
 public:
  FlushDenormals() : csr_(_mm_getcsr()) { _mm_setcsr(csr_ | 0x8040); }   // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(csr_); }

 private:
  unsigned csr_;
#endif
};

// Rows per at::parallel_for task: at least kGrainElements elements.
int64_t grain(int64_t V) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(V, 1)); }

// ---------------------------------------------------------------------------------------------
// Forward

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

// The state of z[0, n), u[0, n) (n a multiple of the vector width): the block's maxima first,
// so that each element costs one exp2 per stream, then the sums in vector lanes. Without
// kGuarded, a masked (-inf) entry turns ha, ta or tb into NaN (0 * inf).
template <class F, Div kDiv, bool kUnitT, bool kGuarded>
FwdState<F> block_state(const F* z, const F* u, int64_t n, const FwdParams<F>& p,
                        const Ahead& ahead) {
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
    sa = sa + ea;
    ha = kGuarded ? ha + V::blendv(ea * xa, ZERO, zv == NEG_INF) : fmadd(ea, xa, ha);
    if (!kUnitT) sz = sz + fmadd(zv, L2E, -ZS).exp2();
    const V eb = fmadd(uv, KA, -BS).exp2();
    sb = sb + eb;
    if (kDiv == Div::kForward)
      tb = kGuarded ? tb + kl_term(eb, uv, uv - zv) : fmadd(eb, uv - zv, tb);
    if (kDiv == Div::kReverse)
      ta = kGuarded ? ta + kl_term(ea, zv, zv - uv) : fmadd(ea, zv - uv, ta);
    sum_z = sum_z + zv;
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
template <class F, Div kDiv, bool kUnitT>
void fold_block(FwdState<F>& st, const F* z, const F* u, int64_t n, const FwdParams<F>& p,
                const Ahead& ahead) {
  FwdState<F> blk = block_state<F, kDiv, kUnitT, false>(z, u, n, p, ahead);
  if (std::isnan(blk.ha + blk.ta + blk.tb))
    blk = block_state<F, kDiv, kUnitT, true>(z, u, n, p, ahead);
  st = FwdState<F>::merge(st, blk);
}

// JSD pass 2: the vector sums of jsd_terms over z[0, n), u[0, n) (n a multiple of the width).
template <class F>
void jsd_block(const F* z, const F* u, int64_t n, const JsdParams<F>& j, Vec<F>& tp,
               Vec<F>& tq, const Ahead& ahead) {
  using V = Vec<F>;
  const V KA(j.ka), LA2(j.la2), LB2(j.lb2), LOG2B(j.log2_beta), LOG2_1MB(j.log2_1mb),
      L2E(static_cast<F>(kLog2e)), ZERO(0);
  for (int64_t i = 0; i < n; i += V::size()) {
    ahead(i);
    const V lp = at::vec::fmadd(V::loadu(u + i), KA, -LB2);
    const V lq = at::vec::fmadd(V::loadu(z + i), KA, -LA2);
    const V x = lp + LOG2B, y = lq + LOG2_1MB;
    const V hi = at::vec::maximum(x, y), lo = at::vec::minimum(x, y);
    const V lm = at::vec::fmadd((lo - hi).exp2().log1p(), L2E, hi);
    const V p = lp.exp2(), q = lq.exp2();
    tp = tp + V::blendv(ZERO, p * (lp - lm), p > ZERO);
    tq = tq + V::blendv(ZERO, q * (lq - lm), q > ZERO);
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
};

template <class F, Div kDiv, bool kUnitT>
void fwd_row(const FwdJob<F>& job, int64_t r, F* zbuf, F* ubuf) {
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
    const F* zb = job.stage_z(zr + c0 * job.z.elem, n, zbuf);
    const F* ub = job.stage_u(ur + c0 * job.u.elem, n, ubuf);
    const Ahead ahead{zr + (c0 + kBlock) * job.z.elem, ur + (c0 + kBlock) * job.u.elem,
                      job.z.elem, job.u.elem};
    fold_block<F, kDiv, kUnitT>(st, zb, ub, nv, job.p, ahead);
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
      const F* zb = job.stage_z(zr + c0 * job.z.elem, n, zbuf);
      const F* ub = job.stage_u(ur + c0 * job.u.elem, n, ubuf);
      const Ahead ahead{zr + (c0 + kBlock) * job.z.elem, ur + (c0 + kBlock) * job.u.elem,
                        job.z.elem, job.u.elem};
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

template <class F, Div kDiv, bool kUnitT>
void fwd_rows(const FwdJob<F>& job, int64_t n_rows) {
  at::parallel_for(0, n_rows, grain(job.V), [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    alignas(64) F zbuf[kBlock];
    alignas(64) F ubuf[kBlock];
    for (int64_t r = begin; r < end; ++r) fwd_row<F, kDiv, kUnitT>(job, r, zbuf, ubuf);
  });
}

template <class F, Div kDiv>
void fwd_div(const FwdJob<F>& job, int64_t n) {
  if (job.p.unit_t) fwd_rows<F, kDiv, true>(job, n);
  else fwd_rows<F, kDiv, false>(job, n);
}

template <class F>
void fwd_typed(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
               const Options<double>& od, const at::Tensor& loss, const at::Tensor& ce,
               const at::Tensor& div, const at::Tensor& entropy, const at::Tensor& stats) {
  const Options<F> o{static_cast<F>(od.hrm), static_cast<F>(od.temperature),
                     static_cast<F>(od.label_smoothing), static_cast<F>(od.beta),
                     od.ignore_index};
  const FwdJob<F> job{Rows(z), Rows(u), labels, o, fwd_params(o),
                      stage_fn<F>(z.scalar_type()), stage_fn<F>(u.scalar_type()),
                      loss.data_ptr<F>(), ce.data_ptr<F>(), div.data_ptr<F>(),
                      entropy.data_ptr<F>(), stats.data_ptr<F>(), z.size(2)};
  const int64_t n = labels.size(0);
  switch (job.p.div) {
    case Div::kForward: return fwd_div<F, Div::kForward>(job, n);
    case Div::kReverse: return fwd_div<F, Div::kReverse>(job, n);
    case Div::kJsd: return fwd_div<F, Div::kJsd>(job, n);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// dz (and du when kDu) of z[0, n), u[0, n) (n a multiple of the vector width), without the
// label's one-hot term: the caller rewrites that element. Guards as in math::grad_elem.
template <class F, bool kHasDiv, Div kDiv, bool kDu>
void grad_block(const BwdRow<F>& r, const F* z, const F* u, int64_t n, F* dz, F* du,
                const Ahead& ahead) {
  using V = Vec<F>;
  using at::vec::fmadd;
  using at::vec::fmsub;
  const V L2E(static_cast<F>(kLog2e)), LN2(static_cast<F>(kLn2)), LZ2(r.lz2), EPS_V(r.eps_v),
      G(r.g), KA(r.ka), LA2(r.la2), LB2(r.lb2), INV_T(r.inv_t), MU(r.mu), CQ(r.cq), CP(r.cp),
      KL_QM(r.kl_qm), KL_PM(r.kl_pm), LOG2B(r.log2_beta), LOG2_1MB(r.log2_1mb), ZERO(0);
  for (int64_t i = 0; i < n; i += V::size()) {
    ahead(i);
    const V zv = V::loadu(z + i);
    const V sm = fmadd(zv, L2E, -LZ2).exp2();
    V d = sm - EPS_V, e = ZERO;
    if constexpr (kHasDiv) {
      const V uv = V::loadu(u + i);
      const V lq = fmadd(zv, KA, -LA2), lp = fmadd(uv, KA, -LB2);
      const V q = r.unit_t ? sm : lq.exp2(), p = lp.exp2();
      if constexpr (kDiv == Div::kForward) {
        d = fmadd(CQ, q - p, d);
        if (kDu) e = V::blendv(ZERO, CP * p * fmsub(uv - zv, INV_T, MU), p > ZERO);
      } else if constexpr (kDiv == Div::kReverse) {
        d = d + V::blendv(ZERO, CQ * q * fmsub(zv - uv, INV_T, MU), q > ZERO);
        if (kDu) e = CP * (p - q);
      } else {
        const V x = lp + LOG2B, y = lq + LOG2_1MB;
        const V hi = at::vec::maximum(x, y), lo = at::vec::minimum(x, y);
        const V lm = fmadd((lo - hi).exp2().log1p(), L2E, hi);
        d = d + V::blendv(ZERO, CQ * q * fmsub(lq - lm, LN2, KL_QM), q > ZERO);
        if (kDu) e = V::blendv(ZERO, CP * p * fmsub(lp - lm, LN2, KL_PM), p > ZERO);
      }
    }
    (G * d).store(dz + i);
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

template <class F, bool kHasDiv, Div kDiv, bool kDu>
void bwd_row(const BwdJob<F>& job, int64_t r, F* zbuf, F* ubuf, F* dzbuf, F* dubuf) {
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
    grad_block<F, kHasDiv, kDiv, kDu>(br, zb, ub, nv, dzb, dub, ahead);
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

template <class F, bool kHasDiv, Div kDiv, bool kDu>
void bwd_rows(const BwdJob<F>& job, int64_t n_rows) {
  at::parallel_for(0, n_rows, grain(job.V), [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    alignas(64) F zbuf[kBlock];
    alignas(64) F ubuf[kBlock];
    alignas(64) F dzbuf[kBlock];
    alignas(64) F dubuf[kBlock];
    for (int64_t r = begin; r < end; ++r)
      bwd_row<F, kHasDiv, kDiv, kDu>(job, r, zbuf, ubuf, dzbuf, dubuf);
  });
}

template <class F, Div kDiv>
void bwd_div(const BwdJob<F>& job, int64_t n) {
  if (job.du.data != nullptr) bwd_rows<F, true, kDiv, true>(job, n);
  else bwd_rows<F, true, kDiv, false>(job, n);
}

template <class F>
void bwd_typed(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
               const at::Tensor& stats, const at::Tensor& grad, const Options<double>& od,
               const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  const Options<F> o{static_cast<F>(od.hrm), static_cast<F>(od.temperature),
                     static_cast<F>(od.label_smoothing), static_cast<F>(od.beta),
                     od.ignore_index};
  Rows du_rows = du.has_value() ? Rows(*du) : Rows(dz);
  if (!du.has_value()) du_rows.data = nullptr;
  const BwdJob<F> job{Rows(z), Rows(u), Rows(dz), du_rows, labels, stats.const_data_ptr<F>(),
                      static_cast<const char*>(grad.const_data_ptr()), grad.stride(0),
                      grad.scalar_type() == at::kFloat, o,
                      stage_fn<F>(z.scalar_type()), stage_fn<F>(u.scalar_type()),
                      unstage_fn<F>(dz.scalar_type()), unstage_fn<F>(du_rows.dtype),
                      dz.scalar_type() == stats.scalar_type(),
                      du_rows.dtype == stats.scalar_type(), z.size(2)};
  const int64_t n = labels.size(0);
  if (o.hrm <= F(0)) return bwd_rows<F, false, Div::kForward, false>(job, n);
  switch (div_kind(o)) {
    case Div::kForward: return bwd_div<F, Div::kForward>(job, n);
    case Div::kReverse: return bwd_div<F, Div::kReverse>(job, n);
    case Div::kJsd: return bwd_div<F, Div::kJsd>(job, n);
  }
}

}  // namespace

void hrm_loss_fwd(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                  const Options<double>& opt, const at::Tensor& loss, const at::Tensor& ce,
                  const at::Tensor& div, const at::Tensor& entropy, const at::Tensor& stats) {
  if (labels.size(0) == 0) return;
  if (stats.scalar_type() == at::kDouble)
    fwd_typed<double>(z, u, labels, opt, loss, ce, div, entropy, stats);
  else
    fwd_typed<float>(z, u, labels, opt, loss, ce, div, entropy, stats);
}

void hrm_loss_bwd(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                  const at::Tensor& stats, const at::Tensor& grad, const Options<double>& opt,
                  const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  if (labels.size(0) == 0) return;
  if (stats.scalar_type() == at::kDouble)
    bwd_typed<double>(z, u, labels, stats, grad, opt, dz, du);
  else
    bwd_typed<float>(z, u, labels, stats, grad, opt, dz, du);
}

}  // namespace cpu
}  // namespace hrmkernels
