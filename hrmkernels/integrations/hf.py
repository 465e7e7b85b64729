"""Distil a Hugging Face causal LM with the fused HRM loss, in a ``transformers`` Trainer.

    from transformers import TrainingArguments
    from hrmkernels.integrations.hf import HRMDistillationTrainer

    trainer = HRMDistillationTrainer(
        model=student, teacher_model=teacher, hrm=0.5, temperature=2.0,
        args=TrainingArguments("out", gradient_accumulation_steps=4, bf16=True),
        train_dataset=dataset)          # rows with input_ids, attention_mask, labels
    trainer.train()

Per micro-batch, ``compute_loss`` runs the loss from the final hidden states of both models
and their output embeddings (``get_output_embeddings()``, bias included), with
``fused_linear_hrm_loss``: neither model's N x V logits are formed (fp32 logits of both models
are what dominates the memory of a distillation step at a 128k vocabulary).

- The head is separated as the backbone (``model.base_model``, i.e. the ``base_model_prefix``
  submodule, else ``get_decoder()``) followed by ``get_output_embeddings()``, an
  ``nn.Linear``. The model's own transforms of the final logits are read from its config
  (``logit_transforms``: Gemma's ``final_logit_softcapping``; ``logit_scale``,
  ``output_multiplier``, ``lm_head_multiplier``, ``1 / logits_scaling``, the names TRL 1.16
  reads) and applied by the loss. At a model's first step, the logits of 8 probe tokens are
  compared with the head's logits after those transforms: a model that transforms its logits
  in a way its config does not announce is caught there.
- A model whose head cannot be separated (no ``nn.Linear`` output embedding, a sharded or
  quantised head, a failed probe), or ``use_fused_linear=False``, falls back to the model's
  logits and ``FusedHRMLoss``, with a one-time warning. A config transform that hrmkernels
  does not map raises ``ValueError`` (never dropped silently); ``use_fused_linear=False``
  runs such a model on its logits.
- Label shifting as in HF causal LMs (``ForCausalLMLoss``): position i predicts
  ``labels[..., i + 1]``; the labels are shifted and padded with -100, the hidden states and
  logits are used whole (no slice, so no N x V or N x H gradient copy). A batch that carries
  ``shift_labels`` (padding-free collators) is used as is.
- A teacher vocabulary padded beyond the student's (Qwen2.5-7B: 152064 rows, 0.5B: 151936) is
  cut to the student's V as a view (``teacher_weight[:V]``, or ``teacher_logits[..., :V]``). A
  smaller one raises.
- Gradient accumulation: the loss is the token sum divided by ``num_items_in_batch``, the
  Trainer's count of predicted tokens over all micro-batches of the optimizer step (and all
  processes, with ``average_tokens_across_devices``), so an accumulated step equals one big
  batch. The trainer makes the Trainer count them for any model, and count ``labels[..., 1:]``.
- Top-k teachers stored offline (``integrations.data.cache_teacher_topk``) or served: without a
  ``teacher_model``, the batch's ``teacher_topk_indices`` and ``teacher_topk_logprobs``
  (..., S, k), aligned with the logits (position i: the distribution of token i + 1), are used
  (pass ``remove_unused_columns=False`` so that the Trainer keeps them), from the student's
  hidden states (``fused_linear_hrm_loss(teacher_topk=...)``): no N x V logits of any model.
  The Trainer checks that every cached row has one entry per input id and names the row that
  does not.

``hrm_distillation_loss`` is the same computation for a hand-written loop. A model wrapped for
data parallelism (DDP, FSDP, a DeepSpeed engine) is run through its wrapper's forward, so that
the wrapper's hooks see the whole loss. For DeepSpeed or FSDP, prepare the teacher yourself
(e.g. ``trainer.accelerator.prepare_model(teacher, evaluation_mode=True)``) before training; a
head whose weight is sharded (a DTensor, ZeRO-3 partitions) falls back to logits. Several GPUs
in one process (DataParallel) are not supported: use one process per GPU (torchrun, DDP).
"""
import weakref
import warnings
from typing import NamedTuple

import torch
from transformers import Trainer

from hrmkernels import fused_linear_hrm_loss
from hrmkernels.api.hrm_loss import FusedHRMLoss

