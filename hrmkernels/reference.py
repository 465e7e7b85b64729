"""The specification of the fused HRM loss in plain PyTorch (docs/design.md section 1).

Readable, differentiable by autograd, and deliberately unoptimised: it materialises several
N x V tensors. Tests compare every backend with it in float64; it is not a backend.

    CE    = (1 - eps) * (lse(z) - z_y) + eps * (lse(z) - mean_v z_v)
    q     = softmax(z / T),  p = softmax(u / T)
    D     = KL(p || q) = sum_v p_v (log p_v - log q_v)     beta = 0 (kl_direction "forward")
          = KL(q || p) = sum_v q_v (log q_v - log p_v)     beta = 1 (kl_direction "reverse")
          = beta KL(p || m) + (1 - beta) KL(q || m)        0 < beta < 1: generalised JSD,
                                                           m = beta p + (1 - beta) q (TRL's beta)
    token = CE + hrm * D                                   (0 at ignored tokens)
    H     = -sum_v q_v log q_v                             the student's entropy, for logging

A sparse teacher (hrm_loss_topk_reference) is given per token as distinct indices t_1..t_k and
log-probabilities l_i = log p_{t_i}, used as given: they are the teacher's distribution at the
KL temperature already (log_softmax(u / T).topk(k)); T divides only the student's logits.

    "rest"         k + 1 outcomes, the top-k and one bucket for everything else:
                   P = max(1 - sum_i p_i, 0) (0 when k = V),  Q = sum_{v not in top-k} q_v
                   KL = sum_i p_i (l_i - log q_{t_i}) + P (log P - log Q)       forward
                      = sum_i q_{t_i} (log q_{t_i} - l_i) + Q (log Q - log P)   reverse
    "renormalize"  k outcomes: p^_i = p_i / sum_j p_j,  q^_i = q_{t_i} / sum_j q_{t_j},
                   KL = sum_i p^_i (log p^_i - log q^_i)  (reverse swaps p^ and q^)

With jsd_beta, D is the generalised JSD above between the two distributions over those k + 1
("rest") or k ("renormalize") outcomes.
"""
import math

import torch

from hrmkernels._checks import (check_num_items, check_options, check_teacher_topk,
                                check_tensors, divergence_beta)
from hrmkernels.api.reduction import HRMLoss


def _compute_dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _ignored_rows_zero(x, keep):
    """x with ignored rows replaced by zeros: their (discarded) loss stays finite, so that no
    0 * inf = NaN reaches the gradient of the kept rows through autograd."""
    return torch.where(keep.unsqueeze(-1), x, 0.0)


