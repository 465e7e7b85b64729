"""hrmkernels: fused GPU kernels for distillation losses, CE + hrm * KL in one pass."""
from hrmkernels.backends import available_backends
from hrmkernels.functional import HRMLoss, fused_hrm_loss
from hrmkernels.linear import FusedLinearHRMLoss, fused_linear_hrm_loss
from hrmkernels.modules import FusedHRMLoss

__version__ = "0.1.0"
__all__ = ["FusedHRMLoss", "FusedLinearHRMLoss", "HRMLoss", "available_backends",
           "fused_hrm_loss", "fused_linear_hrm_loss"]
