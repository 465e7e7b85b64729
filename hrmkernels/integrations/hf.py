"""Distil a Hugging Face causal LM with the fused HRM loss, in a ``transformers`` Trainer.

    from transformers import TrainingArguments
    from hrmkernels.integrations.hf import HRMDistillationTrainer

    trainer = HRMDistillationTrainer(
        model=student, teacher_model=teacher, hrm=0.5, temperature=2.0,
        args=TrainingArguments("out", gradient_accumulation_steps=4, bf16=True),
        train_dataset=dataset)          # rows with input_ids, attention_mask, labels
    trainer.train()

Per micro-batch, ``compute_loss`` runs the student without its own loss (no labels passed),
the teacher under ``torch.no_grad()``, and ``FusedHRMLoss`` on the logits:

- Label shifting as in HF causal LMs: ``logits[..., :-1, :]`` predict ``labels[..., 1:]``
  (views, no copies). A batch that carries ``shift_labels`` (padding-free collators) is used
  as is, unshifted.
- A teacher vocabulary padded beyond the student's (Qwen2.5-7B: 152064 rows, 0.5B: 151936) is
  cut to the student's V as the view ``teacher_logits[..., :V]``. A smaller one raises.
- Gradient accumulation: the loss is the token sum divided by ``num_items_in_batch``, the
  Trainer's count of predicted tokens over all micro-batches of the optimizer step (and all
  processes, with ``average_tokens_across_devices``), so an accumulated step equals one big
  batch. The trainer makes the Trainer count them for any model, and count ``labels[..., 1:]``.
- Top-k teachers stored offline: without a ``teacher_model``, the batch's
  ``teacher_topk_indices`` and ``teacher_topk_logprobs`` (..., k), aligned with the logits,
  are used (pass ``remove_unused_columns=False`` so that the Trainer keeps them).

``hrm_distillation_loss`` is the same computation for a hand-written loop. For DeepSpeed or
FSDP, prepare the teacher yourself (e.g. ``trainer.accelerator.prepare_model(teacher,
evaluation_mode=True)``) before training. Several GPUs in one process (DataParallel) are not
supported: use one process per GPU (torchrun, DDP).
"""
import torch
from transformers import Trainer

from hrmkernels.modules import FusedHRMLoss

TOPK_KEYS = ("teacher_topk_indices", "teacher_topk_logprobs")


def match_vocab(teacher_logits, vocab_size):
    """The teacher's logits over the student's vocabulary: a view when the teacher's is padded."""
    if teacher_logits.shape[-1] < vocab_size:
        raise ValueError(f"the teacher's logits have V={teacher_logits.shape[-1]} columns, fewer "
                         f"than the student's V={vocab_size}: the vocabularies cannot be aligned")
    return teacher_logits[..., :vocab_size]


def _targets(inputs):
    """The labels the loss compares the logits with: shift_labels, else labels[..., 1:]."""
    shift_labels = inputs.get("shift_labels")
    return shift_labels if shift_labels is not None else inputs["labels"][..., 1:]


def hrm_distillation_loss(model, inputs, loss_fn, teacher_model=None, num_items_in_batch=None,
                          return_outputs=False):
    """CE + hrm * KL of a causal LM ``model`` on a batch, against a teacher, with ``loss_fn``.

    Args:
        model: the student, a causal LM returning ``.logits`` (B, S, V).
        inputs: the batch: model inputs plus ``labels`` (B, S), unshifted, or ``shift_labels``
            (B, S), already shifted; without ``teacher_model``, also ``teacher_topk_indices``
            and ``teacher_topk_logprobs`` (B, S, k), aligned with the logits (position i holds
            the teacher's distribution of token i + 1).
        loss_fn: a ``FusedHRMLoss`` (its reduction "mean" divides by ``num_items_in_batch``).
        teacher_model: the teacher, same tokenizer, vocabulary V or padded beyond it.
        num_items_in_batch: the number of predicted tokens in the whole accumulated batch.
        return_outputs: also return the student's outputs.
    """
    if inputs.get("labels") is None and inputs.get("shift_labels") is None:
        raise ValueError("the batch has neither labels nor shift_labels")
    labels = _targets(inputs)
    shifted = inputs.get("shift_labels") is not None
    topk = tuple(inputs.get(key) for key in TOPK_KEYS)
    inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", *TOPK_KEYS)}
    outputs = model(**inputs)          # without labels: the model computes no loss of its own
    logits = outputs.logits
    def cut(x):   # the positions that predict a label
        return x if shifted else x[..., :-1, :]

    if teacher_model is not None:
        with torch.no_grad():
            teacher_logits = teacher_model(**inputs).logits
        loss = loss_fn(cut(logits), cut(match_vocab(teacher_logits, logits.shape[-1])), labels,
                       num_items_in_batch=num_items_in_batch)
    elif topk[0] is not None and topk[1] is not None:
        loss = loss_fn(cut(logits), labels=labels, teacher_topk=tuple(cut(t) for t in topk),
                       num_items_in_batch=num_items_in_batch)
    else:
        raise ValueError("no teacher: pass a teacher_model, or batches with "
                         f"{' and '.join(TOPK_KEYS)}")
    return (loss, outputs) if return_outputs else loss


class HRMDistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is ``CE + hrm * KL(teacher || student)``, fused.

    Args:
        teacher_model: the teacher (moved to the training device, eval mode, frozen), or None
            for batches carrying an offline top-k teacher (see the module docstring).
        hrm, temperature, kl_direction, label_smoothing, topk_mode, backend: as in
            ``hrmkernels.fused_hrm_loss``.
        *args, **kwargs: the Trainer's own.

    The per-token mean CE and KL since the last log are logged as ``ce`` and ``kl``.
    """

    def __init__(self, *args, teacher_model=None, hrm=0.5, temperature=1.0, kl_direction="forward",
                 label_smoothing=0.0, topk_mode="rest", backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = FusedHRMLoss(hrm, temperature=temperature, kl_direction=kl_direction,
                                    label_smoothing=label_smoothing, topk_mode=topk_mode,
                                    backend=backend, return_components=True)
        if teacher_model is not None:
            teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.teacher_model = teacher_model
        # The Trainer counts num_items_in_batch (and treats the loss as already normalised for
        # gradient accumulation) only for models that take loss kwargs; this loss always does,
        # for any student, and shifts labels as causal LMs do.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._components = None        # running (CE sum, KL sum, tokens), on the device

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        (loss, ce, kl), outputs = hrm_distillation_loss(
            model, inputs, self.loss_fn, self.teacher_model, num_items_in_batch,
            return_outputs=True)
        if model.training:             # token sums: ce and kl are means over denom tokens
            n = (_targets(inputs) != self.loss_fn.ignore_index).sum().to(ce.dtype)
            denom = n if num_items_in_batch is None else num_items_in_batch
            step = torch.stack([ce * denom, kl * denom, n])
            self._components = step if self._components is None else self._components + step
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices",
                                                       False):
            # num_items_in_batch counts every process's tokens and DDP averages the gradients.
            loss = loss * (self.accelerator.num_processes // _tp_size(self))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._components is not None and "loss" in logs:
            ce, kl, n = self._components.tolist()  # sync-ok: logging, which syncs for the loss too
            logs = {**logs, "ce": ce / max(n, 1), "kl": kl / max(n, 1)}
            self._components = None
        super().log(logs, *args, **kwargs)


def _tp_size(trainer):
    return trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
