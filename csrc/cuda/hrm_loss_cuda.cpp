// The hrmkernels custom ops: TORCH_LIBRARY schemas and their CUDA implementations, which check
// the tensors and call the plain launchers (hrm_loss_kernels.h) on torch's current stream.
//
//   hrm_loss_fwd      forward: loss, ce, kl (N,) and the stats (N, 4) the backward needs
//   hrm_loss_bwd      backward: writes dz (and du) from the stats and the rows' gradients
//   hrm_loss_fwd_bwd  both at once for gradients known up front (one pass on Hopper)
//
// Python (hrmkernels/kernels/native.py) registers the fake (meta) implementations, so the ops work
// under torch.compile and torch.export; the autograd formula lives in hrmkernels/autograd.py.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/hrm_loss_kernels.h"

// `import hrmkernels._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

namespace hrmkernels {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "hrmkernels CUDA backend: ", name,
                  " must be float32, bfloat16 or float16, got ", t.scalar_type(),
                  " (float64 runs on backend=\"torch\")");
  }
}

// A (B, S, V) row view on z's device with z's shape and a unit last stride.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& z) {
  TORCH_CHECK(t.is_cuda(), "hrmkernels CUDA backend: ", name, " must be a CUDA tensor, got one on ",
              t.device());
  TORCH_CHECK(t.device() == z.device(), "hrmkernels CUDA backend: ", name, " is on ", t.device(),
              " but z is on ", z.device());
  TORCH_CHECK(t.dim() == 3, "hrmkernels CUDA backend: ", name,
              " must be a (B, S, V) row view, got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == z.sizes(), "hrmkernels CUDA backend: ", name, " has shape ", t.sizes(),
              " but z has shape ", z.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, "hrmkernels CUDA backend: ", name,
              " must have a unit last stride, got strides ", t.strides());
}

// A (N,) tensor on z's device: dtype check left to the caller.
void check_vector(const at::Tensor& t, const char* name, const at::Tensor& z, int64_t n) {
  TORCH_CHECK(t.device() == z.device(), "hrmkernels CUDA backend: ", name, " is on ", t.device(),
              " but z is on ", z.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "hrmkernels CUDA backend: ", name,
              " must have shape (", n, ",) (one entry per row of z), got ", t.sizes());
}

void check_labels(const at::Tensor& labels, const at::Tensor& z) {
  check_vector(labels, "labels", z, z.size(0) * z.size(1));
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "hrmkernels CUDA backend: labels must be int64 or int32, got ", labels.scalar_type());
}

