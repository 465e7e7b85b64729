"""FusedHRMLoss: the nn.Module form of fused_hrm_loss."""
import torch

from hrmkernels._checks import TOPK_MODES, _choice, check_options
from hrmkernels.functional import fused_hrm_loss


class FusedHRMLoss(torch.nn.Module):
    """``CE + hrm * KL`` as a module; see :func:`hrmkernels.fused_hrm_loss` for the keywords.

    The options are plain attributes (``loss_fn.hrm = 2.0`` between steps, for a schedule).

    Example::

        loss_fn = FusedHRMLoss(hrm=0.5, temperature=2.0)
        loss = loss_fn(student_logits, teacher_logits, labels)
        loss = loss_fn(student_logits, labels=labels, teacher_topk=(indices, logprobs))
    """

    def __init__(self, hrm, *, temperature=1.0, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, kl_direction="forward", jsd_beta=None, backend="auto",
                 return_components=False, inplace_backward=False, topk_mode="rest",
                 shift_labels=False, process_group=None, vocab_start_index=None):
        super().__init__()
        check_options(hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction,
                      backend, jsd_beta, shift_labels)
        _choice("topk_mode", topk_mode, TOPK_MODES)
        self.hrm, self.temperature, self.kl_direction = hrm, temperature, kl_direction
        self.jsd_beta = jsd_beta
        self.reduction, self.label_smoothing = reduction, label_smoothing
        self.ignore_index = ignore_index
        self.backend, self.return_components = backend, return_components
        self.inplace_backward, self.topk_mode = inplace_backward, topk_mode
        self.shift_labels = shift_labels
        self.process_group, self.vocab_start_index = process_group, vocab_start_index

    def forward(self, student_logits, teacher_logits=None, labels=None, num_items_in_batch=None, *,
                teacher_topk=None):
        return fused_hrm_loss(
            student_logits, teacher_logits, labels, self.hrm, teacher_topk=teacher_topk,
            num_items_in_batch=num_items_in_batch, temperature=self.temperature,
            kl_direction=self.kl_direction, jsd_beta=self.jsd_beta, reduction=self.reduction,
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            backend=self.backend, return_components=self.return_components,
            inplace_backward=self.inplace_backward, topk_mode=self.topk_mode,
            shift_labels=self.shift_labels,
            process_group=self.process_group, vocab_start_index=self.vocab_start_index)

    def extra_repr(self):
        divergence = (f"jsd_beta={self.jsd_beta}" if self.jsd_beta is not None
                      else f"kl_direction={self.kl_direction!r}")
        return (f"hrm={self.hrm}, temperature={self.temperature}, {divergence}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}")
