"""backend="torch": the fused HRM loss in pure PyTorch, memory-frugal, for any device.

The launchers' contract is in kernels/__init__.py (hrm_loss_fwd / hrm_loss_bwd, and
hrm_loss_topk_fwd / hrm_loss_topk_bwd for top-k teachers): rows are processed in chunks of about
CHUNK_ELEMENTS logits, so the fp32 temporaries never exceed a few chunk-sized tensors whatever N is;
the forward saves per-row log-sum-exps and the backward is written by hand from docs/design.md
section 1 (top-k: topk.py) instead of keeping an autograd graph over N x V tensors.
Math runs in float32, or float64 when an input is float64.

The launchers call custom ops (torch.ops.hrmkernels.*_torch), which torch.compile treats as
opaque calls: a compiled model runs these loops unchanged. The CPU label and index checks
(kernels.host_checks) run inside the ops, so they also run in a compiled model; they are skipped
only while tracing and on other devices, where a bad label or index gives a NaN loss instead,
as in the GPU kernels.
"""
import math

import torch
from torch import Tensor

from hrmkernels import kernels

CHUNK_ELEMENTS = 1 << 21   # ~8 MB per fp32 temporary


def _rows(z):
    """Yield (r0, r1, b, s0, s1): rows r0:r1 of the (B, S, V) view z are z[b, s0:s1]."""
    _, s_len, v = z.shape
    step = max(1, CHUNK_ELEMENTS // v)
    for b in range(z.shape[0]):
        for s0 in range(0, s_len, step):
            s1 = min(s0 + step, s_len)
            yield b * s_len + s0, b * s_len + s1, b, s0, s1


def _compute_dtype(z, u):
    return torch.promote_types(torch.promote_types(z.dtype, u.dtype), torch.float32)


def _ce(zc, y, v, eps):
    """lse(z) and CE per row of the chunk zc; NaN CE for a label outside [0, V)."""
    valid = (y >= 0) & (y < v)
    lse_z = torch.logsumexp(zc, -1)
    z_y = zc.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    z_y = torch.where(valid, z_y, torch.nan)
    ce = lse_z - z_y if eps == 0 else lse_z - (1 - eps) * z_y - eps * zc.mean(-1)
    return lse_z, ce


def _ce_grad(zc, lse_z, y, v, eps):
    """d CE / dz = softmax(z) - eps / V - (1 - eps) onehot(y), for the chunk zc."""
    d_z = (zc - lse_z).exp_().sub_(eps / v)
    valid = ((y >= 0) & (y < v)).to(zc.dtype)[:, None]
    d_z.scatter_add_(1, y.clamp(0, v - 1)[:, None], valid * (eps - 1))   # -(1 - eps) at y
    return d_z


def _entropy(a):
    """H(softmax(a)) per row as log s - h / s with s = sum e, h = sum e (a - m), e = exp(a - m),
    m = max a: the kernels' relative form, accurate where lse(a) - E_q[a] would cancel."""
    m = a.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    e = (a - m).exp()
    s = e.sum(-1)
    return s.log() - (e * torch.where(a == float("-inf"), 0.0, a - m)).sum(-1) / s


def _log_mix(lp, lq, beta):
    """log(beta p + (1 - beta) q) from log p and log q; -inf only where p = q = 0."""
    return torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def _xlogy_diff(w, x, d):
    """sum w d over the last dimension, decided by w's logit x rather than by w, which may
    underflow (docs/design.md, "Non-finite inputs"): 0 where x = -inf (0 * log 0 = 0, even at
    d = inf), +inf where d = +inf (the other distribution is 0 there), NaN passes through."""
    term = torch.where(d == float("inf"), float("inf"), w * d)
    return torch.where(x == float("-inf"), 0.0, term).sum(-1)


def _jsd_terms(lp, lq, beta):
    """KL(p || m) and KL(q || m) per row, m = beta p + (1 - beta) q, from log-probabilities."""
    lm = _log_mix(lp, lq, beta)
    return _xlogy_diff(lp.exp(), lp, lp - lm), _xlogy_diff(lq.exp(), lq, lq - lm)


def _divergence(a, b, lse_a, lse_b, beta):
    """The divergence per row and the two statistics the backward needs (the derivation is in
    kernels/triton/hrm_loss.py).

    KL (beta 0 or 1): mu = E_p[b - a] (reverse: E_q[a - b]), KL = mu + lse_a - lse_b (reverse:
    + lse_b - lse_a), stats (mu, 0). JSD: kl_qm = KL(q || m), kl_pm = KL(p || m), stats
    (kl_qm, kl_pm).
    """
    if beta in (0.0, 1.0):
        x, d, lse_x, lse_d = (a, a - b, lse_a, lse_b - lse_a) if beta == 1.0 else \
            (b, b - a, lse_b, lse_a - lse_b)
        w = (x - lse_x[:, None]).exp()
        # Divided by sum(w), not 1: the rounding of lse would otherwise scale |d| ~ |logits| / T.
        mu = _xlogy_diff(w, x, d) / w.sum(-1)
        kl = mu + lse_d
        # a NaN in the other stream (lse_d) reaches the backward through mu: a NaN gradient
        return kl.clamp_min(0), torch.where(kl.isnan(), kl, mu), torch.zeros_like(mu)
    kl_pm, kl_qm = _jsd_terms(b - lse_b[:, None], a - lse_a[:, None], beta)
    return (beta * kl_pm + (1 - beta) * kl_qm).clamp_min(0), kl_qm, kl_pm


def _fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
    v = z.shape[-1]
    kernels.check_label_range(labels, v, ignore_index)
    dtype, eps = _compute_dtype(z, u), float(label_smoothing)
    n = labels.numel()
    ce, div, ent = (torch.empty(n, dtype=dtype, device=z.device) for _ in range(3))
    stats = torch.empty(n, 5, dtype=dtype, device=z.device)
    for r0, r1, bi, s0, s1 in _rows(z):
        y = labels[r0:r1].long()
        zc, uc = z[bi, s0:s1].to(dtype), u[bi, s0:s1].to(dtype)
        a, b = zc / temperature, uc / temperature
        lse_z, ce_c = _ce(zc, y, v, eps)
        lse_a = lse_z if temperature == 1 else torch.logsumexp(a, -1)
        lse_b = torch.logsumexp(b, -1)
        div_c, s3, s4 = _divergence(a, b, lse_a, lse_b, beta)
        keep = y != ignore_index
        ce[r0:r1] = torch.where(keep, ce_c, 0.0)
        div[r0:r1] = torch.where(keep, div_c, 0.0)
        ent[r0:r1] = torch.where(keep, _entropy(a), 0.0)
        stats[r0:r1] = torch.where(keep[:, None], torch.stack((lse_z, lse_a, lse_b, s3, s4), 1),
                                   0.0)
    loss = ce + hrm * div if hrm > 0 else ce.clone()
    return loss, ce, div, ent, stats


def _bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index, beta, dz, du):
    v = z.shape[-1]
    dtype, eps, c = _compute_dtype(z, u), float(label_smoothing), hrm / temperature
    # A masked entry (logit -inf) contributes 0, never 0 * inf; the guards test the logits, not
    # `p > 0`, which would drop a NaN, also where p underflows (docs/design.md).
    for r0, r1, bi, s0, s1 in _rows(z):
        y = labels[r0:r1].long()
        keep = (y != ignore_index)[:, None]   # ignored rows: exact zeros (their stats are 0)
        g = torch.where(keep, grad[r0:r1, None].to(dtype), 0.0)
        lse_z, lse_a, lse_b, s3, s4 = (stats[r0:r1, i, None].to(dtype) for i in range(5))
        zc = z[bi, s0:s1].to(dtype)
        d_z = _ce_grad(zc, lse_z, y, v, eps)
        d_u = None
        if hrm > 0:
            a, b = zc / temperature, u[bi, s0:s1].to(dtype) / temperature
            lq, lp = a - lse_a, b - lse_b
            q, p = lq.exp(), lp.exp()
            if beta == 1.0:     # log q - log p - KL = (a - b) - mu
                d_z += c * torch.where(a == float("-inf"), 0.0, q * ((a - b) - s3))
                d_u = c * (p - q)
            elif beta == 0.0:   # log p - log q - KL = (b - a) - mu
                d_z += c * (q - p)
                d_u = c * torch.where(b == float("-inf"), 0.0, p * ((b - a) - s3))
            else:               # JSD: (1 - beta) q (lq - lm - kl_qm), beta p (lp - lm - kl_pm)
                lm = _log_mix(lp, lq, beta)
                d_z += c * (1 - beta) * torch.where(a == float("-inf"), 0.0, q * (lq - lm - s3))
                d_u = c * beta * torch.where(b == float("-inf"), 0.0, p * (lp - lm - s4))
        if du is not None:
            du[bi, s0:s1] = torch.where(keep, d_u * g, 0.0) if d_u is not None else 0
        dz[bi, s0:s1] = torch.where(keep, d_z * g, 0.0)


