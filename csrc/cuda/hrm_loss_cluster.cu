// Hopper (sm_90+): forward and backward of the fused HRM loss in one kernel that keeps a whole
// row of z and u on chip, split across a thread-block cluster. CUDA toolkit headers only.
//
// The KL (beta 0 or 1) only; the math is hrm_loss_math.h's. The two-kernel path reads z and u
// twice: forward 4 B + backward 6 B = 10 B per element (bf16, no teacher gradient). Here the row's
// slice of each CTA stays in its shared memory between the two phases, so the kernel reads
// z and u once and writes dz once: 6 B per element (8 B with du), the minimum. It needs each
// row's gradient g_r before the forward has run (the caller knows it when the loss is the final
// objective: 1 for "sum", 1 / n for "mean").
//
//   phase 1  each CTA loads its slice (16-byte vectors) into shared memory and folds it into
//            the online state (3 log-sum-exps, the entropy and KL sums, sum z)
//   phase 2  block reduction, then the C partial states are merged through distributed shared
//            memory (cluster.map_shared_rank), identically in every CTA
//   phase 3  rank 0 stores loss, CE, KL, entropy and the stats; every CTA derives lse's and mu
//   phase 4  each CTA writes dz (and du) for its slice from shared memory
//
// Cluster size C: the smallest power of two giving at most kSmemTarget bytes of logits per CTA
// (C <= 16; 16 is a non-portable size), e.g. bf16/bf16 V = 128256 -> C = 8 (64 KB per CTA),
// V = 262144 -> C = 16. Used when every row of z, u, dz, du starts 16-byte aligned and
// V % 8 == 0 (the common vocabularies); otherwise, for the JSD (whose second pass this kernel
// does not have), before sm_90, or if the device cannot schedule such a cluster, the launcher
// runs the portable forward and backward kernels.
//
// In place (dz aliasing z) is safe: a CTA reads its whole slice in phase 1 and writes it in
// phase 4, after two cluster barriers; the label's logit z_y is read by rank 0 in phase 1.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "hrm_loss_device.cuh"
#include "hrm_loss_kernels.h"

namespace hrmkernels {
namespace {

using namespace device;
namespace cg = cooperative_groups;

constexpr int kClusterThreads = 256;
constexpr int kMaxCluster = 16;
constexpr int64_t kSmemTarget = 96 * 1024;    // bytes of logits (z and u) per CTA to aim for
constexpr int64_t kSmemMax = 200 * 1024;      // and at most (227 KB per block on H100)

// Eight elements as raw 16-byte words (one for 2-byte types, two for fp32).
template <class T> struct Raw8 { uint4 w[sizeof(T) / 2]; };

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900   // used by the sm_90 kernel body only

template <class T>
__device__ __forceinline__ Raw8<T> load_global_raw8(const T* p) {   // streaming, evict-first
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i)
    r.w[i] = __ldcs(reinterpret_cast<const uint4*>(p) + i);
  return r;
}

template <class T>
__device__ __forceinline__ Raw8<T> load_shared_raw8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i) r.w[i] = reinterpret_cast<const uint4*>(p)[i];
  return r;
}

template <class T>
__device__ __forceinline__ void store_shared_raw8(T* p, const Raw8<T>& r) {
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i) reinterpret_cast<uint4*>(p)[i] = r.w[i];
}

__device__ __forceinline__ void unpack8(const Raw8<float>& r, float (&x)[kVec]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    x[4 * i] = __uint_as_float(r.w[i].x);
    x[4 * i + 1] = __uint_as_float(r.w[i].y);
    x[4 * i + 2] = __uint_as_float(r.w[i].z);
    x[4 * i + 3] = __uint_as_float(r.w[i].w);
  }
}

