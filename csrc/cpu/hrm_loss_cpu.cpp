// The CPU implementations of the hrmkernels ops (schemas: csrc/hrm_loss.cpp): check the
// tensors, allocate the forward's outputs, and run the kernels of hrm_loss_kernels.cpp.
#include <torch/library.h>

#include <optional>

#include "../hrm_loss_binding.h"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace {

constexpr Backend kCpu{"hrmkernels CPU backend", c10::DeviceType::CPU, /*float64=*/true};

math::Options<double> options(double hrm, double temperature, double label_smoothing,
                              int64_t ignore_index, double beta) {
  return {hrm, temperature, label_smoothing, beta, ignore_index};
}

FwdOutputs hrm_loss_fwd_cpu(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                            double hrm, double temperature, double label_smoothing,
                            int64_t ignore_index, double beta) {
  check_inputs(kCpu, z, u, labels, hrm, temperature, label_smoothing, beta);
  FwdOutputs out = empty_outputs(z, u, labels.size(0));
  const auto& [loss, ce, div, entropy, stats] = out;
  cpu::hrm_loss_fwd(z, u, labels, options(hrm, temperature, label_smoothing, ignore_index, beta),
                    loss, ce, div, entropy, stats);
  return out;
}

// Writes the gradient of sum_r grad_r * loss_r into dz and, when given, du.
void hrm_loss_bwd_cpu(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                      const at::Tensor& stats, const at::Tensor& grad, double hrm,
                      double temperature, double label_smoothing, int64_t ignore_index,
                      double beta, const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  check_inputs(kCpu, z, u, labels, hrm, temperature, label_smoothing, beta);
  check_grads(kCpu, z, u, stats, grad, dz, du);
  cpu::hrm_loss_bwd(z, u, labels, stats, grad,
                    options(hrm, temperature, label_smoothing, ignore_index, beta), dz, du);
}

}  // namespace
}  // namespace hrmkernels

TORCH_LIBRARY_IMPL(hrmkernels, CPU, m) {
  m.impl("hrm_loss_fwd", &hrmkernels::hrm_loss_fwd_cpu);
  m.impl("hrm_loss_bwd", &hrmkernels::hrm_loss_bwd_cpu);
}
