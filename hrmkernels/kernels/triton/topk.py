"""Triton kernels for the fused HRM loss with a sparse teacher (top-k ids and log-probabilities).

A top-k teacher stores, per token, k distinct ids t_i and log-probabilities l_i (DistillKit,
Megatron's top-k KD): k ids and k values instead of V logits. The log-probabilities are used as
given (the teacher at the KL temperature already); T divides only the student: a = z / T,
q = softmax(a), and ls_i = log q_{t_i} = a_{t_i} - lse(a). The kernel reads the student row once
plus k gathers. Two choices for the teacher's mass outside the top-k (reference.py has the spec):

"rest": one more outcome, everything else. P = 1 - sum_i exp(l_i), Q = sum_{v not in top-k} q_v,

    forward KL = sum_i p_i (l_i - ls_i) + P (log P - log Q)
    reverse KL = sum_i q_i (ls_i - l_i) + Q (log Q - log P)

  Differentiating through Q, the gradient is the full-vocabulary one (hrm_loss.py) against
  an implied teacher that spreads P over the rest like the student does: p~_v = P q_v / Q =
  exp(a_v - L) outside the top-k, with L = lse_rest(a) - log P, and p~ = p on the top-k:

    dKL/da_v = q_v - p~_v                                   forward
             = q_v (log q_v - log p~_v - KL)                reverse; outside the top-k,
               log q_v - log p~_v = log Q - log P = L - lse(a), the same for every v

"renormalize": p^_i = p_i / sum_j p_j and q^_i = q_{t_i} / sum_j q_{t_j} over the top-k only:

    forward KL = sum_i p^_i (log p^_i - log q^_i),  dKL/da_{t_i} = q^_i - p^_i
    reverse KL = sum_i q^_i (log q^_i - log p^_i),  dKL/da_{t_i} = q^_i (log q^_i - log p^_i - KL)

  and 0 outside the top-k. CE and its gradient are the dense kernel's, on the full row.

JSD (0 < beta < 1): hrm_loss.py's generalised JSD between the two distributions over the same
k + 1 ("rest") or k ("renormalize") outcomes, lm = log(beta p + (1 - beta) q) per outcome from
logs. Its gradient is dense JSD's, (1 - beta) q (lq - lm - KL(q || m)), per outcome, and through
Q the rest bucket's spreads over the entries outside the top-k as the KL's does: every one gets
(1 - beta) q_v (log Q - log M - KL(q || m)), M = beta P + (1 - beta) Q. Bounded by -log beta and
-log(1 - beta), the JSD stays finite where the KL is infinite (P = 0 < Q, Q = 0 < P).

Numerics. Q is never 1 - sum_i q_{t_i}: for a confident student that difference cancels to 0 in
fp32 (Q < 1e-7) and the KL would be infinite. Instead the forward excludes the top-k from a
third online log-sum-exp, lse_rest(a), block by block: with the ids sorted, each block's members
are a contiguous run of them, so a row costs k block-wide compares (one per id), not V x k.
P comes from the log-probabilities as -expm1(m + log1p(sum of the others' exp(l - m))), m =
max l, in fp64 (k values per row): a teacher holding 1 - 1e-9 of its mass in the top-k gives
P = 1e-9, not 0, and P ~ 1e-4 keeps more than fp32's three digits. With k = V there is no rest
outcome and P = 0 (rounded log-probabilities need not add up to exactly 1).

Any k. A program holds BLOCK_K <= MAX_BLOCK_K top-k entries at a time and loops over steps of
that many: the registers do not grow with k (k = 32768 at once spilled 9-16 KB). Across steps
the forward carries online log-sum-exps for "renormalize" (two passes: normalisers, then the
divergence) and, for P, the pair (m, o): the running max and the sum of exp(l - m) over all
entries but one maximal one, so that the other entries never cancel against the 1 of the
maximum.

Stats saved per row (N, 4): lse(z), lse_s (lse(a) for "rest", lse over the top-k of a for
"renormalize"), L ("rest"; JSD: log Q - log M, 0 where Q = 0) or lse_t = lse(l)
("renormalize"), and KL (JSD: KL(q || m)).

Bytes per row (bf16 student, int64 ids, fp32 log-probabilities): forward reads z once (2V) and
12k for the teacher; backward reads z again and writes dz (4V), plus 12k per vocabulary block.
The backward writes the dense gradient of its block, then (after a barrier) overwrites the
block's top-k entries with their own values, step by step. Their logits come from the block in
registers (tl.gather), not from memory, which the dense store may have overwritten (dz may
alias z).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from hrmkernels.kernels import check_label_range
from hrmkernels.kernels.triton.common import (block_v, custom_triton_op, device_of,
                                              divergence_args, log_mix, online_lse,
                                              online_lse_h, store_ce_loss, store_ignored_row)

# Top-k entries a program holds at once; a larger k is a loop over steps of this many, so the
# registers a program needs do not grow with k.
MAX_BLOCK_K = 1024


@triton.jit
def _log1p(x):
    # log(1 + x) to full relative precision near 0 (Goldberg: log(u) * x / (u - 1), u = 1 + x)
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _one_minus_exp(x):
    # 1 - exp(x) to full relative precision near 0 (Kahan: expm1(x) = (u - 1) * x / log(u))
    u = tl.exp(x)
    em1 = tl.where(x < -0.5, u - 1.0, (u - 1.0) * (x / tl.log(u)))
    return -tl.where(u == 1.0, x, em1)


@triton.jit
def _bucket_kl(log_w, log_v):
    # w (log w - log v) for the rest bucket from logs: 0 where w = 0, and +inf where v = 0 < w,
    # also when w underflows in exp (fp32: w < 1e-45), as it would in exact arithmetic.
    w = tl.exp(log_w)
    term = tl.where(w > 0.0, w * (log_w - log_v), 0.0)
    return tl.where((log_v == float("-inf")) & (log_w > float("-inf")), float("inf"), term)


@triton.jit
def _jsd_terms(lp, lq, log_beta, log_1m_beta):
    """KL(p || m) and KL(q || m) over a vector of outcomes given by their logs; 0 * log 0 = 0."""
    lm = log_mix(lp, lq, log_beta, log_1m_beta)
    p = tl.exp(lp)
    q = tl.exp(lq)
    return (tl.sum(tl.where(p > 0.0, p * (lp - lm), 0.0), axis=0),
            tl.sum(tl.where(q > 0.0, q * (lq - lm), 0.0), axis=0))


@triton.jit
def _topk_divergence_step(kl, kl_pm, kl_qm, lt, ls, log_beta, log_1m_beta,
                          REVERSE: tl.constexpr, JSD: tl.constexpr):
    """A step of top-k entries added to the divergence's sums, from their teacher and student
    log-probabilities lt, ls: sum p (lt - ls) (forward), sum q (ls - lt) (reverse), or the JSD's
    KL(p || m) and KL(q || m) terms. A zero probability contributes 0."""
    if JSD:
        pm, qm = _jsd_terms(lt, ls, log_beta, log_1m_beta)
        kl_pm += pm
        kl_qm += qm
    elif REVERSE:
        q = tl.exp(ls)
        kl += tl.sum(tl.where(q > 0.0, q * (ls - lt), 0.0), axis=0)
    else:
        p = tl.exp(lt)
        kl += tl.sum(tl.where(p > 0.0, p * (lt - ls), 0.0), axis=0)
    return kl, kl_pm, kl_qm


@triton.jit
def _fold_max_others(m, o, lp, BLOCK_K: tl.constexpr):
    """Fold a block of log-probabilities lp (fp64) into (m, o): m = max l and o = the sum of
    exp(l - m) over every entry but one maximal one, so that sum exp(l) = exp(m) (1 + o)."""
    m_c = tl.max(lp, axis=0)
    e = tl.exp(lp - tl.where(m_c == float("-inf"), 0.0, m_c))
    o_c = tl.sum(tl.where(tl.arange(0, BLOCK_K) == tl.argmax(lp, axis=0), 0.0, e), axis=0)
    new = m_c > m
    top = tl.maximum(m, m_c)
    # The other side's entries, its maximum included (the 1), rescaled to the larger max.
    w = tl.exp(tl.minimum(m, m_c) - tl.where(top == float("-inf"), 0.0, top))
    return top, tl.where(new, o_c, o) + (tl.where(new, o, o_c) + 1.0) * w


@triton.jit
def _topk_chunk(z_row, i_row, l_row, k0, K, V, inv_t, UNIT_T: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Top-k entries k0 .. k0 + BLOCK_K - 1 of a row: (in range, id in [0, V), l, a = z_id / T).

    An id outside [0, V) is never dereferenced (it reads z_0); it makes the row's KL NaN.
    """
    ks = k0 + tl.arange(0, BLOCK_K)
    kmask = ks < K
    idx = tl.load(i_row + ks, mask=kmask, other=0).to(tl.int64)
    lp = tl.load(l_row + ks, mask=kmask, other=float("-inf")).to(tl.float32)
    ok = (idx >= 0) & (idx < V)
    a = tl.load(z_row + tl.where(ok, idx, 0), mask=kmask, other=float("-inf")).to(tl.float32)
    if not UNIT_T:
        a = a * inv_t
    return kmask, ok, lp, a