# Top-k teachers: the math, the stats and the gradient are derived in topk.py.

def _check_topk_indices(idx, v):
    if not kernels.host_checks(idx):
        return
    bad = (idx < 0) | (idx >= v)
    if bad.any():  # sync-ok: CPU tensor
        raise ValueError(f"teacher_topk indices must lie in [0, {v}) (the student's vocabulary); "
                         f"found {idx[bad][0]}")  # sync-ok: CPU tensor


def rest_mass(lp):
    """P = 1 - sum_i exp(l_i) over the last dimension, accurate when the top-k hold nearly all
    the mass: log sum_i exp(l_i) = m + log1p(the others' sum relative to the maximum m), then
    P = -expm1(that), clamped at 0 (log-probabilities rounded to bf16 can add up past 1)."""
    m = lp.amax(-1, keepdim=True)
    e = (lp - torch.where(m == float("-inf"), 0.0, m)).exp()
    e = e.scatter(-1, lp.argmax(-1, keepdim=True), 0.0)   # the maximum's own term is exactly 1
    return (-torch.expm1(m.squeeze(-1) + torch.log1p(e.sum(-1)))).clamp_min(0)


def _bucket_kl(log_w, log_v):
    """w (log w - log v) from logs: 0 where w = 0, +inf where v = 0 < w (even if exp(log w)
    underflows), as in the kernel."""
    w = log_w.exp()
    term = torch.where(w > 0, w * (log_w - log_v), 0.0)
    return torch.where((log_v == float("-inf")) & (log_w > float("-inf")), float("inf"), term)