TOPK_KEYS = ("teacher_topk_indices", "teacher_topk_logprobs")
# Multipliers of the final logits, in the order TRL 1.16 looks for them (Cohere, Muse, Falcon-H1);
# the first one a config sets wins. `logits_scaling` (Granite, MiniCPM3: divide; HyperCLOVA X:
# multiply) comes after them.
SCALE_NAMES = ("logit_scale", "output_multiplier", "lm_head_multiplier")
# Final-logit transforms of transformers architectures that are not mapped onto the loss's
# (scale, softcap): refused rather than dropped. Values say what the model does.
UNMAPPED = {
    "logits_soft_cap": "RecurrentGemma's softcap under another name",
    "output_logit_soft_cap": "xLSTM's output softcap",
    "unpadded_vocab_size": "Inkling's cut of the logits to an unpadded vocabulary",
}
PROBE_TOKENS = 8


def logit_transforms(config):
    """``(scale, softcap)`` of a causal LM's final logits, read from its (text) config.

    The model's logits are ``softcap * tanh(scale * (h @ W.T + b) / softcap)`` (no tanh when
    softcap is None), TRL 1.16's order. Read: ``final_logit_softcapping`` (Gemma 2/3/4,
    VaultGemma, NanoChat); the scale from ``logit_scale`` (Cohere), ``output_multiplier``
    (Muse), ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling`` (Granite,
    MiniCPM3; ``logits_scaling`` itself for HyperCLOVA X, which multiplies). A None value means
    absent. Raises ValueError for a transform that is not mapped (see ``UNMAPPED``).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, what in UNMAPPED.items():
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"{type(config).__name__}.{name} = {getattr(config, name)!r} ({what}) is a logit "
                "transform hrmkernels does not map onto fused_linear_hrm_loss; pass "
                "use_fused_linear=False to compute the loss from the model's own logits")
    scale = next((getattr(config, n) for n in SCALE_NAMES if getattr(config, n, None) is not None),
                 None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        x = float(config.logits_scaling)
        scale = x if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / x
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


class LinearHead(NamedTuple):
    """A causal LM split into ``backbone`` (returns ``last_hidden_state``) and ``head`` (an
    ``nn.Linear`` to the vocabulary), with the logit transforms of ``logit_transforms``."""
    backbone: torch.nn.Module
    head: torch.nn.Linear
    scale: float
    softcap: float | None

    def kwargs(self, who):
        """The fused_linear_hrm_loss keywords of these transforms (none when they are trivial)."""
        out = {}
        if self.scale != 1.0:
            out[f"{who}_logit_scale"] = self.scale
        if self.softcap is not None:
            out[f"{who}_softcap"] = self.softcap
        return out


class HeadNotSeparable(Exception):
    """The model's logits cannot be computed as transforms of ``head(backbone(x))``."""


