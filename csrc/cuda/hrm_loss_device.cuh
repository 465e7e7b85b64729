// Device code shared by the kernels (hrm_loss_kernels.cu, hrm_loss_cluster.cu): element access,
// the forward's online state and fold, the row outputs, and the backward's per-element gradient.
// The math is written out at the top of hrm_loss_kernels.cu. CUDA toolkit headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "hrm_loss_kernels.h"
#include "reduce.cuh"

namespace hrmkernels {
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
// Forward

// The per-thread (then per-block) state of the forward: online lse of z, a = z/T, b = u/T
// (base 2), with the KL's weighted sum in b.t (forward KL, w = u - z) or a.t (reverse KL,
// w = z - u), raw logit units (mu = t / s / T); and sum_v z_v for label smoothing.
struct FwdState {
  OnlineLse z, a, b;
  float sum_z;

  __device__ __forceinline__ static FwdState identity() {
    return {OnlineLse::identity(), OnlineLse::identity(), OnlineLse::identity(), 0.f};
  }
  __device__ __forceinline__ static FwdState merge(const FwdState& x, const FwdState& y) {
    return {OnlineLse::merge(x.z, y.z), OnlineLse::merge(x.a, y.a), OnlineLse::merge(x.b, y.b),
            x.sum_z + y.sum_z};
  }
  __device__ __forceinline__ FwdState shfl_xor(int lane_mask) const {
    return {z.shfl_xor(lane_mask), a.shfl_xor(lane_mask), b.shfl_xor(lane_mask),
            __shfl_xor_sync(0xffffffffu, sum_z, lane_mask)};
  }
};

// Fold 8 values x (base 2) into st; kWeighted also adds 2^(x - m) * w to st.t. A term with
// x = -inf (zero probability) is 0; one with x finite and w = +inf (the other distribution is
// 0 there) is +inf, the true KL, even when 2^(x - m) underflows.
template <bool kWeighted>
__device__ __forceinline__ void fold8(OnlineLse& st, const float (&x)[kVec], const float (&w)[kVec]) {
  float mx = x[0];
#pragma unroll
  for (int i = 1; i < kVec; ++i) mx = fmaxf(mx, x[i]);
  const float m = fmaxf(st.m, mx);
  const float ms = finite_or_zero_max(m);
  float s = 0.f, t = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float e = fast_exp2(x[i] - ms);
    s += e;
    if (kWeighted) t += x[i] == -INFINITY ? 0.f : (w[i] == INFINITY ? INFINITY : e * w[i]);
  }
  const float alpha = fast_exp2(st.m - ms);  // 0 when st.m == -inf: st.s and st.t are 0 then
  st.s = fmaf(st.s, alpha, s);
  if (kWeighted) st.t = rescale_add(st.t, alpha, t);
  st.m = m;
}

// Fold 8 elements of z and u (natural units, masked entries -inf) into the thread's state.
// ka = log2(e) / T. With T == 1, a = z: the a stream is not kept (copied from z at the end) and
// the reverse KL's weighted sum rides on the z stream.
__device__ __forceinline__ void fwd_accumulate(FwdState& st, const float (&z)[kVec],
                                               const float (&u)[kVec], float ka, bool unit_t,
                                               bool reverse) {
  float z2[kVec], a2[kVec], b2[kVec], w[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    z2[i] = z[i] * kLog2e;
    a2[i] = unit_t ? z2[i] : z[i] * ka;
    b2[i] = u[i] * ka;
    w[i] = reverse ? z[i] - u[i] : u[i] - z[i];
  }
  if (unit_t) {
    if (reverse) fold8<true>(st.z, z2, w); else fold8<false>(st.z, z2, w);
  } else {
    fold8<false>(st.z, z2, w);
    if (reverse) fold8<true>(st.a, a2, w); else fold8<false>(st.a, a2, w);
  }
  if (reverse) fold8<false>(st.b, b2, w); else fold8<true>(st.b, b2, w);
}

// The row's outputs from its fully merged state; z_y is NaN for a label outside [0, V).
struct FwdResult {
  float loss, ce, kl, lse_z, lse_a, lse_b, mu;
};

