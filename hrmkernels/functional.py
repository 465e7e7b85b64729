"""fused_hrm_loss: validation, backend choice, reduction."""
from typing import NamedTuple

import torch

from hrmkernels import backends
from hrmkernels._checks import check_num_items, check_options, check_tensors
from hrmkernels.autograd import HRMLossFunction


class HRMLoss(NamedTuple):
    """What ``return_components=True`` returns: the loss and its detached CE and KL parts."""
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def fused_hrm_loss(student_logits, teacher_logits, labels, hrm, *, temperature=1.0,
                   ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   kl_direction="forward", num_items_in_batch=None, backend="auto",
                   return_components=False, inplace_backward=False):
    """Causal-LM cross-entropy plus hrm times the KL divergence to a teacher, in one fused pass.

    Per token: ``CE(z, y) + hrm * KL(softmax(u / T) || softmax(z / T))`` (``kl_direction=
    "reverse"`` swaps the two distributions); CE sees the raw logits z, as F.cross_entropy with
    ``label_smoothing``. No ``T**2`` factor: pass ``hrm * T**2`` for Hinton's convention.

    Args:
        student_logits: (..., V) float32/bfloat16/float16, any strides with a unit last stride.
        teacher_logits: (..., V) same leading shape and V; gets a gradient only if it requires one.
            A padded teacher vocabulary is passed as the view ``teacher_logits[..., :V]``.
        labels: (...) int64 or int32; ``ignore_index`` marks tokens that contribute nothing.
        hrm: weight of the KL term, >= 0.
        reduction: "mean" (sum / number of non-ignored tokens, or / ``num_items_in_batch``),
            "sum", or "none" (a float32 tensor shaped like labels, 0 at ignored tokens).
        backend: "auto" (the fastest available for the tensors' device), "triton", "cuda", "torch".
        return_components: return ``HRMLoss(loss, ce, kl)``, ce and kl detached, same reduction.
        inplace_backward: write the student gradient into student_logits' storage (saves one
            N x V buffer; the logits are garbage after backward).

    Returns:
        The loss as a float32 tensor (float64 for float64 inputs on the torch backend), or
        ``HRMLoss`` with ``return_components=True``.
    """
    check_tensors(student_logits, teacher_logits, labels)
    check_options(hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, backend)
    check_num_items(num_items_in_batch, student_logits.device)
    impl = backends.resolve(backend, student_logits.device)
    out = HRMLossFunction.apply(student_logits, teacher_logits, labels, float(hrm),
                                float(temperature), float(label_smoothing), int(ignore_index),
                                kl_direction == "reverse", impl, bool(inplace_backward))
    if reduction == "none":
        out = [t.view(labels.shape) for t in out]
    else:
        out = [t.sum() for t in out]
        if reduction == "mean":
            if num_items_in_batch is None:
                denom = (labels != ignore_index).sum().clamp_min(1)
            elif isinstance(num_items_in_batch, torch.Tensor):
                denom = num_items_in_batch.clamp_min(1)
            else:
                denom = max(int(num_items_in_batch), 1)
            out = [t / denom for t in out]
    loss, ce, kl = out
    return HRMLoss(loss, ce.detach(), kl.detach()) if return_components else loss
