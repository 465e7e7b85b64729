// Plain launchers for the fused HRM loss kernels (hrm_loss_kernels.cu): raw pointers, sizes,
// element strides and a cudaStream_t. No torch headers, so that the kernels compile with nvcc
// alone; the torch binding (hrm_loss_cuda.cpp) validates tensors and fills these structs.
//
// Logits arrive as (B, S, V) row views with a unit last stride: row r = b * S + s starts at
// ptr + b * stride_b + s * stride_s (element strides, int64).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../hrm_loss_math.h"

namespace hrmkernels {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RowsView {
  const void* ptr;              // (B, S, V), dtype below, unit last stride
  int64_t stride_b, stride_s;   // element strides of dimensions 0 and 1
  DType dtype;
};

// hrm, temperature, label smoothing, beta (0 forward KL, 1 reverse KL, else JSD_beta) and
// ignore_index: see hrm_loss_math.h.
using HrmLossOptions = math::Options<float>;

struct HrmLossFwdArgs {
  RowsView z, u;                // student and teacher logits, same (B, S, V)
  const void* labels;           // (N,), N = B * S; int64 if labels_int64 else int32
  int64_t labels_stride;        // element stride of labels
  bool labels_int64;
  float* loss;                  // (N,) out: CE + hrm * D (0 at ignored rows)
  float* ce;                    // (N,) out
  float* div;                   // (N,) out: D, the KL or JSD that beta chooses
  float* entropy;               // (N,) out: H(softmax(z / T))
  float* stats;                 // (N, 5) out, contiguous, for the backward (hrm_loss_math.h):
                                //   lse(z), lse(z / T), lse(u / T), then mu, 0 (KL) or
                                //   kl_qm, kl_pm (JSD)
  int64_t B, S, V;
  HrmLossOptions opt;
};

struct HrmLossBwdArgs {
  RowsView z, u;                // as in the forward
  const void* labels;
  int64_t labels_stride;
  bool labels_int64;
  const float* stats;           // (N, 5) contiguous, from the forward
  const float* grad;            // (N,) fp32: d(total loss) / d(loss_r); grad_stride may be 0
  int64_t grad_stride;
  void* dz;                     // (B, S, V) out, z's dtype, unit last stride; may alias z
  int64_t dz_stride_b, dz_stride_s;
  void* du;                     // (B, S, V) out, u's dtype, or nullptr: no teacher gradient
  int64_t du_stride_b, du_stride_s;
  int64_t B, S, V;
  HrmLossOptions opt;
};

// All return cudaSuccess or the launch error (cudaErrorInvalidValue for sizes beyond the grid
// limits); they never synchronise. N = B * S = 0 launches nothing.
cudaError_t hrm_loss_fwd_launch(const HrmLossFwdArgs& args, cudaStream_t stream);
cudaError_t hrm_loss_bwd_launch(const HrmLossBwdArgs& args, cudaStream_t stream);

}  // namespace hrmkernels
