"""FusedHRMLoss: the nn.Module form of fused_hrm_loss."""
import torch

from hrmkernels._checks import check_options
from hrmkernels.functional import fused_hrm_loss


class FusedHRMLoss(torch.nn.Module):
    """``CE + hrm * KL`` as a module; see :func:`hrmkernels.fused_hrm_loss` for the keywords.

    Example::

        loss_fn = FusedHRMLoss(hrm=0.5, temperature=2.0)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(self, hrm, *, temperature=1.0, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, kl_direction="forward", backend="auto",
                 return_components=False, inplace_backward=False):
        super().__init__()
        check_options(hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction,
                      backend)
        self.hrm, self.temperature, self.ignore_index = hrm, temperature, ignore_index
        self.reduction, self.label_smoothing, self.kl_direction = reduction, label_smoothing, kl_direction
        self.backend, self.return_components = backend, return_components
        self.inplace_backward = inplace_backward

    def forward(self, student_logits, teacher_logits, labels, num_items_in_batch=None):
        return fused_hrm_loss(
            student_logits, teacher_logits, labels, self.hrm, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, kl_direction=self.kl_direction,
            num_items_in_batch=num_items_in_batch, backend=self.backend,
            return_components=self.return_components, inplace_backward=self.inplace_backward)

    def extra_repr(self):
        return (f"hrm={self.hrm}, temperature={self.temperature}, kl_direction={self.kl_direction!r}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}")
