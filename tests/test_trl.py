"""hrmkernels.integrations.trl against TRL 1.16's own losses, on CPU, with tiny models built from
configs (nothing is downloaded). The loss is CE + hrm * D; D must equal TRL's loss and the CE
the student's cross-entropy on the same tokens, to 1e-5 relative in fp32:

- the hook against TRL's ``_chunked_divergence_loss`` on the same tensors (beta 0, 0.5, 1;
  T 1 and 2; hrm 0 and 0.5; biases; logit scale and softcap), loss and gradients;
- a real ``DistillationTrainer`` step (on-policy, generation by transformers, no vLLM) and a
  real ``GKDTrainer`` step: the first step's loss against TRL's own loss on the same batch.
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # CI reaches package registries only, not the Hub
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from trl import DistillationConfig, DistillationTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from hrmkernels.integrations import trl as hrm_trl

V = 64
RTOL = 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _logits(h, w, b, scale, softcap):
    z = F.linear(h, w, b) * scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


@pytest.mark.parametrize("transforms", [
    (1.0, 1.0, None, None),
    pytest.param((0.5, 2.0, 3.0, 4.0), id="scale-softcap")])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("hrm", [0.0, 0.5])
@pytest.mark.parametrize("num_items", [None, 11])
def test_hook_equals_trls_chunked_divergence_loss(transforms, beta, temperature, hrm, num_items):
    s_scale, t_scale, s_cap, t_cap = transforms
    torch.manual_seed(0)
    b, k, hs, ht = 2, 7, 16, 24
    h_s = torch.randn(b, k, hs, requires_grad=True)
    h_t = torch.randn(b, k, ht)
    w_s = (torch.randn(V, hs) * 0.5).requires_grad_(True)
    b_s = (torch.randn(V) * 0.1).requires_grad_(True)
    w_t, b_t = torch.randn(V, ht) * 0.5, torch.randn(V) * 0.1
    mask = torch.ones(b, k, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, :2] = 0
    labels = torch.randint(0, V, (b, k))
    nib = None if num_items is None else torch.tensor(float(num_items))
    common = dict(num_items_in_batch=nib, student_lm_head_bias=b_s, teacher_lm_head_bias=b_t,
                  student_logit_scale=s_scale, teacher_logit_scale=t_scale,
                  student_final_logit_softcapping=s_cap, teacher_final_logit_softcapping=t_cap,
                  temperature=temperature)
    parts = {}
    ours, ent, n_valid = hrm_trl.hrm_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, **common,
                                                     labels=labels, hrm=hrm, backend="torch",
                                                     parts=parts)
    grads = torch.autograd.grad(ours, [h_s, w_s, b_s])

    theirs, their_ent, their_n = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, **common)
    keep = mask.bool()
    ce_sum = F.cross_entropy(_logits(h_s, w_s, b_s, s_scale, s_cap)[keep], labels[keep],
                             reduction="sum")
    denom = keep.sum() if nib is None else nib
    expected = ce_sum / denom + hrm * theirs
    assert n_valid == their_n
    assert _rel(parts["divergence"] / denom, theirs) <= RTOL     # D is TRL's loss
    assert _rel(ent, their_ent) <= RTOL
    assert _rel(ours, expected) <= RTOL
    for g, e in zip(grads, torch.autograd.grad(expected, [h_s, w_s, b_s])):
        assert _rel(g, e) <= RTOL


def _tokenizer():
    """A word-level tokenizer over V tokens, built in memory: w0 ... w60, <pad>, <eos>, <unk>."""
    vocab = {f"w{i}": i for i in range(V - 3)}
    vocab.update({"<pad>": V - 3, "<eos>": V - 2, "<unk>": V - 1})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>",
                                                padding_side="left")


def _models(**extra):
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=64, vocab_size=V,
                 initializer_range=0.3, pad_token_id=V - 3, eos_token_id=V - 2,
                 bos_token_id=None, **extra)
    torch.manual_seed(0)
    return (transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)),
            transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small)))


def _common_args(tmp_path):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                disable_tqdm=True, learning_rate=1e-3)


def _ce(logits, labels, num_items):
    """The student's CE summed over labels != -100 (aligned with logits), / num_items."""
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], reduction="sum") / num_items


