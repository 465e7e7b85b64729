"""hrmkernels.integrations.hf with tiny, randomly initialised transformers models (nothing is
downloaded): the fused-linear loss from hidden states equals the logits path (loss and
gradients) for Llama, Qwen2 (tied and padded vocabularies), Phi (a head bias), Gemma2 (softcap)
and Cohere (logit scale); logit transforms read from configs; the fallback to logits; label
shifting; top-k batches; a DDP wrapper; gradient accumulation through a real Trainer equal to
one big batch."""
import gc
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # CI reaches package registries only, not the Hub
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")          # the Trainer needs it

from hrmkernels import FusedHRMLoss, fused_hrm_loss
from hrmkernels.integrations import hf
from hrmkernels.integrations.hf import (HRMDistillationTrainer, hrm_distillation_loss,
                                        logit_transforms, match_vocab, split_head)
from hrmkernels.reference import hrm_loss_reference, hrm_loss_topk_reference

V_STUDENT, V_TEACHER = 96, 112     # the teacher's vocabulary padded beyond the student's (Qwen)
# initializer_range 0.3: logits of a few units, so that softcaps bend them and the KL is not tiny
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.3)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16)


def _lm(kind, vocab_size=V_STUDENT, **extra):
    """A tiny causal LM of architecture `kind`, random weights, from its config."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "phi": (transformers.PhiConfig, transformers.PhiForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
    }[kind]
    kwargs = {**SMALL, **(GEMMA if kind == "gemma2" else {}), **extra}
    return model_cls(config_cls(vocab_size=vocab_size, **kwargs))


def _models():
    torch.manual_seed(0)
    return _lm("llama"), _lm("qwen2", V_TEACHER)


def _rows(n, length=10):
    """n sequences with -100 labels (prompt tokens, padding) in different numbers per row."""
    ids = torch.randint(0, V_STUDENT, (n, length))
    labels = ids.clone()
    for i in range(n):
        labels[i, : 1 + 2 * i] = -100
    return [dict(input_ids=ids[i], attention_mask=torch.ones(length, dtype=torch.long),
                 labels=labels[i]) for i in range(n)]


def _batch(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _loss_and_grads(student, teacher, batch, loss_fn, **kwargs):
    student.zero_grad(set_to_none=True)
    out = hrm_distillation_loss(student, batch, loss_fn, teacher, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def _assert_same(fused, logits):
    (a, ga), (b, gb) = fused, logits
    for x, y in zip(a, b):   # loss, ce, kl
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        err = (ga[name] - gb[name]).norm() / gb[name].norm().clamp_min(1e-12)
        assert err <= 1e-5, (name, err.item())


def test_match_vocab_cuts_a_padded_teacher_as_a_view():
    t = torch.randn(2, 5, V_TEACHER)
    cut = match_vocab(t, V_STUDENT)
    assert cut.shape[-1] == V_STUDENT and cut.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="fewer than the student's"):
        match_vocab(t[..., :50], V_STUDENT)


ARCHS = {   # student, teacher: what each pair adds
    "llama-qwen2-padded": (("llama",), ("qwen2", V_TEACHER)),
    "qwen2-tied-llama": (("qwen2", V_STUDENT, {"tie_word_embeddings": True}), ("llama",)),
    "phi-head-bias": (("phi",), ("phi", V_TEACHER)),
    "gemma2-softcap": (("gemma2", V_STUDENT, {"final_logit_softcapping": 2.0}),
                       ("gemma2", V_TEACHER, {"final_logit_softcapping": 3.0})),
    "cohere-logit-scale": (("cohere", V_STUDENT, {"logit_scale": 0.5}),
                           ("cohere", V_STUDENT, {"logit_scale": 2.0})),
}


def _pair(name):
    torch.manual_seed(0)
    return tuple(_lm(spec[0], *spec[1:2], **(spec[2] if len(spec) > 2 else {}))
                 for spec in ARCHS[name])


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("jsd_beta", [None, 0.5])
def test_fused_linear_path_equals_the_logits_path(name, jsd_beta):
    student, teacher = _pair(name)
    assert isinstance(split_head(student), hf.LinearHead)   # no fallback: really fused-linear
    batch = _batch(_rows(3))
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, jsd_beta=jsd_beta, backend="torch",
                           return_components=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # a fallback warning would fail the test
        fused = _loss_and_grads(student, teacher, batch, loss_fn, num_items_in_batch=25)
    logits = _loss_and_grads(student, teacher, batch, loss_fn, num_items_in_batch=25,
                             use_fused_linear=False)
    _assert_same(fused, logits)
    if student.config.tie_word_embeddings:   # the tied matrix: embedding and head gradients
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_padding_free_shift_labels_on_the_fused_linear_path():
    student, teacher = _models()
    batch = _batch(_rows(3))
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, backend="torch", return_components=True)
    shifted = {"input_ids": batch["input_ids"][:, :-1], "shift_labels": batch["labels"][:, 1:],
               "attention_mask": batch["attention_mask"][:, :-1]}
    _assert_same(_loss_and_grads(student, teacher, shifted, loss_fn),
                 _loss_and_grads(student, teacher, batch, loss_fn))


def test_hrm_distillation_loss_shifts_labels_and_matches_the_reference():
    student, teacher = _models()
    batch = _batch(_rows(3))
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, backend="torch")
    loss = hrm_distillation_loss(student, batch, loss_fn, teacher, num_items_in_batch=25)
    z = student(input_ids=batch["input_ids"]).logits
    with torch.no_grad():
        u = teacher(input_ids=batch["input_ids"]).logits
    expected = hrm_loss_reference(z[:, :-1], u[:, :-1, :V_STUDENT], batch["labels"][:, 1:], 0.5,
                                  temperature=2.0, num_items_in_batch=25)
    torch.testing.assert_close(loss, expected)
    # padding-free collators hand over shift_labels: used as they are, logits unshifted
    shifted = {**batch, "shift_labels": batch["labels"][:, 1:], "labels": None}
    shifted["input_ids"] = batch["input_ids"][:, :-1]
    shifted["attention_mask"] = batch["attention_mask"][:, :-1]
    torch.testing.assert_close(hrm_distillation_loss(student, shifted, loss_fn, teacher),
                               expected * 25 / (batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("use_fused_linear", [True, False])
def test_hrm_distillation_loss_with_an_offline_topk_teacher(use_fused_linear):
    student, teacher = _models()
    batch = _batch(_rows(2))
    with torch.no_grad():
        u = teacher(input_ids=batch["input_ids"]).logits[..., :V_STUDENT]
    lp, idx = torch.log_softmax(u, -1).topk(8, -1)      # stored per position, like the logits
    batch.update(teacher_topk_indices=idx, teacher_topk_logprobs=lp)
    loss_fn = FusedHRMLoss(0.5, backend="torch", topk_mode="renormalize")
    loss = hrm_distillation_loss(student, batch, loss_fn, use_fused_linear=use_fused_linear)
    z = student(input_ids=batch["input_ids"]).logits
    expected = hrm_loss_topk_reference(z[:, :-1], (idx[:, :-1], lp[:, :-1]), batch["labels"][:, 1:],
                                       0.5, topk_mode="renormalize")
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="no teacher"):
        hrm_distillation_loss(student, _batch(_rows(2)), loss_fn)


def test_a_loss_fn_that_shifts_labels_itself_is_refused():
    student, teacher = _models()
    with pytest.raises(ValueError, match="shift_labels=False"):
        hrm_distillation_loss(student, _batch(_rows(2)), FusedHRMLoss(0.5, shift_labels=True),
                              teacher)


def test_logit_transforms_read_from_configs():
    assert logit_transforms(transformers.LlamaConfig()) == (1.0, None)
    assert logit_transforms(transformers.Gemma2Config()) == (1.0, 30.0)
    assert (logit_transforms(transformers.Gemma3TextConfig(final_logit_softcapping=5.0))
            == (1.0, 5.0))
    assert logit_transforms(transformers.CohereConfig()) == (0.0625, None)
    assert logit_transforms(transformers.GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert logit_transforms(transformers.FalconH1Config(lm_head_multiplier=0.5))[0] == 0.5
    hcx = transformers.LlamaConfig(logits_scaling=4.0)
    hcx.model_type = "hyperclovax"     # HyperCLOVA X multiplies by logits_scaling
    assert logit_transforms(hcx) == (4.0, None)
    with pytest.raises(ValueError, match="logits_soft_cap.*use_fused_linear=False"):
        logit_transforms(transformers.LlamaConfig(logits_soft_cap=5.0))


def test_an_unmapped_transform_is_refused_not_dropped():
    torch.manual_seed(0)
    student = _lm("llama", logits_soft_cap=5.0)     # a name hrmkernels does not map
    loss_fn = FusedHRMLoss(0.5, backend="torch")
    with pytest.raises(ValueError, match="does not map"):
        hrm_distillation_loss(student, _batch(_rows(2)), loss_fn, _lm("qwen2"))
    hrm_distillation_loss(student, _batch(_rows(2)), loss_fn, _lm("qwen2"), use_fused_linear=False)


def test_the_probe_catches_a_transform_read_wrong(monkeypatch):
    student, _ = _pair("gemma2-softcap")
    assert split_head(student).softcap == 2.0
    monkeypatch.setattr(hf, "logit_transforms", lambda config: (1.0, None))   # softcap dropped
    with pytest.raises(hf.HeadNotSeparable, match="does not announce"):
        split_head(student)


class _HiddenScaleLlama(transformers.LlamaForCausalLM):
    """Multiplies its logits by 3 without saying so in its config (a custom model)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_an_inseparable_head_falls_back_to_logits_with_one_warning(who):
    torch.manual_seed(0)
    odd = _HiddenScaleLlama(transformers.LlamaConfig(vocab_size=V_STUDENT, **SMALL))
    student, teacher = (odd, _lm("qwen2")) if who == "student" else (_lm("llama"), odd)
    with pytest.raises(hf.HeadNotSeparable, match="does not announce"):
        split_head(odd)
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, backend="torch", return_components=True)
    with pytest.warns(UserWarning, match="uses its logits instead") as record:
        fused = _loss_and_grads(student, teacher, _batch(_rows(3)), loss_fn)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per model: the second step is silent
        _loss_and_grads(student, teacher, _batch(_rows(3)), loss_fn)
    torch.manual_seed(0)
    batch = _batch(_rows(3))
    _assert_same(_loss_and_grads(student, teacher, batch, loss_fn),
                 _loss_and_grads(student, teacher, batch, loss_fn, use_fused_linear=False))
    assert fused[0].loss.isfinite()


