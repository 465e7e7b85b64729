// Fused HRM loss, forward and backward, in CUDA C++: CUDA toolkit headers only (no torch).
//
// The math (the divergences that beta chooses, the online state, the row epilogues and the
// per-element gradient) is derived in csrc/hrm_loss_math.h, shared with the CPU kernels. Here:
//
// Forward (one block per row). The KL (beta 0 or 1): ONE read of z and u, folding three online
// log-sum-exps, the entropy sum and the KL's weighted sum; the KL follows without a second read.
// The JSD (0 < beta < 1): a second read, for kl_pm and kl_qm once the log-sum-exps are known.
// A label outside [0, V) is never dereferenced: its CE and loss are NaN. Rows whose label is
// ignore_index store 0 for every output and stat, and read nothing else.
//
// Backward (grid over (row, V-block), one more read of z and u): dz (and du) per element from
// the stats (lse_z, lse_a, lse_b, mu or kl_qm, kl_pm) and the row's incoming gradient g.
// Ignored rows write an exact 0 without reading z, u or g. hrm == 0 writes du = 0.
//
// Bytes per element (bf16 in, bf16 out): forward reads z and u (4 B; JSD 8 B); backward reads
// them again and writes dz (6 B; 8 B with du): 10 B per element for the KL's forward +
// backward. Per row: a label, loss, CE, D, entropy and 5 stats (40 B), and the incoming gradient.
//
// Loads: 16-byte vectors (8 elements: one load for 2-byte types, two for fp32) over the part of
// a row where every tensor involved is 16-byte aligned. A row whose start is misaligned gets a
// scalar head of h < 8 elements first, when one h aligns all tensors at once (true for
// contiguous tensors, whatever V); the rest (< 8 elements) is a scalar tail. Rows with no such h
// (e.g. different misalignments of z and u) run fully scalar, still coalesced across a warp.
// All offsets are int64 (N * V exceeds 2**31 at N = 16k, V = 128k).
//
// Shared device code (loads, the row traversal, the stores) is in hrm_loss_device.cuh.
#include <cuda_runtime.h>

#include <cstdint>

#include "hrm_loss_device.cuh"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace {

using namespace device;

// ---------------------------------------------------------------------------------------------
// Forward

// grid = (N,), block = threads_for(V) (a multiple of 32, at most kMaxThreads): one row per block.
template <class Tz, class Tu>
__global__ void __launch_bounds__(kMaxThreads) hrm_loss_fwd_kernel(const HrmLossFwdArgs args) {
  __shared__ FwdState smem[kMaxWarps + 1];
  const HrmLossOptions& o = args.opt;
  const int64_t row = blockIdx.x;
  const int64_t y = load_label(args.labels, args.labels_stride, args.labels_int64, row);
  if (y == o.ignore_index) {
    if (threadIdx.x == 0) fwd_store_zeros(row, args);
    return;
  }
  const int64_t V = args.V;
  const Tz* zr = row_ptr<Tz>(args.z, row / args.S, row % args.S);
  const Tu* ur = row_ptr<Tu>(args.u, row / args.S, row % args.S);

  FwdVisit pass1{FwdState::identity(), math::fwd_params(o), o.label_smoothing > 0.f};
  visit_row(zr, ur, V, pass1);
  const FwdState st = block_allreduce(pass1.st, smem);   // every thread gets the row's state

  const bool valid = y >= 0 && y < V;   // an out-of-range label is never dereferenced
  const float z_y = threadIdx.x == 0 && valid ? to_float(zr[valid ? y : 0]) : NAN;
  math::FwdResult<float> res = math::fwd_finish(st, o, V, z_y);
  if (math::div_kind(o) == math::Div::kJsd) {   // pass 2, with the log-sum-exps known
    __shared__ JsdSums jsd_smem[kMaxWarps + 1];
    JsdVisit pass2{JsdSums::identity(), math::jsd_params(o, res.stats[1], res.stats[2])};
    visit_row(zr, ur, V, pass2);
    const JsdSums sums = block_allreduce(pass2.sums, jsd_smem);
    math::jsd_finish(res, o, sums.tp, sums.tq);
  }
  if (threadIdx.x == 0) fwd_store(res, row, args);
}

// ---------------------------------------------------------------------------------------------
// Backward

