// Online log-sum-exp states and their warp / block reductions. CUDA toolkit headers only.
//
// Every exponent is taken in base 2: a logit x is scaled once to x2 = x * log2(e), so that
// exp(x - m) = 2^(x2 - m2) is one ex2.approx instruction (as Triton's tl.exp).
//
// OnlineLse carries, for a stream x2 seen so far,
//     m = max x2,   s = sum 2^(x2 - m),   t = sum 2^(x2 - m) * w   (w: a weight per element)
// and two states merge by rescaling both to the larger max. A max that is still -inf (nothing
// seen, or only masked -inf entries) is replaced by 0 before it is subtracted, because
// -inf - -inf is NaN; its sums are 0, so the rescale factor 2^(-inf) = 0 keeps them 0.
// t may be +inf (a KL term with p > 0 where q = 0): +inf stays +inf under rescaling, even by a
// factor that underflows to 0 (0 * inf would be NaN; the true KL is +inf).
#pragma once

#include <cuda_runtime.h>

namespace hrmkernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxWarps = 32;

// 2^x with the hardware approximation (2 ulp, denormal results flushed to 0); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float finite_or_zero_max(float m) { return m == -INFINITY ? 0.f : m; }

// t * scale + add, where an infinite t stays infinite (see the file comment).
__device__ __forceinline__ float rescale_add(float t, float scale, float add) {
  return t == INFINITY ? INFINITY : fmaf(t, scale, add);
}

struct OnlineLse {
  float m, s, t;

  __device__ __forceinline__ static OnlineLse identity() { return {-INFINITY, 0.f, 0.f}; }

  __device__ __forceinline__ static OnlineLse merge(const OnlineLse& x, const OnlineLse& y) {
    const float m = fmaxf(x.m, y.m);
    const float ms = finite_or_zero_max(m);
    const float ax = fast_exp2(x.m - ms), ay = fast_exp2(y.m - ms);
    const float t = y.t == INFINITY ? INFINITY : rescale_add(x.t, ax, y.t * ay);
    return {m, fmaf(x.s, ax, y.s * ay), t};
  }

  __device__ __forceinline__ OnlineLse shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, m, lane_mask), __shfl_xor_sync(0xffffffffu, s, lane_mask),
            __shfl_xor_sync(0xffffffffu, t, lane_mask)};
  }

  // log sum exp(x) in natural units: (m + log2 s) * ln 2; -inf when s == 0.
  __device__ __forceinline__ float lse() const { return (m + log2f(s)) * kLn2; }
};

// Butterfly reduction: every lane of the warp ends with the merge of all 32 lanes.
template <class State>
__device__ __forceinline__ State warp_allreduce(State x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = State::merge(x, x.shfl_xor(offset));
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