def test_a_ddp_wrapped_student_runs_through_its_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    student, teacher = _models()
    batch = _batch(_rows(3))
    loss_fn = FusedHRMLoss(0.5, backend="torch", return_components=True)
    expected = _loss_and_grads(student, teacher, batch, loss_fn)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(student)
        calls = []
        ddp.register_forward_pre_hook(lambda *_: calls.append(1))
        student.zero_grad(set_to_none=True)
        out = hrm_distillation_loss(ddp, batch, loss_fn, teacher)
        out.loss.backward()
        assert calls == [1] and "forward" not in student.__dict__   # redirected, then restored
        got = (out, {n: p.grad.clone() for n, p in student.named_parameters()})
        # The reducer holds the process group: destroyed after destroy_process_group, gloo's
        # destructor once hung joining its threads in a full run. Free it while the group lives.
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()
    _assert_same(got, expected)


@pytest.mark.parametrize("use_fused_linear", [True, False])
def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path, use_fused_linear):
    # 4 rows, 2 per micro-batch, 2 micro-batches per step, SGD with lr 1: the step's parameter
    # change is minus the gradient of the mean over all 4 rows' predicted tokens, whichever rows
    # the sampler puts together, because each micro-batch divides by num_items_in_batch.
    student, teacher = _models()
    rows = _rows(4)
    before = [p.detach().clone() for p in student.parameters()]
    batch = _batch(rows)
    z = student(input_ids=batch["input_ids"]).logits
    with torch.no_grad():
        u = teacher(input_ids=batch["input_ids"]).logits
    big = fused_hrm_loss(z[:, :-1], u[:, :-1, :V_STUDENT], batch["labels"][:, 1:], 0.5,
                         temperature=2.0, backend="torch")
    grads = torch.autograd.grad(big, list(student.parameters()))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = HRMDistillationTrainer(model=student, teacher_model=teacher, hrm=0.5, temperature=2.0,
                                     backend="torch", use_fused_linear=use_fused_linear,
                                     args=args, train_dataset=rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="hrmkernels")   # no fallback to logits
        trainer.train()
    for p0, p1, g in zip(before, student.parameters(), grads):
        step = p0 - p1.detach()
        assert (step - g).norm() <= 1e-4 * g.norm() + 1e-7, (step - g).norm() / g.norm()
    logged = next(log for log in trainer.state.log_history if "ce" in log)
    assert logged["ce"] > 0 and logged["kl"] >= 0
    torch.testing.assert_close(torch.tensor(logged["loss"]), big.detach(), rtol=1e-4, atol=0)
    # evaluation runs the same loss (no logits on the fused-linear path, none needed)
    assert trainer.evaluate(rows)["eval_loss"] > 0
