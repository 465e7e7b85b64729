// The CPU implementations of the hrmkernels ops (schemas: csrc/hrm_loss.cpp): check the
// tensors, allocate the forward's outputs, and run the kernels of hrm_loss_fwd.cpp,
// hrm_loss_bwd.cpp and hrm_loss_fwd_bwd.cpp (declared in hrm_loss_kernels.h).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../hrm_loss_binding.h"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace {

constexpr Backend kCpu{"hrmkernels CPU backend", c10::DeviceType::CPU, /*float64=*/true};

math::Options<double> options(double hrm, double temperature, double label_smoothing,
                              int64_t ignore_index, double beta) {
  return {hrm, temperature, label_smoothing, beta, ignore_index};
}

// A label outside [0, V) that is not ignore_index: on CPU finding it costs one read of the
// labels and no device sync, so the CPU kernels raise the torch backend's ValueError (the GPU
// kernels make that row's loss NaN instead). Also inside a compiled graph, where Python checks
// do not run.
void check_label_range(const at::Tensor& labels, int64_t v, int64_t ignore_index) {
  const at::Tensor y = labels.contiguous();
  AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "check_label_range", [&] {
    const index_t* data = y.data_ptr<index_t>();
    for (int64_t i = 0; i < y.numel(); ++i) {
      const int64_t label = data[i];
      TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < v),
                        "labels must lie in [0, ", v, ") or equal ignore_index=", ignore_index,
                        "; found ", label, " at flat position ", i);
    }
  });
}

FwdOutputs hrm_loss_fwd_cpu(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                            double hrm, double temperature, double label_smoothing,
                            int64_t ignore_index, double beta) {
  check_inputs(kCpu, z, u, labels, hrm, temperature, label_smoothing, beta);
  check_label_range(labels, z.size(2), ignore_index);
  FwdOutputs out = empty_outputs(z, u, labels.size(0));
  const auto& [loss, ce, div, entropy, stats] = out;
  cpu::hrm_loss_fwd(z, u, labels, options(hrm, temperature, label_smoothing, ignore_index, beta),
                    loss, ce, div, entropy, stats);
  return out;
}

// A gradient buffer fresh from the allocator is untouched memory: the backward's first write to
// each 4 KB page faults, and the kernel zero-fills it (64,000 faults for a 262 MB dz: half the
// time of a 2-thread backward, benchmarks/NOTES.md). Asking for transparent huge pages before
// the first write makes that 125 faults of 2 MB, as torch's own THP_MEM_ALLOC_ENABLE=1 does
// for every large allocation. Advice only: where it is not granted, nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  if (end > first + kHuge) {
    madvise(reinterpret_cast<void*>(first), (end - first) & ~(kHuge - 1), MADV_HUGEPAGE);
  }
#endif
}

// Writes the gradient of sum_r grad_r * loss_r into dz and, when given, du.
void hrm_loss_bwd_cpu(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                      const at::Tensor& stats, const at::Tensor& grad, double hrm,
                      double temperature, double label_smoothing, int64_t ignore_index,
                      double beta, const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  check_inputs(kCpu, z, u, labels, hrm, temperature, label_smoothing, beta);
  check_grads(kCpu, z, u, stats, grad, dz, du);
  if (dz.data_ptr() != z.data_ptr()) advise_huge_pages(dz);   // in place: resident already
  if (du.has_value() && du->data_ptr() != u.data_ptr()) advise_huge_pages(*du);
  cpu::hrm_loss_bwd(z, u, labels, stats, grad,
                    options(hrm, temperature, label_smoothing, ignore_index, beta), dz, du);
}

// Both at once, for a grad known before the forward (reduction "mean" / "sum": the rows'
// gradient scale): one sweep over each row, the row's gradient written while it is in cache.
FwdOutputs hrm_loss_fwd_bwd_cpu(const at::Tensor& z, const at::Tensor& u,
                                const at::Tensor& labels, const at::Tensor& grad, double hrm,
                                double temperature, double label_smoothing, int64_t ignore_index,
                                double beta, const at::Tensor& dz,
                                const std::optional<at::Tensor>& du) {
  check_inputs(kCpu, z, u, labels, hrm, temperature, label_smoothing, beta);
  check_label_range(labels, z.size(2), ignore_index);
  FwdOutputs out = empty_outputs(z, u, labels.size(0));
  const auto& [loss, ce, div, entropy, stats] = out;
  check_grads(kCpu, z, u, stats, grad, dz, du);
  if (dz.data_ptr() != z.data_ptr()) advise_huge_pages(dz);
  if (du.has_value() && du->data_ptr() != u.data_ptr()) advise_huge_pages(*du);
  cpu::hrm_loss_fwd_bwd(z, u, labels, grad,
                        options(hrm, temperature, label_smoothing, ignore_index, beta), loss, ce,
                        div, entropy, stats, dz, du);
  return out;
}

// dz (and du) *= grad, a 0-d CPU tensor read here (host memory: no sync), and nothing at all
// when it is exactly 1 (the gradient computed in the forward is returned untouched).
void hrm_loss_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& dz,
                             const std::optional<at::Tensor>& du) {
  TORCH_CHECK(grad.device().is_cpu() && grad.numel() == 1, kCpu.name,
              ": grad must be a one-element CPU tensor, got ", grad.sizes(), " on ",
              grad.device());
  const double g = grad.item<double>();
  if (g == 1.0) return;
  dz.mul_(g);
  if (du.has_value()) du->mul_(g);
}

}  // namespace
}  // namespace hrmkernels

TORCH_LIBRARY_IMPL(hrmkernels, CPU, m) {
  m.impl("hrm_loss_fwd", &hrmkernels::hrm_loss_fwd_cpu);
  m.impl("hrm_loss_bwd", &hrmkernels::hrm_loss_bwd_cpu);
  m.impl("hrm_loss_fwd_bwd", &hrmkernels::hrm_loss_fwd_bwd_cpu);
  m.impl("hrm_loss_scale_grad", &hrmkernels::hrm_loss_scale_grad_cpu);
}
