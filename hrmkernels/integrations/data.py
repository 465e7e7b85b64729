"""Offline teachers on disk: a Hugging Face teacher's top-k (or sampled) distribution at every
position of a tokenised ``datasets.Dataset``, computed once, trained from without the teacher.

    from hrmkernels.integrations.data import TopKDataCollator, cache_teacher_topk
    cached = cache_teacher_topk(teacher, tokenised, k=32, temperature=2.0, path="cache/k32")
    cached = datasets.load_from_disk("cache/k32")          # a later run: no teacher needed
    trainer = HRMDistillationTrainer(model=student, hrm=0.5, temperature=2.0,
                                     train_dataset=cached, data_collator=TopKDataCollator(),
                                     args=TrainingArguments(..., remove_unused_columns=False))

Columns: ``teacher_topk_indices`` (int32) and ``teacher_topk_logprobs`` (float32, or float16
with ``logprob_dtype="float16"``), each (S, k) per row of S input ids, as the Trainer reads them.

Alignment: position i holds the teacher's distribution of the token at i + 1, i.e. what the
teacher's logits at position i predict, so a row has exactly as many entries as input_ids (like
the logits) and the Trainer shifts the labels as it does for logits. The last entry predicts
past the row's end and is never used with Hugging Face labels.

Bytes per token: k * (4 + 4) for int32 ids and float32 log-probabilities (k * 6 with float16),
plus 8 for Arrow's offsets (``datasets.Array2D`` is a list of lists): 264 B at k = 32, against
V * 2 bytes of bf16 logits (256 KB at V = 128256).
"""
import math
import uuid
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from hrmkernels import teacher_sample, teacher_topk
from hrmkernels.integrations.hf import TOPK_KEYS, HeadNotSeparable, _last_hidden, split_head

LOGPROB_DTYPES = ("float32", "float16")


def cache_teacher_topk(teacher, dataset, k=None, *, sample=None, temperature=1.0, batch_size=8,
                       logprob_dtype="float32", generator=None, path=None, device=None,
                       desc=None):
    """Run `teacher` over `dataset` and return it with the two top-k columns added.

    Each batch of rows runs through the teacher's backbone under no_grad; the final hidden
    states of the rows' positions go through :func:`hrmkernels.teacher_topk` on the output
    embedding, with the logit scale and softcap of the teacher's config
    (``integrations.hf.split_head``), so the teacher's N x V logits are never formed. A teacher
    whose head cannot be separated is run on its logits instead, with a warning.

    Args:
        teacher: a causal LM (``transformers`` model; the tokenizer of the dataset).
        dataset: a ``datasets.Dataset`` with ``input_ids`` (rows of any lengths; batches are
            right-padded with ``attention_mask``, which a causal LM's real positions ignore).
        k: store the teacher's top-k log-probabilities at ``temperature``.
        sample: instead of k, Sparse Logit Sampling: ``sample`` draws per position
            (:func:`hrmkernels.teacher_sample`, with ``generator``), stored as min(sample, V)
            distinct ids and log-frequencies, padded with -inf. Train on it with
            ``topk_mode="rest"`` (its tail mass is 0).
        temperature: T of the stored distribution: train with the same T.
        batch_size: rows per teacher forward.
        logprob_dtype: "float32" (default) or "float16" (the KL error it adds:
            docs/integrations.md).
        path: if given, ``save_to_disk(path)`` (Arrow, memory-mapped by ``load_from_disk``).
        device: where the teacher runs (default: its parameters' device).
        desc: the progress bar's label.

    Returns:
        The dataset with ``teacher_topk_indices`` (int32) and ``teacher_topk_logprobs`` columns
        of shape (len(input_ids), k) per row.
    """
    import datasets

    if (k is None) == (sample is None):
        raise ValueError("pass k (the teacher's top-k) or sample (the number of draws), not both")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset has no input_ids column (columns: {dataset.column_names})")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    teacher.eval()
    try:
        head = split_head(teacher)
    except HeadNotSeparable as e:
        warnings.warn(f"hrmkernels: {type(teacher).__name__}: {e}; caching from its logits "
                      "(each batch's logits are materialised)", stacklevel=2)
        head = None
    v = (head.head.weight if head is not None else teacher.get_output_embeddings().weight).shape[0]
    if sample is None:
        produce, width, what = partial(teacher_topk, k=k), k, f"top-{k}"
    else:
        produce = partial(teacher_sample, n=sample, generator=generator)
        width, what = min(sample, v), f"{sample} samples"
    lp_dtype = getattr(torch, logprob_dtype)
    features = dataset.features.copy()
    features[TOPK_KEYS[0]] = datasets.Array2D((None, width), "int32")
    features[TOPK_KEYS[1]] = datasets.Array2D((None, width), logprob_dtype)

    @torch.no_grad()
    def add_columns(batch):
        rows = [torch.as_tensor(r, dtype=torch.long) for r in batch["input_ids"]]
        lengths = [len(r) for r in rows]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device)
        mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).to(device)
        inputs = dict(input_ids=ids, attention_mask=mask.long(), use_cache=False)
        if head is not None:
            h = _last_hidden(head.backbone(**inputs))[mask]       # (tokens, H): real positions
            w, b = head.head.weight, head.head.bias
            idx, lp = produce(h, w, bias=b, temperature=temperature, logit_scale=head.scale,
                              softcap=head.softcap)
        else:
            idx, lp = produce(logits=teacher(**inputs).logits[mask], temperature=temperature)
        # sync-ok: caching writes the teacher's rows to host storage (offline, not a training step)
        idx, lp = idx.to(torch.int32).cpu(), lp.to(lp_dtype).cpu()  # sync-ok
        batch[TOPK_KEYS[0]] = [t.numpy() for t in idx.split(lengths)]  # sync-ok: host tensors
        batch[TOPK_KEYS[1]] = [t.numpy() for t in lp.split(lengths)]  # sync-ok: host tensors
        return batch

    out = dataset.map(add_columns, batched=True, batch_size=batch_size, features=features,
                      desc=desc or f"teacher {what}", load_from_cache_file=False,
                      new_fingerprint=uuid.uuid4().hex)   # the teacher is not in the fingerprint
    if path is not None:
        out.save_to_disk(str(path))
    return out


