"""hrmkernels.integrations.data with tiny random transformers models (nothing downloaded): the
cache equals the teacher's log-softmax top-k at every position (softcap included), survives
save_to_disk / load_from_disk, samples as Sparse Logit Sampling says, and trains a student
through HRMDistillationTrainer without a teacher and without N x V logits."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from hrmkernels.integrations.data import (TopKDataCollator, cache_teacher_topk,  # noqa: E402
                                          check_topk_rows, served_topk)
from hrmkernels.integrations.hf import TOPK_KEYS, HRMDistillationTrainer  # noqa: E402
from hrmkernels.reference import hrm_loss_topk_reference  # noqa: E402

V = 96
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.3)
LENGTHS = [5, 9, 3, 7, 6]


def _lm(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "gemma2":   # final_logit_softcapping: the cache applies the config's softcap
        config = transformers.Gemma2Config(vocab_size=V, head_dim=16, query_pre_attn_scalar=16,
                                           final_logit_softcapping=2.0, **SMALL)
        return transformers.Gemma2ForCausalLM(config).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V, **SMALL)).eval()


def _dataset():
    g = torch.Generator().manual_seed(1)
    return datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(0, V, (n,), generator=g).tolist() for n in LENGTHS]})


def _teacher_logprobs(teacher, row, t):
    with torch.no_grad():
        u = teacher(input_ids=torch.tensor([row])).logits[0].double()
    return torch.log_softmax(u / t, -1)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_cache_is_the_teachers_top_k_at_every_position(kind, tmp_path):
    teacher = _lm(kind)
    cached = cache_teacher_topk(teacher, _dataset(), k=8, temperature=1.5, batch_size=2,
                                path=tmp_path / "k8")
    assert cached.features[TOPK_KEYS[0]].dtype == "int32"
    loaded = datasets.load_from_disk(str(tmp_path / "k8"))
    storage = loaded.data.column(TOPK_KEYS[0]).chunk(0).storage.type   # on disk: 4 B an id
    assert loaded.features[TOPK_KEYS[0]].dtype == "int32" and "int32" in str(storage)
    loaded = loaded.with_format("torch")
    for i, row in enumerate(_dataset()["input_ids"]):
        idx, lp = loaded[i][TOPK_KEYS[0]], loaded[i][TOPK_KEYS[1]]
        assert lp.dtype == torch.float32
        assert idx.shape == lp.shape == (len(row), 8)       # one entry per input id
        ref = _teacher_logprobs(teacher, row, 1.5)          # position i predicts token i + 1
        want = ref.topk(8, -1).values
        torch.testing.assert_close(lp.double(), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(ref.gather(-1, idx.long()), want, rtol=0, atol=2e-5)


def test_cache_samples_and_stores_float16():
    teacher = _lm("llama")
    gen = torch.Generator().manual_seed(0)
    sampled = cache_teacher_topk(teacher, _dataset(), sample=12, generator=gen).with_format("torch")
    for row in sampled:
        idx, lp = row[TOPK_KEYS[0]].long(), row[TOPK_KEYS[1]]
        assert idx.shape[-1] == 12 and (idx.sort(-1).values.diff(dim=-1) > 0).all()
        torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(len(idx), dtype=
                                   torch.float64), rtol=0, atol=1e-5)
    half = cache_teacher_topk(teacher, _dataset(), k=8, logprob_dtype="float16")
    full = cache_teacher_topk(teacher, _dataset(), k=8).with_format("torch")
    assert half.features[TOPK_KEYS[1]].dtype == "float16"
    assert "halffloat" in str(half.data.column(TOPK_KEYS[1]).chunk(0).storage.type)   # 2 B
    half = half.with_format("torch")   # read back as float32
    for a, b in zip(half, full):
        assert torch.equal(a[TOPK_KEYS[1]].half().float(), a[TOPK_KEYS[1]])
        torch.testing.assert_close(a[TOPK_KEYS[1]].float(), b[TOPK_KEYS[1]], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="not both"):
        cache_teacher_topk(teacher, _dataset(), k=8, sample=4)


def test_a_row_that_does_not_match_its_input_ids_is_named(tmp_path):
    teacher = _lm("llama")
    cached = cache_teacher_topk(teacher, _dataset(), k=4)
    check_topk_rows(cached)
    bad = cached.map(lambda r, i: {"input_ids": r["input_ids"][:-1] if i == 3 else r["input_ids"]},
                     with_indices=True)
    with pytest.raises(ValueError, match="train_dataset row 3: teacher_topk_indices has 7 "
                                         "positions but input_ids has 6"):
        HRMDistillationTrainer(model=_lm("llama", 1), hrm=0.5, train_dataset=bad,
                               args=transformers.TrainingArguments(str(tmp_path), use_cpu=True,
                                                                   report_to=[]))
    with pytest.raises(ValueError, match="batch row 1: 7 cached positions for 6 input ids"):
        TopKDataCollator()([bad[2], bad[3]])


def test_trainer_trains_from_the_cache_without_logits(tmp_path):
    """One SGD step (lr 1) from the loaded cache, no teacher: the parameter change is minus the
    gradient of the reference loss on the student's logits; the head never sees more tokens
    than the probe's 8 (no N x V logits)."""
    cached = cache_teacher_topk(_lm("gemma2"), _dataset(), k=8, temperature=2.0,
                                path=tmp_path / "cache")
    loaded = datasets.load_from_disk(str(tmp_path / "cache"))
    student = _lm("llama", seed=1)
    rows = TopKDataCollator()([cached.with_format("torch")[i] for i in range(len(LENGTHS))])
    z = student(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    topk = tuple(rows[k][:, :-1] for k in TOPK_KEYS)
    ref = hrm_loss_topk_reference(z[:, :-1], topk, rows["labels"][:, 1:], 0.5, temperature=2.0)
    grads = torch.autograd.grad(ref, list(student.parameters()))
    before = [p.detach().clone() for p in student.parameters()]
    seen = []
    student.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(LENGTHS), max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    trainer = HRMDistillationTrainer(model=student, hrm=0.5, temperature=2.0, backend="torch",
                                     args=args, train_dataset=loaded,
                                     data_collator=TopKDataCollator())
    trainer.train()
    assert seen and max(seen) <= 8                     # only the probe's tokens
    for p0, p1, g in zip(before, student.parameters(), grads):
        assert ((p0 - p1.detach()) - g).norm() <= 1e-4 * g.norm() + 1e-7


def test_served_prompt_logprobs_map_onto_the_cache_alignment():
    """vLLM's prompt_logprobs (None, then per token j the top-k of its distribution, plus token j
    itself when outside them) -> position i holds entry i + 1, as the cache does."""
    from collections import namedtuple
    Logprob = namedtuple("Logprob", "logprob rank")
    teacher, row = _lm("llama"), _dataset()["input_ids"][1]
    ref = _teacher_logprobs(teacher, row, 1.0).float()          # (S, V): position i -> token i+1
    served = [None]
    for j in range(1, len(row)):
        lp, ids = ref[j - 1].topk(4)
        entry = {int(t): Logprob(float(v), r + 1) for r, (t, v) in enumerate(zip(ids, lp))}
        entry.setdefault(row[j], Logprob(float(ref[j - 1, row[j]]), 50))   # the prompt token
        served.append(entry)
    served[3] = dict(list(served[3].items())[:2])               # a position with 2 entries
    idx, lp = served_topk(served, 4)
    cached = cache_teacher_topk(teacher, _dataset().select([1]), k=4).with_format("torch")[0]
    keep = [i for i in range(len(row) - 1) if i != 2]
    torch.testing.assert_close(lp[keep], cached[TOPK_KEYS[1]][keep], rtol=0, atol=1e-5)
    assert torch.equal(idx[keep].long(), cached[TOPK_KEYS[0]][keep])
    assert idx[2, :2].tolist() == cached[TOPK_KEYS[0]][2, :2].tolist()
    assert (lp[2, 2:] == float("-inf")).all() and len(set(idx[2].tolist())) == 4