def _topk_fwd(z, idx, lp, labels, hrm, temperature, label_smoothing, ignore_index, beta,
              renormalize):
    v, reverse, jsd = z.shape[-1], beta == 1.0, 0.0 < beta < 1.0
    kernels.check_label_range(labels, v, ignore_index)
    _check_topk_indices(idx, v)
    dtype, eps = _compute_dtype(z, lp), float(label_smoothing)
    n = labels.numel()
    ce, kl, ent = (torch.empty(n, dtype=dtype, device=z.device) for _ in range(3))
    stats = torch.empty(n, 4, dtype=dtype, device=z.device)
    for r0, r1, bi, s0, s1 in _rows(z):
        y = labels[r0:r1].long()
        zc, lt = z[bi, s0:s1].to(dtype), lp[bi, s0:s1].to(dtype)
        ic = idx[bi, s0:s1].long()
        ok = ((ic >= 0) & (ic < v)).all(-1)
        ic = ic.clamp(0, v - 1)      # never read out of bounds: the row's KL is NaN instead
        lse_z, ce_c = _ce(zc, y, v, eps)
        a = zc / temperature
        a_top = a.gather(1, ic)
        if renormalize:
            lse_s, lse_t = a_top.logsumexp(-1), lt.logsumexp(-1)
            ls, lt = a_top - lse_s[:, None], lt - lse_t[:, None]
            if jsd:
                kl_pm, slot3 = _jsd_terms(lt, ls, beta)
                kl_c = beta * kl_pm + (1 - beta) * slot3
            else:
                kl_c = (_xlogy_diff(ls.exp(), ls, ls - lt) if reverse
                        else _xlogy_diff(lt.exp(), lt, lt - ls))
            slot2 = lse_t
        else:
            lse_s = a.logsumexp(-1)
            lse_r = a.scatter(1, ic, float("-inf")).logsumexp(-1)   # outside the top-k
            ls = a_top - lse_s[:, None]
            # P in float64, as in the kernel (k values per row)
            log_pr = rest_mass(lt.double()).log().to(dtype) if lt.shape[-1] < v else \
                torch.full_like(lse_s, -torch.inf)
            log_qr = lse_r - lse_s
            if jsd:   # k + 1 outcomes; outside the top-k every q_v shares log Q - log M
                kl_pm, slot3 = _jsd_terms(torch.cat((lt, log_pr[:, None]), 1),
                                          torch.cat((ls, log_qr[:, None]), 1), beta)
                kl_c = beta * kl_pm + (1 - beta) * slot3
                slot2 = torch.where(log_qr == float("-inf"), 0.0,
                                    log_qr - _log_mix(log_pr, log_qr, beta))
            elif reverse:
                kl_c = _xlogy_diff(ls.exp(), ls, ls - lt) + _bucket_kl(log_qr, log_pr)
            else:
                kl_c = _xlogy_diff(lt.exp(), lt, lt - ls) + _bucket_kl(log_pr, log_qr)
            if not jsd:   # L: outside the top-k the implied teacher is P q_v / Q = exp(a_v - L)
                slot2 = torch.where(log_pr == float("-inf"), float("inf"), lse_r - log_pr)
        kl_c = torch.where(ok, kl_c.clamp_min(0), torch.nan)
        if not jsd:
            slot3 = kl_c
        keep = y != ignore_index
        ce[r0:r1] = torch.where(keep, ce_c, 0.0)
        kl[r0:r1] = torch.where(keep, kl_c, 0.0)
        ent[r0:r1] = torch.where(keep, _entropy(a), 0.0)
        stats[r0:r1] = torch.stack((lse_z, lse_s, slot2, torch.where(ok, slot3, torch.nan)), 1)
    loss = ce + hrm * kl if hrm > 0 else ce.clone()
    return loss, ce, kl, ent, stats


