"""hrmkernels: fused GPU kernels for distillation losses, CE + hrm * KL in one pass."""
from hrmkernels.backends import available_backends
from hrmkernels.api.hrm_loss import FusedHRMLoss, fused_hrm_loss
from hrmkernels.api.linear_hrm_loss import FusedLinearHRMLoss, fused_linear_hrm_loss
from hrmkernels.api.reduction import HRMLoss
from hrmkernels.api.teacher_topk import teacher_sample, teacher_topk

__version__ = "0.1.0"
__all__ = ["FusedHRMLoss", "FusedLinearHRMLoss", "HRMLoss", "available_backends",
           "fused_hrm_loss", "fused_linear_hrm_loss", "teacher_sample", "teacher_topk"]