__device__ __forceinline__ void unpack8(const Raw8<__nv_bfloat16>& r, float (&x)[kVec]) {
  const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {   // bf16 is the top half of an fp32: exact by shifting
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack8(const Raw8<__half>& r, float (&x)[kVec]) {
  const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
#endif

// grid = (N * C,), cluster = (C,), block = kClusterThreads, dynamic shared memory
// chunks_per_cta * 8 * (sizeof(Tz) + sizeof(Tu)). CTA `rank` of row blockIdx.x / C owns the
// elements [rank * chunks_per_cta * 8, (rank + 1) * chunks_per_cta * 8) of the row (clipped at V).
template <class Tz, class Tu>
__global__ void __launch_bounds__(kClusterThreads)
    hrm_loss_cluster_kernel(const HrmLossFwdBwdArgs args, int64_t chunks_per_cta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ FwdState red[kMaxWarps + 1];
  __shared__ FwdState cta_state;   // this CTA's partial state, read by the cluster via DSMEM
  __shared__ FwdState row_state;   // the merged state of the whole row
  __shared__ float z_y_shared;     // rank 0: the label's logit (NaN for a label outside [0, V))

  cg::cluster_group cluster = cg::this_cluster();
  const int n_ctas = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const HrmLossFwdArgs& f = args.fwd;
  const HrmLossOptions& o = f.opt;
  const int64_t V = f.V;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / n_ctas;
  const int64_t rb = row / f.S, rs = row % f.S;
  const Tz* zr = row_ptr<Tz>(f.z, rb, rs);
  const Tu* ur = row_ptr<Tu>(f.u, rb, rs);
  Tz* dzr = static_cast<Tz*>(args.dz) + rb * args.dz_stride_b + rs * args.dz_stride_s;
  Tu* dur = args.du == nullptr
                ? nullptr
                : static_cast<Tu*>(args.du) + rb * args.du_stride_b + rs * args.du_stride_s;
  const int64_t lo_unclipped = rank * chunks_per_cta * kVec;
  const int64_t lo = lo_unclipped < V ? lo_unclipped : V;
  const int64_t hi = lo + chunks_per_cta * kVec < V ? lo + chunks_per_cta * kVec : V;
  const int64_t n_chunks = (hi - lo) / kVec;                 // V % 8 == 0: no tail
  Tz* zs = reinterpret_cast<Tz*>(smem_raw);
  Tu* us = reinterpret_cast<Tu*>(smem_raw + chunks_per_cta * kVec * sizeof(Tz));

  const int64_t y = load_label(f.labels, f.labels_stride, f.labels_int64, row);
  if (y == o.ignore_index) {   // the whole cluster takes this branch: no barrier is skipped
    const float zeros[kVec] = {};
    for (int64_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
      store8(dzr + lo + c * kVec, zeros);
      if (dur != nullptr) store8(dur + lo + c * kVec, zeros);
    }
    if (rank == 0 && threadIdx.x == 0) fwd_store_zeros(row, f);
    return;
  }

  // Phase 1: load the slice into shared memory and fold it into this thread's state.
  if (rank == 0 && threadIdx.x == 0) {   // before any CTA can write dz (which may alias z)
    const bool valid = y >= 0 && y < V;
    z_y_shared = valid ? to_float(zr[valid ? y : 0]) : NAN;
  }
  FwdVisit fold{FwdState::identity(), math::fwd_params(o), o.label_smoothing > 0.f};
  for (int64_t c0 = threadIdx.x; c0 < n_chunks; c0 += static_cast<int64_t>(kUnroll) * blockDim.x) {
    Raw8<Tz> rz[kUnroll];
    Raw8<Tu> ru[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {   // all loads first: kUnroll * 32 B in flight
      const int64_t c = c0 + static_cast<int64_t>(j) * blockDim.x;
      if (c < n_chunks) {
        rz[j] = load_global_raw8(zr + lo + c * kVec);
        ru[j] = load_global_raw8(ur + lo + c * kVec);
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t c = c0 + static_cast<int64_t>(j) * blockDim.x;
      if (c >= n_chunks) break;
      store_shared_raw8(zs + c * kVec, rz[j]);
      store_shared_raw8(us + c * kVec, ru[j]);
      float z[kVec], u[kVec];
      unpack8(rz[j], z);
      unpack8(ru[j], u);
      fold(z, u, kVec);
    }
  }

  // Phase 2: merge the block's states, then the cluster's, in rank order in every CTA.
  const FwdState st = block_allreduce(fold.st, red);
  if (threadIdx.x == 0) cta_state = st;
  cluster.sync();   // every CTA's cta_state is written and visible cluster-wide
  if (threadIdx.x < 32) {
    FwdState part = FwdState::identity();
    if (static_cast<int>(threadIdx.x) < n_ctas)
      part = *cluster.map_shared_rank(&cta_state, static_cast<unsigned>(threadIdx.x));
    part = warp_allreduce(part);
    if (threadIdx.x == 0) row_state = part;
  }
  cluster.sync();   // remote reads done (no CTA exits while read), and row_state visible

  // Phase 3: the row's outputs (rank 0) and the backward's constants (every CTA).
  const math::FwdResult<float> res =
      math::fwd_finish(row_state, o, V, rank == 0 ? z_y_shared : 0.f);
  if (rank == 0 && threadIdx.x == 0) fwd_store(res, row, f);
  const BwdRow r = math::make_bwd_row(o, V, y, args.grad[row * args.grad_stride], res.stats);

  // Phase 4: the gradient of this CTA's slice, from shared memory.
  for (int64_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
    float z[kVec], u[kVec], dz[kVec], du[kVec];
    unpack8(load_shared_raw8(zs + c * kVec), z);
    unpack8(load_shared_raw8(us + c * kVec), u);
    const int64_t col0 = lo + c * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) math::grad_elem(r, z[i], u[i], col0 + i, dz[i], du[i]);
    store8(dzr + col0, dz);
    if (dur != nullptr) store8(dur + col0, du);
  }
#else
  __trap();   // not compiled for sm_90+: the launcher never selects this kernel there
#endif
}

bool aligned_rows(const void* p, int64_t stride_b, int64_t stride_s, int64_t B, int64_t S,
                  size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (B <= 1 || (stride_b * static_cast<int64_t>(elem)) % 16 == 0) &&
         (S <= 1 || (stride_s * static_cast<int64_t>(elem)) % 16 == 0);
}

struct ClusterPlan {
  int ctas = 0;                  // 0: use the two portable kernels
  int64_t chunks_per_cta = 0;
  size_t smem = 0;
};

// Whether and how to run hrm_loss_cluster_kernel<Tz, Tu> for `a` on the current device.
// Sets the kernel's shared-memory and cluster-size attributes for the chosen plan.
template <class Tz, class Tu>
ClusterPlan plan_cluster(const HrmLossFwdBwdArgs& a) {
  const HrmLossFwdArgs& f = a.fwd;
  ClusterPlan none;
  if (math::div_kind(f.opt) == math::Div::kJsd || f.V % kVec != 0 ||
      !aligned_rows(f.z.ptr, f.z.stride_b, f.z.stride_s, f.B, f.S, sizeof(Tz)) ||
      !aligned_rows(f.u.ptr, f.u.stride_b, f.u.stride_s, f.B, f.S, sizeof(Tu)) ||
      !aligned_rows(a.dz, a.dz_stride_b, a.dz_stride_s, f.B, f.S, sizeof(Tz)) ||
      (a.du != nullptr && !aligned_rows(a.du, a.du_stride_b, a.du_stride_s, f.B, f.S, sizeof(Tu))))
    return none;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      major < 9)
    return none;
  auto kernel = hrm_loss_cluster_kernel<Tz, Tu>;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.ptxVersion < 90)
    return none;   // this build has no sm_90 code for the kernel (e.g. only compute_80 PTX)
  const int64_t row_bytes = f.V * static_cast<int64_t>(sizeof(Tz) + sizeof(Tu));
  const int64_t n_chunks = f.V / kVec;
  int ctas = 1;
  while (ctas < kMaxCluster && row_bytes > kSmemTarget * ctas) ctas *= 2;
  for (; ctas >= 1; ctas /= 2) {   // that size, or smaller ones if the device refuses it
    ClusterPlan p;
    p.ctas = ctas;
    p.chunks_per_cta = (n_chunks + ctas - 1) / ctas;
    p.smem = static_cast<size_t>(p.chunks_per_cta) * kVec * (sizeof(Tz) + sizeof(Tu));
    if (static_cast<int64_t>(p.smem) > kSmemMax) return none;
    if (f.B * f.S > INT32_MAX / ctas) return none;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(p.smem)) != cudaSuccess)
      continue;
    if (ctas > 8 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
      continue;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute cluster_attr;
    cluster_attr.id = cudaLaunchAttributeClusterDimension;
    cluster_attr.val.clusterDim.x = ctas;
    cluster_attr.val.clusterDim.y = 1;
    cluster_attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3(ctas);
    cfg.blockDim = dim3(kClusterThreads);
    cfg.dynamicSmemBytes = p.smem;
    cfg.attrs = &cluster_attr;
    cfg.numAttrs = 1;
    int max_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) == cudaSuccess &&
        max_clusters > 0)
      return p;
  }
  cudaGetLastError();   // clear what a refused attribute or occupancy query left behind
  return none;
}

