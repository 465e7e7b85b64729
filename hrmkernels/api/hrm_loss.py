"""fused_hrm_loss and FusedHRMLoss: validation, backend choice, reduction."""
import torch

from hrmkernels import backends
from hrmkernels._checks import (TOPK_MODES, _choice, check_num_items, check_options,
                                check_teacher_topk, check_tensors, divergence_beta)
from hrmkernels.kernels import check_label_range
from hrmkernels.autograd.hrm_loss import (HRMLossFunction, HRMLossFwdGradFunction,
                                          HRMTopKLossFunction)
from hrmkernels.autograd.vocab_parallel import VocabParallelHRMLossFunction, shard_layout
from hrmkernels.api.reduction import mean_denominator, reduce_outputs


def next_token_labels(labels, rows_shape, ignore_index):
    """Unshifted Hugging Face labels (..., S) -> the label each position predicts, same shape:
    ``labels[..., 1:]`` with ignore_index appended, as transformers' ForCausalLMLoss pads them.
    Only the labels move: the logits (or hidden states) are passed whole, the last position of
    every sequence is an ignored row, and no N x V gradient is sliced or copied. `rows_shape`:
    the shape the labels must have, the logits' without V (named in the error)."""
    if not isinstance(labels, torch.Tensor):
        return labels   # check_tensors names it
    if labels.dim() < 1 or len(rows_shape) < 1:
        raise ValueError("shift_labels=True needs a sequence dimension: logits (..., S, V) and "
                         "labels (..., S)")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"with shift_labels=True, labels are unshifted (one per position, as "
                         f"Hugging Face passes them) and must have shape {tuple(rows_shape)}, "
                         f"the logits' without V; got {tuple(labels.shape)}")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def fused_hrm_loss(student_logits, teacher_logits=None, labels=None, hrm=None, *,
                   teacher_topk=None, topk_mode="rest", temperature=1.0, ignore_index=-100,
                   reduction="mean", label_smoothing=0.0, kl_direction="forward",
                   jsd_beta=None, num_items_in_batch=None, shift_labels=False, backend="auto",
                   return_components=False, inplace_backward=False, process_group=None,
                   vocab_start_index=None):
    """Causal-LM cross-entropy plus hrm times a divergence to a teacher, in one fused pass.

    Per token: ``CE(z, y) + hrm * KL(softmax(u / T) || softmax(z / T))`` (``kl_direction=
    "reverse"`` swaps the two distributions; ``jsd_beta`` takes the generalised JSD instead);
    CE sees the raw logits z, as F.cross_entropy with ``label_smoothing``. No ``T**2`` factor,
    as in TRL, Liger-Kernel and torchtune: pass ``hrm * T**2`` for Hinton's convention.

    Args:
        student_logits: (..., V) float32/bfloat16/float16, any strides with a unit last stride.
        teacher_logits: (..., V) same leading shape and V; gets a gradient only if it requires one.
            A padded teacher vocabulary is passed as the view ``teacher_logits[..., :V]``.
            None with hrm=0 (and no teacher_topk): the fused cross-entropy alone; the reported
            divergence is 0 (the forward spends one more exp per element on it, no memory).
        labels: (...) int64 or int32, the label of each position, i.e. already shifted as the
            next token (``labels[..., i]`` is what ``logits[..., i, :]`` predicts); ``ignore_index``
            marks tokens that contribute nothing. See ``shift_labels`` for Hugging Face labels.
        hrm: weight of the KL term, >= 0.
        teacher_topk: instead of teacher_logits, a sparse teacher ``(indices, logprobs)``, each
            (..., k): the teacher's top-k token ids (distinct, in [0, V)) and their
            log-probabilities, as stored offline (DistillKit, Megatron top-k KD). The
            log-probabilities are used as given, so store them at the KL temperature
            (``log_softmax(u / T).topk(k)``); T divides only the student's logits. They get no
            gradient. Memory: k ids and k log-probabilities per token instead of V logits.
        topk_mode: what happens to the probability mass outside the top-k.
            "rest" (default): one more outcome, "everything else", with the teacher's mass
            ``P = 1 - sum(exp(logprobs))`` (clamped at 0; 0 when k = V) and the student's mass
            outside the top-k ``Q``; the KL is over these k + 1 outcomes (Megatron's "ghost"
            bucket). It is never above the full KL and equals it when k = V. The student's
            logits outside the top-k get the gradient of the full KL against a teacher that
            spreads P over them like the student does. Reverse KL is infinite where P = 0 < Q
            (e.g. bf16 log-probabilities that add up past 1): use fp32 log-probabilities, or
            "renormalize", for reverse KL.
            "renormalize": both distributions renormalised over the top-k; the student's logits
            outside the top-k then get no KL gradient (only the CE's).
        jsd_beta: None (the KL of ``kl_direction``), or beta in [0, 1] for TRL's generalised
            Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
            ``m = beta p + (1 - beta) q``, p the teacher's and q the student's distribution.
            As in TRL and Liger, beta = 0 is exactly KL(p || q) and beta = 1 exactly KL(q || p)
            (the formula itself tends to 0 at both ends). Costs one more read of both logits in
            the forward. With ``teacher_topk``, the JSD between the two distributions over the
            k + 1 ("rest") or k ("renormalize") outcomes. Not with ``process_group``
            (the KLs are: jsd_beta 0 or 1).
        reduction: "mean" (sum / number of non-ignored tokens, or / ``num_items_in_batch``),
            "sum", or "none" (a float32 tensor shaped like labels, 0 at ignored tokens).
        num_items_in_batch: the denominator of "mean" (int or 0-d tensor), for gradient
            accumulation: the non-ignored tokens of every micro-batch of the optimizer step, as
            transformers' Trainer counts them. Only with reduction="mean" (else ValueError). It
            must be at least this call's own count of non-ignored tokens; a smaller value cannot
            be such a count (it would silently scale the loss up), and makes the loss NaN (checked
            on the device: no host synchronisation). 0 with every token ignored gives 0.
        shift_labels: False (default): labels are aligned with the logits, as above. True:
            labels are unshifted Hugging Face causal-LM labels (``model(input_ids, labels=...)``
            style, usually the input ids with -100 on prompt and padding); the loss then compares
            ``logits[..., :-1, :]`` (student and teacher, or the top-k tensors) with
            ``labels[..., 1:]``, as views, and "none" returns shape ``labels[..., 1:]``.
        backend: "auto" (the fastest available for the tensors' device), "triton", "cuda",
            "cpu" (the C++ kernels on CPU tensors), "torch". Top-k teachers run on "triton" and
            "torch".
        return_components: return ``HRMLoss(loss, ce, kl)``, ce and kl detached, same reduction;
            its attribute ``entropy`` is the student's entropy H(softmax(z / T)), reduced alike.
        inplace_backward: write the student gradient into student_logits' storage (saves one
            N x V buffer; the logits are garbage after backward). On the cpu backend with
            reduction "mean" or "sum" the gradient is computed in the forward (one sweep a row)
            and the logits are overwritten there, after the loss has been computed from them:
            garbage as soon as this call returns.
        process_group: vocabulary parallelism. Student and teacher logits are this rank's slice
            of the vocabulary (equal slices in rank order, or starting at `vocab_start_index`);
            labels are global. Every rank gets the loss over the whole vocabulary after two
            all-reduces of O(N) floats; the backward communicates nothing. DTensor logits
            sharded on the last dimension are used the same way, through their local shards.

    Returns:
        The loss as a float32 tensor (float64 for float64 inputs on the torch backend), or
        ``HRMLoss`` with ``return_components=True``.

    Nothing here synchronises the host, so a training step using the loss can be captured in a
    CUDA graph, and ``torch.compile(fullgraph=True)`` traces it without a graph break.
    """
    if labels is None:
        raise TypeError("fused_hrm_loss() is missing labels")
    if hrm is None:
        raise TypeError("fused_hrm_loss() is missing hrm (the weight of the KL term)")
    if teacher_logits is not None and teacher_topk is not None:
        raise TypeError("fused_hrm_loss() takes one teacher: teacher_logits or teacher_topk")
    hrm, temperature, label_smoothing, ignore_index = check_options(
        hrm, temperature, ignore_index, reduction, label_smoothing, kl_direction, backend,
        jsd_beta, shift_labels)
    if teacher_logits is None and teacher_topk is None:
        if hrm != 0:
            raise ValueError(f"hrm={hrm} weighs a divergence to a teacher, but neither "
                             "teacher_logits nor teacher_topk was given (hrm=0 without a teacher "
                             "is the fused cross-entropy)")
        # The fused cross-entropy: the student's own logits stand in for the teacher (the same
        # memory, no second tensor; D = 0 exactly, and the backward never reads them at hrm = 0).
        teacher_logits = student_logits.detach() if isinstance(student_logits,
                                                               torch.Tensor) else student_logits
    if shift_labels:
        rows = student_logits.shape[:-1] if isinstance(student_logits, torch.Tensor) else ()
        labels = next_token_labels(labels, rows, ignore_index)
    beta = divergence_beta(kl_direction, jsd_beta)
    options = (hrm, temperature, label_smoothing, ignore_index, beta)
    sharded = process_group is not None or hasattr(student_logits, "to_local")   # or a DTensor
    if 0 < beta < 1 and sharded:
        raise ValueError("jsd_beta strictly between 0 and 1 needs the whole vocabulary on one "
                         "device (no process_group, no DTensor logits); 0 and 1 are the KLs")
    if teacher_topk is None:
        v = None
        if sharded:
            student_logits, teacher_logits, process_group, start, v = shard_layout(
                student_logits, teacher_logits, process_group, vocab_start_index)
        check_tensors(student_logits, teacher_logits, labels)
        check_label_range(labels, v or student_logits.shape[-1], ignore_index)
        num_items_in_batch = check_num_items(num_items_in_batch, student_logits.device, reduction)
        impl = backends.resolve(backend, student_logits.device, dtype=_dtype(student_logits,
                                                                             teacher_logits))
        if not sharded and _gradient_in_forward(impl, student_logits, reduction):
            denom = (mean_denominator(labels, ignore_index, num_items_in_batch)
                     if reduction == "mean" else None)
            total, *out = HRMLossFwdGradFunction.apply(
                student_logits, teacher_logits, labels, denom, *options, impl,
                bool(inplace_backward))
            return reduce_outputs(out, labels, ignore_index, reduction, num_items_in_batch,
                                  return_components, shifted=shift_labels, denom=denom,
                                  reduced_loss=total)
        args = (student_logits, teacher_logits, labels, *options, impl, bool(inplace_backward))
        out = (VocabParallelHRMLossFunction.apply(*args, process_group, start, v) if sharded
               else HRMLossFunction.apply(*args))
    elif sharded:
        raise ValueError("process_group (vocabulary parallelism) needs teacher_logits; a top-k "
                         "teacher is not sharded by vocabulary")
    else:
        check_teacher_topk(student_logits, teacher_topk, labels, topk_mode)
        check_label_range(labels, student_logits.shape[-1], ignore_index)
        num_items_in_batch = check_num_items(num_items_in_batch, student_logits.device, reduction)
        impl = backends.resolve(backend, student_logits.device, topk=True,
                                dtype=_dtype(student_logits, teacher_topk[1]))
        out = HRMTopKLossFunction.apply(student_logits, *teacher_topk, labels, *options,
                                        topk_mode == "renormalize", impl, bool(inplace_backward))
    return reduce_outputs(out, labels, ignore_index, reduction, num_items_in_batch,
                          return_components, shifted=shift_labels)


def _gradient_in_forward(impl, student_logits, reduction):
    """Whether the loss takes HRMLossFwdGradFunction: reduction "mean" or "sum" (each row's
    gradient scale is known in the forward), a backend that computes the gradient in the same
    sweep (the C++ CPU kernels), and a student gradient that will be asked for (grad mode on,
    logits requiring grad; else nothing would be written). Python bools only: no sync."""
    available = getattr(impl, "fwd_grad_available", None)
    return (reduction != "none" and available is not None and available(student_logits.device)
            and torch.is_grad_enabled() and student_logits.requires_grad)


def _dtype(*tensors):
    """float64 if an input is float64 (the backends that compute in float32 then step aside)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
