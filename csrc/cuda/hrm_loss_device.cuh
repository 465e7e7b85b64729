// Device code of the kernels (hrm_loss_kernels.cu) and the cost harness: element access,
// the row traversal, warp exchanges of the forward's states, and the rows' stores. The math
// itself (the online state, its fold and merge, the row epilogues, the per-element gradient) is
// hrm_loss_math.h, shared with the CPU kernels. CUDA toolkit headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../hrm_loss_math.h"
#include "hrm_loss_kernels.h"
#include "reduce.cuh"

namespace hrmkernels {
namespace math {

// The forward's state, exchanged between lanes (warp_allreduce finds it by argument lookup).
__device__ __forceinline__ FwdState<float> shfl_xor(const FwdState<float>& x, int lane_mask) {
  const auto f = [lane_mask](float v) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); };
  return {f(x.mz), f(x.sz), f(x.ma), f(x.sa), f(x.ha), f(x.ta), f(x.mb), f(x.sb), f(x.tb),
          f(x.sum_z)};
}

}  // namespace math

namespace device {

constexpr int kVec = 8;           // elements per vector step (16 bytes of a 2-byte type)
constexpr int kUnroll = 2;        // vector steps a thread has in flight before computing
constexpr int kMaxThreads = 256;  // threads per block of the portable kernels

// ---------------------------------------------------------------------------------------------
// Element access

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Eight elements at a 16-byte aligned address. Streaming (evict-first), coherent loads: the
// data is read once, and the in-place backward writes where it reads (so no ld.global.nc).
__device__ __forceinline__ void load8(const float* p, float (&x)[kVec]) {
  const float4 lo = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 hi = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  x[0] = lo.x; x[1] = lo.y; x[2] = lo.z; x[3] = lo.w;
  x[4] = hi.x; x[5] = hi.y; x[6] = hi.z; x[7] = hi.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&x)[kVec]) {
  const uint4 r = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of an fp32: exact by shifting
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void load8(const __half* p, float (&x)[kVec]) {
  const uint4 r = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    const float2 f = __half22float2(h);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float (&x)[kVec]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(x[0], x[1], x[2], x[3]));
  __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(x[4], x[5], x[6], x[7]));
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&x)[kVec]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
}

__device__ __forceinline__ void store8(__half* p, const float (&x)[kVec]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
}

template <class T>
__device__ __forceinline__ const T* row_ptr(const RowsView& v, int64_t b, int64_t s) {
  return static_cast<const T*>(v.ptr) + b * v.stride_b + s * v.stride_s;
}

__device__ __forceinline__ int64_t load_label(const void* labels, int64_t stride, bool is_int64,
                                              int64_t row) {
  return is_int64 ? static_cast<const int64_t*>(labels)[row * stride]
                  : static_cast<int64_t>(static_cast<const int32_t*>(labels)[row * stride]);
}

