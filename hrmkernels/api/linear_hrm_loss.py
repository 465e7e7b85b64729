"""fused_linear_hrm_loss / FusedLinearHRMLoss: the HRM loss from hidden states and LM heads.

The loss of fused_hrm_loss on the logits ``hidden @ weight.T + bias`` of student and teacher,
without materialising the N x V logits: token chunks bound them to a chunk (see
autograd/linear_hrm_loss.py). hrmkernels.experimental.tiled_linear_hrm_loss runs the same
loss on logit tiles kept on chip (Triton), which no measurement yet supports.
"""
import math
from numbers import Integral, Real

import torch

from hrmkernels import backends
from hrmkernels._checks import (FLOAT_DTYPES, LABEL_DTYPES, TOPK_MODES, _choice,
                                check_num_items, check_options, check_topk_pair, divergence_beta)
from hrmkernels.api.hrm_loss import next_token_labels
from hrmkernels.api.reduction import HRMLoss, mean_denominator
from hrmkernels.autograd.linear_hrm_loss import (ChunkedLinearHRMFunction,
                                                 FusedLinearHRMFunction)
from hrmkernels.kernels import check_label_range

DEFAULT_CHUNK_BUDGET = 1 << 30   # bytes of chunk temporaries: ~820 tokens per chunk at V=128256
# With a top-k teacher no teacher chunk exists and the student's chunk logits are the step's
# largest tensor: half the budget (~1000 rows at V = 128256) keeps the step within a quarter of
# the logits path's memory (0.99 GiB against 4.14, docs/integrations.md); 1 GiB took 0.36x.
DEFAULT_TOPK_CHUNK_BUDGET = 1 << 29


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _same_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but student_hidden is on {device}; "
                         "all tensors must share one device")


def _check_head(who, hidden, weight, bias, device, lead):
    """Shapes (..., H), (V, H), (V,); one float dtype for hidden and weight (and bias); device."""
    h, w, b = f"{who}_hidden", f"{who}_weight", f"{who}_bias"
    _tensor(h, hidden)
    _tensor(w, weight)
    for name, t in ((h, hidden), (w, weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        _same_device(name, t, device)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{h} must have shape (..., H) with H >= 1, got {tuple(hidden.shape)}")
    if lead is not None and hidden.shape[:-1] != lead:
        raise ValueError(f"{h} leading shape {tuple(hidden.shape[:-1])} must equal student_hidden "
                         f"leading shape {tuple(lead)}")
    size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != size or weight.shape[0] == 0:
        raise ValueError(f"{w} must have shape (V, H) with H={size} (the last dimension of {h}) "
                         f"and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w} is {weight.dtype} but {h} is {hidden.dtype}: the matmul needs one "
                        "dtype (cast one of them)")
    if bias is not None:
        _tensor(b, bias)
        _same_device(b, bias, device)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{b} must have shape (V,) = ({weight.shape[0]},) to match {w}, "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{b} must have the dtype of {w} ({weight.dtype}), got {bias.dtype}")


def _v_mismatch(name, vt, v, view):
    msg = f"{name} has V={vt} but student_weight has V={v}: the vocabularies must match"
    if vt > v:
        msg += f"; for a padded teacher vocabulary pass {view.format(v=v)} (a view, no copy)"
    return ValueError(msg)


def check_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias, teacher_logits, labels):
    """Validate the tensors of fused_linear_hrm_loss; every message names the argument."""
    _tensor("student_hidden", student_hidden)
    device = student_hidden.device
    _check_head("student", student_hidden, student_weight, student_bias, device, None)
    lead, v = student_hidden.shape[:-1], student_weight.shape[0]
    if teacher_logits is not None:
        given = [n for n, t in (("teacher_hidden", teacher_hidden),
                                ("teacher_weight", teacher_weight),
                                ("teacher_bias", teacher_bias)) if t is not None]
        if given:
            raise ValueError(f"pass either teacher_hidden and teacher_weight, or teacher_logits, "
                             f"not both (got teacher_logits and {', '.join(given)})")
        _tensor("teacher_logits", teacher_logits)
        if teacher_logits.dtype not in FLOAT_DTYPES:
            raise TypeError("teacher_logits must be float32, bfloat16, float16 or float64, "
                            f"got {teacher_logits.dtype}")
        _same_device("teacher_logits", teacher_logits, device)
        if teacher_logits.dim() < 1 or teacher_logits.shape[-1] != v:
            raise _v_mismatch("teacher_logits", teacher_logits.shape[-1] if teacher_logits.dim()
                              else 0, v, "teacher_logits[..., :{v}]")
        if teacher_logits.shape[:-1] != lead:
            raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} "
                             f"must equal student_hidden leading shape {tuple(lead)}")
    elif teacher_hidden is None and teacher_weight is None and teacher_bias is None:
        pass   # no teacher: the fused cross-entropy (fused_linear_hrm_loss checks hrm == 0)
    elif teacher_hidden is None or teacher_weight is None:
        missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
        raise ValueError(f"{missing} is None: pass teacher_hidden and teacher_weight, or "
                         "teacher_logits=")
    else:
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, device, lead)
        if teacher_weight.shape[0] != v:
            raise _v_mismatch("teacher_weight", teacher_weight.shape[0], v, "teacher_weight[:{v}]")
    _tensor("labels", labels)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    _same_device("labels", labels, device)
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {tuple(lead)} (student_hidden without its last "
                         f"dimension), got {tuple(labels.shape)}")