HrmLossBwdArgs bwd_args(const HrmLossFwdBwdArgs& a) {
  const HrmLossFwdArgs& f = a.fwd;
  HrmLossBwdArgs b{};
  b.z = f.z;
  b.u = f.u;
  b.labels = f.labels;
  b.labels_stride = f.labels_stride;
  b.labels_int64 = f.labels_int64;
  b.stats = f.stats;
  b.grad = a.grad;
  b.grad_stride = a.grad_stride;
  b.dz = a.dz;
  b.dz_stride_b = a.dz_stride_b;
  b.dz_stride_s = a.dz_stride_s;
  b.du = a.du;
  b.du_stride_b = a.du_stride_b;
  b.du_stride_s = a.du_stride_s;
  b.B = f.B;
  b.S = f.S;
  b.V = f.V;
  b.opt = f.opt;
  return b;
}

template <class Tz, class Tu> struct FwdBwdLaunch {
  static cudaError_t run(const HrmLossFwdBwdArgs& a, cudaStream_t stream) {
    const ClusterPlan p = plan_cluster<Tz, Tu>(a);
    if (p.ctas == 0) {
      const cudaError_t err = hrm_loss_fwd_launch(a.fwd, stream);
      return err != cudaSuccess ? err : hrm_loss_bwd_launch(bwd_args(a), stream);
    }
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute cluster_attr;
    cluster_attr.id = cudaLaunchAttributeClusterDimension;
    cluster_attr.val.clusterDim.x = p.ctas;
    cluster_attr.val.clusterDim.y = 1;
    cluster_attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(a.fwd.B * a.fwd.S * p.ctas));
    cfg.blockDim = dim3(kClusterThreads);
    cfg.dynamicSmemBytes = p.smem;
    cfg.stream = stream;
    cfg.attrs = &cluster_attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, hrm_loss_cluster_kernel<Tz, Tu>, a,
                                               p.chunks_per_cta);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
};

template <class Tz, class Tu> struct ClusterSize {
  static cudaError_t run(const HrmLossFwdBwdArgs& a, int* ctas) {
    *ctas = plan_cluster<Tz, Tu>(a).ctas;
    return cudaSuccess;
  }
};

}  // namespace

cudaError_t hrm_loss_fwd_bwd_launch(const HrmLossFwdBwdArgs& args, cudaStream_t stream) {
  if (args.fwd.B * args.fwd.S == 0) return cudaSuccess;
  if (args.fwd.V <= 0 || args.fwd.S <= 0) return cudaErrorInvalidValue;
  return dispatch<FwdBwdLaunch>(args.fwd.z.dtype, args.fwd.u.dtype, args, stream);
}

int hrm_loss_fwd_bwd_cluster_size(const HrmLossFwdBwdArgs& args) {
  if (args.fwd.B * args.fwd.S == 0 || args.fwd.V <= 0 || args.fwd.S <= 0) return 0;
  int ctas = 0;
  dispatch<ClusterSize>(args.fwd.z.dtype, args.fwd.u.dtype, args, &ctas);
  return ctas;
}

}  // namespace hrmkernels