// Smallest h in [0, kVec) such that every pointer advanced by h elements is 16-byte aligned,
// or -1 if there is none (the row then runs scalar). Pointers are element-aligned.
template <int kCount>
__device__ __forceinline__ int vector_head(const void* const (&ptrs)[kCount],
                                           const int (&sizes)[kCount]) {
  for (int h = 0; h < kVec; ++h) {
    bool ok = true;
#pragma unroll
    for (int i = 0; i < kCount; ++i)
      ok &= ptrs[i] == nullptr ||
            (reinterpret_cast<uintptr_t>(ptrs[i]) + static_cast<uintptr_t>(h) * sizes[i]) % 16 == 0;
    if (ok) return h;
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Row traversal

// Visit the elements [lo, hi) of a row, kVec per thread per step, element i = base + k * blockDim
// + tid (coalesced for each k): visit(z, u, n_in) with lanes k >= n_in (past hi) set to -inf.
template <class Tz, class Tu, class Visit>
__device__ __forceinline__ void visit_scalar_range(const Tz* zr, const Tu* ur, int64_t lo,
                                                   int64_t hi, Visit& visit) {
  for (int64_t base = lo; base < hi; base += static_cast<int64_t>(kVec) * blockDim.x) {
    float z[kVec], u[kVec];
    int n_in = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      const bool in = i < hi;
      z[k] = in ? to_float(zr[i]) : -INFINITY;
      u[k] = in ? to_float(ur[i]) : -INFINITY;
      n_in += in;
    }
    visit(z, u, n_in);
  }
}

// Visit a whole row, each thread its share: 16-byte vectors over the part where z and u are
// both aligned (kUnroll vector steps in flight per thread), the rest scalar.
template <class Tz, class Tu, class Visit>
__device__ __forceinline__ void visit_row(const Tz* zr, const Tu* ur, int64_t V, Visit& visit) {
  const void* const ptrs[2] = {zr, ur};
  const int sizes[2] = {static_cast<int>(sizeof(Tz)), static_cast<int>(sizeof(Tu))};
  const int h = vector_head(ptrs, sizes);
  if (h < 0) {
    visit_scalar_range(zr, ur, 0, V, visit);
    return;
  }
  const int64_t head = h < V ? h : V;
  const int64_t n_vec = (V - head) / kVec;        // aligned 8-element steps after the head
  visit_scalar_range(zr, ur, 0, head, visit);
  const Tz* zb = zr + head;
  const Tu* ub = ur + head;
  for (int64_t c0 = threadIdx.x; c0 < n_vec; c0 += static_cast<int64_t>(kUnroll) * blockDim.x) {
    float z[kUnroll][kVec], u[kUnroll][kVec];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {   // all loads first: kUnroll * 32 B in flight
      const int64_t c = c0 + static_cast<int64_t>(j) * blockDim.x;
      if (c < n_vec) {
        load8(zb + c * kVec, z[j]);
        load8(ub + c * kVec, u[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      if (c0 + static_cast<int64_t>(j) * blockDim.x < n_vec) visit(z[j], u[j], kVec);
  }
  visit_scalar_range(zr, ur, head + n_vec * kVec, V, visit);
}

// ---------------------------------------------------------------------------------------------
// Forward

using FwdState = math::FwdState<float>;

// Pass 1: fold kVec elements into the thread's state (sum_z over the n_in in-range lanes).
struct FwdVisit {
  FwdState st;
  math::FwdParams<float> p;
  bool smooth;
  __device__ __forceinline__ void operator()(const float (&z)[kVec], const float (&u)[kVec],
                                             int n_in) {
    if (smooth) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) st.sum_z += i < n_in ? z[i] : 0.f;
    }
    math::fwd_fold<kVec>(st, z, u, p);
  }
};

// JSD pass 2: the thread's sums of p (lp - lm) and q (lq - lm) (base 2; masked lanes add 0).
struct JsdSums {
  float tp, tq;
  __device__ __forceinline__ static JsdSums identity() { return {0.f, 0.f}; }
  __device__ __forceinline__ static JsdSums merge(const JsdSums& x, const JsdSums& y) {
    return {x.tp + y.tp, x.tq + y.tq};
  }
};

__device__ __forceinline__ JsdSums shfl_xor(const JsdSums& x, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, x.tp, lane_mask),
          __shfl_xor_sync(0xffffffffu, x.tq, lane_mask)};
}

struct JsdVisit {
  JsdSums sums;
  math::JsdParams<float> j;
  __device__ __forceinline__ void operator()(const float (&z)[kVec], const float (&u)[kVec],
                                             int) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float tp, tq;
      math::jsd_terms(z[i], u[i], j, tp, tq);
      sums.tp += tp;
      sums.tq += tq;
    }
  }
};

__device__ __forceinline__ void fwd_store(const math::FwdResult<float>& r, int64_t row,
                                          const HrmLossFwdArgs& a) {
  a.loss[row] = r.loss;
  a.ce[row] = r.ce;
  a.div[row] = r.div;
  a.entropy[row] = r.entropy;
#pragma unroll
  for (int k = 0; k < 5; ++k) a.stats[5 * row + k] = r.stats[k];
}

__device__ __forceinline__ void fwd_store_zeros(int64_t row, const HrmLossFwdArgs& a) {
  a.loss[row] = a.ce[row] = a.div[row] = a.entropy[row] = 0.f;
#pragma unroll
  for (int k = 0; k < 5; ++k) a.stats[5 * row + k] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// Backward

using BwdRow = math::BwdRow<float>;

// ---------------------------------------------------------------------------------------------
// Host helpers

// Threads per block: enough for kVec * kUnroll elements each, a power of two in [32, 256].
inline int threads_for(int64_t V) {
  const int64_t need = (V + kVec * kUnroll - 1) / (kVec * kUnroll);
  int t = 32;
  while (t < need && t < kMaxThreads) t *= 2;
  return t;
}

// F<Tz, Tu>::run(a, extra) for the dtype pair at run time: 3 x 3 instantiations.
template <template <class, class> class F, class Args, class Extra>
inline cudaError_t dispatch(DType dz, DType du, const Args& a, Extra extra) {
  auto on_u = [&](auto z_tag) -> cudaError_t {
    using Tz = decltype(z_tag);
    switch (du) {
      case DType::kFloat32: return F<Tz, float>::run(a, extra);
      case DType::kBFloat16: return F<Tz, __nv_bfloat16>::run(a, extra);
      case DType::kFloat16: return F<Tz, __half>::run(a, extra);
    }
    return cudaErrorInvalidValue;
  };
  switch (dz) {
    case DType::kFloat32: return on_u(float{});
    case DType::kBFloat16: return on_u(__nv_bfloat16{});
    case DType::kFloat16: return on_u(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace device
}  // namespace hrmkernels