def test_distillation_trainer_first_step_equals_trls_loss(tmp_path):
    student, teacher = _models()
    hrm = 0.5
    seen = {}

    class Probe(hrm_trl.HRMTRLDistillationTrainer):
        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            if not seen:   # before the optimizer step: TRL's own loss and the CE, same batch
                with torch.no_grad():
                    seen["trl"] = DistillationTrainer._compute_loss(
                        self, unwrapped_student, inputs, num_items_in_batch)[0]
                    completion = inputs["completion_ids"]
                    k = completion.shape[1]
                    logits = unwrapped_student(
                        input_ids=torch.cat([inputs["prompt_ids"], completion], 1),
                        attention_mask=torch.cat([inputs["prompt_mask"],
                                                  inputs["completion_mask"]], 1)).logits
                    labels = completion.masked_fill(inputs["completion_mask"] == 0, -100)
                    seen["ce"] = _ce(logits[:, -k - 1:-1], labels, num_items_in_batch)
            out = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
            seen.setdefault("ours", out[0].detach())
            return out

    prompts = datasets.Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + j) % 50}" for j in range(4 + i % 3)) for i in range(4)]})
    args = DistillationConfig(**_common_args(tmp_path), max_completion_length=6, use_vllm=False,
                              beta=0.5, temperature=2.0, bf16=False,
                              gradient_checkpointing=False)
    trainer = Probe(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                    processing_class=_tokenizer(), hrm=hrm, backend="torch")
    trainer.train()
    assert seen["trl"] > 0 and seen["ce"] > 0
    assert _rel(seen["ours"], seen["ce"] + hrm * seen["trl"]) <= RTOL
    log = next(x for x in trainer.state.log_history if "divergence" in x)
    assert abs(log["divergence"] - seen["trl"].item()) <= RTOL * seen["trl"].item()
    assert abs(log["ce"] - seen["ce"].item()) <= RTOL * seen["ce"].item()


def test_gkd_trainer_first_step_equals_trls_loss(tmp_path):
    student, teacher = _models()
    hrm = 0.5
    seen = {}
    reference = GKDTrainer.compute_loss

    class Probe(hrm_trl.HRMGKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not seen:   # before the optimizer step: GKD's own loss and the CE, same batch
                with torch.no_grad():
                    seen["trl"] = reference(self, model, inputs,
                                            num_items_in_batch=num_items_in_batch)
                    labels = inputs["labels"][:, 1:]
                    n = (labels != -100).sum() if num_items_in_batch is None \
                        else num_items_in_batch
                    logits = model(input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"]).logits
                    seen["ce"] = _ce(logits[:, :-1], labels, n)
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.setdefault("ours", loss.detach())
            return loss

    torch.manual_seed(1)
    ids = torch.randint(0, 50, (4, 9))
    labels = ids.clone()
    labels[:, :3] = -100                      # the prompt
    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def collate(examples):
        batch = {k: torch.tensor([e[k] for e in examples]) for k in ("input_ids", "labels")}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    args = GKDConfig(**_common_args(tmp_path), lmbda=0.0, seq_kd=False, beta=0.5,
                     max_length=16, bf16=False)
    trainer = Probe(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                    data_collator=collate, processing_class=_tokenizer(), hrm=hrm,
                    backend="torch")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="hrmkernels")   # fused-linear, no fallback
        trainer.train()
    expected = seen["ce"] + hrm * seen["trl"]
    assert seen["trl"] > 0
    assert _rel(seen["ours"], expected) <= RTOL
    log = next(x for x in trainer.state.log_history if "divergence" in x)
    assert abs(log["divergence"] - seen["trl"].item()) <= RTOL * seen["trl"].item()
