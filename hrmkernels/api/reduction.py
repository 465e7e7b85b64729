"""Reductions of the per-token outputs, their denominator and the result type of
return_components=True."""
from typing import NamedTuple

import torch


class _Parts(NamedTuple):
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


class HRMLoss(_Parts):
    """What ``return_components=True`` returns: the loss and its detached parts.

    Unpacks as ``loss, ce, kl`` (``kl`` is the divergence term: KL, or the JSD with
    ``jsd_beta``); ``entropy`` (an attribute, not unpacked) is the student's entropy
    ``-sum q log q`` of ``q = softmax(z / T)``, detached and reduced like ``ce`` and ``kl``.
    """

    def __new__(cls, loss, ce, kl, entropy=None):
        self = super().__new__(cls, loss, ce, kl)
        self.entropy = entropy
        return self


def mean_denominator(labels, ignore_index, num_items_in_batch):
    """The denominator of reduction="mean", never read on the host: max(n, 1) for the call's n
    non-ignored tokens, or `num_items_in_batch` (checked: None, a float or a 0-d tensor) as a
    plain denominator, whatever n is: under DDP, TRL passes the global count / world_size, which
    a rank holding more tokens than the average exceeds. A count of 0 means "no tokens": with
    none here the loss is 0, with some the count cannot be theirs and the loss is NaN (decided
    on the device). A Python float, or a float32 (int64 for n) 0-d tensor.
    """
    number = not isinstance(num_items_in_batch, torch.Tensor)
    if number and num_items_in_batch is not None and num_items_in_batch > 0:
        return num_items_in_batch
    n = (labels != ignore_index).sum()
    if num_items_in_batch is None:
        return n.clamp_min(1)
    none_here = torch.where(n > 0, float("nan"), 1.0)
    if number:
        return none_here
    count = num_items_in_batch.float()   # a CPU 0-d tensor stays there: read as a scalar
    return torch.where(count > 0, count, none_here)


def reduce_outputs(out, labels, ignore_index, reduction, num_items_in_batch, return_components,
                   shifted=False, denom=None, reduced_loss=None):
    """Per-token (loss, ce, div, entropy), each (N,), reduced as the API promises: "none" shaped
    like the labels (without the padded last position of each sequence when `shifted`: the
    shape of ``labels[..., 1:]``), "sum", or "mean" over mean_denominator (or `denom`, when the
    caller has it). The loss, or HRMLoss with detached parts. `reduced_loss`: the loss already
    reduced by the autograd Function (HRMLossFwdGradFunction), returned in place of out[0]'s."""
    if reduction == "none":
        out = [t.view(labels.shape) for t in out]
        if shifted:
            out = [t[..., :-1] for t in out]
    else:
        out = [t.sum() for t in out]
        if reduction == "mean":
            if denom is None:
                denom = mean_denominator(labels, ignore_index, num_items_in_batch)
            out = [t / denom for t in out]
    if reduced_loss is not None:
        out[0] = reduced_loss
    loss, ce, div, entropy = out
    if not return_components:
        return loss
    return HRMLoss(loss, ce.detach(), div.detach(), entropy.detach())
