"""Triton kernels for the fused HRM loss and their launchers.

Notation for one row: student logits z, teacher logits u (V each), label y, a = z/T, b = u/T,
sm = softmax(z), q = softmax(a), p = softmax(b), lse(x) = log sum_v exp(x_v).

Forward, one pass over the row. Three online log-sum-exps (lse_z, lse_a, lse_b) and one
running weighted sum give the KL without a second read, because log p - log q = (b - a) -
(lse_b - lse_a):

    forward KL  = sum_v p_v (b_v - a_v) + lse_a - lse_b,   p_v = exp(b_v - m_b) / s_b
    reverse KL  = sum_v q_v (a_v - b_v) + lse_b - lse_a,   q_v = exp(a_v - m_a) / s_a
    CE          = lse_z - (1 - eps) z_y - eps * mean_v z_v
    H(q)        = log s_a - h / s_a,   h = sum_v exp(a_v - m_a) (a_v - m_a)   (for logging)

With a running max m and sum s = sum exp(x - m), the weighted sum t = sum exp(x - m) w is
rescaled by exp(m_old - m_new) exactly like s, and t / s is the expectation at the end.

Backward, one more pass writing, per element, with g the row's incoming gradient:

    dz = g * [sm - eps/V - (1 - eps) [v == y]  +  hrm/T * (q - p)]                    forward
                                               +  hrm/T * q (log q - log p - KL)       reverse
    du = g * hrm/T * p (log p - log q - KL)     forward,     g * hrm/T * (p - q)       reverse

The log-sum-exps cancel from log p - log q - KL = (b - a) - mu with mu = E_p[b - a] (forward;
reverse: log q - log p - KL = (a - b) - E_q[a - b]). The forward saves mu = t / s, not KL: at
logits of magnitude 1e4 the lse terms are ~1e4 and would cost three digits in fp32.

Bytes per element (bf16 in, bf16 out): forward reads z and u (4 B); backward reads them again
and writes dz (6 B; 8 B with du). Per row: a label, loss, CE, KL, entropy and 5 saved
statistics (40 B).

Masked vocabulary entries (-inf) are legal: a zero probability contributes 0 to every sum
(0 * inf is NaN, so the factor beside it is clamped or the term selected away), and running
maxima start at -FLT_MAX rather than -inf (exp(-inf - -inf) is NaN).

Generalised JSD (0 < beta < 1, TRL's beta; beta = 0 and 1 are the KLs above), m = beta p +
(1 - beta) q, with lq = a - lse_a, lp = b - lse_b and lm = log m from logs (a log-add-exp):

    D = beta KL(p || m) + (1 - beta) KL(q || m)
      = beta sum_v p_v (lp_v - lm_v) + (1 - beta) sum_v q_v (lq_v - lm_v)

lm_v needs both normalised distributions at once and is no shift of a_v or b_v, so a running
sum cannot be rescaled when lse_a or lse_b moves: the forward takes two passes. Pass 1 is the
KL forward without its weighted sum (lse_z, lse_a, lse_b, CE, entropy); pass 2 reads the row
again and accumulates KL(q || m) and KL(p || m) with the final log-sum-exps. Taking lm from
logs keeps an entry whose log-probabilities lie below -104 under both models (p and q
underflow to 0 in fp32) at 0 * finite = 0: no log(0 + 0), no 0 * inf (Liger #1453, a NaN
there). Entries masked in both (-inf) give lm = -inf, guarded like the KL's zero probabilities.

Backward: D = beta sum p log p + (1 - beta) sum q log q - sum m log m, so dD/dq_v =
(1 - beta)(lq_v - lm_v), and through the softmax (dq_w/da_v = q_w ([w = v] - q_v)):

    dz += g * hrm/T * (1 - beta) q (lq - lm - KL(q || m))
    du  = g * hrm/T * beta p (lp - lm - KL(p || m))

one pass, as for the KL; the forward saves (lse_z, lse_a, lse_b, KL(q || m), KL(p || m)).

Bytes per element, bf16: forward reads z and u twice (8 B), backward reads them once and
writes dz (6 B; 8 B with du): 14 B forward + backward, against 10 B for the KL.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from hrmkernels.kernels import check_label_range
from hrmkernels.kernels.triton.common import (FLT_MAX, LN2, LOG2E, MAXNREG_8_WARPS, block_v,
                                              custom_triton_op, device_of, divergence_args,
                                              divergence_grads, exp2, launch_target, log_mix,
                                              no_output, store_ce_loss, store_ignored_row)


# The forward's per-element work, from the SASS (benchmarks/NOTES.md, "The lean forward"): in
# base 2 with log2(e)/T folded into one FFMA before each MUFU.EX2, every thread keeps its own
# running max and sums over the elements it loads (a [THREADS, VEC, KSUB] tile: VEC contiguous
# logits, 16 B, KSUB = 2 loads THREADS * VEC apart, joined in registers), and the threads are
# combined once a row. Masks exist only in the
# last, partial block. Per thread and stream x (z, a = z/T, b = u/T; c = log2(e) or log2(e)/T):
#
#     m' = max(m, c max x),   s' = s 2^(m - m') + sum 2^(c x - m'),
#
# the weighted sums t (KL) and h (entropy) rescaled with the same factor. The guards cost one
# FMNMX each, on the values rather than the logits: d = (b - a) T (forward; (a - b) T reverse)
# is clamped at -FLT_MAX, so a masked entry of the weighting model (d = -inf, or NaN where both
# mask) adds 2^-inf * -FLT_MAX = 0. What is left makes t +inf or NaN only where d = +inf (masked
# in the other model alone: the KL is +inf, also where the weight underflowed and 0 * inf gave
# NaN), or where a logit is NaN (then s is NaN too); a NaN logit passes through the
# exponentials. The entropy's c x - m is clamped the same way,
# NaN kept. Combining thread sums (m_i, s_i) into M = max m_i: s = sum s_i 2^(m_i - M), and h
# relative to M is 2^(m_i - M) (h_i + s_i (m_i - M)).

@triton.jit
def _tile_index(offs, KSUB: tl.constexpr):
    """The tile's offsets, [THREADS, VEC, 2] (KSUB = 2) or [THREADS, VEC], from the first run's."""
    if KSUB == 2:
        return tl.join(offs, offs + offs.numel)
    else:
        return offs


@triton.jit
def _load_tile(row, offs, n, MASKED: tl.constexpr, KSUB: tl.constexpr):
    """The tile of logits row[:n] at _tile_index(offs) as fp32, -inf past n. Loaded as KSUB
    [THREADS, VEC] runs and joined: each load stays 16 B a thread on every Triton, and the
    KSUB axis in registers (a 3-D load lets the compiler spread it over lanes)."""
    step: tl.constexpr = offs.numel
    if MASKED:
        x = tl.load(row + offs, mask=offs < n, other=float("-inf"))
    else:
        x = tl.load(row + offs)
    if KSUB == 2:
        if MASKED:
            y = tl.load(row + step + offs, mask=offs + step < n, other=float("-inf"))
        else:
            y = tl.load(row + step + offs)
        x = tl.join(x, y)
    return x.to(tl.float32)


@triton.jit
def _rmax(x, KSUB: tl.constexpr):
    """Max of each thread's elements of a tile: [THREADS]."""
    if KSUB == 2:
        return tl.max(tl.max(x, axis=2), axis=1)
    else:
        return tl.max(x, axis=1)


