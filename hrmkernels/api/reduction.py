"""The result type of return_components=True and the denominator of reduction="mean"."""
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
    """The denominator of reduction="mean", a 0-d device tensor never read on the host: max(n, 1)
    for the n non-ignored tokens, or max(num_items_in_batch, 1). A num_items_in_batch below n
    cannot count the tokens it covers (it would scale the loss up, or make 0 a sum): NaN then."""
    n = (labels != ignore_index).sum()
    if num_items_in_batch is None:
        return n.clamp_min(1)
    count = (num_items_in_batch.clamp_min(1) if isinstance(num_items_in_batch, torch.Tensor)
             else max(int(num_items_in_batch), 1))
    return torch.where(n > num_items_in_batch, float("nan"), count)
