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

// The gradient fields HrmLossBwdArgs and HrmLossFwdBwdArgs share: the rows' incoming gradient
// grad (N,) and the outputs dz, du (du may be absent: no teacher gradient).
template <class Args>
void set_grad_args(Args& args, const at::Tensor& grad, const at::Tensor& dz,
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

HrmLossFwdBwdArgs fwd_bwd_args(const HrmLossFwdArgs& fwd, const at::Tensor& grad,
                               const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  HrmLossFwdBwdArgs args{};
  args.fwd = fwd;
  set_grad_args(args, grad, dz, du);
  return args;
}

// grad (N,) float32 with any stride, dz like z, du (optional) like u.
void check_fwd_bwd_grads(const at::Tensor& z, const at::Tensor& u, const at::Tensor& grad,
                         const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  check_vector(kCuda, grad, "grad", z, z.size(0) * z.size(1));
  TORCH_CHECK(grad.scalar_type() == at::kFloat, kCuda.name,
              ": grad must be float32 (any stride, 0 included), got ", grad.scalar_type());
  check_rows(kCuda, dz, "dz (student gradient)", z);
  TORCH_CHECK(dz.scalar_type() == z.scalar_type(), kCuda.name, ": dz must have z's dtype ",
              z.scalar_type(), ", got ", dz.scalar_type());
  if (du.has_value()) {
    check_rows(kCuda, *du, "du (teacher gradient)", z);
    TORCH_CHECK(du->scalar_type() == u.scalar_type(), kCuda.name, ": du must have u's dtype ",
                u.scalar_type(), ", got ", du->scalar_type());
  }
}

// The forward's outputs, and the gradient of sum_r grad_r * loss_r written into dz (and du),
// with grad given up front: on Hopper one pass over z and u for the KL (hrm_loss_cluster.cu).
FwdOutputs hrm_loss_fwd_bwd_cuda(const at::Tensor& z, const at::Tensor& u,
                                 const at::Tensor& labels, const at::Tensor& grad, double hrm,
                                 double temperature, double label_smoothing, int64_t ignore_index,
                                 double beta, const at::Tensor& dz,
                                 const std::optional<at::Tensor>& du) {
  check_inputs(kCuda, z, u, labels, hrm, temperature, label_smoothing, beta);
  check_fwd_bwd_grads(z, u, grad, dz, du);
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossFwdArgs fwd;
  FwdOutputs out = forward_args(
      z, u, labels, options(hrm, temperature, label_smoothing, ignore_index, beta), fwd);
  if (labels.size(0) == 0) return out;
  check_launch(hrm_loss_fwd_bwd_launch(fwd_bwd_args(fwd, grad, dz, du), current_stream(z)),
               "hrm_loss_fwd_bwd");
  return out;
}

// CTAs per row that hrm_loss_fwd_bwd uses for these tensors here (0: two kernels instead).
int64_t hrm_loss_fwd_bwd_cluster_size_cuda(const at::Tensor& z, const at::Tensor& u,
                                           const at::Tensor& dz,
                                           const std::optional<at::Tensor>& du) {
  check_rows(kCuda, z, "z (student logits)", z);
  check_rows(kCuda, u, "u (teacher logits)", z);
  const at::Tensor grad = at::empty({z.size(0) * z.size(1)}, z.options().dtype(at::kFloat));
  check_fwd_bwd_grads(z, u, grad, dz, du);
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossFwdArgs fwd{};
  fwd.z = rows_view(z);
  fwd.u = rows_view(u);
  fwd.B = z.size(0);
  fwd.S = z.size(1);
  fwd.V = z.size(2);
  return hrm_loss_fwd_bwd_cluster_size(fwd_bwd_args(fwd, grad, dz, du));
}

}  // namespace
}  // namespace hrmkernels

TORCH_LIBRARY_IMPL(hrmkernels, CUDA, m) {
  m.impl("hrm_loss_fwd", &hrmkernels::hrm_loss_fwd_cuda);
  m.impl("hrm_loss_bwd", &hrmkernels::hrm_loss_bwd_cuda);
  m.impl("hrm_loss_fwd_bwd", &hrmkernels::hrm_loss_fwd_bwd_cuda);
  m.impl("hrm_loss_fwd_bwd_cluster_size", &hrmkernels::hrm_loss_fwd_bwd_cluster_size_cuda);
}
