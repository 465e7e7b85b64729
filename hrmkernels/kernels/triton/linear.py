"""Stage 2 of the fused linear HRM loss: Triton kernels that never write N x V logits.

Notation as in hrm_loss.py, with the logits formed on chip from the heads:

    z = f_s(x_s W_s^T + b_s)   student logits, x_s (N, Hs), W_s (V, Hs), b_s (V,)
    u = f_t(x_t W_t^T + b_t)   teacher logits, x_t (N, Ht), W_t (V, Ht)  (or read from memory)

with f each head's logit transform (linear_autograd.py): c tanh(s x / c) with a softcap c, else
s x, applied to the fp32 tile on chip; its derivative s (1 - (f / c)^2) (or s) multiplies the
logit gradient tile before the head gradients.

A program owns a (BLOCK_N x BLOCK_V) logit tile at a time: it is a tl.dot loop over the hidden
size with an fp32 accumulator, so no logit is ever rounded to the input dtype (the Liger #1432
error) and none reaches global memory. The per-row statistics are those of the logits kernels,
carried across vocabulary tiles by the online log-sum-exp.

Gradients, with dz and du the per-element logit gradients of hrm_loss.py (times the row's
incoming gradient g; 0 on ignored rows):

    d x_s = dz' W_s     d W_s = dz'^T x_s     d b_s = sum_rows dz'     (teacher: du', x_t, W_t)

with dz' = dz f_s'(x_s W_s^T + b_s), and likewise du' (precomputed teacher logits get du itself).

The teacher makes dz dense (q - p is non-zero everywhere), so CCE's gradient filtering (skip a
tile whose |dz| < eps) would drop the distillation term: there is no filtering here.

fp32 operands use the precision torch would (torch.get_float32_matmul_precision(): "highest" is
IEEE fp32, the default; "high"/"medium" allow TF32), so the float64 comparison holds for fp32.
Everything runs in fp32: float64 inputs are rounded to fp32 tiles (use impl="chunked" for fp64).
Tiles, warps and pipeline stages depend on those operands (CONFIGS below): fp32 at "high" or
"highest" and fp64 take small tiles and are slow; impl="chunked" suits them better.
"""
import torch
import triton
import triton.language as tl

from hrmkernels.kernels.triton.common import (device_of, divergence_args, divergence_grads,
                                              launch_target, log_mix)


# Launch configurations (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) per kernel and kind
# of dot, chosen with tests/test_triton_aot.py: every specialisation fits the smallest block of
# sm_80, sm_86, sm_90, sm_100 (sm_86: 99 KB of shared memory) and spills no register, with a
# margin for more flags. Speed is untuned (that needs a GPU).
#   "16":   bf16/fp16 operands. The backward also holds the head-gradient dots' operands and
#           results: half the BLOCK_K.
#   "tf32": fp32 operands at matmul precision "medium" (one tf32 product): 4-byte operands,
#           half the BLOCK_K for the same shared memory.
#   "wide": fp32 at "high" (tf32x3: three products of split operands) or "highest" (IEEE fp32
#           on FMA units, no tensor cores), and fp64 (tiles read in fp64, multiplied in fp32):
#           about twice the registers per product, so half the tile and a quarter of BLOCK_K.
CONFIGS = {
    ("fwd", "16"): (64, 64, 64, 8, 3), ("bwd", "16"): (64, 64, 32, 8, 2),
    ("fwd", "tf32"): (64, 64, 32, 8, 3), ("bwd", "tf32"): (64, 64, 32, 8, 3),
    ("fwd", "wide"): (32, 64, 16, 8, 2), ("bwd", "wide"): (32, 64, 16, 8, 2),
}


def _config(kind, dots, target):
    """Launch configuration of kernel `kind` ("fwd", "bwd") on `target` (None: the interpreter)
    for the heads' dots [(dtype, input_precision)], as keywords of the launch."""
    if target is None:   # the interpreter pays per operation: the smallest legal dot tiles
        tiles = (16, 64, 32, 8, 1)
    else:
        wide = any(d == torch.float64 or p in ("ieee", "tf32x3") for d, p in dots)
        tf32 = any(d == torch.float32 for d, _ in dots)
        tiles = CONFIGS[kind, "wide" if wide else "tf32" if tf32 else "16"]
    config = dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_K", "num_warps", "num_stages"), tiles))
    if target is not None:   # else ptxas aims at 128 registers and spills 8 B to 2 KB
        config["maxnreg"] = 255
    return config