// Elements [lo, hi) of one row, scalar: kVec per thread per step, all loaded before any store
// (dz may alias z). Ignored rows (!active) store 0 without loading.
template <class Tz, class Tu>
__device__ __forceinline__ void bwd_scalar_range(const BwdRow& r, bool active, const Tz* zr,
                                                 const Tu* ur, Tz* dzr, Tu* dur, int64_t lo,
                                                 int64_t hi) {
#pragma unroll 1
  for (int64_t base = lo + threadIdx.x; base < hi; base += static_cast<int64_t>(kVec) * blockDim.x) {
    float z[kVec], u[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * blockDim.x;
      const bool in = active && i < hi;
      z[k] = in ? to_float(zr[i]) : 0.f;
      u[k] = in && r.has_div ? to_float(ur[i]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * blockDim.x;
      if (i < hi) {
        float dz = 0.f, du = 0.f;
        if (active) math::grad_elem(r, z[k], u[k], i, dz, du);
        dzr[i] = from_float<Tz>(dz);
        if (dur != nullptr) dur[i] = from_float<Tu>(du);
      }
    }
  }
}

// grid = (N * blocks_per_row,), block = threads_for(V); block (row, j) owns the elements
// [j * P, (j + 1) * P) of its row, P = kVec * kUnroll * blockDim (in the vector case: the
// 8-element steps j * P / 8 ... after the head; block 0 also does the head and the tail).
// Every element is read and written by one thread, so dz may alias z (in-place backward).
template <class Tz, class Tu>
__global__ void __launch_bounds__(kMaxThreads)
    hrm_loss_bwd_kernel(const HrmLossBwdArgs args, int64_t blocks_per_row) {
  const HrmLossOptions& o = args.opt;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / blocks_per_row;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) % blocks_per_row;
  const int64_t V = args.V;
  const int64_t rb = row / args.S, rs = row % args.S;
  const Tz* zr = row_ptr<Tz>(args.z, rb, rs);
  const Tu* ur = row_ptr<Tu>(args.u, rb, rs);
  Tz* dzr = static_cast<Tz*>(args.dz) + rb * args.dz_stride_b + rs * args.dz_stride_s;
  Tu* dur = args.du == nullptr
                ? nullptr
                : static_cast<Tu*>(args.du) + rb * args.du_stride_b + rs * args.du_stride_s;

  const int64_t y = load_label(args.labels, args.labels_stride, args.labels_int64, row);
  const bool active = y != o.ignore_index;   // ignored rows store zeros and read nothing else
  const BwdRow r = active ? math::make_bwd_row(o, V, y, args.grad[row * args.grad_stride],
                                               args.stats + 5 * row)
                          : BwdRow{};

  constexpr int kPer = kVec * kUnroll;
  const int64_t per_block = static_cast<int64_t>(kPer) * blockDim.x;
  const void* const ptrs[4] = {zr, ur, dzr, dur};
  const int sizes[4] = {static_cast<int>(sizeof(Tz)), static_cast<int>(sizeof(Tu)),
                        static_cast<int>(sizeof(Tz)), static_cast<int>(sizeof(Tu))};
  const int h = vector_head(ptrs, sizes);
  if (h < 0) {
    const int64_t lo = blk * per_block;
    bwd_scalar_range(r, active, zr, ur, dzr, dur, lo, lo + per_block < V ? lo + per_block : V);
    return;
  }
  const int64_t head = h < V ? h : V;
  const int64_t n_vec = (V - head) / kVec;
  const int64_t body_end = head + n_vec * kVec;
  if (blk == 0) {
    bwd_scalar_range(r, active, zr, ur, dzr, dur, 0, head);
    bwd_scalar_range(r, active, zr, ur, dzr, dur, body_end, V);
  }
  const int64_t c_lo = blk * kUnroll * blockDim.x;   // first 8-element step of this block
  float z[kUnroll][kVec], u[kUnroll][kVec];
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const int64_t c = c_lo + static_cast<int64_t>(j) * blockDim.x + threadIdx.x;
    if (active && c < n_vec) {
      load8(zr + head + c * kVec, z[j]);
      if (r.has_div) load8(ur + head + c * kVec, u[j]);
      else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) u[j][i] = 0.f;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const int64_t c = c_lo + static_cast<int64_t>(j) * blockDim.x + threadIdx.x;
    if (c >= n_vec) continue;
    const int64_t col0 = head + c * kVec;
    float dz[kVec], du[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      dz[i] = du[i] = 0.f;
      if (active) math::grad_elem(r, z[j][i], u[j][i], col0 + i, dz[i], du[i]);
    }
    store8(dzr + col0, dz);
    if (dur != nullptr) store8(dur + col0, du);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

template <class Tz, class Tu>
cudaError_t fwd_typed(const HrmLossFwdArgs& a, cudaStream_t stream) {
  const int64_t n = a.B * a.S;
  if (n > INT32_MAX) return cudaErrorInvalidValue;   // grid.x limit: 2**31 - 1 rows
  hrm_loss_fwd_kernel<Tz, Tu><<<static_cast<unsigned>(n), threads_for(a.V), 0, stream>>>(a);
  return cudaGetLastError();
}

template <class Tz, class Tu>
cudaError_t bwd_typed(const HrmLossBwdArgs& a, cudaStream_t stream) {
  const int64_t n = a.B * a.S;
  const int threads = threads_for(a.V);
  const int64_t per_block = static_cast<int64_t>(kVec) * kUnroll * threads;
  const int64_t blocks_per_row = (a.V + per_block - 1) / per_block;
  if (n > INT32_MAX / blocks_per_row) return cudaErrorInvalidValue;
  hrm_loss_bwd_kernel<Tz, Tu>
      <<<static_cast<unsigned>(n * blocks_per_row), threads, 0, stream>>>(a, blocks_per_row);
  return cudaGetLastError();
}

template <class Tz, class Tu> struct FwdLaunch {
  static cudaError_t run(const HrmLossFwdArgs& a, cudaStream_t s) { return fwd_typed<Tz, Tu>(a, s); }
};
template <class Tz, class Tu> struct BwdLaunch {
  static cudaError_t run(const HrmLossBwdArgs& a, cudaStream_t s) { return bwd_typed<Tz, Tu>(a, s); }
};

}  // namespace

cudaError_t hrm_loss_fwd_launch(const HrmLossFwdArgs& args, cudaStream_t stream) {
  if (args.B * args.S == 0) return cudaSuccess;
  if (args.V <= 0 || args.S <= 0) return cudaErrorInvalidValue;
  return dispatch<FwdLaunch>(args.z.dtype, args.u.dtype, args, stream);
}

cudaError_t hrm_loss_bwd_launch(const HrmLossBwdArgs& args, cudaStream_t stream) {
  if (args.B * args.S == 0) return cudaSuccess;
  if (args.V <= 0 || args.S <= 0) return cudaErrorInvalidValue;
  return dispatch<BwdLaunch>(args.z.dtype, args.u.dtype, args, stream);
}

}  // namespace hrmkernels
