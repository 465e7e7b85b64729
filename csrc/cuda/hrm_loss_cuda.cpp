// The CUDA implementations of the hrmkernels ops (schemas: csrc/hrm_loss.cpp): check the
// tensors (csrc/hrm_loss_binding.h), allocate the forward's outputs, and call the plain
// launchers of hrm_loss_kernels.h on torch's current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../hrm_loss_binding.h"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace {

constexpr Backend kCuda{"hrmkernels CUDA backend", c10::DeviceType::CUDA, /*float64=*/false};

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kFloat32;   // the checks allow nothing else
  }
}

RowsView rows_view(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), dtype_of(t)};
}

HrmLossOptions options(double hrm, double temperature, double label_smoothing,
                       int64_t ignore_index, double beta) {
  return {static_cast<float>(hrm), static_cast<float>(temperature),
          static_cast<float>(label_smoothing), static_cast<float>(beta), ignore_index};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "hrmkernels::", op, ": kernel launch failed: ",
              cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (too many rows for one grid?)" : "");
}

cudaStream_t current_stream(const at::Tensor& z) {
  return c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
}

// The input fields HrmLossFwdArgs and HrmLossBwdArgs share: the (B, S, V) row views of z and
// u, and the labels (int32 or int64, any stride).
template <class Args>
void set_input_args(Args& args, const at::Tensor& z, const at::Tensor& u,
                    const at::Tensor& labels) {
  args.z = rows_view(z);
  args.u = rows_view(u);
  args.labels = labels.data_ptr();
  args.labels_stride = labels.stride(0);
  args.labels_int64 = labels.scalar_type() == at::kLong;
  args.B = z.size(0);
  args.S = z.size(1);
  args.V = z.size(2);
}

// The forward's outputs (float32) and the launcher arguments that point at them.
FwdOutputs forward_args(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                        const HrmLossOptions& opt, HrmLossFwdArgs& args) {
  FwdOutputs out = empty_outputs(z, u, labels.size(0));
  const auto& [loss, ce, div, entropy, stats] = out;
  args = HrmLossFwdArgs{};
  set_input_args(args, z, u, labels);
  args.loss = loss.data_ptr<float>();
  args.ce = ce.data_ptr<float>();
  args.div = div.data_ptr<float>();
  args.entropy = entropy.data_ptr<float>();
  args.stats = stats.data_ptr<float>();
  args.opt = opt;
  return out;
}

FwdOutputs hrm_loss_fwd_cuda(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                             double hrm, double temperature, double label_smoothing,
                             int64_t ignore_index, double beta) {
  check_inputs(kCuda, z, u, labels, hrm, temperature, label_smoothing, beta);
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossFwdArgs args;
  FwdOutputs out = forward_args(
      z, u, labels, options(hrm, temperature, label_smoothing, ignore_index, beta), args);
  check_launch(hrm_loss_fwd_launch(args, current_stream(z)), "hrm_loss_fwd");
  return out;
}

// HrmLossBwdArgs' gradient fields: the rows' incoming gradient grad (N,) and the outputs dz, du
// (du may be absent: no teacher gradient).
void set_grad_args(HrmLossBwdArgs& args, const at::Tensor& grad, const at::Tensor& dz,
                   const std::optional<at::Tensor>& du) {
  args.grad = grad.data_ptr<float>();
  args.grad_stride = grad.stride(0);
  args.dz = dz.data_ptr();
  args.dz_stride_b = dz.stride(0);
  args.dz_stride_s = dz.stride(1);
  args.du = du.has_value() ? du->data_ptr() : nullptr;
  args.du_stride_b = du.has_value() ? du->stride(0) : 0;
  args.du_stride_s = du.has_value() ? du->stride(1) : 0;
}

// Writes the gradient of sum_r grad_r * loss_r into dz and, when given, du.
void hrm_loss_bwd_cuda(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                       const at::Tensor& stats, const at::Tensor& grad, double hrm,
                       double temperature, double label_smoothing, int64_t ignore_index,
                       double beta, const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  check_inputs(kCuda, z, u, labels, hrm, temperature, label_smoothing, beta);
  check_grads(kCuda, z, u, stats, grad, dz, du);
  if (labels.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossBwdArgs args{};
  set_input_args(args, z, u, labels);
  args.stats = stats.data_ptr<float>();
  set_grad_args(args, grad, dz, du);
  args.opt = options(hrm, temperature, label_smoothing, ignore_index, beta);
  check_launch(hrm_loss_bwd_launch(args, current_stream(z)), "hrm_loss_bwd");
}

}  // namespace
}  // namespace hrmkernels

TORCH_LIBRARY_IMPL(hrmkernels, CUDA, m) {
  m.impl("hrm_loss_fwd", &hrmkernels::hrm_loss_fwd_cuda);
  m.impl("hrm_loss_bwd", &hrmkernels::hrm_loss_bwd_cuda);
}