def served_topk(prompt_logprobs, k):
    """A served teacher's prompt log-probabilities as one row of the two top-k columns.

    Args:
        prompt_logprobs: what vLLM returns for a prompt of S tokens with ``SamplingParams(
            prompt_logprobs=k)`` (``RequestOutput.prompt_logprobs``, as TRL's server trainers
            request it): S entries, None for the first token, then for each token j a dict
            ``{token id: Logprob}`` (or a float) of the k most likely tokens at position j given
            the tokens before it, plus token j itself when it is not among them.
        k: the number of entries to keep per position (the most likely, by log-probability).

    Returns:
        ``(indices, logprobs)``, (S, k) int32 and float32: position i holds entry i + 1, the
        distribution of token i + 1, as cache_teacher_topk aligns them. An entry with fewer than
        k tokens is padded with ids it does not list and log-probability -inf (probability 0);
        the last position, which predicts past the prompt, holds a uniform distribution over
        ids 0..k-1 (its label is never used).
    """
    s = len(prompt_logprobs)
    idx = torch.arange(k, dtype=torch.int32).repeat(s, 1)
    lp = torch.full((s, k), -math.log(k))
    for i, entry in enumerate(prompt_logprobs[1:]):
        top = sorted(((int(t), float(getattr(v, "logprob", v))) for t, v in entry.items()),
                     key=lambda e: -e[1])[:k]
        ids = [t for t, _ in top]
        taken = set(ids)
        pad = [j for j in range(k + len(ids)) if j not in taken][:k - len(ids)]
        idx[i] = torch.tensor(ids + pad, dtype=torch.int32)
        lp[i] = torch.tensor([v for _, v in top] + [float("-inf")] * len(pad))
    return idx, lp


def check_topk_rows(dataset, name="dataset"):
    """Raise ValueError naming the first row whose cached top-k columns do not have one entry
    per input id (a cache built from other tokens, or cut differently). Reads only the Arrow
    list lengths, in batches."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def lengths(column):
        chunks = [c.storage if isinstance(c, pa.ExtensionArray) else c for c in column.chunks]
        return pc.list_value_length(pa.chunked_array(chunks, type=chunks[0].type) if chunks
                                    else column).to_numpy(zero_copy_only=False)

    start = 0
    for table in dataset.with_format("arrow").iter(batch_size=65536):
        n_ids = lengths(table.column("input_ids"))
        for key in TOPK_KEYS:
            bad = (lengths(table.column(key)) != n_ids).nonzero()[0]  # sync-ok: numpy, no device
            if len(bad):
                row = int(bad[0])
                got = int(lengths(table.column(key))[row])
                raise ValueError(f"{name} row {start + row}: {key} has {got} positions but "
                                 f"input_ids has {int(n_ids[row])}; a cached row needs one entry "
                                 "per input id (position i: the distribution of token i + 1)")
        start += table.num_rows


@dataclass
class TopKDataCollator:
    """Batches rows of ``input_ids`` (with optional ``attention_mask`` and ``labels``; labels
    default to the input ids, HF causal-LM style) and their cached top-k columns, right-padded
    to the longest row: ids with ``pad_token_id``, labels with -100, and the top-k columns with
    a uniform teacher over ids 0..k-1 (the loss ignores padded positions; any valid entries do).
    """
    pad_token_id: int = 0

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        width = len(features[0][TOPK_KEYS[0]][0])
        b = len(features)
        ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(b, length, dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        idx = torch.arange(width, dtype=torch.int32).repeat(b, length, 1)
        lp = torch.full((b, length, width), -math.log(width))
        for i, f in enumerate(features):
            row = torch.as_tensor(f["input_ids"], dtype=torch.long)
            n = len(row)
            top_i, top_lp = (torch.as_tensor(f[key]) for key in TOPK_KEYS)
            if top_i.shape[0] != n or top_lp.shape[0] != n:
                raise ValueError(f"batch row {i}: {top_i.shape[0]} cached positions for {n} "
                                 "input ids (check_topk_rows names the dataset row)")
            ids[i, :n], mask[i, :n] = row, torch.as_tensor(f.get("attention_mask", 1))
            labels[i, :n] = torch.as_tensor(f["labels"]) if "labels" in f else row
            idx[i, :n], lp[i, :n] = top_i, top_lp.float()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, TOPK_KEYS[0]: idx,
                TOPK_KEYS[1]: lp}