# The backward's S_GRADS / T_GRADS constexprs are bit masks of the gradients to form for the
# student / teacher head: 1 d hidden, 2 d weight, 4 d bias, 8 d teacher logits.


@triton.jit
def _tanh(x):
    """tanh to a few ulps from exp alone (the interpreter has no libdevice): (1 - e) / (1 + e),
    e = exp(-2|x|), loses at most two bits for |x| >= 1/8; below, the Taylor series to x^7
    (truncation < 2e-9 relative). tanh(+-inf) = +-1, NaN passes through."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _transform_grad(f, scale, cap, CAP: tl.constexpr):
    """d f / d x of the logit transform, from its output f: scale (1 - (f / cap)^2), or scale."""
    if CAP:
        t = f / cap
        d = scale * (1.0 - t * t)
    else:
        d = scale
    return d


@triton.jit
def _aligned(h, x_stride, w_stride, ALIGN: tl.constexpr):
    """h and the row strides of x (N, h) and w (V, h), which ALIGN divides (the launcher checks),
    as values Triton knows ALIGN divides.

    Triton learns only divisibility by 16 from the arguments: at h = 1000 it would load rows
    element by element (and spill the registers that takes), not 16 bytes at a time. (A
    tl.multiple_of hint on an argument is dropped; n // ALIGN * ALIGN = n carries it.)
    """
    return h // ALIGN * ALIGN, x_stride // ALIGN * ALIGN, w_stride // ALIGN * ALIGN


@triton.jit
def _logits_tile(x_ptr, x_stride, w_ptr, w_stride, b_ptr, rows, cols, row_mask, col_mask, H,
                 scale, cap, HAS_BIAS: tl.constexpr, CAP: tl.constexpr, DOT_F32: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """f(x[rows] @ w[cols]^T (+ b[cols])): a (BLOCK_N, BLOCK_V) fp32 tile; rows, cols int64;
    f the logit transform: cap tanh(scale y / cap) when CAP, else scale y.

    Reads BLOCK_N*H + BLOCK_V*H elements, 2*BLOCK_N*BLOCK_V*H FLOPs. Out-of-range rows and
    columns load zeros (finite results the callers mask).
    """
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :],
                    mask=row_mask[:, None] & (k[None, :] < H), other=0.0)    # (BLOCK_N, BLOCK_K)
        w_t = tl.load(w_ptr + cols[None, :] * w_stride + k[:, None],
                      mask=col_mask[None, :] & (k[:, None] < H), other=0.0)  # (BLOCK_K, BLOCK_V)
        if DOT_F32:   # fp64 inputs, or bf16 under the interpreter (whose bf16 tl.dot is wrong)
            x, w_t = x.to(tl.float32), w_t.to(tl.float32)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if CAP:
        acc = cap * _tanh(acc * (scale / cap))
    else:
        acc = acc * scale
    return acc


@triton.jit
def _teacher_tile(xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr, u_ptr, u_stride, rows, cols,
                  row_mask, col_mask, Ht, scale, cap, TEACHER_LOGITS: tl.constexpr,
                  HAS_BT: tl.constexpr, T_CAP: tl.constexpr, DOT_F32_T: tl.constexpr,
                  PREC_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The teacher's fp32 logit tile: read from u (used as given), or formed like the student's."""
    if TEACHER_LOGITS:
        u = tl.load(u_ptr + rows[:, None] * u_stride + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    else:
        u = _logits_tile(xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr, rows, cols, row_mask,
                         col_mask, Ht, scale, cap, HAS_BT, T_CAP, DOT_F32_T, PREC_T,
                         BLOCK_N, BLOCK_V, BLOCK_K)
    return u


@triton.jit
def _online_lse_rows(m, s, x):
    """online_lse of common.py for a (rows, cols) tile: fold x into per-row (m, s)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    return m_new, s * alpha + tl.sum(e, axis=1), e, alpha


@triton.jit
def _online_lse_rows_h(m, s, h, x):
    """_online_lse_rows that also carries h = sum exp(x - m) (x - m) per row, for the entropy
    (common.py's online_lse_h)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    shift = tl.where(s > 0.0, s * (m - m_safe), 0.0)     # s == 0 while m is -inf
    h = alpha * (h + shift) + tl.sum(tl.where(e > 0.0, e * (x - m_safe[:, None]), 0.0), axis=1)
    return m_new, s * alpha + tl.sum(e, axis=1), h, e, alpha


# Forward. grid = (cdiv(N, BLOCK_N), SPLIT): program (i, j) folds vocabulary tiles
# [j * tiles_per_split, (j + 1) * tiles_per_split) of rows block i into the online state of
# the logits kernel, ten numbers per row, merged in merge_partials by one more online step
# (SPLIT > 1 keeps the GPU busy when N is small):
#
#     (max, sum) of z, a and b over the range, t (the KL's weighted sum, relative to the max of
#     b (forward) or a (reverse)), h (the entropy's, relative to the max of a), sum_v z_v
#     (label smoothing), z_y (0 unless the label lies in the range).
#
# Keeping the maxima and sums apart, not their log-sum-exps, makes the merge as exact as one
# range: a rounded lse ~ 1e4 would shift the ranges' weights by its ulp.
#
# FLOPs 2 N V (Hs + Ht) (no teacher GEMM when hrm == 0 or teacher logits are given; then N V
# teacher logits are read instead). Bytes: W_s, W_t once per row block (L2 shares them between
# programs that run together), x once per vocabulary tile, SPLIT * N * 40 out; nothing N x V.
# The JSD takes a second sweep (_linear_hrm_loss_jsd_kernel): 4 N V (Hs + Ht) FLOPs in all.
@triton.jit
def _linear_hrm_loss_fwd_kernel(
    xs_ptr, xs_stride, ws_ptr, ws_stride, bs_ptr,   # student x (N, Hs), W (V, Hs), b (V,)
    xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr,   # teacher x (N, Ht), W (V, Ht), b (V,)
    u_ptr, u_stride,                                # teacher logits (N, V), when TEACHER_LOGITS
    y_ptr,                                          # labels (N,) int32/int64
    part_ptr,                                       # (SPLIT, N, 10) fp32 out: partial statistics
    N, V, Hs, Ht, tiles_per_split, inv_t,
    s_scale, s_cap, t_scale, t_cap,                 # logit transforms (cap used if S_CAP / T_CAP)
    HAS_KL: tl.constexpr, UNIT_T: tl.constexpr, REVERSE: tl.constexpr, JSD: tl.constexpr,
    SMOOTH: tl.constexpr, TEACHER_LOGITS: tl.constexpr, HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    DOT_F32_S: tl.constexpr, DOT_F32_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    ALIGN_S: tl.constexpr, ALIGN_T: tl.constexpr,   # divide Hs, Ht and the heads' row strides
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    Hs, xs_stride, ws_stride = _aligned(Hs, xs_stride, ws_stride, ALIGN_S)
    Ht, xt_stride, wt_stride = _aligned(Ht, xt_stride, wt_stride, ALIGN_T)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    neg_inf = tl.full([BLOCK_N], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_N], tl.float32)
    m_z, s_z, m_a, s_a, m_b, s_b = neg_inf, zero, neg_inf, zero, neg_inf, zero
    t, h, sum_z, z_y = zero, zero, zero, zero
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(xs_ptr, xs_stride, ws_ptr, ws_stride, bs_ptr, rows, cols, row_mask,
                         col_mask, Hs, s_scale, s_cap, HAS_BS, S_CAP, DOT_F32_S, PREC_S,
                         BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if UNIT_T:
            a = z
            m_z, s_z, h, e_z, alpha_z = _online_lse_rows_h(m_z, s_z, h, z)
            m_a, s_a, e_a, alpha_a = m_z, s_z, e_z, alpha_z
        else:
            a = z * inv_t
            m_z, s_z, e_z, alpha_z = _online_lse_rows(m_z, s_z, z)
            m_a, s_a, h, e_a, alpha_a = _online_lse_rows_h(m_a, s_a, h, a)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if SMOOTH:
            sum_z += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        if HAS_KL:
            u = _teacher_tile(xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr, u_ptr, u_stride,
                              rows, cols, row_mask, col_mask, Ht, t_scale, t_cap, TEACHER_LOGITS,
                              HAS_BT, T_CAP, DOT_F32_T, PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
            b = tl.where(col_mask[None, :], u * inv_t, float("-inf"))
            m_b, s_b, e_b, alpha_b = _online_lse_rows(m_b, s_b, b)
            # A zero-probability entry contributes 0 (guarded: 0 * inf is NaN).
            if REVERSE and not JSD:
                t = t * alpha_a + tl.sum(tl.where(a > float("-inf"), e_a * (a - b), 0.0), axis=1)
            elif not JSD:
                t = t * alpha_b + tl.sum(tl.where(b > float("-inf"), e_b * (b - a), 0.0), axis=1)
    out = part_ptr + (split * N + rows) * 10
    tl.store(out, m_z, mask=row_mask)
    tl.store(out + 1, s_z, mask=row_mask)
    tl.store(out + 2, m_a, mask=row_mask)
    tl.store(out + 3, s_a, mask=row_mask)
    tl.store(out + 4, m_b, mask=row_mask)
    tl.store(out + 5, s_b, mask=row_mask)
    tl.store(out + 6, t, mask=row_mask)
    tl.store(out + 7, h, mask=row_mask)
    tl.store(out + 8, sum_z, mask=row_mask)
    tl.store(out + 9, z_y, mask=row_mask)


# JSD, second sweep. Same grid and ranges as the forward; with the merged lse(a), lse(b) of the
# first sweep, program (i, j) recomputes its tiles and sums KL(q || m) and KL(p || m) over its
# range (hrm_loss.py's pass 2: lm from logs, no NaN where p and q underflow). Plain sums: the
# ranges add up. FLOPs 2 N V (Hs + Ht) again, bytes as the forward's, SPLIT * N * 8 out.
@triton.jit
def _linear_hrm_loss_jsd_kernel(
    xs_ptr, xs_stride, ws_ptr, ws_stride, bs_ptr,   # student head, as in the forward
    xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr,   # teacher head
    u_ptr, u_stride,                                # teacher logits (N, V), when TEACHER_LOGITS
    stats_ptr,                                      # (N, 5) fp32: lse(z), lse(a), lse(b), ...
    part_ptr,                                       # (SPLIT, N, 2) fp32 out: KL(q||m), KL(p||m)
    N, V, Hs, Ht, tiles_per_split, inv_t,
    s_scale, s_cap, t_scale, t_cap, log_beta, log_1m_beta,
    TEACHER_LOGITS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    DOT_F32_S: tl.constexpr, DOT_F32_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    ALIGN_S: tl.constexpr, ALIGN_T: tl.constexpr,   # divide Hs, Ht and the heads' row strides
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    Hs, xs_stride, ws_stride = _aligned(Hs, xs_stride, ws_stride, ALIGN_S)
    Ht, xt_stride, wt_stride = _aligned(Ht, xt_stride, wt_stride, ALIGN_T)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse_a = tl.load(stats_ptr + 5 * rows + 1, mask=row_mask, other=0.0)[:, None]
    lse_b = tl.load(stats_ptr + 5 * rows + 2, mask=row_mask, other=0.0)[:, None]
    kl_qm = tl.zeros([BLOCK_N], tl.float32)
    kl_pm = tl.zeros([BLOCK_N], tl.float32)
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(xs_ptr, xs_stride, ws_ptr, ws_stride, bs_ptr, rows, cols, row_mask,
                         col_mask, Hs, s_scale, s_cap, HAS_BS, S_CAP, DOT_F32_S, PREC_S,
                         BLOCK_N, BLOCK_V, BLOCK_K)
        u = _teacher_tile(xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr, u_ptr, u_stride,
                          rows, cols, row_mask, col_mask, Ht, t_scale, t_cap, TEACHER_LOGITS,
                          HAS_BT, T_CAP, DOT_F32_T, PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
        lq = tl.where(col_mask[None, :], z * inv_t, float("-inf")) - lse_a
        lp = tl.where(col_mask[None, :], u * inv_t, float("-inf")) - lse_b
        lm = log_mix(lp, lq, log_beta, log_1m_beta)
        q = tl.exp(lq)
        p = tl.exp(lp)
        kl_qm += tl.sum(tl.where(q > 0.0, q * (lq - lm), 0.0), axis=1)
        kl_pm += tl.sum(tl.where(p > 0.0, p * (lp - lm), 0.0), axis=1)
    out = part_ptr + (split * N + rows) * 2
    tl.store(out, kl_qm, mask=row_mask)
    tl.store(out + 1, kl_pm, mask=row_mask)


def _merge_lse(m, s):
    """One more online log-sum-exp step over the ranges' (max, sum), each (SPLIT, N): the max
    M, the factors r = exp(m - M) that carry each range's sums to M, and the merged sum."""
    top = m.amax(0)
    r = torch.exp(m - torch.where(top == float("-inf"), 0.0, top))   # empty range: exp(-inf) = 0
    return top, r, (r * s).sum(0)


def merge_partials(part, labels, v, label_smoothing, reverse, with_kl):
    """(SPLIT, N, 10) online states -> ce, kl, entropy (N,) and stats (N, 5), fp32, torch ops.

    kl is the KL (reverse or forward) when with_kl, else 0 (also for the JSD, whose second sweep
    adds it); stats = (lse(z), lse(a), lse(b), mu, 0) per row, as the logits launchers save
    them (the backward uses (b - a) - mu for log p - log q - KL, where the lse terms cancel).
    """
    (m_z, r_z, s_z), (m_a, r_a, s_a), (m_b, r_b, s_b) = (
        _merge_lse(part[..., i], part[..., i + 1]) for i in (0, 2, 4))
    lse = torch.stack([m + s.log() for m, s in ((m_z, s_z), (m_a, s_a), (m_b, s_b))], 1)
    # h relative to each range's max, moved to the common one as online_lse_h does
    shift = part[..., 2] - torch.where(m_a == float("-inf"), 0.0, m_a)
    shift = torch.where(part[..., 3] > 0, part[..., 3] * shift, 0.0)
    entropy = s_a.log() - (r_a * (part[..., 7] + shift)).sum(0) / s_a
    r_w, s_w = (r_a, s_a) if reverse else (r_b, s_b)
    mu = torch.where(s_w > 0, (r_w * part[..., 6]).sum(0) / s_w, 0.0)
    gap = lse[:, 2] - lse[:, 1]                                          # lse_b - lse_a
    kl = (mu + gap if reverse else mu - gap).clamp_min(0.0) if with_kl else torch.zeros_like(mu)
    y = labels.long()
    z_y = torch.where((y >= 0) & (y < v), part[..., 9].sum(0), torch.nan)  # bad label: NaN CE
    ce = lse[:, 0] - z_y
    if label_smoothing > 0:
        eps = float(label_smoothing)
        ce = lse[:, 0] - (1 - eps) * z_y - eps * part[..., 8].sum(0) / v
    return ce, kl, entropy, torch.cat((lse, mu[:, None], torch.zeros_like(mu)[:, None]), 1)


@triton.jit
def _accumulate_head_grads(d, x_ptr, x_stride, w_ptr, w_stride, dx_ptr, dw_ptr, db_ptr,
                           rows, cols, row_mask, col_mask, H, GRADS: tl.constexpr,
                           DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[rows] += d @ w[cols], dw[cols] += d^T @ x[rows], db[cols] += sum_rows d.

    d: a (BLOCK_N, BLOCK_V) fp32 logit-gradient tile; dx (N, H), dw (V, H), db (V,) fp32 buffers
    that other programs add to as well, hence fp32 atomics (relaxed: only the sum matters; the
    order, and so the last bits, vary from run to run).
    """
    if GRADS & 4:
        tl.atomic_add(db_ptr + cols, tl.sum(d, axis=0), mask=col_mask, sem="relaxed")
    if DOT_F32:
        dd = d
    else:   # the dot runs in the weight's dtype, as autograd's would (d rounded once)
        dd = d.to(w_ptr.dtype.element_ty)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_mask = k < H
        if GRADS & 1:
            w = tl.load(w_ptr + cols[:, None] * w_stride + k[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_K)
            if DOT_F32:
                w = w.to(tl.float32)
            tl.atomic_add(dx_ptr + rows[:, None] * H + k[None, :],
                          tl.dot(dd, w, input_precision=PRECISION),
                          mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        if GRADS & 2:
            x = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            if DOT_F32:
                x = x.to(tl.float32)
            tl.atomic_add(dw_ptr + cols[:, None] * H + k[None, :],
                          tl.dot(tl.trans(dd), x, input_precision=PRECISION),
                          mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


# Backward. grid = (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)): program (i, j) recomputes the z (and u)
# tile, forms dz (and du) from the saved lse and KL (or JSD) statistics exactly as
# _hrm_loss_bwd_kernel does, chains them through the logit transforms, and adds its share of
# the head gradients.
#
# FLOPs: 2 N V (Hs + Ht) recomputation + 4 N V Hs for d x_s, d W_s (+ 4 N V Ht for teacher
# gradients). Bytes: the recomputation reads as the forward does; the atomics add
# 4 N V H (1/BLOCK_V + 1/BLOCK_N) bytes of fp32 into L2 (dx and dW are revisited once per tile).
# That is the price of writing nothing N x V: at H = 4096 it exceeds the 6-10 bytes per logit
# that stage 1 moves, so whether this beats stage 1 is for the GPU benchmark to say.
@triton.jit
def _linear_hrm_loss_bwd_kernel(
    xs_ptr, xs_stride, ws_ptr, ws_stride, bs_ptr,   # student head, as in the forward
    xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr,   # teacher head
    u_ptr, u_stride,                                # teacher logits (N, V), when TEACHER_LOGITS
    y_ptr, stats_ptr,                               # labels (N,); (N, 5) fp32 from the forward
    g_ptr, g_stride,                                # per-row incoming gradient (N,); 0 stride ok
    dxs_ptr, dws_ptr, dbs_ptr,                      # fp32 (N, Hs), (V, Hs), (V,) accumulators
    dxt_ptr, dwt_ptr, dbt_ptr,                      # fp32 (N, Ht), (V, Ht), (V,) accumulators
    du_ptr, du_stride,                              # (N, V) out, teacher logits' dtype
    N, V, Hs, Ht, hrm, inv_t, eps, ignore_index,
    s_scale, s_cap, t_scale, t_cap, beta, log_beta, log_1m_beta,
    S_GRADS: tl.constexpr, T_GRADS: tl.constexpr,   # bit masks, see above
    HAS_KL: tl.constexpr, UNIT_T: tl.constexpr, REVERSE: tl.constexpr, JSD: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    DOT_F32_S: tl.constexpr, DOT_F32_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    ALIGN_S: tl.constexpr, ALIGN_T: tl.constexpr,   # divide Hs, Ht and the heads' row strides
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    Hs, xs_stride, ws_stride = _aligned(Hs, xs_stride, ws_stride, ALIGN_S)
    Ht, xt_stride, wt_stride = _aligned(Ht, xt_stride, wt_stride, ALIGN_T)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask, col_mask = rows < N, cols < V
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    keep = row_mask & (y != ignore_index)
    live = keep[:, None] & col_mask[None, :]
    g = tl.load(g_ptr + rows * g_stride, mask=keep, other=0.0).to(tl.float32)
    lse_z = tl.load(stats_ptr + 5 * rows, mask=keep, other=0.0)
    z = _logits_tile(xs_ptr, xs_stride, ws_ptr, ws_stride, bs_ptr, rows, cols, keep, col_mask,
                     Hs, s_scale, s_cap, HAS_BS, S_CAP, DOT_F32_S, PREC_S,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    sm = tl.exp(z - lse_z[:, None])
    dz = sm - eps / V - tl.where(cols[None, :] == y[:, None], 1.0 - eps, 0.0)
    if HAS_KL:
        lse_a = tl.load(stats_ptr + 5 * rows + 1, mask=keep, other=0.0)[:, None]
        lse_b = tl.load(stats_ptr + 5 * rows + 2, mask=keep, other=0.0)[:, None]
        s3 = tl.load(stats_ptr + 5 * rows + 3, mask=keep, other=0.0)[:, None]
        u = _teacher_tile(xt_ptr, xt_stride, wt_ptr, wt_stride, bt_ptr, u_ptr, u_stride, rows,
                          cols, keep, col_mask, Ht, t_scale, t_cap, TEACHER_LOGITS, HAS_BT, T_CAP,
                          DOT_F32_T, PREC_T, BLOCK_N, BLOCK_V, BLOCK_K)
        b = u * inv_t
        if UNIT_T:
            a = z
            q = sm
        else:
            a = z * inv_t
            q = tl.exp(a - lse_a)
        p = tl.exp(b - lse_b)
        s4 = tl.load(stats_ptr + 5 * rows + 4, mask=keep, other=0.0)[:, None]
        g_z, g_u = divergence_grads(a, b, q, p, lse_a, lse_b, s3, s4, beta, log_beta,
                                     log_1m_beta, REVERSE, JSD)
        dz += hrm * inv_t * g_z
        du = hrm * inv_t * g_u
        du = tl.where(live, du * g[:, None], 0.0)
        if T_GRADS & 8:   # each element of du belongs to this program alone: a plain store
            tl.store(du_ptr + rows[:, None] * du_stride + cols[None, :],
                     du.to(du_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        if T_GRADS & 7:
            _accumulate_head_grads(du * _transform_grad(u, t_scale, t_cap, T_CAP), xt_ptr,
                                   xt_stride, wt_ptr, wt_stride, dxt_ptr, dwt_ptr, dbt_ptr, rows,
                                   cols, row_mask, col_mask, Ht, T_GRADS & 7, DOT_F32_T, PREC_T,
                                   BLOCK_K)
    dz = tl.where(live, dz * g[:, None], 0.0)   # ignored rows, padding: exactly 0
    if S_GRADS:
        _accumulate_head_grads(dz * _transform_grad(z, s_scale, s_cap, S_CAP), xs_ptr, xs_stride,
                               ws_ptr, ws_stride, dxs_ptr, dws_ptr, dbs_ptr, rows, cols, row_mask,
                               col_mask, Hs, S_GRADS, DOT_F32_S, PREC_S, BLOCK_K)


def _dot_options(dtype, target):
    """(DOT_F32, PRECISION) for tiles of `dtype`: fp32 tiles follow torch's fp32 matmul setting."""
    dot_f32 = dtype == torch.float64 or (target is None and dtype == torch.bfloat16)
    if not (dot_f32 or dtype == torch.float32):
        return False, None
    return dot_f32, {"highest": "ieee", "high": "tf32x3"}.get(torch.get_float32_matmul_precision(),
                                                               "tf32")


def _align(*sizes):
    """The largest power of two up to 16 that divides every size."""
    return next(a for a in (16, 8, 4, 2, 1) if all(int(s) % a == 0 for s in sizes))


def _common(kind, xs, ws, bs, xt, wt, bt, u, transforms):
    """Arguments, constexprs and launch options the launchers of kernel `kind` ("fwd", "bwd")
    share: the heads, the teacher logits, and the tiles' flags; transforms ((scale, softcap),
    (scale, softcap)) as in linear_autograd.py."""
    teacher_logits = u is not None
    student = (xs, xs.stride(0), ws, ws.stride(0), bs if bs is not None else ws)
    teacher = (xt, xt.stride(0), wt, wt.stride(0), bt if bt is not None else wt) \
        if xt is not None else student   # dummies: TEACHER_LOGITS never reads them
    target = launch_target(xs.device)
    dot_s = _dot_options(xs.dtype, target)
    dot_t = _dot_options(xt.dtype, target) if xt is not None else dot_s
    dots = [(xs.dtype, dot_s[1])] + ([(xt.dtype, dot_t[1])] if xt is not None else [])
    align_t = _align(xt.shape[1], xt.stride(0), wt.stride(0)) if xt is not None else 1
    u_args = (u, u.stride(0)) if teacher_logits else (xs, 0)
    ht = xt.shape[1] if xt is not None else 0
    (s_scale, s_cap), (t_scale, t_cap) = transforms
    caps = (s_scale, s_cap or 1.0, t_scale, t_cap or 1.0)
    flags = dict(TEACHER_LOGITS=teacher_logits, HAS_BS=bs is not None, HAS_BT=bt is not None,
                 S_CAP=s_cap is not None, T_CAP=t_cap is not None,
                 DOT_F32_S=dot_s[0], DOT_F32_T=dot_t[0], PREC_S=dot_s[1], PREC_T=dot_t[1],
                 ALIGN_S=_align(xs.shape[1], xs.stride(0), ws.stride(0)), ALIGN_T=align_t,
                 **_config(kind, dots, target))
    return (*student, *teacher, *u_args), ht, caps, flags


def _default_split(n, v, device, block_n, block_v):
    """Vocabulary splits so that about two programs per SM run even when N is small."""
    tiles = triton.cdiv(v, block_v)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(2 * sms, triton.cdiv(n, block_n))))


NO_TRANSFORMS = ((1.0, None), (1.0, None))


def linear_hrm_loss_fwd(xs, ws, bs, xt, wt, bt, u, labels, hrm, temperature, label_smoothing,
                        ignore_index, beta, transforms=NO_TRANSFORMS, with_kl=None, split=None):
    """Loss, CE, D, entropy (N,) and stats (N, 5), fp32, of the logits f_s(x_s W_s^T + b_s) and
    f_t(x_t W_t^T + b_t) (or u), as the logits launchers' (kernels/__init__.py).

    xs (N, Hs), ws (V, Hs), xt (N, Ht), wt (V, Ht), u (N, V): unit last stride; biases (V,)
    contiguous or None; either (xt, wt, bt) or u; labels (N,). beta: 0 forward KL, 1 reverse,
    else the JSD (a second GEMM sweep). transforms: ((scale, softcap), (scale, softcap)) of the
    student and teacher heads. with_kl: compute D even at hrm == 0 (default: only when
    hrm > 0; else the teacher is never read and D is 0). split: vocabulary splits (default:
    enough programs to fill the GPU).
    """
    with_kl = hrm > 0 if with_kl is None else with_kl or hrm > 0
    n, v = labels.numel(), ws.shape[0]
    args, ht, caps, flags = _common("fwd", xs, ws, bs, xt, wt, bt, u, transforms)
    block_n, block_v = flags["BLOCK_N"], flags["BLOCK_V"]
    split = split or _default_split(n, v, xs.device, block_n, block_v)
    tiles_per_split = triton.cdiv(triton.cdiv(v, block_v), split)
    split = triton.cdiv(triton.cdiv(v, block_v), tiles_per_split)   # no empty ranges
    part = torch.empty(split, n, 10, dtype=torch.float32, device=xs.device)
    (_, log_beta, log_1m_beta), divergence = divergence_args(beta, with_kl)
    jsd = divergence["JSD"]
    grid = (triton.cdiv(n, block_n), split)
    if n:
        with device_of(xs):
            _linear_hrm_loss_fwd_kernel[grid](
                *args, labels, part, n, v, xs.shape[1], ht, tiles_per_split, 1.0 / temperature,
                *caps, HAS_KL=with_kl, UNIT_T=temperature == 1.0, SMOOTH=label_smoothing > 0,
                **divergence, **flags)
    ce, kl, entropy, stats = merge_partials(part, labels, v, label_smoothing,
                                            divergence["REVERSE"], with_kl and not jsd)
    if jsd:   # the second sweep, with the merged log-sum-exps
        part = torch.empty(split, n, 2, dtype=torch.float32, device=xs.device)
        if n:
            with device_of(xs):
                _linear_hrm_loss_jsd_kernel[grid](
                    *args, stats, part, n, v, xs.shape[1], ht, tiles_per_split,
                    1.0 / temperature, *caps, log_beta, log_1m_beta, **flags)
        kl_qm, kl_pm = part.sum(0).unbind(1)
        kl = (beta * kl_pm + (1 - beta) * kl_qm).clamp_min(0.0)
        stats = torch.cat((stats[:, :3], kl_qm[:, None], kl_pm[:, None]), 1)
    loss = ce + hrm * kl if hrm > 0 else ce
    keep = labels != ignore_index
    loss, ce, kl, entropy = (torch.where(keep, x, 0.0) for x in (loss, ce, kl, entropy))
    return loss, ce, kl, entropy, torch.where(keep[:, None], stats, 0.0)


def linear_hrm_loss_bwd(xs, ws, bs, xt, wt, bt, u, labels, stats, grad, hrm, temperature,
                        label_smoothing, ignore_index, beta, transforms, want):
    """Gradients of sum_r grad_r * loss_r, as the 7-tuple (d xs, d ws, d bs, d xt, d wt, d bt, d u).

    `want` is a 7-tuple of bools in the same order; unwanted entries are None. Head gradients
    accumulate in fp32 and are returned in their input's dtype; grad (N,) may have stride 0.
    """
    n, v = labels.numel(), ws.shape[0]
    dev = xs.device
    shapes = (xs.shape, ws.shape, (v,),
              *((xt.shape, wt.shape, (v,)) if xt is not None else [()] * 3))
    acc = [torch.zeros(s, dtype=torch.float32, device=dev) if w and i < 6 else None
           for i, (s, w) in enumerate(zip(shapes, want))]
    du = None
    if want[6]:   # every element is stored when the KL term exists; else the gradient is 0
        new = torch.empty_like if hrm > 0 else torch.zeros_like
        du = new(u, memory_format=torch.contiguous_format)
    s_grads = sum(1 << i for i, w in enumerate(want[:3]) if w)
    t_grads = sum(1 << i for i, w in enumerate(want[3:]) if w) if hrm > 0 else 0   # else exactly 0
    args, ht, caps, flags = _common("bwd", xs, ws, bs, xt, wt, bt, u, transforms)
    scalars, divergence = divergence_args(beta, hrm > 0)
    grid = (triton.cdiv(n, flags["BLOCK_N"]), triton.cdiv(v, flags["BLOCK_V"]))
    if n and (s_grads or t_grads):
        dummy = stats
        with device_of(xs):
            _linear_hrm_loss_bwd_kernel[grid](
                *args, labels, stats, grad, grad.stride(0),
                *(a if a is not None else dummy for a in acc),
                du if du is not None else dummy, du.stride(0) if du is not None else 0,
                n, v, xs.shape[1], ht, float(hrm), 1.0 / temperature, float(label_smoothing),
                ignore_index, *caps, *scalars, S_GRADS=s_grads, T_GRADS=t_grads,
                HAS_KL=hrm > 0, UNIT_T=temperature == 1.0, **divergence, **flags)
    dtypes = (xs.dtype, ws.dtype, ws.dtype, *((xt.dtype, wt.dtype, wt.dtype) if xt is not None
                                              else [None] * 3))
    return (*(a.to(d) if a is not None else None for a, d in zip(acc, dtypes)), du)