void check_options(double temperature, double label_smoothing, double hrm) {
  TORCH_CHECK(temperature > 0, "hrmkernels CUDA backend: temperature must be > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "hrmkernels CUDA backend: label_smoothing must lie in [0, 1], got ", label_smoothing);
  TORCH_CHECK(hrm >= 0, "hrmkernels CUDA backend: hrm must be >= 0, got ", hrm);
}

RowsView rows_view(const at::Tensor& t, const char* name) {
  return {t.data_ptr(), t.stride(0), t.stride(1), dtype_of(t, name)};
}

HrmLossOptions options(double hrm, double temperature, double label_smoothing,
                       int64_t ignore_index, bool reverse) {
  return {static_cast<float>(hrm), static_cast<float>(temperature),
          static_cast<float>(label_smoothing), ignore_index, reverse};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "hrmkernels::", op, ": kernel launch failed: ",
              cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (too many rows for one grid?)" : "");
}

void check_inputs(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                  double hrm, double temperature, double label_smoothing) {
  check_rows(z, "z (student logits)", z);
  check_rows(u, "u (teacher logits)", z);
  check_labels(labels, z);
  check_options(temperature, label_smoothing, hrm);
}

// grad (N,) float32 with any stride, dz like z, du (optional) like u.
void check_grads(const at::Tensor& z, const at::Tensor& u, int64_t n, const at::Tensor& grad,
                 const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  check_vector(grad, "grad", z, n);
  TORCH_CHECK(grad.scalar_type() == at::kFloat,
              "hrmkernels CUDA backend: grad must be float32 (any stride, 0 included), got ",
              grad.scalar_type());
  check_rows(dz, "dz (student gradient)", z);
  TORCH_CHECK(dz.scalar_type() == z.scalar_type(), "hrmkernels CUDA backend: dz must have z's dtype ",
              z.scalar_type(), ", got ", dz.scalar_type());
  if (du.has_value()) {
    check_rows(*du, "du (teacher gradient)", z);
    TORCH_CHECK(du->scalar_type() == u.scalar_type(),
                "hrmkernels CUDA backend: du must have u's dtype ", u.scalar_type(), ", got ",
                du->scalar_type());
  }
}

using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward's outputs, loss, ce, kl (N,) and stats (N, 4) = (lse_z, lse_a, lse_b, mu), all
// float32 (see hrm_loss_kernels.cu), and the launcher arguments that point at them.
FwdOutputs forward_args(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                        double hrm, double temperature, double label_smoothing,
                        int64_t ignore_index, bool reverse, HrmLossFwdArgs& args) {
  const int64_t n = labels.size(0);
  const auto opts = z.options().dtype(at::kFloat);
  FwdOutputs out{at::empty({n}, opts), at::empty({n}, opts), at::empty({n}, opts),
                 at::empty({n, 4}, opts)};
  args = HrmLossFwdArgs{};
  args.z = rows_view(z, "z (student logits)");
  args.u = rows_view(u, "u (teacher logits)");
  args.labels = labels.data_ptr();
  args.labels_stride = labels.stride(0);
  args.labels_int64 = labels.scalar_type() == at::kLong;
  args.loss = std::get<0>(out).data_ptr<float>();
  args.ce = std::get<1>(out).data_ptr<float>();
  args.kl = std::get<2>(out).data_ptr<float>();
  args.stats = std::get<3>(out).data_ptr<float>();
  args.B = z.size(0);
  args.S = z.size(1);
  args.V = z.size(2);
  args.opt = options(hrm, temperature, label_smoothing, ignore_index, reverse);
  return out;
}

cudaStream_t current_stream(const at::Tensor& z) {
  return c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
}

FwdOutputs hrm_loss_fwd_cuda(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                             double hrm, double temperature, double label_smoothing,
                             int64_t ignore_index, bool reverse) {
  check_inputs(z, u, labels, hrm, temperature, label_smoothing);
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossFwdArgs args;
  FwdOutputs out = forward_args(z, u, labels, hrm, temperature, label_smoothing, ignore_index,
                                reverse, args);
  check_launch(hrm_loss_fwd_launch(args, current_stream(z)), "hrm_loss_fwd");
  return out;
}

// Writes the gradient of sum_r grad_r * loss_r into dz and, when given, du.
void hrm_loss_bwd_cuda(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                       const at::Tensor& stats, const at::Tensor& grad, double hrm,
                       double temperature, double label_smoothing, int64_t ignore_index,
                       bool reverse, const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  check_inputs(z, u, labels, hrm, temperature, label_smoothing);
  const int64_t n = labels.size(0);
  TORCH_CHECK(stats.device() == z.device() && stats.scalar_type() == at::kFloat &&
                  stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 4 &&
                  stats.is_contiguous(),
              "hrmkernels CUDA backend: stats must be a contiguous float32 (", n,
              ", 4) tensor on z's device (hrm_loss_fwd's fourth output), got ",
              stats.scalar_type(), " of shape ", stats.sizes(), " on ", stats.device());
  check_grads(z, u, n, grad, dz, du);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossBwdArgs args{};
  args.z = rows_view(z, "z (student logits)");
  args.u = rows_view(u, "u (teacher logits)");
  args.labels = labels.data_ptr();
  args.labels_stride = labels.stride(0);
  args.labels_int64 = labels.scalar_type() == at::kLong;
  args.stats = stats.data_ptr<float>();
  args.grad = grad.data_ptr<float>();
  args.grad_stride = grad.stride(0);
  args.dz = dz.data_ptr();
  args.dz_stride_b = dz.stride(0);
  args.dz_stride_s = dz.stride(1);
  args.du = du.has_value() ? du->data_ptr() : nullptr;
  args.du_stride_b = du.has_value() ? du->stride(0) : 0;
  args.du_stride_s = du.has_value() ? du->stride(1) : 0;
  args.B = z.size(0);
  args.S = z.size(1);
  args.V = z.size(2);
  args.opt = options(hrm, temperature, label_smoothing, ignore_index, reverse);
  check_launch(hrm_loss_bwd_launch(args, current_stream(z)), "hrm_loss_bwd");
}

HrmLossFwdBwdArgs fwd_bwd_args(const HrmLossFwdArgs& fwd, const at::Tensor& grad,
                               const at::Tensor& dz, const std::optional<at::Tensor>& du) {
  HrmLossFwdBwdArgs args{};
  args.fwd = fwd;
  args.grad = grad.data_ptr<float>();
  args.grad_stride = grad.stride(0);
  args.dz = dz.data_ptr();
  args.dz_stride_b = dz.stride(0);
  args.dz_stride_s = dz.stride(1);
  args.du = du.has_value() ? du->data_ptr() : nullptr;
  args.du_stride_b = du.has_value() ? du->stride(0) : 0;
  args.du_stride_s = du.has_value() ? du->stride(1) : 0;
  return args;
}

// The forward's outputs, and the gradient of sum_r grad_r * loss_r written into dz (and du),
// with grad given up front: on Hopper one pass over z and u (hrm_loss_cluster.cu).
FwdOutputs hrm_loss_fwd_bwd_cuda(const at::Tensor& z, const at::Tensor& u,
                                 const at::Tensor& labels, const at::Tensor& grad, double hrm,
                                 double temperature, double label_smoothing, int64_t ignore_index,
                                 bool reverse, const at::Tensor& dz,
                                 const std::optional<at::Tensor>& du) {
  check_inputs(z, u, labels, hrm, temperature, label_smoothing);
  check_grads(z, u, labels.size(0), grad, dz, du);
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossFwdArgs fwd;
  FwdOutputs out = forward_args(z, u, labels, hrm, temperature, label_smoothing, ignore_index,
                                reverse, fwd);
  if (labels.size(0) == 0) return out;
  check_launch(hrm_loss_fwd_bwd_launch(fwd_bwd_args(fwd, grad, dz, du), current_stream(z)),
               "hrm_loss_fwd_bwd");
  return out;
}

// CTAs per row that hrm_loss_fwd_bwd uses for these tensors here (0: two kernels instead).
int64_t hrm_loss_fwd_bwd_cluster_size_cuda(const at::Tensor& z, const at::Tensor& u,
                                           const at::Tensor& dz,
                                           const std::optional<at::Tensor>& du) {
  check_rows(z, "z (student logits)", z);
  check_rows(u, "u (teacher logits)", z);
  const at::Tensor grad = at::empty({z.size(0) * z.size(1)}, z.options().dtype(at::kFloat));
  check_grads(z, u, grad.size(0), grad, dz, du);
  const c10::cuda::CUDAGuard guard(z.device());
  HrmLossFwdArgs fwd{};
  fwd.z = rows_view(z, "z (student logits)");
  fwd.u = rows_view(u, "u (teacher logits)");
  fwd.B = z.size(0);
  fwd.S = z.size(1);
  fwd.V = z.size(2);
  return hrm_loss_fwd_bwd_cluster_size(fwd_bwd_args(fwd, grad, dz, du));
}

}  // namespace
}  // namespace hrmkernels

