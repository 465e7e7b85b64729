"""Argument validation (docs/design.md section 3) and the canonical row view shared by every
backend.

Nothing here launches work on a device or reads device memory: every check looks at metadata
(shape, dtype, device, Python numbers) only, so validation never synchronises the host.
"""
import math
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")
KL_DIRECTIONS = ("forward", "reverse")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
TOPK_MODES = ("rest", "renormalize")


def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


# The kernels compute in float32: an option must stay a normal, finite float32 number there,
# or it would silently become 0 or inf (hrm=1e39, temperature=1e-46). Integers passed to the
# kernels are int64.
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38     # the smallest normal float32
INT64 = (-2**63, 2**63 - 1)


def _real(name, value):
    """`value` as a Python float: any real number (float, int, numpy scalar, Fraction)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a Python float (or another real number), got "
                        f"{type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _fp32(name, given, value=None, what=None):
    """Reject a nonzero value (`given`, or what the kernels derive from it: `what` = `value`)
    that float32 rounds to 0 or to inf, naming the argument and the range."""
    value = given if value is None else value
    if value != 0 and not FP32_TINY <= abs(value) <= FP32_MAX:
        derived = f": {what} = {value:.4g}" if what else ""
        raise ValueError(f"{name}={given!r}{derived} is computed in float32 and must be 0 or lie "
                         f"in [{FP32_TINY:.4g}, {FP32_MAX:.4g}] in magnitude")


def check_int64(name, value):
    """An int (numpy integers too) that fits the kernels' int64, as a Python int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"{name}={value} does not fit the kernels' int64: it must lie in "
                         f"[-2**63, 2**63 - 1]")
    return value


