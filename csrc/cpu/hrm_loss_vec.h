// What the CPU kernels of the fused HRM loss (hrm_loss_fwd.cpp, hrm_loss_bwd.cpp) share: row
// access, the staging of a block of logits as F, horizontal reductions, the prefetch of the next
// block, the floating-point mode, and how rows are spread over threads.
//
// Rows go to threads through at::parallel_for (at least kGrainElements elements per task). A
// row is processed in blocks of kBlock elements that stay in L1; each block of z and u is
// "staged" as F (float, or double for float64 inputs): read in place when the dtype is F, else
// converted into a buffer (bf16 / fp16 -> fp32, a vector at a time). The math on a block is
// vectorised with at::vec::Vectorized<F> (16 fp32 lanes with AVX-512, 8 with AVX2; SLEEF's
// exp2), and the shared scalar math (csrc/hrm_loss_math.h) takes a row's tail of fewer than a
// vector's width, the label's element, and the row epilogues.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <xmmintrin.h>
#endif

#include "../hrm_loss_math.h"

namespace hrmkernels {
namespace cpu {

template <class F> using Vec = at::vec::Vectorized<F>;

constexpr int64_t kBlock = 1024;            // elements per block: 4 buffers of 4 KB (fp32) in L1
constexpr int64_t kGrainElements = 1 << 15; // a thread's smallest share of the work

// ---------------------------------------------------------------------------------------------
// Element access

// A (B, S, V) row view: row r starts at data + ((r / S) * sb + (r % S) * ss) elements.
struct Rows {
  char* data;
  int64_t sb, ss, S, elem;
  at::ScalarType dtype;

  explicit Rows(const at::Tensor& t)
      : data(static_cast<char*>(t.data_ptr())), sb(t.stride(0)), ss(t.stride(1)), S(t.size(1)),
        elem(t.element_size()), dtype(t.scalar_type()) {}
  char* row(int64_t r) const { return data + ((r / S) * sb + (r % S) * ss) * elem; }
};

// Elements [0, n) of src (dtype T) as F: src itself when T is F, else converted into buf.
template <class F, class T>
const F* stage(const char* src, int64_t n, F* buf) {
  const T* s = reinterpret_cast<const T*>(src);
  if constexpr (std::is_same_v<T, F>) {
    return s;
  } else {
    int64_t i = 0;
    if constexpr (std::is_same_v<F, float> && c10::is_reduced_floating_point_v<T>) {
      for (; i + Vec<float>::size() <= n; i += Vec<float>::size()) {
        Vec<float> v;
        at::vec::load_to_float(s + i, v);
        v.store(buf + i);
      }
    }
    for (; i < n; ++i) buf[i] = static_cast<F>(static_cast<float>(s[i]));
    return buf;
  }
}

// Elements [0, n) of src (F) stored into dst as T.
template <class F, class T>
void unstage(const F* src, int64_t n, char* dst) {
  T* d = reinterpret_cast<T*>(dst);
  int64_t i = 0;
  if constexpr (std::is_same_v<F, float> && c10::is_reduced_floating_point_v<T>) {
    constexpr int64_t W = Vec<float>::size();
    for (; i + 2 * W <= n; i += 2 * W)
      at::vec::convert_from_float<T>(Vec<float>::loadu(src + i), Vec<float>::loadu(src + i + W))
          .store(d + i);
  }
  for (; i < n; ++i) d[i] = static_cast<T>(src[i]);
}

// A vector stored past the caches (a non-temporal store: no read for ownership of its lines),
// for a gradient written once and not read again before the backward; p aligned to the vector
// (kNtAlign bytes). The caller fences (sfence) before its results are read elsewhere. fp32 /
// fp64 gradients only: bf16 through non-temporal stores measured 5% slower than plain ones.
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kNtAlign = 64;
inline void store_nt(const Vec<float>& v, float* p) { _mm512_stream_ps(p, v); }
inline void store_nt(const Vec<double>& v, double* p) { _mm512_stream_pd(p, v); }
inline void fence_nt() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr uintptr_t kNtAlign = 32;
inline void store_nt(const Vec<float>& v, float* p) { _mm256_stream_ps(p, v); }
inline void store_nt(const Vec<double>& v, double* p) { _mm256_stream_pd(p, v); }
inline void fence_nt() { _mm_sfence(); }
#else
constexpr uintptr_t kNtAlign = 0;   // never aligned enough: plain stores
template <class T> void store_nt(const Vec<T>& v, T* p) { v.store(p); }
inline void fence_nt() {}
#endif

inline bool nt_aligned(const void* p) {
  return kNtAlign != 0 && reinterpret_cast<uintptr_t>(p) % kNtAlign == 0;
}

template <class F> using StageFn = const F* (*)(const char*, int64_t, F*);
template <class F> using UnstageFn = void (*)(const F*, int64_t, char*);

template <class F> StageFn<F> stage_fn(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return stage<F, float>;
    case at::kBFloat16: return stage<F, c10::BFloat16>;
    case at::kHalf: return stage<F, c10::Half>;
    default: return stage<F, double>;   // float64 (F is double then; the binding checks dtypes)
  }
}

template <class F> UnstageFn<F> unstage_fn(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return unstage<F, float>;
    case at::kBFloat16: return unstage<F, c10::BFloat16>;
    case at::kHalf: return unstage<F, c10::Half>;
    default: return unstage<F, double>;
  }
}

template <class F> F load_elem(const Rows& t, int64_t r, int64_t col) {
  F x;
  return *stage_fn<F>(t.dtype)(t.row(r) + col * t.elem, 1, &x);
}

inline int64_t load_label(const at::Tensor& labels, int64_t r) {
  const int64_t i = r * labels.stride(0);
  return labels.scalar_type() == at::kLong ? labels.const_data_ptr<int64_t>()[i]
                                           : labels.const_data_ptr<int32_t>()[i];
}

template <class F> F hsum(const Vec<F>& v) {
  alignas(64) F x[Vec<F>::size()];
  v.store(x);
  F s = 0;
  for (int i = 0; i < Vec<F>::size(); ++i) s += x[i];
  return s;
}

template <class F> F hmax(const Vec<F>& v) {
  alignas(64) F x[Vec<F>::size()];
  v.store(x);
  F m = x[0];
  for (int i = 1; i < Vec<F>::size(); ++i) m = math::max(m, x[i]);
  return m;
}

// The next block of z and u, prefetched while this one computes: staging a block and its max
// pass read memory, the exp2 pass does not, so without this the two would not overlap.
struct Ahead {
  const char *z, *u;
  int64_t z_elem, u_elem;
  void operator()(int64_t i) const {   // at element i of the current block
    __builtin_prefetch(z + i * z_elem);
    __builtin_prefetch(u + i * u_elem);
  }
};

// Denormal results of exp2 (a probability below 2^-126 of the row's largest, common with peaked
// distributions) cost microcode assists on x86: measured 3x the time of the whole kernel at
// logits of scale 30. They are below 1e-38 of the sums, and the GPU's ex2.approx.ftz flushes
// them too, so each task runs with flush-to-zero and denormals-are-zero, restored after.
class FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
 public:
  FlushDenormals() : csr_(_mm_getcsr()) { _mm_setcsr(csr_ | 0x8040); }   // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(csr_); }

 private:
  unsigned csr_;
#endif
};

// Rows per at::parallel_for task: at least kGrainElements elements.
inline int64_t grain(int64_t V) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(V, 1));
}

}  // namespace cpu
}  // namespace hrmkernels