TORCH_LIBRARY(hrmkernels, m) {
  m.set_python_module("hrmkernels.kernels.native");   // where the fake (meta) implementations live
  m.def(
      "hrm_loss_fwd(Tensor z, Tensor u, Tensor labels, float hrm, float temperature, "
      "float label_smoothing, int ignore_index, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "hrm_loss_bwd(Tensor z, Tensor u, Tensor labels, Tensor stats, Tensor grad, "
      "float hrm, float temperature, float label_smoothing, int ignore_index, bool reverse, "
      "Tensor(a!) dz, Tensor(b!)? du) -> ()");
  m.def(
      "hrm_loss_fwd_bwd(Tensor z, Tensor u, Tensor labels, Tensor grad, float hrm, "
      "float temperature, float label_smoothing, int ignore_index, bool reverse, "
      "Tensor(a!) dz, Tensor(b!)? du) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("hrm_loss_fwd_bwd_cluster_size(Tensor z, Tensor u, Tensor dz, Tensor? du) -> int");
}

TORCH_LIBRARY_IMPL(hrmkernels, CUDA, m) {
  m.impl("hrm_loss_fwd", &hrmkernels::hrm_loss_fwd_cuda);
  m.impl("hrm_loss_bwd", &hrmkernels::hrm_loss_bwd_cuda);
  m.impl("hrm_loss_fwd_bwd", &hrmkernels::hrm_loss_fwd_bwd_cuda);
  m.impl("hrm_loss_fwd_bwd_cluster_size", &hrmkernels::hrm_loss_fwd_bwd_cluster_size_cuda);
}