def _positive(name, value, optional):
    """A positive finite Python float (or None when `optional`), named in the error."""
    if optional and value is None:
        return None
    what = "a positive finite float" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {what}, got {value}")
    return float(value)


def logit_transforms(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
                     teacher_logits=None):
    """Validated ((scale, softcap), (scale, softcap)) of the student and teacher heads."""
    transforms = ((_positive("student_logit_scale", student_logit_scale, False),
                   _positive("student_softcap", student_softcap, True)),
                  (_positive("teacher_logit_scale", teacher_logit_scale, False),
                   _positive("teacher_softcap", teacher_softcap, True)))
    if teacher_logits is not None and transforms[1] != (1.0, None):
        raise ValueError("teacher_logit_scale and teacher_softcap transform the teacher head's "
                         "logits; teacher_logits are used as given (transform them before passing "
                         "them, or pass teacher_hidden and teacher_weight)")
    return transforms


def check_linear_options(impl, chunk_budget_bytes, backend):
    if chunk_budget_bytes is not None and (isinstance(chunk_budget_bytes, bool) or not isinstance(
            chunk_budget_bytes, Integral) or chunk_budget_bytes <= 0):
        raise ValueError("chunk_budget_bytes must be a positive int or None, "
                         f"got {chunk_budget_bytes!r}")
    if impl == "fused" and backend not in ("auto", "triton"):
        raise ValueError(f"tiled_linear_hrm_loss is the Triton kernel: backend must be 'auto' or "
                         f"'triton', got {backend!r}")


def _autocast(tensors):
    """Under torch.autocast, the dtype F.linear would compute in; else the tensors unchanged.

    Mixed precision keeps fp32 weights and bf16 activations; F.linear casts both for the matmul,
    and so does this (the cast is differentiable: fp32 weights get fp32 gradients).
    """
    hidden = tensors[0]
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(hidden.device.type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in tensors]


def _rows(t, size):
    """(N, size) view (a copy only when the layout needs one) with a unit last stride."""
    t = t.reshape(-1, size)
    return t if t.stride(-1) == 1 or size == 1 else t.contiguous()


def _check_topk_teacher(teacher_topk, topk_mode, student_hidden, student_weight, teacher_hidden,
                        teacher_weight, teacher_bias, teacher_logits, teacher_logit_scale,
                        teacher_softcap):
    """A sparse teacher replaces the teacher's head: nothing else of the teacher is given."""
    given = [n for n, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                            ("teacher_bias", teacher_bias), ("teacher_logits", teacher_logits))
             if t is not None]
    if given:
        raise ValueError(f"teacher_topk is the teacher: pass teacher_hidden and teacher_weight as "
                         f"None (got teacher_topk and {', '.join(given)})")
    if teacher_logit_scale != 1.0 or teacher_softcap is not None:
        raise ValueError("teacher_logit_scale and teacher_softcap transform the teacher head's "
                         "logits; teacher_topk log-probabilities are used as given")
    check_topk_pair(teacher_topk, student_hidden.shape[:-1], student_weight.shape[0],
                    student_hidden.device, "student_hidden")
    _choice("topk_mode", topk_mode, TOPK_MODES)