def _topk_bwd(z, idx, lp, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
              beta, renormalize, dz):
    v, reverse, jsd = z.shape[-1], beta == 1.0, 0.0 < beta < 1.0
    dtype, eps, c = _compute_dtype(z, lp), float(label_smoothing), hrm / temperature
    for r0, r1, bi, s0, s1 in _rows(z):
        y = labels[r0:r1].long()
        g = torch.where(y != ignore_index, grad[r0:r1].to(dtype), 0.0)[:, None]
        lse_z, lse_s, slot2, kl = (stats[r0:r1, i, None].to(dtype) for i in range(4))
        zc = z[bi, s0:s1].to(dtype)
        d_z = _ce_grad(zc, lse_z, y, v, eps)
        if hrm > 0:
            ic = idx[bi, s0:s1].long().clamp(0, v - 1)
            d_top = d_z.gather(1, ic)                 # the CE part at the top-k entries
            a = zc / temperature
            if not renormalize:                       # outside the top-k (rest bucket)
                q = (a - lse_s).exp()
                if jsd:
                    d_z += c * (1 - beta) * torch.where(q > 0, q * (slot2 - kl), 0.0)
                elif reverse:
                    d_z += c * torch.where(q > 0, q * ((slot2 - lse_s) - kl), 0.0)
                else:
                    d_z += c * (q - torch.where(a > float("-inf"), (a - slot2).exp(), 0.0))
            ls = a.gather(1, ic) - lse_s
            lt = lp[bi, s0:s1].to(dtype) - (slot2 if renormalize else 0.0)
            q_top = ls.exp()
            if jsd:   # kl = KL(q || m) here
                lm = _log_mix(lt, ls, beta)
                d_top += c * (1 - beta) * torch.where(q_top > 0, q_top * (ls - lm - kl), 0.0)
            elif reverse:
                d_top += c * torch.where(q_top > 0, q_top * (ls - lt - kl), 0.0)
            else:
                d_top += c * (q_top - lt.exp())
            d_z.scatter_(1, ic, d_top)                # the top-k entries' own gradient
        dz[bi, s0:s1] = torch.where(y[:, None] != ignore_index, d_z * g, 0.0)   # exact 0 if ignored


# Custom ops: torch.compile treats them as opaque calls (FakeTensor tracing sees only the shapes
# registered below). The backward writes into dz (and du) in place, like the CUDA op's schema
# "Tensor(a!) dz, Tensor(b!)? du".