def unwrap(model):
    """The module inside data-parallel and compile wrappers (DDP, FSDP, DeepSpeed, compile)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _transform(logits, scale, softcap):
    logits = logits * scale if scale != 1.0 else logits
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits


def _last_hidden(out):
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, tuple):
        hidden = out[0]
    if not isinstance(hidden, torch.Tensor):
        raise HeadNotSeparable(f"its backbone returned {type(out).__name__}, without "
                               "last_hidden_state")
    return hidden


def split_head(model, probe=True):
    """``LinearHead`` of a causal LM, or raises ``HeadNotSeparable`` saying why not.

    ``probe``: compare the logits of PROBE_TOKENS tokens with the head's (eval mode, no grad,
    once); a mismatch means a transform the config does not announce. ValueError (from
    ``logit_transforms``) for a transform that is announced but not mapped.
    """
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise HeadNotSeparable(f"its output embedding is {type(head).__name__}, not an nn.Linear")
    weight = head.weight
    if type(weight).__name__ == "DTensor" or weight.dim() != 2 or not weight.is_floating_point():
        raise HeadNotSeparable("its head weight is sharded or quantised "
                               f"({type(weight).__name__} {tuple(weight.shape)} {weight.dtype})")
    backbone = getattr(model, "base_model", model)
    if backbone is model and hasattr(model, "get_decoder"):
        backbone = model.get_decoder()
    if backbone is model or not isinstance(backbone, torch.nn.Module):
        raise HeadNotSeparable("neither base_model_prefix nor get_decoder() gives its backbone")
    scale, softcap = logit_transforms(model.config)
    split = LinearHead(backbone, head, scale, softcap)
    if probe:
        _probe(model, split)
    return split


def _probe(model, split):
    """Raise HeadNotSeparable unless model(x).logits == transforms(head(backbone(x))) on a few
    tokens. Runs in eval mode (dropout off), restoring every module's mode afterwards."""
    v = split.head.weight.shape[0]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        embed = model.get_input_embeddings()
        device = embed.weight.device if embed is not None else split.head.weight.device
        ids = (torch.arange(PROBE_TOKENS, device=device) * 7 % v)[None]
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits.float()
            h = _last_hidden(split.backbone(input_ids=ids, use_cache=False)).float()
            bias = split.head.bias.float() if split.head.bias is not None else None
            got = _transform(torch.nn.functional.linear(h, split.head.weight.float(), bias),
                             split.scale, split.softcap)
    except HeadNotSeparable:
        raise
    except Exception as e:  # noqa: BLE001 (any failure of the split call means: not separable)
        raise HeadNotSeparable(f"the probe forward failed ({type(e).__name__}: {e})") from e
    finally:
        for m, mode in modes:
            m.training = mode
    # Host reads, once per model at its first step. A tolerance of 1% of the largest logit
    # passes bf16 rounding and catches a missing scale or softcap.
    err = float("inf")
    if got.shape == want.shape:
        err = (got - want).abs().max().item()  # sync-ok: once per model (the probe)
    if not err <= 1e-2 * want.abs().max().item() + 1e-4:  # sync-ok: once per model (the probe)
        raise HeadNotSeparable(
            f"its logits differ from the head's logits after scale={split.scale}, "
            f"softcap={split.softcap} by up to {err:.3g} on probe tokens: a transform its config "
            "does not announce")


_SPLITS = weakref.WeakKeyDictionary()   # model -> LinearHead, or the reason it has none


def _split_or_warn(model):
    """split_head, cached per model; None (with a one-time warning) where there is no split."""
    inner = unwrap(model)
    split = _SPLITS.get(inner)
    if isinstance(split, LinearHead) and split.head is not inner.get_output_embeddings():
        del _SPLITS[inner]   # the head was replaced (resize_token_embeddings): split again
    if inner not in _SPLITS:
        try:
            _SPLITS[inner] = split_head(inner)
        except HeadNotSeparable as e:
            _SPLITS[inner] = str(e)
            warnings.warn(f"hrmkernels: {type(inner).__name__}: {e}; the loss uses its logits "
                          "instead (N x V materialised)", stacklevel=3)
    split = _SPLITS[inner]
    return split if isinstance(split, LinearHead) else None


def _through_wrapper(model, fn):
    """fn() run as the forward of `model`'s wrapper (DDP, FSDP, DeepSpeed) when it has one.

    A DDP wrapper prepares its gradient reduction in its own forward, FSDP gathers parameters
    there: calling the inner model's submodules directly would skip both. So the inner model's
    forward is swapped for fn for the one call (the forward redirection of PyTorch Lightning;
    TRL does the same).
    """
    inner = getattr(model, "module", None)
    if not isinstance(inner, torch.nn.Module):
        return fn()
    original = inner.__dict__.get("forward")   # an instance attribute, e.g. accelerate's autocast

    def forward(*args, **kwargs):
        _restore(inner, original)
        return fn()

    inner.forward = forward
    try:
        return model()
    finally:
        _restore(inner, original)


def _restore(module, original):
    if original is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = original


def match_vocab(teacher_logits, vocab_size):
    """The teacher's logits over the student's vocabulary: a view when the teacher's is padded."""
    if teacher_logits.shape[-1] < vocab_size:
        raise ValueError(f"the teacher's logits have V={teacher_logits.shape[-1]} columns, fewer "
                         f"than the student's V={vocab_size}: the vocabularies cannot be aligned")
    return teacher_logits[..., :vocab_size]


