"""The specification of the fused HRM loss in plain PyTorch (DESIGN.md section 1).

Readable, differentiable by autograd, and deliberately unoptimised: it materialises several
N x V tensors. Tests compare every backend with it in float64; it is not a backend.

    CE    = (1 - eps) * (lse(z) - z_y) + eps * (lse(z) - mean_v z_v)
    q     = softmax(z / T),  p = softmax(u / T)
    KL    = sum_v p_v (log p_v - log q_v)        forward (teacher || student)
          = sum_v q_v (log q_v - log p_v)        reverse (student || teacher)
    token = CE + hrm * KL                        (0 at ignored tokens)
"""
import torch

from hrmkernels._checks import check_num_items, check_options, check_tensors


def hrm_loss_reference(student_logits, teacher_logits, labels, hrm, *, temperature=1.0,
                       ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       kl_direction="forward", num_items_in_batch=None, return_components=False):
    """CE + hrm * KL in plain PyTorch; same arguments and results as ``fused_hrm_loss``.

    Math runs in float32, or float64 when an input is float64. Returns the loss, or
    ``(loss, ce, kl)`` with ``return_components=True`` (ce and kl detached).
    """
    check_tensors(student_logits, teacher_logits, labels)
    check_options(hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, "torch")
    check_num_items(num_items_in_batch, student_logits.device)
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                                torch.float32)
    z, u = student_logits.to(dtype), teacher_logits.to(dtype)
    keep = labels != ignore_index
    eps = float(label_smoothing)

    log_sm = torch.log_softmax(z, dim=-1)
    nll = -log_sm.gather(-1, torch.where(keep, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    ce = (1 - eps) * nll + eps * -log_sm.mean(-1) if eps > 0 else nll

    log_q = torch.log_softmax(z / temperature, dim=-1)
    log_p = torch.log_softmax(u / temperature, dim=-1)
    if kl_direction == "reverse":
        log_p, log_q = log_q, log_p          # KL(q || p) is KL(p || q) with the roles swapped
    p = log_p.exp()
    # 0 * log 0 = 0: mask the difference before the product, so autograd never meets 0 * inf.
    kl = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)

    loss = ce + hrm * kl if hrm > 0 else ce   # hrm == 0 drops the KL term, even an infinite one
    zero = torch.zeros((), dtype=dtype, device=z.device)
    loss, ce, kl = (torch.where(keep, t, zero) for t in (loss, ce, kl))

    if reduction == "none":
        out = (loss, ce, kl)
    else:
        out = tuple(t.sum() for t in (loss, ce, kl))
        if reduction == "mean":
            n = keep.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
            denom = n.to(device=z.device, dtype=dtype).clamp_min(1)
            out = tuple(t / denom for t in out)
    loss, ce, kl = out
    return (loss, ce.detach(), kl.detach()) if return_components else loss