def _ce(z, labels, keep, eps):
    log_sm = torch.log_softmax(z, dim=-1)
    nll = -log_sm.gather(-1, torch.where(keep, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return (1 - eps) * nll + eps * -log_sm.mean(-1) if eps > 0 else nll


def _kl(log_p, log_q):
    """sum p (log p - log q) over the last dimension, decided by the logs, not by an exp that
    may underflow: 0 where log p = -inf (0 * log 0 = 0, masked before the product so that
    autograd never meets 0 * inf); +inf where log p > -inf = log q, even where exp(log p) is 0;
    NaN passes through (values and gradients)."""
    p = log_p.exp()
    masked = log_p == float("-inf")
    term = p * torch.where(masked, 0.0, log_p - log_q)
    return torch.where(~masked & (log_q == float("-inf")) & (p == 0), float("inf"), term).sum(-1)


def _divergence(log_p, log_q, beta):
    """KL(p || q) at beta = 0, KL(q || p) at beta = 1, else beta KL(p || m) + (1 - beta) KL(q || m)
    with m = beta p + (1 - beta) q, whose log is taken in log space: entries whose probability
    underflows under both models (log p, log q < -104 in fp32) give 0, not 0 * log 0 = NaN."""
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    both_zero = (log_p == float("-inf")) & (log_q == float("-inf"))
    lp, lq = (torch.where(both_zero, 0.0, x) for x in (log_p, log_q))   # no NaN gradient there
    log_m = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    log_m = torch.where(both_zero, float("-inf"), log_m)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _entropy(log_q):
    q = log_q.exp()
    return -(q * torch.where(log_q == float("-inf"), 0.0, log_q)).sum(-1)


def _denominator(keep, num_items_in_batch, dtype):
    """"mean" divides by max(n, 1), n the kept tokens, or by num_items_in_batch as given; a count
    of 0 means no tokens: the loss is 0 if there are none, NaN if there are some."""
    n = keep.sum().to(dtype)
    if num_items_in_batch is None:
        return n.clamp_min(1)
    count = torch.as_tensor(num_items_in_batch, dtype=dtype, device=keep.device)
    return torch.where(count > 0, count, torch.where(n > 0, float("nan"), 1.0))


def _finish(ce, kl, entropy, hrm, keep, labels, ignore_index, reduction, num_items_in_batch,
            return_components):
    """token = CE + hrm * D, zeroed at ignored tokens, then reduced."""
    loss = ce + hrm * kl if hrm > 0 else ce   # hrm == 0 drops the KL term, even an infinite one
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    out = tuple(torch.where(keep, t, zero) for t in (loss, ce, kl, entropy))
    if reduction != "none":
        out = tuple(t.sum() for t in out)
        if reduction == "mean":
            out = tuple(t / _denominator(keep, num_items_in_batch, ce.dtype) for t in out)
    loss, ce, kl, entropy = out
    return HRMLoss(loss, ce.detach(), kl.detach(), entropy.detach()) if return_components else loss


def hrm_loss_reference(student_logits, teacher_logits, labels, hrm, *, temperature=1.0,
                       ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       kl_direction="forward", jsd_beta=None, num_items_in_batch=None,
                       return_components=False):
    """CE + hrm * D in plain PyTorch; same arguments and results as ``fused_hrm_loss``.

    Math runs in float32, or float64 when an input is float64. Returns the loss, or
    ``HRMLoss(loss, ce, kl)`` (with ``.entropy``) for ``return_components=True``.
    """
    check_tensors(student_logits, teacher_logits, labels)
    hrm, temperature, label_smoothing, ignore_index = check_options(
        hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, "torch", jsd_beta)
    num_items_in_batch = check_num_items(num_items_in_batch, student_logits.device, reduction)
    dtype = _compute_dtype(student_logits, teacher_logits)
    keep = labels != ignore_index
    z, u = (_ignored_rows_zero(x.to(dtype), keep) for x in (student_logits, teacher_logits))
    ce = _ce(z, labels, keep, float(label_smoothing))
    log_q = torch.log_softmax(z / temperature, dim=-1)
    log_p = torch.log_softmax(u / temperature, dim=-1)
    kl = _divergence(log_p, log_q, divergence_beta(kl_direction, jsd_beta))
    return _finish(ce, kl, _entropy(log_q), hrm, keep, labels, ignore_index, reduction,
                   num_items_in_batch, return_components)


def hrm_loss_topk_reference(student_logits, teacher_topk, labels, hrm, *, topk_mode="rest",
                            temperature=1.0, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, kl_direction="forward", jsd_beta=None,
                            num_items_in_batch=None, return_components=False):
    """CE + hrm * D to a top-k teacher ``(indices, logprobs)``, each (..., k); see the module
    docstring for the two ``topk_mode`` choices. Same results as ``fused_hrm_loss(...,
    teacher_topk=...)``; the log-probabilities get no gradient.
    """
    check_teacher_topk(student_logits, teacher_topk, labels, topk_mode)
    hrm, temperature, label_smoothing, ignore_index = check_options(
        hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, "torch", jsd_beta)
    num_items_in_batch = check_num_items(num_items_in_batch, student_logits.device, reduction)
    idx, logp = teacher_topk
    dtype = _compute_dtype(student_logits, logp)
    keep = labels != ignore_index
    z = _ignored_rows_zero(student_logits.to(dtype), keep)
    lp, idx = logp.detach().to(dtype), idx.long()
    ce = _ce(z, labels, keep, float(label_smoothing))
    log_q = torch.log_softmax(z / temperature, dim=-1)
    log_q_top = log_q.gather(-1, idx)
    if topk_mode == "renormalize":
        log_p, log_q = lp.log_softmax(-1), log_q_top.log_softmax(-1)
    else:
        # P = 1 - sum_i p_i, written -expm1(log sum_i p_i) so that P ~ 1e-30 does not round to 0
        rest_p = (-torch.expm1(lp.logsumexp(-1))).clamp_min(0) * (idx.shape[-1] < z.shape[-1])
        # log Q = log sum of q outside the top-k; where nothing is left, Q = 0 (and no NaN
        # gradient from a log-sum-exp over nothing but -inf).
        outside = log_q.scatter(-1, idx, float("-inf"))
        has_rest = (outside > float("-inf")).any(-1, keepdim=True)
        log_rest_q = torch.where(has_rest, torch.where(has_rest, outside, 0.0).logsumexp(-1, True),
                                 float("-inf"))
        log_p = torch.cat([lp, rest_p.log().unsqueeze(-1)], -1)
        log_q = torch.cat([log_q_top, log_rest_q], -1)
    kl = _divergence(log_p, log_q, divergence_beta(kl_direction, jsd_beta))
    return _finish(ce, kl, _entropy(torch.log_softmax(z / temperature, dim=-1)), hrm, keep,
                   labels, ignore_index, reduction, num_items_in_batch, return_components)