def fused_linear_hrm_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                          hrm, *, student_bias=None, teacher_bias=None, teacher_logits=None,
                          temperature=1.0, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, kl_direction="forward", jsd_beta=None,
                          num_items_in_batch=None, shift_labels=False, student_logit_scale=1.0,
                          teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                          backend="auto", return_components=False, inplace_backward=False,
                          chunk_budget_bytes=None, teacher_topk=None, topk_mode="rest"):
    """fused_hrm_loss on ``hidden @ weight.T + bias`` of student and teacher, no N x V logits.

    Same loss, keywords and results as :func:`hrmkernels.fused_hrm_loss` applied to the logits
    ``student_hidden @ student_weight.T + student_bias`` and the teacher's likewise, each
    transformed by its model's logit scale and softcap first (TRL's order):
    ``softcap * tanh(scale * logits / softcap)``, or ``scale * logits`` without a softcap.

    Args:
        student_hidden: (..., Hs) float; student_weight: (V, Hs) same dtype; student_bias: (V,).
        teacher_hidden: (..., Ht), same leading shape (Ht may differ from Hs);
            teacher_weight: (V, Ht), the same V (a padded teacher vocabulary is passed as the
            view ``teacher_weight[:V]``); teacher_bias: (V,). Pass both as None and
            ``teacher_logits=`` (..., V) to use precomputed teacher logits instead, or no teacher
            at all with hrm=0: the fused linear cross-entropy (the reported divergence is 0).
        labels: (...) int64/int32, the leading shape of student_hidden.
        hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, jsd_beta,
            num_items_in_batch, return_components: as in fused_hrm_loss.
        shift_labels: as in fused_hrm_loss: True takes unshifted Hugging Face labels (the
            hidden states' leading shape) and shifts them, never the hidden states: position i
            predicts labels[..., i + 1], the last position of each sequence is ignored.
        student_logit_scale, teacher_logit_scale: positive floats (default 1.0) multiplying each
            model's logits (Cohere's ``logit_scale``; ``1 / logits_scaling`` for HyperCLOVA X).
        student_softcap, teacher_softcap: None (default) or a positive float c: the logits become
            ``c * tanh(logits / c)`` after the scale (Gemma's ``final_logit_softcapping``).
            CE sees the transformed student logits; the divergence sees them divided by T.
            Precomputed ``teacher_logits`` are used as given (the teacher keywords must then
            keep their defaults).
        teacher_topk, topk_mode: a sparse teacher ``(indices, logprobs)``, each (..., k) with
            student_hidden's leading shape, as in fused_hrm_loss (log-probabilities used as
            given, stored at T), in place of the teacher's hidden states and head (pass those as
            None): the offline or served teacher. Only the student's chunk logits exist; the
            top-k launchers run on them (backends "torch" and "triton").
        backend: the loss launchers called on each chunk ("auto", "triton", "cuda", "cpu",
            "torch").
        inplace_backward: accepted for symmetry with fused_hrm_loss; it changes nothing here,
            since the chunk logits are always overwritten by their gradient.
        chunk_budget_bytes: upper bound on the per-chunk temporaries (default 1 GiB, 512 MiB
            with teacher_topk): the
            student's fp32 chunk logits (overwritten by their gradient), the teacher's, and
            the torch GEMMs' operands. The fp32 weight-gradient accumulator (V x H x 4
            bytes) comes on top.

    Gradients reach the student hidden, weight and bias, and the teacher tensors that require
    them. Logits are formed in fp32 (never rounded to bf16, cf. Liger #1432) and the weight
    gradient accumulates in fp32. Under torch.autocast, hidden states, weights and biases are
    cast to autocast's dtype first, as F.linear would. No path synchronises the host.
    """
    return _linear_hrm_loss("chunked", **locals())


