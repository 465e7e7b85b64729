// Fused HRM loss on the CPU, forward and backward in one sweep over each row, for rows'
// gradients known before the forward (reduction "mean" or "sum": 1 / denominator or 1).
//
// Each row runs fwd_row (hrm_loss_fwd_row.h) and then, while the row is still in cache (a row
// of V = 32000 is 128 KB in bf16 for z and u together), bwd_row (hrm_loss_bwd_row.h) from the
// stats it has just written. The loss values of a row are written before its gradient pass, so
// dz may alias z (inplace_backward).
//
// For the KLs (hrm > 0, V <= kStoreMaxV) the forward keeps each element's exp2 of the three
// streams, shifted by its block's max (Exps, fwd_row<..., kStore>), and the gradient pass
// multiplies them by one factor per block (2^(shift - lse2)) instead of three exp2 an element:
// the CPU kernels are bound by the exp2s (about 3 ns an element and core for the forward, far
// below memory speed), so reading less memory alone saves little. 12 B a row element of
// buffers per thread (384 KB at V = 32000, in L2 with the row); an fp32 dz goes past the
// caches (non-temporal stores, where the row is aligned: no read for ownership of its lines,
// the gradient is not read again before the backward). The outputs of the forward are
// bitwise those of hrm_loss_fwd; the gradients differ from hrm_loss_bwd's by the rounding of
// 2^a 2^b against 2^(a + b) (an ulp of fp32). The JSD, hrm = 0 and larger V take the
// forward's and the backward's row code as they are, one after the other.
//
// Bytes per element from memory (bf16): z and u once (4 B) and dz written (2 B), 6 B (8 B with
// du) instead of the two calls' 10 B (12 B); the gradient pass re-reads the row from cache.
#include <vector>

#include "hrm_loss_bwd_row.h"
#include "hrm_loss_fwd_row.h"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace cpu {
namespace {

using namespace detail;

constexpr int64_t kStoreMaxV = int64_t{1} << 16;   // 768 KB of fp32 exponentials a thread

template <class F, Div kDiv, bool kUnitT, bool kHasDiv, bool kDu, bool kStore>
void fwd_bwd_rows(const FwdJob<F>& fwd, const BwdJob<F>& bwd, int64_t n_rows) {
  const int64_t V = fwd.V, blocks = (V + kBlock - 1) / kBlock;
  at::parallel_for(0, n_rows, grain(V), [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    alignas(64) F zbuf[kBlock];
    alignas(64) F ubuf[kBlock];
    alignas(64) F dzbuf[kBlock];
    alignas(64) F dubuf[kBlock];
    std::vector<F> keep(kStore ? 3 * (V + blocks) : 0);
    Exps<F> ex;
    if (kStore) {
      F* k = keep.data();
      ex = {k, k + V, k + 2 * V, k + 3 * V, k + 3 * V + blocks, k + 3 * V + 2 * blocks};
    }
    for (int64_t r = begin; r < end; ++r) {
      fwd_row<F, kDiv, kUnitT, kStore>(fwd, r, zbuf, ubuf, ex);
      bwd_row<F, kHasDiv, kDiv, kDu, kStore>(bwd, r, zbuf, ubuf, dzbuf, dubuf, ex);
    }
    if (kStore) fence_nt();   // the non-temporal stores of dz, before the task ends
  });
}

// The backward's choices (hrm = 0: no divergence term; du) as hrm_loss_bwd.cpp makes them, and
// whether the forward keeps the exponentials (the KLs, V <= kStoreMaxV).
template <class F, Div kDiv, bool kUnitT, bool kHasDiv, bool kDu>
void fwd_bwd_keep(const FwdJob<F>& fwd, const BwdJob<F>& bwd, int64_t n) {
  if (kHasDiv && kDiv != Div::kJsd && fwd.V <= kStoreMaxV)
    return fwd_bwd_rows<F, kDiv, kUnitT, kHasDiv, kDu, kHasDiv && kDiv != Div::kJsd>(fwd, bwd, n);
  fwd_bwd_rows<F, kDiv, kUnitT, kHasDiv, kDu, false>(fwd, bwd, n);
}

template <class F, Div kDiv, bool kUnitT>
void fwd_bwd_grad(const FwdJob<F>& fwd, const BwdJob<F>& bwd, int64_t n) {
  if (bwd.o.hrm <= F(0)) return fwd_bwd_keep<F, kDiv, kUnitT, false, false>(fwd, bwd, n);
  if (bwd.du.data != nullptr) return fwd_bwd_keep<F, kDiv, kUnitT, true, true>(fwd, bwd, n);
  fwd_bwd_keep<F, kDiv, kUnitT, true, false>(fwd, bwd, n);
}

template <class F, Div kDiv>
void fwd_bwd_div(const FwdJob<F>& fwd, const BwdJob<F>& bwd, int64_t n) {
  if (fwd.p.unit_t) fwd_bwd_grad<F, kDiv, true>(fwd, bwd, n);
  else fwd_bwd_grad<F, kDiv, false>(fwd, bwd, n);
}

template <class F>
void fwd_bwd_typed(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                   const at::Tensor& grad, const Options<double>& od, const at::Tensor& loss,
                   const at::Tensor& ce, const at::Tensor& div, const at::Tensor& entropy,
                   const at::Tensor& stats, const at::Tensor& dz,
                   const std::optional<at::Tensor>& du) {
  const FwdJob<F> fwd = make_fwd_job<F>(z, u, labels, od, loss, ce, div, entropy, stats);
  const BwdJob<F> bwd = make_bwd_job<F>(z, u, labels, fwd.stats, grad, od, dz, du);
  const int64_t n = labels.size(0);
  switch (fwd.p.div) {
    case Div::kForward: return fwd_bwd_div<F, Div::kForward>(fwd, bwd, n);
    case Div::kReverse: return fwd_bwd_div<F, Div::kReverse>(fwd, bwd, n);
    case Div::kJsd: return fwd_bwd_div<F, Div::kJsd>(fwd, bwd, n);
  }
}

}  // namespace

void hrm_loss_fwd_bwd(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                      const at::Tensor& grad, const Options<double>& opt, const at::Tensor& loss,
                      const at::Tensor& ce, const at::Tensor& div, const at::Tensor& entropy,
                      const at::Tensor& stats, const at::Tensor& dz,
                      const std::optional<at::Tensor>& du) {
  if (labels.size(0) == 0) return;
  if (stats.scalar_type() == at::kDouble)
    fwd_bwd_typed<double>(z, u, labels, grad, opt, loss, ce, div, entropy, stats, dz, du);
  else
    fwd_bwd_typed<float>(z, u, labels, grad, opt, loss, ce, div, entropy, stats, dz, du);
}

}  // namespace cpu
}  // namespace hrmkernels
