// Warp and block all-reductions of a mergeable state (the forward's online state of
// hrm_loss_math.h, or the JSD's two sums). CUDA toolkit headers only.
//
// A State has static identity() and merge(x, y), and a free function shfl_xor(x, lane_mask)
// that exchanges it between lanes (hrm_loss_device.cuh).
#pragma once

#include <cuda_runtime.h>

namespace hrmkernels {

constexpr int kMaxWarps = 32;

// Butterfly reduction: every lane of the warp ends with the merge of all 32 lanes.
template <class State>
__device__ __forceinline__ State warp_allreduce(State x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = State::merge(x, shfl_xor(x, offset));
  return x;
}

// Merge of one State per thread, returned to every thread. blockDim.x must be a multiple of 32
// (at most 1024); `smem` holds kMaxWarps + 1 States. Ends with a barrier, so smem may be reused.
template <class State>
__device__ __forceinline__ State block_allreduce(State x, State* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  x = warp_allreduce(x);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = warp_allreduce(lane < n_warps ? smem[lane] : State::identity());
    if (lane == 0) smem[kMaxWarps] = x;
  }
  __syncthreads();
  x = smem[kMaxWarps];
  __syncthreads();
  return x;
}

}  // namespace hrmkernels