def _linear_hrm_loss(impl, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                     hrm, student_bias, teacher_bias, teacher_logits, temperature, ignore_index,
                     reduction, label_smoothing, kl_direction, jsd_beta, num_items_in_batch,
                     shift_labels, student_logit_scale, teacher_logit_scale, student_softcap,
                     teacher_softcap, backend, return_components, inplace_backward,
                     chunk_budget_bytes, teacher_topk=None, topk_mode="rest"):
    """fused_linear_hrm_loss with impl "chunked" (token chunks, torch GEMMs, the loss launchers)
    or "fused" (the Triton kernels of logit tiles on chip: hrmkernels.experimental)."""
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
     teacher_bias) = _autocast([student_hidden, student_weight, student_bias, teacher_hidden,
                                teacher_weight, teacher_bias])
    hrm, temperature, label_smoothing, ignore_index = check_options(
        hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, backend,
        jsd_beta, shift_labels)
    if shift_labels and isinstance(student_hidden, torch.Tensor):
        labels = next_token_labels(labels, student_hidden.shape[:-1], ignore_index)
    check_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias, teacher_logits, labels)
    if teacher_topk is not None:
        if impl != "chunked":
            raise ValueError("teacher_topk runs on the chunked fused_linear_hrm_loss, not on "
                             "tiled_linear_hrm_loss")
        _check_topk_teacher(teacher_topk, topk_mode, student_hidden, student_weight,
                            teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                            teacher_logit_scale, teacher_softcap)
    teacherless = teacher_hidden is None and teacher_logits is None and teacher_topk is None
    if teacherless and hrm != 0:
        raise ValueError(f"hrm={hrm} weighs a divergence to a teacher, but no teacher was given: "
                         "pass teacher_hidden and teacher_weight, or teacher_logits= (hrm=0 "
                         "without a teacher is the fused linear cross-entropy)")
    check_linear_options(impl, chunk_budget_bytes, backend)
    transforms = logit_transforms(student_logit_scale, teacher_logit_scale, student_softcap,
                                  teacher_softcap, teacher_logits)
    beta = divergence_beta(kl_direction, jsd_beta)
    device = student_hidden.device
    num_items_in_batch = check_num_items(num_items_in_batch, device, reduction)
    v = student_weight.shape[0]
    check_label_range(labels, v, ignore_index)
    heads = [_rows(student_hidden, student_hidden.shape[-1]), student_weight, student_bias]
    topk = ()
    if teacherless or teacher_topk is not None:
        heads += [None, None, None, None]
        if teacher_topk is not None:   # (N, k) rows
            topk = (*(_rows(t, t.shape[-1]) for t in teacher_topk), topk_mode == "renormalize")
    elif teacher_logits is None:
        heads += [_rows(teacher_hidden, teacher_hidden.shape[-1]), teacher_weight, teacher_bias,
                  None]
    else:
        heads += [None, None, None, _rows(teacher_logits, v)]
    y = labels.reshape(-1).contiguous()   # the kernels read labels densely
    # with_kl: report the divergence even at hrm == 0 (needs the teacher; 0 without one)
    options = (hrm, temperature, label_smoothing, ignore_index, beta,
               bool(return_components) and not teacherless)
    denom = None
    if reduction == "mean":
        denom = mean_denominator(labels, ignore_index, num_items_in_batch)
    elif reduction == "sum":
        denom = 1
    grad_enabled = torch.is_grad_enabled()
    # float64 heads: chunk logits in float64, for a backend that computes in float64
    wide = torch.float64 if any(t is not None and t.dtype == torch.float64
                                for t in (*heads, *topk[:2])) else None
    if impl == "chunked":
        budget = (int(chunk_budget_bytes) if chunk_budget_bytes is not None else
                  DEFAULT_TOPK_CHUNK_BUDGET if topk else DEFAULT_CHUNK_BUDGET)
        launchers = backends.resolve(backend, device, topk=bool(topk), dtype=wide)
        out = ChunkedLinearHRMFunction.apply(*heads, y, denom, options, transforms, launchers,
                                             budget, grad_enabled, *topk)
    else:
        kernels = backends.resolve_linear_tiles(device, wide)
        # The kernels address weights by row stride and biases densely.
        heads = [t.contiguous() if t is not None and t.dim() == 1 else t for t in heads]
        heads = [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in heads]
        out = FusedLinearHRMFunction.apply(*heads, y, options, transforms, kernels)
        if denom is not None:
            out = [t.sum() / denom for t in out]
    if reduction == "none":
        out = [t.view(labels.shape) for t in out]
        if shift_labels:   # the padded last position of each sequence is not returned
            out = [t[..., :-1] for t in out]
    loss, ce, kl, entropy = out
    if not return_components:
        return loss
    return HRMLoss(loss, ce.detach(), kl.detach(), entropy.detach())


class FusedLinearHRMLoss(torch.nn.Module):
    """fused_linear_hrm_loss as a module; the keywords are fixed at construction.

    Example::

        loss_fn = FusedLinearHRMLoss(hrm=0.5, temperature=2.0)
        loss = loss_fn(student_hidden, student.lm_head.weight,
                       teacher_hidden, teacher.lm_head.weight[:V], labels)
    """

    def __init__(self, hrm, *, temperature=1.0, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, kl_direction="forward", jsd_beta=None, shift_labels=False,
                 student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                 teacher_softcap=None, backend="auto", return_components=False,
                 chunk_budget_bytes=None, topk_mode="rest"):
        super().__init__()
        check_options(hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction,
                      backend, jsd_beta, shift_labels)
        check_linear_options("chunked", chunk_budget_bytes, backend)
        logit_transforms(student_logit_scale, teacher_logit_scale, student_softcap,
                         teacher_softcap)
        _choice("topk_mode", topk_mode, TOPK_MODES)
        self.options = dict(temperature=temperature, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing,
                            kl_direction=kl_direction, jsd_beta=jsd_beta,
                            shift_labels=shift_labels, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale,
                            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                            backend=backend, return_components=return_components,
                            chunk_budget_bytes=chunk_budget_bytes, topk_mode=topk_mode)
        self.hrm = hrm

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                student_bias=None, teacher_bias=None, teacher_logits=None,
                num_items_in_batch=None, teacher_topk=None):
        return fused_linear_hrm_loss(student_hidden, student_weight, teacher_hidden,
                                     teacher_weight, labels, self.hrm, student_bias=student_bias,
                                     teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                                     num_items_in_batch=num_items_in_batch,
                                     teacher_topk=teacher_topk, **self.options)

    def extra_repr(self):
        return f"hrm={self.hrm}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