@triton.jit
def _rsum(x, KSUB: tl.constexpr):
    if KSUB == 2:
        return tl.sum(tl.sum(x, axis=2), axis=1)
    else:
        return tl.sum(x, axis=1)


@triton.jit
def _col(m, KSUB: tl.constexpr):
    """A thread's statistic [THREADS] against its elements of a tile."""
    if KSUB == 2:
        return m[:, None, None]
    else:
        return m[:, None]


@triton.jit
def _fwd_tile(z_row, u_row, offs, V, c_z, c_a, m_z, s_z, m_a, s_a, h, m_b, s_b, t, sum_z,
              MASKED: tl.constexpr, REVERSE: tl.constexpr, KL: tl.constexpr,
              SMOOTH: tl.constexpr, UNIT_T: tl.constexpr, TEACHER: tl.constexpr,
              KSUB: tl.constexpr):
    """Fold one tile of a row into each thread's running statistics."""
    z = _load_tile(z_row, offs, V, MASKED, KSUB)
    if TEACHER:
        u = _load_tile(u_row, offs, V, MASKED, KSUB)
    z_max = _rmax(z, KSUB)          # this thread's elements only
    m_new = tl.maximum(m_z, z_max * c_z)
    arg_z = z * c_z - _col(m_new, KSUB)
    e_z = exp2(arg_z)
    alpha_z = exp2(m_z - m_new)
    if UNIT_T:
        arg_a, e_a, alpha_a = arg_z, e_z, alpha_z
        shift = s_z * (m_z - m_new)
    s_z = s_z * alpha_z + _rsum(e_z, KSUB)
    m_z = m_new
    if UNIT_T:
        m_a, s_a = m_z, s_z
    else:
        m_new = tl.maximum(m_a, z_max * c_a)
        arg_a = z * c_a - _col(m_new, KSUB)
        e_a = exp2(arg_a)
        alpha_a = exp2(m_a - m_new)
        shift = s_a * (m_a - m_new)
        s_a = s_a * alpha_a + _rsum(e_a, KSUB)
        m_a = m_new
    h_arg = tl.maximum(arg_a, -FLT_MAX, propagate_nan=tl.PropagateNan.ALL)
    h = alpha_a * (h + shift) + _rsum(e_a * h_arg, KSUB)
    if TEACHER:
        m_new = tl.maximum(m_b, _rmax(u, KSUB) * c_a)
        e_b = exp2(u * c_a - _col(m_new, KSUB))
        alpha_b = exp2(m_b - m_new)
        s_b = s_b * alpha_b + _rsum(e_b, KSUB)
        m_b = m_new
    if KL and TEACHER:
        if REVERSE:
            d, e, alpha = z - u, e_a, alpha_a
        else:
            d, e, alpha = u - z, e_b, alpha_b
        t = t * alpha + _rsum(e * tl.maximum(d, -FLT_MAX), KSUB)
    if SMOOTH:
        if MASKED:
            z = tl.where(_tile_index(offs, KSUB) < V, z, 0.0)
        # + 0.0 (one FADD a thread): Triton 3.6's thread-locality pass asserts on a plain
        # `acc += tl.sum(...)` whose loop result has two uses (the tail's call)
        sum_z += _rsum(z, KSUB) + 0.0
    return m_z, s_z, m_a, s_a, h, m_b, s_b, t, sum_z