__device__ __forceinline__ FwdResult fwd_finish(FwdState st, const HrmLossOptions& o, int64_t V,
                                                float z_y) {
  if (o.temperature == 1.f) st.a = st.z;   // T == 1: the a stream rode on the z stream
  FwdResult r;
  r.lse_z = st.z.lse();
  r.lse_a = st.a.lse();
  r.lse_b = st.b.lse();
  const float inv_t = 1.f / o.temperature;
  r.mu = o.reverse ? st.a.t / st.a.s * inv_t : st.b.t / st.b.s * inv_t;
  const float kl = o.reverse ? r.mu + r.lse_b - r.lse_a : r.mu + r.lse_a - r.lse_b;
  r.kl = kl < 0.f ? 0.f : kl;  // NaN passes through
  const float eps = o.label_smoothing;
  r.ce = eps > 0.f ? r.lse_z - (1.f - eps) * z_y - eps * st.sum_z / static_cast<float>(V)
                   : r.lse_z - z_y;
  r.loss = o.hrm > 0.f ? r.ce + o.hrm * r.kl : r.ce;   // hrm == 0 drops the KL, even +inf
  return r;
}

__device__ __forceinline__ void fwd_store(const FwdResult& r, int64_t row, float* loss, float* ce,
                                          float* kl, float* stats) {
  loss[row] = r.loss;
  ce[row] = r.ce;
  kl[row] = r.kl;
  stats[4 * row] = r.lse_z;
  stats[4 * row + 1] = r.lse_a;
  stats[4 * row + 2] = r.lse_b;
  stats[4 * row + 3] = r.mu;
}

__device__ __forceinline__ void fwd_store_zeros(int64_t row, float* loss, float* ce, float* kl,
                                                float* stats) {
  loss[row] = ce[row] = kl[row] = 0.f;
  stats[4 * row] = stats[4 * row + 1] = stats[4 * row + 2] = stats[4 * row + 3] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// Backward

// Per-row constants of the backward, base-2 lse's (l*2 = lse * log2 e).
struct BwdRow {
  float g, lz2, la2, lb2, mu, ka, inv_t, c, eps_v, one_m_eps;
  int64_t y;
  bool has_kl, reverse, unit_t;
};

__device__ __forceinline__ void grad_elem(const BwdRow& r, float z, float u, int64_t col,
                                          float& dz, float& du) {
  const float lsm2 = z * kLog2e - r.lz2;   // log2 sm
  const float sm = fast_exp2(lsm2);
  float d = sm - r.eps_v;
  if (col == r.y) d -= r.one_m_eps;
  float e = 0.f;                           // hrm == 0: the teacher gets an exact 0 gradient
  if (r.has_kl) {
    const float q = r.unit_t ? sm : fast_exp2(z * r.ka - r.la2);
    const float p = fast_exp2(u * r.ka - r.lb2);
    const float b_minus_a = (u - z) * r.inv_t;
    if (r.reverse) {
      d += r.c * (q > 0.f ? q * (-b_minus_a - r.mu) : 0.f);
      e = r.c * (p - q);
    } else {
      d += r.c * (q - p);
      e = r.c * (p > 0.f ? p * (b_minus_a - r.mu) : 0.f);
    }
  }
  dz = r.g * d;
  du = r.g * e;
}

// The backward's constants for a row: g, and the forward's stats (lse_z, lse_a, lse_b, mu).
__device__ __forceinline__ BwdRow make_bwd_row(const HrmLossOptions& o, int64_t V, int64_t y,
                                               float g, float lse_z, float lse_a, float lse_b,
                                               float mu) {
  BwdRow r;
  const float inv_t = 1.f / o.temperature;
  r.g = g;
  r.lz2 = lse_z * kLog2e;
  r.la2 = lse_a * kLog2e;
  r.lb2 = lse_b * kLog2e;
  r.mu = mu;
  r.ka = kLog2e * inv_t;
  r.inv_t = inv_t;
  r.c = o.hrm * inv_t;
  r.eps_v = o.label_smoothing / static_cast<float>(V);
  r.one_m_eps = 1.f - o.label_smoothing;
  r.y = y;
  r.has_kl = o.hrm > 0.f;
  r.reverse = o.reverse;
  r.unit_t = o.temperature == 1.f;
  return r;
}

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
