// The CPU kernels of the fused HRM loss (hrm_loss_fwd.cpp, hrm_loss_bwd.cpp), called by the
// binding (hrm_loss_cpu.cpp) with checked tensors. Math: csrc/hrm_loss_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../hrm_loss_math.h"

namespace hrmkernels {
namespace cpu {

// z, u: (B, S, V) with a unit last stride, float32/bfloat16/float16/float64 each; labels (N,)
// int32/int64, any stride. Outputs loss, ce, div, entropy (N,) and stats (N, 5), contiguous,
// float64 when z or u is float64, else float32.
void hrm_loss_fwd(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                  const math::Options<double>& opt, const at::Tensor& loss, const at::Tensor& ce,
                  const at::Tensor& div, const at::Tensor& entropy, const at::Tensor& stats);

// stats (N, 5) from hrm_loss_fwd; grad (N,) float32 or stats' dtype, any stride (0 included).
// Writes dz (z's dtype and shape, unit last stride; may alias z) and, when given, du.
void hrm_loss_bwd(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                  const at::Tensor& stats, const at::Tensor& grad,
                  const math::Options<double>& opt, const at::Tensor& dz,
                  const std::optional<at::Tensor>& du);

// hrm_loss_fwd and hrm_loss_bwd in one sweep over each row, for a grad known before the
// forward: the outputs of hrm_loss_fwd, and dz (may alias z) and du as hrm_loss_bwd writes them.
void hrm_loss_fwd_bwd(const at::Tensor& z, const at::Tensor& u, const at::Tensor& labels,
                      const at::Tensor& grad, const math::Options<double>& opt,
                      const at::Tensor& loss, const at::Tensor& ce, const at::Tensor& div,
                      const at::Tensor& entropy, const at::Tensor& stats, const at::Tensor& dz,
                      const std::optional<at::Tensor>& du);

}  // namespace cpu
}  // namespace hrmkernels
