"""Offline distillation: cache the demo's teacher once, then train students from the cache alone.

The teacher of examples/train_distill.py (same data, tokenizer and model code, imported from it)
is run once over the training windows by hrmkernels.integrations.data.cache_teacher_topk, which
stores its top-k log-probabilities per position (k = 8, 32, 128) or Sparse Logit Sampling's
n = 32 draws, from its hidden states (its N x V logits are never formed), saved with
save_to_disk. Each cache is loaded without the teacher and a student is trained from it with
HRMDistillationTrainer (the loss from the student's hidden states, fused_linear_hrm_loss with
teacher_topk: the student's N x V logits are never formed either); one more student learns from
the live dense teacher. Same initial student, batches and steps for every variant.

Usage:
    python examples/offline_distill.py                  # CPU default, a few minutes
    python examples/offline_distill.py --ks 16 64 --samples 12 32 --hrm 0.5 --iters 300

Other options are train_distill.py's (--preset, model and data sizes, --seed, --lr,
--temperature, --device, ...). Writes to --out (default out/offline): offline.csv (one row per
variant: validation KL to the full teacher and CE, the cache's size on disk (input ids and
labels included) and the teacher columns' bytes per token, step time, peak memory),
offline_storage.csv (the KL error that float16 log-probabilities add), offline_curves.csv,
offline_distill.png, the caches (cache_*/) and the teacher checkpoint.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from matplotlib.figure import Figure
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_distill as demo  # noqa: E402  (the demo's data, model and evaluation)

from hrmkernels import fused_hrm_loss  # noqa: E402
from hrmkernels.integrations.data import TopKDataCollator, cache_teacher_topk  # noqa: E402
from hrmkernels.integrations.hf import TOPK_KEYS, HRMDistillationTrainer  # noqa: E402


# ----------------------------------------------------------------------------- the demo's GPT, as
# a transformers model: backbone (base_model) + output embedding, what the integrations split

class DemoGPTConfig(transformers.PretrainedConfig):
    model_type = "hrmkernels_demo_gpt"

    def __init__(self, vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8, **kwargs):
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        super().__init__(**kwargs)


class DemoBackbone(nn.Module):
    """The GPT without its head: returns last_hidden_state, as a transformers base model."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, attention_mask=None, **kwargs):   # causal: right padding is inert
        return BaseModelOutput(last_hidden_state=self.gpt.hidden(input_ids))


class DemoGPTForCausalLM(transformers.PreTrainedModel):
    config_class = DemoGPTConfig
    base_model_prefix = "backbone"

    def __init__(self, config, gpt):
        super().__init__(config)
        self.backbone = DemoBackbone(gpt)

    @property
    def gpt(self):
        return self.backbone.gpt

    def get_input_embeddings(self):
        return self.gpt.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.gpt(input_ids))


def as_hf(gpt):
    c = gpt.cfg
    return DemoGPTForCausalLM(DemoGPTConfig(c.vocab_size, c.block_size, c.n_layer, c.n_head,
                                            c.n_embd), gpt)


# ----------------------------------------------------------------------------- measuring

