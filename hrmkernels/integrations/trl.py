"""The fused HRM loss in TRL's distillation trainers (tested with trl 1.16.0).

    from hrmkernels.integrations.trl import HRMTRLDistillationTrainer, HRMGKDTrainer

    trainer = HRMTRLDistillationTrainer(model=student, teacher_model=teacher, hrm=0.5,
                                        args=DistillationConfig(..., beta=0.0, temperature=1.0),
                                        train_dataset=prompts, processing_class=tokenizer)
    trainer = HRMGKDTrainer(model=student, teacher_model=teacher, hrm=0.5, args=GKDConfig(...),
                            ...)

Both trainers keep everything TRL does (generation, batching, the models' hidden states,
logging) and replace only the loss: per token ``CE + hrm * D``, with D TRL's divergence for
``args.beta`` (0 forward KL, 1 reverse KL, else the generalised JSD, as TRL defines it) and CE
the student's cross-entropy on the same tokens, normalised as TRL normalises (by
``num_items_in_batch``, else by the number of loss tokens). ``hrm = 0`` keeps the CE alone,
the contract of ``fused_hrm_loss``; the divergence is still computed and logged as
``divergence``, equal to TRL's own loss, beside ``ce``.

- ``HRMTRLDistillationTrainer`` (on-policy ``DistillationTrainer``): TRL 1.16 computes its loss
  in the module-level ``_chunked_divergence_loss`` from hidden states and heads, with the logit
  scale and softcap it reads from the configs. The trainer swaps that function for
  ``hrm_divergence_loss`` (same arguments, plus the labels: the completion tokens) for the
  duration of each ``_compute_loss`` call, so TRL's own hidden states, heads, transforms,
  temperature and normalisation reach the fused kernels unchanged. The CE is on the sampled
  completion tokens.
- ``HRMGKDTrainer`` (``trl.experimental.gkd.GKDTrainer``): ``compute_loss`` is
  ``hrm_distillation_loss`` of ``hrmkernels.integrations.hf``: fused-linear from hidden states
  where the heads can be separated. Temperature 1, as GKD's own loss: its
  ``args.temperature`` is the sampling temperature only.
"""
import contextlib
import functools

import torch
from trl import DistillationTrainer
from trl.experimental.gkd import GKDTrainer
from trl.trainer import distillation_trainer as _trl_distillation

from hrmkernels import fused_linear_hrm_loss
from hrmkernels.integrations.hf import hrm_distillation_loss
from hrmkernels.api.hrm_loss import FusedHRMLoss

if not hasattr(_trl_distillation, "_chunked_divergence_loss"):   # the hook moved: not 1.16
    raise ImportError("hrmkernels.integrations.trl hooks trl 1.16's _chunked_divergence_loss, "
                      "which this trl does not have; install trl==1.16.0")

IGNORE_INDEX = -100