def _targets(inputs, ignore_index):
    """The label of each position (B, S): the batch's shift_labels, else its labels shifted as
    transformers' ForCausalLMLoss shifts them (labels[..., 1:], then ignore_index)."""
    shift_labels = inputs.get("shift_labels")
    if shift_labels is not None:
        return shift_labels
    labels = inputs["labels"]
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _linear_options(loss_fn, chunk_budget_bytes):
    """fused_linear_hrm_loss keywords equal to a FusedHRMLoss's options."""
    return dict(temperature=loss_fn.temperature, ignore_index=loss_fn.ignore_index,
                reduction=loss_fn.reduction, label_smoothing=loss_fn.label_smoothing,
                kl_direction=loss_fn.kl_direction, jsd_beta=loss_fn.jsd_beta,
                backend=loss_fn.backend, return_components=loss_fn.return_components,
                chunk_budget_bytes=chunk_budget_bytes, topk_mode=loss_fn.topk_mode)


def hrm_distillation_loss(model, inputs, loss_fn, teacher_model=None, num_items_in_batch=None,
                          return_outputs=False, *, use_fused_linear=True,
                          chunk_budget_bytes=None):
    """CE + hrm * KL of a causal LM ``model`` on a batch, against a teacher, with ``loss_fn``.

    Args:
        model: the student, a causal LM (or its DDP / FSDP / DeepSpeed wrapper).
        inputs: the batch: model inputs plus ``labels`` (B, S), unshifted, or ``shift_labels``
            (B, S), already shifted; without ``teacher_model``, also ``teacher_topk_indices``
            and ``teacher_topk_logprobs`` (B, S, k), aligned with the logits (position i holds
            the teacher's distribution of token i + 1).
        loss_fn: a ``FusedHRMLoss``: its options (hrm, temperature, reduction, jsd_beta, ...)
            are the loss's, on either path ("mean" divides by ``num_items_in_batch``).
        teacher_model: the teacher, same tokenizer, vocabulary V or padded beyond it. Run under
            ``torch.no_grad()``; its parameters get no gradient.
        num_items_in_batch: the number of predicted tokens in the whole accumulated batch.
        return_outputs: also return the student's outputs: the backbone's (``last_hidden_state``,
            no logits) on the fused-linear path, the model's on the logits path.
        use_fused_linear: compute the loss from hidden states and heads (default) where the
            heads can be separated (see the module docstring); False: from the models' logits.
        chunk_budget_bytes: fused_linear_hrm_loss's bound on its per-chunk temporaries.
    """
    if inputs.get("labels") is None and inputs.get("shift_labels") is None:
        raise ValueError("the batch has neither labels nor shift_labels")
    if getattr(loss_fn, "shift_labels", False):
        raise ValueError("hrm_distillation_loss shifts the batch's labels itself: pass a "
                         "FusedHRMLoss with shift_labels=False")
    labels = _targets(inputs, loss_fn.ignore_index)
    topk = tuple(inputs.get(key) for key in TOPK_KEYS)
    inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", *TOPK_KEYS)}

    # Vocabulary-parallel losses take logit shards: the fused-linear loss has no such mode.
    student = None
    has_topk = topk[0] is not None and topk[1] is not None
    if use_fused_linear and (teacher_model is not None or has_topk) and \
            loss_fn.process_group is None:
        student = _split_or_warn(model)
    if student is None:
        return _logits_loss(model, inputs, labels, loss_fn, teacher_model, topk,
                            num_items_in_batch, return_outputs)
    teacher = _split_or_warn(teacher_model) if teacher_model is not None else None

    def step():   # the whole loss inside the student's forward (see _through_wrapper)
        out = student.backbone(**inputs, use_cache=False)
        h = _last_hidden(out)
        w, b = student.head.weight, student.head.bias
        v = w.shape[0]
        with torch.no_grad():
            if teacher_model is None:   # an offline or served teacher: its top-k, no head
                teacher_args = dict(teacher_hidden=None, teacher_weight=None, teacher_topk=topk)
            elif teacher is not None:
                ht = _last_hidden(_through_wrapper(
                    teacher_model, lambda: teacher.backbone(**inputs, use_cache=False)))
                tw, tb = teacher.head.weight, teacher.head.bias
                if tw.shape[0] < v:
                    raise ValueError(f"the teacher's head has V={tw.shape[0]} rows, fewer than "
                                     f"the student's V={v}: the vocabularies cannot be aligned")
                # views of the first V rows (a padded teacher vocabulary); no teacher gradient
                teacher_args = dict(teacher_hidden=ht, teacher_weight=tw[:v].detach(),
                                    teacher_bias=tb[:v].detach() if tb is not None else None,
                                    **teacher.kwargs("teacher"))
            else:   # the teacher's own logits, transforms included
                u = teacher_model(**inputs).logits
                teacher_args = dict(teacher_hidden=None, teacher_weight=None,
                                    teacher_logits=match_vocab(u, v))
        loss = fused_linear_hrm_loss(
            h, w, labels=labels, hrm=loss_fn.hrm, student_bias=b,
            num_items_in_batch=num_items_in_batch, **teacher_args, **student.kwargs("student"),
            **_linear_options(loss_fn, chunk_budget_bytes))
        return loss, out

    loss, outputs = _through_wrapper(model, step)
    return (loss, outputs) if return_outputs else loss