def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakMemory:
    """Peak extra memory of a block: CUDA allocated bytes, or on Linux the resident set's
    high-water mark over its value at the start (reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif os.path.exists("/proc/self/clear_refs"):
            self.mb = (_status_kib("VmHWM") * 1024 - self.base) / 2**20


class Probe(transformers.TrainerCallback):
    """Step times, and validation CE and KL to the full teacher every eval_every steps."""

    def __init__(self, evaluate, eval_every):
        self.evaluate, self.eval_every = evaluate, eval_every
        self.times, self.curve = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        demo.sync(args.device)
        self.times.append(time.perf_counter() - self.t0)
        if state.global_step % self.eval_every == 0 or state.global_step == state.max_steps:
            self.curve.append((state.global_step, *self.evaluate()))


# ----------------------------------------------------------------------------- the run

def windows(tokens, rows, block_size, seed):
    """`rows` training windows of block_size tokens, drawn with a fixed seed: the cached data."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(len(tokens) - block_size, (rows,), generator=g)
    ids = torch.stack([tokens[i:i + block_size] for i in start.tolist()]).long()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def dir_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def train_variant(name, args, cfg, data, teacher, val, ctx, collator=None):
    """One student (same seed, batches and steps) with HRMDistillationTrainer; its metrics."""
    torch.manual_seed(args.seed)
    student = as_hf(demo.GPT(cfg).to(args.device))
    probe = Probe(lambda: demo.evaluate(student.gpt, teacher.gpt, val, args, ctx, args.seed + 4),
                  args.eval_every)
    targs = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"), per_device_train_batch_size=args.batch_size,
        max_steps=args.iters, learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=max(1, args.iters // 20),
        weight_decay=0.1, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        logging_steps=max(1, args.iters // 10), save_strategy="no", report_to=[],
        use_cpu=args.device.type == "cpu", bf16=args.dtype == "bfloat16",
        remove_unused_columns=False, dataloader_num_workers=0)
    trainer = HRMDistillationTrainer(
        model=student, teacher_model=teacher if collator is None else None, hrm=args.hrm,
        temperature=args.temperature, kl_direction=args.kl_direction, backend=args.backend,
        args=targs, train_dataset=data, data_collator=collator, callbacks=[probe])
    print(f"\n{name}:")
    with PeakMemory(args.device) as mem:
        trainer.train()
    step_s = statistics.median(probe.times[1:] or probe.times)
    return dict(probe=probe, val_ce=probe.curve[-1][1], val_kl=probe.curve[-1][2],
                step_ms=1e3 * step_s, peak_mem_mb=mem.mb, student=student)


@torch.no_grad()
def storage_error(student, teacher, val, args, ctx):
    """Per k: the validation KL(teacher || student) to the full teacher, to its top-k ("rest")
    with float32 log-probabilities, and with them rounded to float16 (what a float16 cache adds:
    the mean and largest per-token change), on the evaluation batches."""
    gen = torch.Generator().manual_seed(args.seed + 4)
    batches = [demo.get_batch(val, args.batch_size, args.block_size, gen, args.device)
               for _ in range(args.eval_iters)]
    opts = dict(temperature=args.temperature, reduction="none", return_components=True,
                backend=args.backend)
    rows = []
    for k in args.ks:
        full, f32, f16, worst = [], [], [], 0.0
        for x, y in batches:
            with ctx:
                z, u = student.gpt(x).float(), teacher.gpt(x).float()
            full.append(fused_hrm_loss(z, u, y, 0.0, **opts).kl)
            lp, idx = torch.log_softmax(u / args.temperature, -1).topk(k, -1)
            a = fused_hrm_loss(z, labels=y, hrm=0.0, teacher_topk=(idx, lp), **opts).kl
            b = fused_hrm_loss(z, labels=y, hrm=0.0, teacher_topk=(idx, lp.half()), **opts).kl
            f32.append(a)
            f16.append(b)
            worst = max(worst, (a - b).abs().max().item())
        full, f32, f16 = (torch.cat(t).double() for t in (full, f32, f16))
        rows.append(dict(k=k, kl_full=full.mean().item(), kl_topk_fp32=f32.mean().item(),
                         kl_topk_fp16=f16.mean().item(),
                         fp16_mean_abs_change=(f16 - f32).abs().mean().item(),
                         fp16_max_abs_change=worst))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other options: "
                                "those of examples/train_distill.py (--help there).")
    p.add_argument("--out", type=Path, default=Path("out/offline"), help="default: out/offline")
    p.add_argument("--hrm", type=float, default=1.0, help="weight of the KL term (default: 1)")
    p.add_argument("--ks", type=int, nargs="*", default=[8, 32, 128],
                   help="top-k caches (default: 8 32 128)")
    p.add_argument("--samples", type=int, nargs="*", default=[32],
                   help="Sparse Logit Sampling caches: draws per position (default: 32)")
    p.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float32",
                   help="storage dtype of the cached log-probabilities (default: float32)")
    mine, rest = p.parse_known_args(argv)
    args = demo.parse_args(rest + ["--out", str(mine.out)])
    for k, v in vars(mine).items():
        setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    t_start = time.perf_counter()
    tok, ids = demo.load_tokens(args.out, args.vocab_size, args.corpus_mb)
    n_val = len(ids) // 10
    train, val = ids[:-n_val], ids[-n_val:]
    vocab = -(-max(args.vocab_size, tok.get_vocab_size()) // 64) * 64
    teacher_cfg = demo.GPTConfig(vocab, args.block_size, args.teacher_layers, args.teacher_heads,
                                 args.teacher_dim)
    student_cfg = demo.GPTConfig(vocab, args.block_size, args.student_layers, args.student_heads,
                                 args.student_dim)
    gpt_teacher, teacher_val_ce = demo.train_teacher(args, teacher_cfg, train, val, ctx)
    teacher = as_hf(gpt_teacher)
    data = windows(train, args.iters * args.batch_size, args.block_size, args.seed + 3)
    tokens = len(data) * args.block_size

    rows, curves = [], []
    variants = [("dense teacher", None, None)] + [(f"top-{k}", dict(k=k), f"cache_k{k}")
                                                   for k in args.ks]
    variants += [(f"sampled n={n}", dict(sample=n), f"cache_n{n}") for n in args.samples]
    for name, how, folder in variants:
        row = dict(variant=name, cache_mb="", bytes_per_token="", cache_s="")
        if how is None:
            result = train_variant(name, args, student_cfg, data, teacher, val, ctx)
        else:
            t0 = time.perf_counter()
            gen = torch.Generator(args.device).manual_seed(args.seed + 5)
            cache_teacher_topk(teacher, data, temperature=args.temperature,
                               batch_size=4 * args.batch_size, generator=gen,
                               logprob_dtype=args.logprob_dtype, path=args.out / folder, **how)
            row["cache_s"] = round(time.perf_counter() - t0, 1)
            cached = datasets.load_from_disk(str(args.out / folder))   # no teacher from here on
            teacher_bytes = sum(cached.data.column(key).nbytes for key in TOPK_KEYS)
            row.update(cache_mb=round(dir_bytes(args.out / folder) / 2**20, 2),
                       bytes_per_token=round(teacher_bytes / tokens, 1))
            result = train_variant(name, args, student_cfg, cached, teacher, val, ctx,
                                   collator=TopKDataCollator())
        row.update(val_kl=round(result["val_kl"], 4), val_ce=round(result["val_ce"], 4),
                   step_ms=round(result["step_ms"], 1), peak_mem_mb=round(result["peak_mem_mb"]))
        rows.append(row)
        curves += [dict(variant=name, step=s, val_ce=ce, val_kl=kl)
                   for s, ce, kl in result["probe"].curve]
        if how is None:
            dense_student = result["student"]
    demo.write_csv(args.out / "offline.csv", rows)
    demo.write_csv(args.out / "offline_curves.csv", curves)
    plot(curves, [r["variant"] for r in rows], args.out / "offline_distill.png", teacher_val_ce)
    errors = storage_error(dense_student, teacher, val, args, ctx) if args.ks else []
    if errors:
        demo.write_csv(args.out / "offline_storage.csv", errors)
    print(f"\nteacher val CE {teacher_val_ce:.3f}; {len(data)} windows of {args.block_size} "
          f"tokens; hrm {args.hrm:g}, T {args.temperature:g}, topk_mode 'rest'")
    print(f"{'variant':>15} {'val KL':>8} {'val CE':>8} {'cache MB':>9} {'B/token':>8} "
          f"{'step ms':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['variant']:>15} {r['val_kl']:>8.4f} {r['val_ce']:>8.4f} {r['cache_mb']!s:>9} "
              f"{r['bytes_per_token']!s:>8} {r['step_ms']:>8.1f} {r['peak_mem_mb']:>8}")
    if errors:
        print("\nKL(teacher || dense-teacher student) on validation, per token: full teacher, "
              "top-k ('rest') float32 and float16 log-probabilities")
        for e in errors:
            print(f"k={e['k']:>4}: full {e['kl_full']:.5f}, fp32 {e['kl_topk_fp32']:.5f}, fp16 "
                  f"{e['kl_topk_fp16']:.5f} (mean |change| {e['fp16_mean_abs_change']:.2e}, "
                  f"max {e['fp16_max_abs_change']:.2e})")
    print(f"\nwrote {args.out}/offline.csv, offline_curves.csv, offline_distill.png "
          f"({time.perf_counter() - t_start:.0f}s)")
    return rows


def plot(curves, variants, path, teacher_val_ce):
    """Validation KL to the full teacher (log scale) and validation CE against training steps,
    one line per variant."""
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_kl, ax_ce = fig.subplots(1, 2)
    for name in variants:
        pts = [c for c in curves if c["variant"] == name]
        steps = [c["step"] for c in pts]
        ax_kl.plot(steps, [c["val_kl"] for c in pts], "o-", ms=3, label=name)
        ax_ce.plot(steps, [c["val_ce"] for c in pts], "o-", ms=3, label=name)
    ax_ce.axhline(teacher_val_ce, color="gray", ls="--", lw=1, label="teacher")
    ax_kl.set_yscale("log")
    for ax, what in ((ax_kl, "validation KL(teacher || student), nats"),
                     (ax_ce, "validation CE, nats")):
        ax.set_xlabel("training steps")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax_kl.legend()
    ax_kl.set_title("distance to the full teacher")
    ax_ce.set_title("causal-LM loss")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