@triton.jit
def _combine(m, s):
    """The row's max M (base 2) and sum s relative to it, from the threads' (m_i, s_i); and the
    factors 2^(m_i - M) that move any other per-thread sum to M."""
    big = tl.max(m, axis=0)
    w = exp2(m - big)
    return big, tl.sum(s * w, axis=0), w


@triton.jit
def _hrm_loss_fwd_kernel(
    z_ptr, z_sb, z_ss,           # student logits (B, S, V), fp32/bf16/fp16, unit last stride
    u_ptr, u_sb, u_ss,           # teacher logits (B, S, V), any float dtype
    y_ptr,                       # labels (N,) int32/int64, N = B * S
    loss_ptr, ce_ptr, kl_ptr,    # (N,) fp32 out: CE + hrm * D, CE, D (0 at ignored rows)
    ent_ptr,                     # (N,) fp32 out: entropy of q = softmax(z/T)
    stats_ptr,                   # (N, 5) fp32 out, for backward: lse(z), lse(z/T), lse(u/T), then
                                 # mu, 0 (KL) or KL(q || m), KL(p || m) (JSD)
    S, V, hrm, inv_t, eps, ignore_index,
    beta, log_beta, log_1m_beta,  # the JSD's weight beta, log beta, log(1 - beta) (JSD only)
    REVERSE: tl.constexpr,       # KL(q || p) instead of KL(p || q)
    JSD: tl.constexpr,           # the generalised JSD, two passes (REVERSE is then unused)
    SMOOTH: tl.constexpr,        # eps > 0: accumulate sum_v z_v
    UNIT_T: tl.constexpr,        # T == 1: a = z, so lse_a = lse_z and q = sm
    TEACHER: tl.constexpr,       # False: u is z itself (the fused cross-entropy), never read
    THREADS: tl.constexpr, VEC: tl.constexpr, KSUB: tl.constexpr,   # the tile (fwd_tile)
    STRIDED: tl.constexpr,       # rows not 16-byte aligned: a thread's VEC logits THREADS apart
):
    BLOCK_V: tl.constexpr = THREADS * VEC * KSUB
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2**31 at N*V > 2**31
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:
        store_ignored_row(row, loss_ptr, ce_ptr, kl_ptr, ent_ptr, stats_ptr, 5)
        return
    z_row = z_ptr + (row // S) * z_sb + (row % S) * z_ss
    u_row = u_ptr + (row // S) * u_sb + (row % S) * u_ss
    if STRIDED:   # 2-byte loads, coalesced across the threads
        offs = tl.arange(0, THREADS)[:, None] + tl.arange(0, VEC)[None, :] * THREADS
    else:         # 16-byte loads, a thread's VEC logits contiguous
        offs = tl.arange(0, THREADS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    c_z = LOG2E
    c_a = LOG2E * inv_t
    lo = tl.full([THREADS], -FLT_MAX, tl.float32)   # a finite floor: 2^(m - m') is never NaN
    zero = tl.zeros([THREADS], tl.float32)
    m_z, s_z, m_a, s_a, h, m_b, s_b, t, sum_z = lo, zero, lo, zero, zero, lo, zero, zero, zero
    full = V // BLOCK_V * BLOCK_V
    for v0 in range(0, full, BLOCK_V):
        m_z, s_z, m_a, s_a, h, m_b, s_b, t, sum_z = _fwd_tile(
            z_row + v0, u_row + v0, offs, V, c_z, c_a, m_z, s_z, m_a, s_a, h, m_b, s_b, t,
            sum_z, False, REVERSE, not JSD, SMOOTH, UNIT_T, TEACHER, KSUB)
    if full < V:
        m_z, s_z, m_a, s_a, h, m_b, s_b, t, sum_z = _fwd_tile(
            z_row + full, u_row + full, offs, V - full, c_z, c_a, m_z, s_z, m_a, s_a, h, m_b,
            s_b, t, sum_z, True, REVERSE, not JSD, SMOOTH, UNIT_T, TEACHER, KSUB)
    big_z, s_z, _ = _combine(m_z, s_z)
    big_a, s_a_row, w_a = _combine(m_a, s_a)
    h = tl.sum(w_a * (h + s_a * (m_a - big_a)), axis=0)
    lse_z = (big_z + tl.log2(s_z)) * LN2
    lse_a = (big_a + tl.log2(s_a_row)) * LN2
    if TEACHER:
        big_b, s_b_row, w_b = _combine(m_b, s_b)
        lse_b = (big_b + tl.log2(s_b_row)) * LN2
    else:
        lse_b = lse_a
    sum_z = tl.sum(sum_z, axis=0)
    if not TEACHER:   # D(q || q) = 0, NaN where lse_a is not finite (as with u = z read)
        s3 = lse_a - lse_a
        s4 = s3
        kl = s3
    elif JSD:   # pass 2: KL(q || m) and KL(p || m) with the final log-sum-exps
        cols = tl.arange(0, BLOCK_V)
        s3 = tl.zeros([BLOCK_V], tl.float32)
        s4 = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            lq = tl.load(z_row + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if not UNIT_T:
                lq = lq * inv_t
            lq = lq - lse_a
            lp = tl.load(u_row + v0 + cols, mask=mask,
                         other=float("-inf")).to(tl.float32) * inv_t - lse_b
            lm = log_mix(lp, lq, log_beta, log_1m_beta)
            # masked entries (-inf) give 0, NaN passes (a `q > 0` guard would drop it)
            s3 += tl.where(lq == float("-inf"), 0.0, exp2(lq * LOG2E) * (lq - lm))
            s4 += tl.where(lp == float("-inf"), 0.0, exp2(lp * LOG2E) * (lp - lm))
        s3 = tl.sum(s3, axis=0)
        s4 = tl.sum(s4, axis=0)
        kl = beta * s4 + (1.0 - beta) * s3
    else:
        # t is finite, but +inf or NaN (0 * inf) where d = +inf: the KL is +inf there, unless
        # a NaN logit (s NaN) or a row one model masks whole (s = 0) makes it NaN
        if REVERSE:
            t = tl.sum(t * w_a, axis=0)
            s3 = t * inv_t / s_a_row   # mu = E_q[a - b]
            kl = s3 + lse_b - lse_a
        else:
            t = tl.sum(t * w_b, axis=0)
            s3 = t * inv_t / s_b_row   # mu = E_p[b - a]
            kl = s3 + lse_a - lse_b
        inf = ((t != t) | (t == float("inf"))) & (s_a_row > 0.0) & (s_b_row > 0.0)
        kl = tl.where(inf, float("inf"), kl)
        s3 = tl.where(inf, float("inf"), s3)
        s4 = 0.0
    kl = tl.where(kl < 0.0, 0.0, kl)  # rounding can dip below the true D >= 0; NaN passes through
    s3 = tl.where(kl != kl, kl, s3)   # a NaN divergence reaches the backward through mu

    store_ce_loss(z_row, y, V, lse_z, sum_z, kl, eps, hrm, loss_ptr + row, ce_ptr + row,
                   kl_ptr + row, SMOOTH)
    tl.store(ent_ptr + row, (tl.log2(s_a_row) - h / s_a_row) * LN2)
    tl.store(stats_ptr + 5 * row, lse_z)
    tl.store(stats_ptr + 5 * row + 1, lse_a)
    tl.store(stats_ptr + 5 * row + 2, lse_b)
    tl.store(stats_ptr + 5 * row + 3, s3)
    tl.store(stats_ptr + 5 * row + 4, s4)


@triton.jit
def _hrm_loss_bwd_kernel(
    z_ptr, z_sb, z_ss,           # student logits (B, S, V)
    u_ptr, u_sb, u_ss,           # teacher logits (B, S, V)
    y_ptr,                       # labels (N,)
    stats_ptr,                   # (N, 5) fp32 from the forward: lse(z), lse(z/T), lse(u/T), then
                                 # mu, 0 (KL) or KL(q || m), KL(p || m) (JSD)
    g_ptr, g_stride,             # the rows' incoming gradient (N,) fp32; stride 0: a scalar
    dz_ptr, dz_sb, dz_ss,        # (B, S, V) out, student dtype; may alias z (inplace_backward)
    du_ptr, du_sb, du_ss,        # (B, S, V) out, teacher dtype; unused unless WRITE_DU
    S, V, hrm, inv_t, eps, ignore_index, beta, log_beta, log_1m_beta,
    REVERSE: tl.constexpr, JSD: tl.constexpr, HAS_KL: tl.constexpr, WRITE_DU: tl.constexpr,
    UNIT_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # grid = (N, cdiv(V, BLOCK_V)): each program owns one block of one row, so reading z and
    # writing dz at the same addresses is safe in place.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    r_b, r_s = row // S, row % S
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:   # ignored rows store an exact 0 gradient
        tl.store(dz_ptr + r_b * dz_sb + r_s * dz_ss + cols,
                 tl.zeros([BLOCK_V], tl.float32).to(dz_ptr.dtype.element_ty), mask=mask)
        if WRITE_DU:
            tl.store(du_ptr + r_b * du_sb + r_s * du_ss + cols,
                     tl.zeros([BLOCK_V], tl.float32).to(du_ptr.dtype.element_ty), mask=mask)
        return
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    lse_z = tl.load(stats_ptr + 5 * row)
    z = tl.load(z_ptr + r_b * z_sb + r_s * z_ss + cols, mask=mask,
                other=float("-inf")).to(tl.float32)
    sm = exp2(z * LOG2E - lse_z * LOG2E)     # one FFMA and one MUFU.EX2 an exponential
    dz = sm - eps / V - tl.where(cols == y, 1.0 - eps, 0.0)
    if HAS_KL:
        lse_a = tl.load(stats_ptr + 5 * row + 1)
        lse_b = tl.load(stats_ptr + 5 * row + 2)
        s3 = tl.load(stats_ptr + 5 * row + 3)
        u = tl.load(u_ptr + r_b * u_sb + r_s * u_ss + cols, mask=mask,
                    other=float("-inf")).to(tl.float32)
        b = u * inv_t
        if UNIT_T:
            a = z
            q = sm
        else:
            a = z * inv_t
            q = exp2(z * (LOG2E * inv_t) - lse_a * LOG2E)
        p = exp2(u * (LOG2E * inv_t) - lse_b * LOG2E)
        s4 = tl.load(stats_ptr + 5 * row + 4)
        g_z, g_u = divergence_grads(a, b, q, p, lse_a, lse_b, s3, s4, beta, log_beta,
                                     log_1m_beta, REVERSE, JSD)
        dz += hrm * inv_t * g_z
        du = hrm * inv_t * g_u
    else:
        du = tl.zeros([BLOCK_V], tl.float32)   # hrm == 0: the teacher gets an exact zero gradient
    if WRITE_DU:
        tl.store(du_ptr + r_b * du_sb + r_s * du_ss + cols, (g * du).to(du_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(dz_ptr + r_b * dz_sb + r_s * dz_ss + cols, (g * dz).to(dz_ptr.dtype.element_ty),
             mask=mask)


def _same_view(z, u):
    """u is z (another view of the same logits: api/hrm_loss.py's fused cross-entropy)."""
    return (torch._C._is_alias_of(u, z) and u.storage_offset() == z.storage_offset()
            and u.stride() == z.stride() and u.dtype == z.dtype)


def fwd_tile(v, z, u, warps=8):
    """The forward's tile [THREADS, VEC, KSUB] for up to block_v logits: VEC logits of 16 B of
    the wider input, a thread's run, and KSUB = 2 runs a thread, where rows are 16-byte aligned;
    elsewhere (STRIDED) each logit is its own load and register, so a thread takes VEC logits
    THREADS apart, once (twice spills). On a GPU THREADS is at most the block's 256; under the
    interpreter whatever the block needs."""
    block = block_v(v, z.device, max(z.element_size(), u.element_size()))
    vec = min(16 // max(z.element_size(), u.element_size()), block)
    aligned = all(t.stride(i) % vec == 0 for t in (z, u) for i in (0, 1))
    ksub = 2 if block >= 2 * vec and aligned else 1
    threads = block // (vec * ksub)
    if launch_target(z.device) is not None:
        threads = min(threads, 32 * warps)
    return dict(THREADS=threads, VEC=vec, KSUB=ksub, STRIDED=not aligned)


def _fwd_fake(z, u, labels, *options):
    n = labels.shape[0]
    return (*(z.new_empty(n, dtype=torch.float32) for _ in range(4)),
            z.new_empty((n, 5), dtype=torch.float32))


@custom_triton_op("hrmkernels::hrm_loss_fwd_triton", (), _fwd_fake)
def _hrm_loss_fwd_op(z: Tensor, u: Tensor, labels: Tensor, hrm: float, temperature: float,
                     label_smoothing: float, ignore_index: int, beta: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, v = labels.shape[0], z.shape[-1]
    check_label_range(labels, v, ignore_index)   # CPU tensors (the interpreter) only
    loss, ce, kl, ent = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(4))
    stats = torch.empty(n, 5, dtype=torch.float32, device=z.device)
    scalars, flags = divergence_args(beta)
    if n:
        with device_of(z):
            wrap_triton(_hrm_loss_fwd_kernel)[(n,)](
                z, z.stride(0), z.stride(1), u, u.stride(0), u.stride(1), labels,
                loss, ce, kl, ent, stats, z.shape[1], v, hrm, 1.0 / temperature,
                label_smoothing, ignore_index, *scalars, SMOOTH=label_smoothing > 0,
                TEACHER=not _same_view(z, u),
                UNIT_T=temperature == 1.0,
                **fwd_tile(v, z, u), num_warps=8, maxnreg=MAXNREG_8_WARPS, **flags)
    return loss, ce, kl, ent, stats


@custom_triton_op("hrmkernels::hrm_loss_bwd_triton", ("dz", "du"), no_output)
def _hrm_loss_bwd_op(z: Tensor, u: Tensor, labels: Tensor, stats: Tensor, grad: Tensor,
                     hrm: float, temperature: float, label_smoothing: float, ignore_index: int,
                     beta: float, dz: Tensor, du: Tensor | None) -> None:
    n, v = labels.shape[0], z.shape[-1]
    if not n:
        return
    block = block_v(v, z.device, max(z.element_size(), u.element_size()))
    write_du = du is not None
    du = du if write_du else dz
    scalars, flags = divergence_args(beta, hrm > 0)
    with device_of(z):
        wrap_triton(_hrm_loss_bwd_kernel)[(n, triton.cdiv(v, block))](
            z, z.stride(0), z.stride(1), u, u.stride(0), u.stride(1), labels, stats,
            grad, grad.stride(0), dz, dz.stride(0), dz.stride(1), du, du.stride(0), du.stride(1),
            z.shape[1], v, hrm, 1.0 / temperature, label_smoothing, ignore_index, *scalars,
            HAS_KL=hrm > 0, WRITE_DU=write_du, UNIT_T=temperature == 1.0, BLOCK_V=block,
            num_warps=8, **flags)


def hrm_loss_fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
    """z, u: (B, S, V) row views; labels: (N,). Returns loss, ce, div, entropy (N,) and stats
    (N, 5), fp32 (the contract of kernels/__init__.py)."""
    return torch.ops.hrmkernels.hrm_loss_fwd_triton(z, u, labels, float(hrm), float(temperature),
                                                    float(label_smoothing), int(ignore_index),
                                                    float(beta))


def hrm_loss_bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
                 beta, dz, du):
    """Write d(sum_r grad_r * loss_r)/dz into dz and, when du is not None, d/du into du.

    grad is (N,) fp32, possibly a stride-0 expansion of a scalar; dz, du are (B, S, V) views
    (dz may be z itself for an in-place backward).
    """
    torch.ops.hrmkernels.hrm_loss_bwd_triton(z, u, labels, stats, grad, float(hrm),
                                             float(temperature), float(label_smoothing),
                                             int(ignore_index), float(beta), dz, du)