def check_options(hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, backend,
                  jsd_beta=None, shift_labels=False):
    """Validate the scalar options shared by every loss; returns them as the kernels take them:
    (hrm, temperature, label_smoothing) as Python floats and ignore_index as a Python int."""
    hrm = _real("hrm", hrm)
    if not hrm >= 0 or math.isinf(hrm):
        raise ValueError(f"hrm must be a finite float >= 0 (the weight of the KL term), got {hrm}")
    _fp32("hrm", hrm)
    t = _real("temperature", temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    _fp32("temperature", t, 1.0 / t, "1 / temperature")
    _fp32("temperature", t, hrm / t, "hrm / temperature, the divergence's gradient scale")
    eps = _real("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    _fp32("label_smoothing", eps)
    ignore_index = check_int64("ignore_index", ignore_index)
    _choice("reduction", reduction, REDUCTIONS)
    _choice("kl_direction", kl_direction, KL_DIRECTIONS)
    _choice("backend", backend, BACKENDS)
    if not isinstance(shift_labels, bool):
        raise TypeError(f"shift_labels must be a bool, got {type(shift_labels).__name__}")
    if jsd_beta is not None:
        if not 0.0 <= _real("jsd_beta", jsd_beta) <= 1.0:
            raise ValueError(f"jsd_beta must lie in [0, 1] (TRL's beta: 0 is "
                             f"KL(teacher || student), 1 is KL(student || teacher)), "
                             f"got {jsd_beta}")
        if kl_direction != "forward":
            raise ValueError("pass jsd_beta or kl_direction, not both: jsd_beta=1.0 is "
                             "kl_direction='reverse', jsd_beta=0.0 is 'forward'")
    return hrm, t, eps, ignore_index


def divergence_beta(kl_direction, jsd_beta):
    """The divergence as the kernels take it: beta = 0 forward KL, 1 reverse KL, else JSD_beta."""
    if jsd_beta is not None:
        return float(jsd_beta)
    return 1.0 if kl_direction == "reverse" else 0.0


def check_tensors(student_logits, teacher_logits, labels):
    """Validate the three tensors: types, dtypes, devices, and shapes (..., V), (..., V), (...)."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                    ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(t.shape)}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    for name, t in (("teacher_logits", teacher_logits), ("labels", labels)):
        if t.device != student_logits.device:
            raise ValueError(f"{name} is on {t.device} but student_logits is on "
                             f"{student_logits.device}; all tensors must share one device")
    v, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vt != v:
        msg = f"teacher_logits has V={vt} but student_logits has V={v}: the vocabularies must match"
        if vt > v:
            msg += (f"; for a padded teacher vocabulary pass teacher_logits[..., :{v}] "
                    f"(a view, no copy)")
        raise ValueError(msg)
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} "
                         f"must equal student_logits leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])} "
                         f"(student_logits without its last dimension), got {tuple(labels.shape)}")


def check_num_items(num_items_in_batch, device, reduction):
    """The denominator of reduction="mean" (None: the call's own token count): a number >= 0
    (a Python int or float, TRL passes global / world_size) or a 0-d numeric tensor; returned as
    a Python float or the tensor."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch is the denominator of reduction='mean'; with "
                         f"reduction={reduction!r} it would be ignored: pass one or the other")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0 or num_items_in_batch.dtype == torch.bool or \
                num_items_in_batch.is_complex():
            raise ValueError("num_items_in_batch must be a number or a 0-d real tensor, got a "
                             f"tensor of shape {tuple(num_items_in_batch.shape)} and "
                             f"{num_items_in_batch.dtype}")
        if num_items_in_batch.device.type not in ("cpu", device.type):
            raise ValueError(f"num_items_in_batch is on {num_items_in_batch.device}, "
                             f"expected {device}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, Real):
        raise TypeError(f"num_items_in_batch must be a number or a 0-d tensor, "
                        f"got {type(num_items_in_batch).__name__}")
    count = float(num_items_in_batch)
    if not 0 <= count <= FP32_MAX:
        raise ValueError(f"num_items_in_batch must be a finite number >= 0 (a token count, "
                         f"at most {FP32_MAX:.4g}), got {num_items_in_batch}")
    return count


def rows_view(x):
    """View x (..., V) as (B, S, V) without a copy, so row r sits at x[r // S, r % S].

    Kernels address row r as ``(r // S) * stride_b + (r % S) * stride_s``, which covers any
    2-D or 3-D strided view (``logits[:, :-1]``, ``teacher[..., :V]``). Only when more than two
    leading dimensions cannot be merged, or the last stride is not 1, is a copy made.
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    shape = (math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])
    try:
        return x.view(shape)
    except RuntimeError:
        return x.reshape(shape)


def check_teacher_topk(student_logits, teacher_topk, labels, topk_mode):
    """Validate a sparse teacher ``(indices, logprobs)``, each (..., k), with the student and
    labels."""
    check_tensors(student_logits, student_logits, labels)   # the student and label checks
    check_topk_pair(teacher_topk, tuple(student_logits.shape[:-1]), student_logits.shape[-1],
                    student_logits.device, "student_logits")
    _choice("topk_mode", topk_mode, TOPK_MODES)


def check_topk_pair(teacher_topk, lead, v, device, student):
    """Validate ``teacher_topk = (indices, logprobs)`` against a student of leading shape `lead`
    and vocabulary `v` on `device`; `student` names the student's tensor in messages."""
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices, logprobs) of tensors shaped "
                        f"(..., k), got {type(teacher_topk).__name__}")
    idx, logp = teacher_topk
    for name, t in (("indices", idx), ("logprobs", logp)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"teacher_topk {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"teacher_topk {name} is on {t.device} but {student} is on "
                             f"{device}; all tensors must share one device")
    if idx.dtype not in LABEL_DTYPES:
        raise TypeError(f"teacher_topk indices must be int64 or int32, got {idx.dtype}")
    if logp.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_topk logprobs must be float32, bfloat16, float16 or float64, "
                        f"got {logp.dtype}")
    lead = tuple(lead)
    if idx.dim() != len(lead) + 1 or tuple(idx.shape[:-1]) != lead or idx.shape[-1] < 1:
        raise ValueError(f"teacher_topk indices must have shape {lead + ('k',)} ({student}' "
                         f"leading shape, then k >= 1), got {tuple(idx.shape)}")
    if logp.shape != idx.shape:
        raise ValueError(f"teacher_topk logprobs must have the indices' shape {tuple(idx.shape)}, "
                         f"got {tuple(logp.shape)}")
    if idx.shape[-1] > v:
        raise ValueError(f"teacher_topk has k={idx.shape[-1]} entries per token but the student's "
                         f"vocabulary has only V={v}")
    if logp.requires_grad:
        raise ValueError("teacher_topk logprobs require grad, but a top-k teacher gets no "
                         "gradient: pass logprobs.detach()")
