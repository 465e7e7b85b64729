// Fused HRM loss on the CPU, forward: the rows over threads (one row: hrm_loss_fwd_row.h).
#include "hrm_loss_fwd_row.h"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace cpu {
namespace {

using namespace detail;

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
  const FwdJob<F> job = make_fwd_job<F>(z, u, labels, od, loss, ce, div, entropy, stats);
  const int64_t n = labels.size(0);
  switch (job.p.div) {
    case Div::kForward: return fwd_div<F, Div::kForward>(job, n);
    case Div::kReverse: return fwd_div<F, Div::kReverse>(job, n);
    case Div::kJsd: return fwd_div<F, Div::kJsd>(job, n);
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

}  // namespace cpu
}  // namespace hrmkernels