@torch.library.custom_op("hrmkernels::hrm_loss_fwd_torch", mutates_args=())
def _hrm_loss_fwd_op(z: Tensor, u: Tensor, labels: Tensor, hrm: float, temperature: float,
                     label_smoothing: float, ignore_index: int, beta: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta)


def _fwd_fake(z, u, labels, *options, n_stats=5):
    n, dtype = labels.shape[0], _compute_dtype(z, u)
    return (*(z.new_empty(n, dtype=dtype) for _ in range(4)),
            z.new_empty((n, n_stats), dtype=dtype))


_hrm_loss_fwd_op.register_fake(_fwd_fake)


@torch.library.custom_op("hrmkernels::hrm_loss_bwd_torch", mutates_args=("dz", "du"))
def _hrm_loss_bwd_op(z: Tensor, u: Tensor, labels: Tensor, stats: Tensor, grad: Tensor,
                     hrm: float, temperature: float, label_smoothing: float, ignore_index: int,
                     beta: float, dz: Tensor, du: Tensor | None) -> None:
    _bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index, beta, dz, du)


_hrm_loss_bwd_op.register_fake(lambda *args: None)


@torch.library.custom_op("hrmkernels::hrm_loss_topk_fwd_torch", mutates_args=())
def _hrm_loss_topk_fwd_op(z: Tensor, idx: Tensor, lp: Tensor, labels: Tensor, hrm: float,
                          temperature: float, label_smoothing: float, ignore_index: int,
                          beta: float, renormalize: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _topk_fwd(z, idx, lp, labels, hrm, temperature, label_smoothing, ignore_index, beta,
                     renormalize)


_hrm_loss_topk_fwd_op.register_fake(
    lambda z, idx, lp, labels, *options: _fwd_fake(z, lp, labels, n_stats=4))


@torch.library.custom_op("hrmkernels::hrm_loss_topk_bwd_torch", mutates_args=("dz",))
def _hrm_loss_topk_bwd_op(z: Tensor, idx: Tensor, lp: Tensor, labels: Tensor, stats: Tensor,
                          grad: Tensor, hrm: float, temperature: float, label_smoothing: float,
                          ignore_index: int, beta: float, renormalize: bool, dz: Tensor) -> None:
    _topk_bwd(z, idx, lp, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
              beta, renormalize, dz)


_hrm_loss_topk_bwd_op.register_fake(lambda *args: None)


def hrm_loss_fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
    """As kernels/__init__.py's contract; outputs are float64 when an input is float64."""
    return torch.ops.hrmkernels.hrm_loss_fwd_torch(z, u, labels, float(hrm), float(temperature),
                                                   float(label_smoothing), int(ignore_index),
                                                   float(beta))


def hrm_loss_bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
                 beta, dz, du):
    """Write d(sum_r grad_r * loss_r)/dz into dz and, when du is not None, d/du into du."""
    torch.ops.hrmkernels.hrm_loss_bwd_torch(z, u, labels, stats, grad, float(hrm),
                                            float(temperature), float(label_smoothing),
                                            int(ignore_index), float(beta), dz, du)


def hrm_loss_topk_fwd(z, idx, lp, labels, hrm, temperature, label_smoothing, ignore_index,
                      beta, renormalize):
    """As kernels.triton.topk.hrm_loss_topk_fwd; float64 outputs when an input is float64."""
    return torch.ops.hrmkernels.hrm_loss_topk_fwd_torch(
        z, idx, lp, labels, float(hrm), float(temperature), float(label_smoothing),
        int(ignore_index), float(beta), bool(renormalize))


def hrm_loss_topk_bwd(z, idx, lp, labels, stats, grad, hrm, temperature, label_smoothing,
                      ignore_index, beta, renormalize, dz):
    """Write d(sum_r grad_r * loss_r)/dz into dz (the top-k log-probabilities get no gradient)."""
    torch.ops.hrmkernels.hrm_loss_topk_bwd_torch(
        z, idx, lp, labels, stats, grad, float(hrm), float(temperature), float(label_smoothing),
        int(ignore_index), float(beta), bool(renormalize), dz)
