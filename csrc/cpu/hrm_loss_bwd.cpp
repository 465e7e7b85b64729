// Fused HRM loss on the CPU, backward: the rows over threads (one row: hrm_loss_bwd_row.h).
#include "hrm_loss_bwd_row.h"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace cpu {
namespace {

using namespace detail;

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
  const BwdJob<F> job =
      make_bwd_job<F>(z, u, labels, stats.const_data_ptr<F>(), grad, od, dz, du);
  const Options<F>& o = job.o;
  const int64_t n = labels.size(0);
  if (o.hrm <= F(0)) return bwd_rows<F, false, Div::kForward, false>(job, n);
  switch (div_kind(o)) {
    case Div::kForward: return bwd_div<F, Div::kForward>(job, n);
    case Div::kReverse: return bwd_div<F, Div::kReverse>(job, n);
    case Div::kJsd: return bwd_div<F, Div::kJsd>(job, n);
  }
}

}  // namespace

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