def _logits_loss(model, inputs, labels, loss_fn, teacher_model, topk, num_items_in_batch,
                 return_outputs):
    """The loss from the models' logits (N x V each): FusedHRMLoss on them, or on a top-k
    teacher carried by the batch."""
    outputs = model(**inputs)          # without labels: the model computes no loss of its own
    logits = outputs.logits
    if teacher_model is not None:
        with torch.no_grad():
            teacher_logits = teacher_model(**inputs).logits
        loss = loss_fn(logits, match_vocab(teacher_logits, logits.shape[-1]), labels,
                       num_items_in_batch=num_items_in_batch)
    elif topk[0] is not None and topk[1] is not None:
        loss = loss_fn(logits, labels=labels, teacher_topk=topk,
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
        hrm, temperature, kl_direction, jsd_beta, label_smoothing, topk_mode, backend: as in
            ``hrmkernels.fused_hrm_loss``.
        use_fused_linear: the loss from hidden states and heads, no N x V logits (default);
            False: from the logits. See the module docstring for the fallback.
        chunk_budget_bytes: as in ``fused_linear_hrm_loss`` (default 1 GiB of chunk
            temporaries).
        *args, **kwargs: the Trainer's own.

    The per-token mean CE and KL since the last log are logged as ``ce`` and ``kl``.
    """

    def __init__(self, *args, teacher_model=None, hrm=0.5, temperature=1.0, kl_direction="forward",
                 jsd_beta=None, label_smoothing=0.0, topk_mode="rest", backend="auto",
                 use_fused_linear=True, chunk_budget_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = FusedHRMLoss(hrm, temperature=temperature, kl_direction=kl_direction,
                                    jsd_beta=jsd_beta, label_smoothing=label_smoothing,
                                    topk_mode=topk_mode, backend=backend, return_components=True)
        self.use_fused_linear, self.chunk_budget_bytes = use_fused_linear, chunk_budget_bytes
        if teacher_model is not None:
            teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        else:   # an offline teacher: each cached row must match its input ids
            for name in ("train_dataset", "eval_dataset"):
                ds = getattr(self, name, None)
                for key, part in (ds.items() if isinstance(ds, dict) else [(None, ds)]):
                    # map-style datasets.Dataset (an Arrow table), not a stream
                    if hasattr(part, "data") and set(TOPK_KEYS) <= set(
                            getattr(part, "column_names", None) or ()):
                        from hrmkernels.integrations.data import check_topk_rows
                        check_topk_rows(part, name if key is None else f"{name}[{key!r}]")
        self.teacher_model = teacher_model
        # The Trainer counts num_items_in_batch (and treats the loss as already normalised for
        # gradient accumulation) only for models that take loss kwargs; this loss always does,
        # for any student, and shifts labels as causal LMs do.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._components = None        # running (CE sum, KL sum, tokens), on the device

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # accelerate applies mixed precision by wrapping model.forward; the fused-linear path
        # calls the backbone and the loss itself, so it needs the same autocast around it.
        with self.accelerator.autocast():
            (loss, ce, kl), outputs = hrm_distillation_loss(
                model, inputs, self.loss_fn, self.teacher_model, num_items_in_batch,
                return_outputs=True, use_fused_linear=self.use_fused_linear,
                chunk_budget_bytes=self.chunk_budget_bytes)
        if model.training:             # token sums: ce and kl are means over denom tokens
            n = (_targets(inputs, self.loss_fn.ignore_index) != self.loss_fn.ignore_index
                 ).sum().to(ce.dtype)
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