def _full(t):
    """A DTensor head (FSDP2) as one plain tensor: gathered once for the whole loss."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def hrm_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                        teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                        student_lm_head_bias=None, teacher_lm_head_bias=None,
                        student_logit_scale=1.0, teacher_logit_scale=1.0,
                        student_final_logit_softcapping=None,
                        teacher_final_logit_softcapping=None, temperature=1.0, *, labels, hrm,
                        backend="auto", chunk_budget_bytes=None, parts=None):
    """CE + hrm * D from hidden states and heads, with the arguments of TRL 1.16's
    ``_chunked_divergence_loss`` plus the keywords below; returns its triple
    ``(loss, entropy_sum, n_valid)``.

    Args:
        student_hidden_states, teacher_hidden_states: (B, K, H_s), (B, K, H_t), aligned with
            the completion tokens. ..._lm_head_weight / _bias: the heads (V, H), (V,).
        completion_mask: (B, K), 1 where a token counts.
        beta, temperature, the logit scales and softcaps: as in TRL (scale, softcap, then / T).
        num_items_in_batch: the denominator (TRL's); None: the number of counted tokens.
        labels: (B, K) the tokens the student predicts there (TRL: ``completion_ids``).
        hrm: the weight of D (>= 0; 0 is the CE alone).
        backend, chunk_budget_bytes: as in ``fused_linear_hrm_loss``.
        parts: a dict that receives the detached token sums ``ce`` and ``divergence``.

    The teacher gets no gradient. ``entropy_sum`` is the student's entropy at temperature T
    summed over the counted tokens, as TRL's.
    """
    labels = labels.masked_fill(completion_mask == 0, IGNORE_INDEX)
    transforms = {}
    for who, scale, softcap in (("student", student_logit_scale, student_final_logit_softcapping),
                                ("teacher", teacher_logit_scale, teacher_final_logit_softcapping)):
        if scale != 1.0:
            transforms[f"{who}_logit_scale"] = float(scale)
        if softcap is not None:
            transforms[f"{who}_softcap"] = float(softcap)
    teacher_bias = _full(teacher_lm_head_bias)
    # TRL's num_items_in_batch is the denominator as given (under DDP the global count over the
    # number of processes, which one process's own count may exceed); None: the counted tokens.
    n_valid = (labels != IGNORE_INDEX).sum()
    denom = n_valid.clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    loss, ce, div = out = fused_linear_hrm_loss(
        student_hidden_states, _full(student_lm_head_weight), teacher_hidden_states,
        _full(teacher_lm_head_weight).detach(), labels, float(hrm),
        student_bias=_full(student_lm_head_bias),
        teacher_bias=teacher_bias.detach() if teacher_bias is not None else None,
        temperature=float(temperature), jsd_beta=float(beta), ignore_index=IGNORE_INDEX,
        num_items_in_batch=num_items_in_batch, backend=backend, return_components=True,
        chunk_budget_bytes=chunk_budget_bytes, **transforms)
    if parts is not None:   # token sums, for logging
        parts.update(ce=ce * denom, divergence=div * denom)
    return loss, out.entropy * denom, n_valid


class _LogParts:
    """Accumulates the CE and divergence token sums of the training steps on the device and logs
    their per-token means as ``ce`` and ``divergence`` (one host read per log)."""
    _parts = None

    def _add_parts(self, ce_sum, div_sum, n):
        step = torch.stack([ce_sum.float(), div_sum.float(), n.float()])
        self._parts = step if self._parts is None else self._parts + step

    def log(self, logs, *args, **kwargs):
        if self._parts is not None and "loss" in logs:
            ce, div, n = self._parts.tolist()  # sync-ok: logging, which syncs for the loss too
            logs = {**logs, "ce": ce / max(n, 1), "divergence": div / max(n, 1)}
            self._parts = None
        super().log(logs, *args, **kwargs)


class HRMTRLDistillationTrainer(_LogParts, DistillationTrainer):
    """TRL's ``DistillationTrainer`` with the loss ``CE + hrm * D`` (fused kernels).

    Args:
        hrm: weight of TRL's divergence D (``args.beta``, ``args.temperature``), >= 0.
        backend, chunk_budget_bytes: as in ``hrmkernels.fused_linear_hrm_loss``.
        *args, **kwargs: ``DistillationTrainer``'s own.
    """

    def __init__(self, *args, hrm=1.0, backend="auto", chunk_budget_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hrm, self.backend, self.chunk_budget_bytes = hrm, backend, chunk_budget_bytes

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:   # tool outputs inside a completion are not trained on
            mask = mask * inputs["tool_mask"]
        parts = {}
        hook = functools.partial(hrm_divergence_loss, labels=inputs["completion_ids"],
                                 hrm=self.hrm, backend=self.backend,
                                 chunk_budget_bytes=self.chunk_budget_bytes, parts=parts)
        with _swapped(_trl_distillation, "_chunked_divergence_loss", hook):
            loss, entropy_sum, n_valid = super()._compute_loss(unwrapped_student, inputs,
                                                               num_items_in_batch)
        if self.model.training:
            self._add_parts(parts["ce"], parts["divergence"], (mask != 0).sum())
        return loss, entropy_sum, n_valid


@contextlib.contextmanager
def _swapped(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class HRMGKDTrainer(_LogParts, GKDTrainer):
    """TRL's experimental ``GKDTrainer`` with the loss ``CE + hrm * D`` (fused kernels).

    D is GKD's generalised JSD for ``args.beta`` at temperature 1 (GKD's own loss ignores
    ``args.temperature``, its sampling temperature); CE is on the batch's labels, shifted as in
    causal LMs. The loss comes from hidden states and heads (``hrm_distillation_loss``; a model
    whose head cannot be separated falls back to its logits with a warning).

    Args:
        hrm: weight of D, >= 0.
        backend, use_fused_linear, chunk_budget_bytes: as in
            ``hrmkernels.integrations.hf.hrm_distillation_loss``.
        *args, **kwargs: ``GKDTrainer``'s own.
    """

    def __init__(self, *args, hrm=1.0, backend="auto", use_fused_linear=True,
                 chunk_budget_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = FusedHRMLoss(hrm, jsd_beta=float(self.beta), backend=backend,
                                    return_components=True)
        self.use_fused_linear, self.chunk_budget_bytes = use_fused_linear, chunk_budget_bytes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        self.teacher_model.eval()
        # accelerate's mixed precision wraps model.forward; the backbone calls need it too
        with self.accelerator.autocast():
            (loss, ce, div), outputs = hrm_distillation_loss(
                model, batch, self.loss_fn, self.teacher_model, num_items_in_batch,
                return_outputs=True, use_fused_linear=self.use_fused_linear,
                chunk_budget_bytes=self.chunk_budget_bytes)
        if model.training:
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            denom = n.clamp_min(1) if num_items_in_batch is None else num_items_in_batch
            self._add_parts(ce * denom, div * denom, n)
        return (loss, outputs) if return_outputs else loss