@triton.jit
def _hrm_loss_topk_fwd_kernel(
    z_ptr, z_sb, z_ss,           # student logits (B, S, V), fp32/bf16/fp16, unit last stride
    i_ptr, i_sb, i_ss,           # teacher top-k ids (B, S, K), int32/int64, unit last stride
    l_ptr, l_sb, l_ss,           # teacher top-k log-probabilities (B, S, K), any float dtype
    srt_ptr,                     # (N, K) the ids sorted ascending per row; read only if REST
    y_ptr,                       # labels (N,) int32/int64
    loss_ptr, ce_ptr, kl_ptr,    # (N,) fp32 out: CE + hrm * KL, CE, KL (0 at ignored rows)
    ent_ptr,                     # (N,) fp32 out: entropy of q = softmax(z/T)
    stats_ptr,                   # (N, 4) fp32 out: lse(z), lse_s, L or lse_t, KL (module doc)
    S, V, K, hrm, inv_t, eps, ignore_index,
    beta, log_beta, log_1m_beta,  # the JSD's beta, log beta, log(1 - beta) (JSD only)
    REVERSE: tl.constexpr,       # KL(student || teacher)
    JSD: tl.constexpr,           # the generalised JSD (REVERSE is then unused)
    REST: tl.constexpr,          # "rest" bucket, else "renormalize"
    SMOOTH: tl.constexpr,        # eps > 0: accumulate sum_v z_v
    UNIT_T: tl.constexpr,        # T == 1: a = z
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,       # top-k entries per step; k is any size (a loop over steps)
):
    row = tl.program_id(0).to(tl.int64)   # int64: row * stride exceeds 2**31 at N*V > 2**31
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:
        store_ignored_row(row, loss_ptr, ce_ptr, kl_ptr, ent_ptr, stats_ptr, 4)
        return
    z_row = z_ptr + (row // S) * z_sb + (row % S) * z_ss
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)   # a scalar fp32 0 for loop carries
    m_z, s_z, m_a, s_a, m_r, s_r = zero - float("inf"), zero, zero - float("inf"), zero, \
        zero - float("inf"), zero
    sum_z = zero
    h = zero          # sum_v exp(a_v - m_a) * (a_v - m_a), for the entropy
    srt_row = srt_ptr + row * K
    hi = tl.sum(tl.zeros([BLOCK_K], tl.int32), axis=0)   # sorted ids below the current block
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z = tl.load(z_row + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if UNIT_T:
            a = z
            m_z, s_z, h, _e_z, _alpha_z = online_lse_h(m_z, s_z, h, z)
        else:
            a = z * inv_t
            m_z, s_z, _e_z, _alpha_z = online_lse(m_z, s_z, z)
            m_a, s_a, h, _e_a, _alpha_a = online_lse_h(m_a, s_a, h, a)
        if SMOOTH:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        if REST:
            # This block's top-k members are srt[lo:hi], lo the previous block's hi (srt is
            # sorted): count the ids below the block's end from lo on; mask them out of the
            # rest's sum, one block-wide compare per member.
            lo = hi
            for k0 in range(lo, K, BLOCK_K):
                inside = k0 + ks < K
                srt = tl.load(srt_row + k0 + ks, mask=inside, other=0)
                hi += tl.sum((inside & (srt < v0 + BLOCK_V)).to(tl.int32), axis=0)
            member = cols < 0
            for j in range(lo, hi):
                member = member | (cols == tl.load(srt_row + j) - v0)
            m_r, s_r, _e_r, _alpha_r = online_lse(m_r, s_r, tl.where(member, float("-inf"), a))
    lse_z = m_z + tl.log(s_z)
    if UNIT_T:
        entropy = tl.log(s_z) - h / s_z
    else:
        entropy = tl.log(s_a) - h / s_a

    # The top-k in steps of BLOCK_K: k gathers from the student's row.
    i_row = i_ptr + (row // S) * i_sb + (row % S) * i_ss
    l_row = l_ptr + (row // S) * l_sb + (row % S) * l_ss
    n_bad = tl.sum(tl.zeros([BLOCK_K], tl.int32), axis=0)   # ids outside [0, V)
    kl = zero                   # the KL (the JSD's: beta kl_pm + (1 - beta) kl_qm, at the end)
    kl_pm, kl_qm = zero, zero   # the JSD's KL(p || m) and KL(q || m)
    if REST:
        lse_s = lse_z if UNIT_T else m_a + tl.log(s_a)
        log_qr = m_r + tl.log(s_r) - lse_s          # -inf when the top-k hold all the mass
        # P = 1 - sum exp(l) = -expm1(lse(l)), lse(l) = m + log1p(the others relative to m), in
        # fp64: k values per row, and P ~ 1e-4 from fp32 sums would keep only three digits.
        m_l, others = (zero - float("inf")).to(tl.float64), zero.to(tl.float64)
        for k0 in range(0, K, BLOCK_K):
            kmask, ok, lp, a_top = _topk_chunk(z_row, i_row, l_row, k0, K, V, inv_t, UNIT_T,
                                               BLOCK_K)
            n_bad += tl.sum((kmask & ~ok).to(tl.int32), axis=0)
            m_l, others = _fold_max_others(m_l, others, lp.to(tl.float64), BLOCK_K)
            kl, kl_pm, kl_qm = _topk_divergence_step(kl, kl_pm, kl_qm, lp, a_top - lse_s,
                                                     log_beta, log_1m_beta, REVERSE, JSD)
        pr = tl.maximum(_one_minus_exp(m_l + _log1p(others)), 0.0)
        pr = tl.where(K == V, 0.0, pr)    # k = V: nothing is left outside, whatever the rounding
        log_pr = tl.log(pr).to(tl.float32)
        if JSD:   # the rest bucket's terms, with M = beta P + (1 - beta) Q
            lm_r = log_mix(log_pr, log_qr, log_beta, log_1m_beta)
            kl_pm += tl.where(log_pr > float("-inf"), tl.exp(log_pr) * (log_pr - lm_r), 0.0)
            kl_qm += tl.where(log_qr > float("-inf"), tl.exp(log_qr) * (log_qr - lm_r), 0.0)
            slot2 = tl.where(log_qr > float("-inf"), log_qr - lm_r, 0.0)
        else:
            if REVERSE:
                kl += _bucket_kl(log_qr, log_pr)
            else:
                kl += _bucket_kl(log_pr, log_qr)
            slot2 = tl.where(pr > 0.0, log_qr + lse_s - log_pr, float("inf"))   # L
    else:
        # Two passes: the normalisers lse_s = lse over the top-k of a and lse_t = lse(l) first,
        # then the divergence of the renormalised distributions.
        m_s, s_s, m_t, s_t = zero - float("inf"), zero, zero - float("inf"), zero
        for k0 in range(0, K, BLOCK_K):
            kmask, ok, lp, a_top = _topk_chunk(z_row, i_row, l_row, k0, K, V, inv_t, UNIT_T,
                                               BLOCK_K)
            n_bad += tl.sum((kmask & ~ok).to(tl.int32), axis=0)
            m_s, s_s, _e_s, _alpha_s = online_lse(m_s, s_s, a_top)
            m_t, s_t, _e_t, _alpha_t = online_lse(m_t, s_t, lp)
        lse_s = m_s + tl.log(s_s)
        slot2 = m_t + tl.log(s_t)                                          # lse_t
        for k0 in range(0, K, BLOCK_K):
            kmask, ok, lp, a_top = _topk_chunk(z_row, i_row, l_row, k0, K, V, inv_t, UNIT_T,
                                               BLOCK_K)
            kl, kl_pm, kl_qm = _topk_divergence_step(kl, kl_pm, kl_qm, lp - slot2,
                                                     a_top - lse_s, log_beta, log_1m_beta,
                                                     REVERSE, JSD)
    if JSD:
        kl = beta * kl_pm + (1.0 - beta) * kl_qm
    kl = tl.where(kl < 0.0, 0.0, kl)  # rounding can dip below the true KL >= 0; NaN passes through
    kl = tl.where(n_bad == 0, kl, float("nan"))
    slot3 = kl
    if JSD:
        slot3 = tl.where(n_bad == 0, kl_qm, float("nan"))

    store_ce_loss(z_row, y, V, lse_z, sum_z, kl, eps, hrm, loss_ptr + row, ce_ptr + row,
                   kl_ptr + row, SMOOTH)
    tl.store(ent_ptr + row, entropy)
    tl.store(stats_ptr + 4 * row, lse_z)
    tl.store(stats_ptr + 4 * row + 1, lse_s)
    tl.store(stats_ptr + 4 * row + 2, slot2)
    tl.store(stats_ptr + 4 * row + 3, slot3)


@triton.jit
def _hrm_loss_topk_bwd_kernel(
    z_ptr, z_sb, z_ss,           # student logits (B, S, V)
    i_ptr, i_sb, i_ss,           # teacher top-k ids (B, S, K)
    l_ptr, l_sb, l_ss,           # teacher top-k log-probabilities (B, S, K)
    y_ptr,                       # labels (N,)
    stats_ptr,                   # (N, 4) fp32 from the forward
    g_ptr, g_stride,             # incoming gradient of the per-row loss (N,); stride 0 = scalar
    dz_ptr, dz_sb, dz_ss,        # (B, S, V) out, student dtype; may alias z (inplace_backward)
    S, V, K, hrm, inv_t, eps, ignore_index, beta, log_beta, log_1m_beta,
    REVERSE: tl.constexpr, JSD: tl.constexpr, REST: tl.constexpr, HAS_KL: tl.constexpr,
    UNIT_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid = (N, cdiv(V, BLOCK_V)): each program owns one block of one row, top-k entries included.
    row = tl.program_id(0).to(tl.int64)
    v0 = tl.program_id(1).to(tl.int64) * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    mask = cols < V
    r_b, r_s = row // S, row % S
    dz_row = dz_ptr + r_b * dz_sb + r_s * dz_ss
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:   # ignored rows store an exact 0 gradient
        tl.store(dz_row + cols, tl.zeros([BLOCK_V], dz_ptr.dtype.element_ty), mask=mask)
        return
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    lse_z = tl.load(stats_ptr + 4 * row)
    z = tl.load(z_ptr + r_b * z_sb + r_s * z_ss + cols, mask=mask,
                other=float("-inf")).to(tl.float32)
    sm = tl.exp(z - lse_z)
    dz = sm - eps / V - tl.where(cols == y, 1.0 - eps, 0.0)
    if HAS_KL:
        lse_s = tl.load(stats_ptr + 4 * row + 1)
        slot2 = tl.load(stats_ptr + 4 * row + 2)
        kl = tl.load(stats_ptr + 4 * row + 3)   # JSD: KL(q || m)
        c = hrm * inv_t
        if REST:   # outside the top-k: the implied teacher p~ = exp(a - L)
            if UNIT_T:
                a = z
                q = sm
            else:
                a = z * inv_t
                q = tl.exp(a - lse_s)
            if JSD:   # slot2 = log Q - log M
                dz += c * (1.0 - beta) * tl.where(q > 0.0, q * (slot2 - kl), 0.0)
            elif REVERSE:
                dz += c * tl.where(q > 0.0, q * ((slot2 - lse_s) - kl), 0.0)
            else:
                dz += c * (q - tl.where(a > float("-inf"), tl.exp(a - slot2), 0.0))
    tl.store(dz_row + cols, (g * dz).to(dz_ptr.dtype.element_ty), mask=mask)
    if HAS_KL:
        # This block's top-k entries overwrite their dense values, in steps of BLOCK_K. Their
        # logits come from the registers (tl.gather), not memory: dz may alias z.
        tl.debug_barrier()   # every thread's dense store lands before the top-k overwrite
        i_row = i_ptr + r_b * i_sb + r_s * i_ss
        l_row = l_ptr + r_b * l_sb + r_s * l_ss
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            idx = tl.load(i_row + ks, mask=ks < K, other=-1).to(tl.int64)
            mine = (ks < K) & (idx >= v0) & (idx < v0 + BLOCK_V) & (idx < V)
            z_t = tl.gather(z, tl.where(mine, idx - v0, 0).to(tl.int32), 0)
            lt = tl.load(l_row + ks, mask=mine, other=float("-inf")).to(tl.float32)
            if not REST:
                lt = lt - slot2
            ls = (z_t if UNIT_T else z_t * inv_t) - lse_s
            q_t = tl.exp(ls)
            if JSD:
                lm = log_mix(lt, ls, log_beta, log_1m_beta)
                top = (1.0 - beta) * tl.where(q_t > 0.0, q_t * (ls - lm - kl), 0.0)
            elif REVERSE:
                top = tl.where(q_t > 0.0, q_t * (ls - lt - kl), 0.0)
            else:
                top = q_t - tl.exp(lt)
            dz_t = tl.exp(z_t - lse_z) - eps / V - tl.where(idx == y, 1.0 - eps, 0.0) + c * top
            tl.store(dz_row + idx, (g * dz_t).to(dz_ptr.dtype.element_ty), mask=mine)


def _block_k(k):
    return min(triton.next_power_of_2(int(k)), MAX_BLOCK_K)


# Custom ops, registered as in hrm_loss.py (triton_op on a GPU, an opaque custom_op under
# TRITON_INTERPRET=1). The backward writes dz in place.

def _fwd_fake(z, idx, lp, labels, *options):
    n = labels.shape[0]
    return (*(z.new_empty(n, dtype=torch.float32) for _ in range(4)),
            z.new_empty((n, 4), dtype=torch.float32))


@custom_triton_op("hrmkernels::hrm_loss_topk_fwd_triton", (), _fwd_fake)
def _hrm_loss_topk_fwd_op(z: Tensor, idx: Tensor, lp: Tensor, labels: Tensor, hrm: float,
                          temperature: float, label_smoothing: float, ignore_index: int,
                          beta: float, renormalize: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, v, k = labels.shape[0], z.shape[-1], idx.shape[-1]
    check_label_range(labels, v, ignore_index)   # CPU tensors (the interpreter) only
    loss, ce, kl, ent = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(4))
    stats = torch.empty(n, 4, dtype=torch.float32, device=z.device)
    if n:
        # "rest" sorts the ids (N x k, small) so that each vocabulary block finds its members.
        srt = idx if renormalize else idx.reshape(n, k).sort(-1).values
        scalars, flags = divergence_args(beta)
        with device_of(z):
            wrap_triton(_hrm_loss_topk_fwd_kernel)[(n,)](
                z, z.stride(0), z.stride(1), idx, idx.stride(0), idx.stride(1),
                lp, lp.stride(0), lp.stride(1), srt, labels, loss, ce, kl, ent, stats,
                z.shape[1], v, k, hrm, 1.0 / temperature, label_smoothing, ignore_index,
                *scalars, REST=not renormalize, SMOOTH=label_smoothing > 0,
                UNIT_T=temperature == 1.0, BLOCK_V=block_v(v, z.device, z.element_size()),
                BLOCK_K=_block_k(k),
                num_warps=4, maxnreg=255,   # else ptxas aims at 128 registers and spills
                **flags)
    return loss, ce, kl, ent, stats


@custom_triton_op("hrmkernels::hrm_loss_topk_bwd_triton", ("dz",), lambda *args: None)
def _hrm_loss_topk_bwd_op(z: Tensor, idx: Tensor, lp: Tensor, labels: Tensor, stats: Tensor,
                          grad: Tensor, hrm: float, temperature: float, label_smoothing: float,
                          ignore_index: int, beta: float, renormalize: bool, dz: Tensor) -> None:
    n, v, k = labels.shape[0], z.shape[-1], idx.shape[-1]
    if not n:
        return
    block = block_v(v, z.device, z.element_size())
    scalars, flags = divergence_args(beta, hrm > 0)
    with device_of(z):
        wrap_triton(_hrm_loss_topk_bwd_kernel)[(n, triton.cdiv(v, block))](
            z, z.stride(0), z.stride(1), idx, idx.stride(0), idx.stride(1),
            lp, lp.stride(0), lp.stride(1), labels, stats, grad, grad.stride(0),
            dz, dz.stride(0), dz.stride(1), z.shape[1], v, k, hrm, 1.0 / temperature,
            label_smoothing, ignore_index, *scalars, REST=not renormalize, HAS_KL=hrm > 0,
            UNIT_T=temperature == 1.0, BLOCK_V=block, BLOCK_K=_block_k(k), num_warps=8,
            **flags)


def hrm_loss_topk_fwd(z, idx, lp, labels, hrm, temperature, label_smoothing, ignore_index,
                      beta, renormalize):
    """z: (B, S, V), idx, lp: (B, S, k) row views; labels: (N,); beta as in hrm_loss.py.

    Returns loss, ce, kl, entropy (N,) and stats (N, 4), fp32.
    """
    return torch.ops.hrmkernels.hrm_loss_topk_fwd_triton(
        z, idx, lp, labels, float(hrm), float(temperature), float(label_smoothing),
        int(ignore_index), float(beta), bool(renormalize))


def hrm_loss_topk_bwd(z, idx, lp, labels, stats, grad, hrm, temperature, label_smoothing,
                      ignore_index, beta, renormalize, dz):
    """Write d(sum_r grad_r * loss_r)/dz into dz, a (B, S, V) view (may be z itself)."""
    torch.ops.hrmkernels.hrm_loss_topk_bwd_triton(
        z, idx, lp, labels, stats, grad, float(hrm), float(temperature), float(label_smoothing),
        int(ignore_index), float(beta), bool(renormalize), dz)
