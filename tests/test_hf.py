"""hrmkernels.integrations.hf with tiny, randomly initialised transformers models (nothing is
downloaded): label shifting, a padded teacher vocabulary, top-k batches, and gradient
accumulation through a real Trainer equal to one big batch."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # CI reaches package registries only, not the Hub
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")          # the Trainer needs it

from hrmkernels import FusedHRMLoss, fused_hrm_loss
from hrmkernels.integrations.hf import HRMDistillationTrainer, hrm_distillation_loss, match_vocab
from hrmkernels.reference import hrm_loss_reference, hrm_loss_topk_reference

V_STUDENT, V_TEACHER = 96, 112     # the teacher's vocabulary padded beyond the student's (Qwen)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def _models():
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V_STUDENT, **SMALL))
    teacher = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=V_TEACHER, **SMALL))
    return student, teacher


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


def test_match_vocab_cuts_a_padded_teacher_as_a_view():
    t = torch.randn(2, 5, V_TEACHER)
    cut = match_vocab(t, V_STUDENT)
    assert cut.shape[-1] == V_STUDENT and cut.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="fewer than the student's"):
        match_vocab(t[..., :50], V_STUDENT)


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
    torch.testing.assert_close(hrm_distillation_loss(student, shifted, loss_fn, teacher), expected * 25
                               / (batch["labels"][:, 1:] != -100).sum())


def test_hrm_distillation_loss_with_an_offline_topk_teacher():
    student, teacher = _models()
    batch = _batch(_rows(2))
    with torch.no_grad():
        u = teacher(input_ids=batch["input_ids"]).logits[..., :V_STUDENT]
    lp, idx = torch.log_softmax(u, -1).topk(8, -1)      # stored per position, like the logits
    batch.update(teacher_topk_indices=idx, teacher_topk_logprobs=lp)
    loss_fn = FusedHRMLoss(0.5, backend="torch", topk_mode="renormalize")
    loss = hrm_distillation_loss(student, batch, loss_fn)
    z = student(input_ids=batch["input_ids"]).logits
    expected = hrm_loss_topk_reference(z[:, :-1], (idx[:, :-1], lp[:, :-1]), batch["labels"][:, 1:],
                                       0.5, topk_mode="renormalize")
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="no teacher"):
        hrm_distillation_loss(student, _batch(_rows(2)), loss_fn)


def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path):
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
                                     backend="torch", args=args, train_dataset=rows)
    trainer.train()
    for p0, p1, g in zip(before, student.parameters(), grads):
        step = p0 - p1.detach()
        assert (step - g).norm() <= 1e-4 * g.norm() + 1e-7, (step - g).norm() / g.norm()
    logged = next(log for log in trainer.state.log_history if "ce" in log)
    assert logged["ce"] > 0 and logged["kl"] >= 0
    torch.testing.assert_close(torch.tensor(logged["loss"]), big.detach(), rtol=1e-4, atol=0)
