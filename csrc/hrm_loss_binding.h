// Argument checks and output allocation shared by the CPU (cpu/hrm_loss_cpu.cpp) and CUDA
// (cuda/hrm_loss_cuda.cpp) bindings of the hrmkernels ops. Every message names the argument and
// what was expected. Metadata only: nothing here reads tensor data.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

namespace hrmkernels {

struct Backend {
  const char* name;          // for messages: "hrmkernels CPU backend"
  c10::DeviceType device;
  bool float64;              // accepts float64 logits
};

inline void check_float(const Backend& be, const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kBFloat16 || s == at::kHalf ||
                  (be.float64 && s == at::kDouble);
  TORCH_CHECK(ok, be.name, ": ", name, " must be float32, bfloat16, float16",
              be.float64 ? " or float64" : "", ", got ", s,
              be.float64 ? "" : " (float64 runs on backend=\"cpu\" or \"torch\")");
}

// A (B, S, V) row view on z's device with z's shape and a unit last stride.
inline void check_rows(const Backend& be, const at::Tensor& t, const char* name,
                       const at::Tensor& z) {
  TORCH_CHECK(t.device().type() == be.device, be.name, ": ", name, " must be a ",
              c10::DeviceTypeName(be.device), " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == z.device(), be.name, ": ", name, " is on ", t.device(),
              " but z is on ", z.device());
  TORCH_CHECK(t.dim() == 3, be.name, ": ", name, " must be a (B, S, V) row view, got shape ",
              t.sizes());
  TORCH_CHECK(t.sizes() == z.sizes(), be.name, ": ", name, " has shape ", t.sizes(),
              " but z has shape ", z.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, be.name, ": ", name,
              " must have a unit last stride, got strides ", t.strides());
  check_float(be, t, name);
}

// A (N,) tensor on z's device: dtype checks are left to the caller.
inline void check_vector(const Backend& be, const at::Tensor& t, const char* name,
                         const at::Tensor& z, int64_t n) {
  TORCH_CHECK(t.device() == z.device(), be.name, ": ", name, " is on ", t.device(),
              " but z is on ", z.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, be.name, ": ", name, " must have shape (", n,
              ",) (one entry per row of z), got ", t.sizes());
}

inline void check_inputs(const Backend& be, const at::Tensor& z, const at::Tensor& u,
                         const at::Tensor& labels, double hrm, double temperature,
                         double label_smoothing, double beta) {
  check_rows(be, z, "z (student logits)", z);
  check_rows(be, u, "u (teacher logits)", z);
  check_vector(be, labels, "labels", z, z.size(0) * z.size(1));
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, be.name,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(temperature > 0, be.name, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, be.name,
              ": label_smoothing must lie in [0, 1], got ", label_smoothing);
  TORCH_CHECK(hrm >= 0, be.name, ": hrm must be >= 0, got ", hrm);
  TORCH_CHECK(beta >= 0 && beta <= 1, be.name, ": beta must lie in [0, 1], got ", beta);
}

// The outputs' dtype: float64 when z or u is float64, else float32.
inline at::ScalarType out_dtype(const at::Tensor& z, const at::Tensor& u) {
  return z.scalar_type() == at::kDouble || u.scalar_type() == at::kDouble ? at::kDouble
                                                                          : at::kFloat;
}

using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// loss, ce, div, entropy (N,) and stats (N, 5), contiguous, uninitialised.
inline FwdOutputs empty_outputs(const at::Tensor& z, const at::Tensor& u, int64_t n) {
  const auto opts = z.options().dtype(out_dtype(z, u));
  return {at::empty({n}, opts), at::empty({n}, opts), at::empty({n}, opts),
          at::empty({n}, opts), at::empty({n, 5}, opts)};
}

// stats from hrm_loss_fwd; grad (N,) float32 (or the stats' dtype), any stride (0 included);
// dz like z, du (optional) like u.
inline void check_grads(const Backend& be, const at::Tensor& z, const at::Tensor& u,
                        const at::Tensor& stats, const at::Tensor& grad, const at::Tensor& dz,
                        const std::optional<at::Tensor>& du) {
  const int64_t n = z.size(0) * z.size(1);
  const auto dtype = out_dtype(z, u);
  TORCH_CHECK(stats.device() == z.device() && stats.scalar_type() == dtype && stats.dim() == 2 &&
                  stats.size(0) == n && stats.size(1) == 5 && stats.is_contiguous(),
              be.name, ": stats must be a contiguous ", dtype, " (", n,
              ", 5) tensor on z's device (hrm_loss_fwd's fifth output), got ",
              stats.scalar_type(), " of shape ", stats.sizes(), " on ", stats.device());
  check_vector(be, grad, "grad", z, n);
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == dtype, be.name,
              ": grad must be float32 (any stride, 0 included), got ", grad.scalar_type());
  check_rows(be, dz, "dz (student gradient)", z);
  TORCH_CHECK(dz.scalar_type() == z.scalar_type(), be.name, ": dz must have z's dtype ",
              z.scalar_type(), ", got ", dz.scalar_type());
  if (du.has_value()) {
    check_rows(be, *du, "du (teacher gradient)", z);
    TORCH_CHECK(du->scalar_type() == u.scalar_type(), be.name, ": du must have u's dtype ",
                u.scalar_type(), ", got ", du->scalar_type());
  }
}

}  // namespace hrmkernels
