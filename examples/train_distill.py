"""Distil a small GPT teacher into a smaller GPT student with FusedHRMLoss, sweeping HRM.

    loss = CE(student, labels) + hrm * KL(softmax(teacher / T) || softmax(student / T))

Data needs no download: Python's own standard-library sources and pydoc topics, tokenised with a
byte-level BPE trained on them at start. The teacher is trained with plain cross-entropy (or
loaded from the checkpoint an earlier run wrote); then one student per HRM value is trained from
the same seed on the same batches, so the runs differ only in the weight of the KL term.

Usage:
    python examples/train_distill.py                        # CPU default, a few minutes
    python examples/train_distill.py --preset gpu           # bigger vocabulary, models and runs
    python examples/train_distill.py --hrm 0 1 --temperature 2 --kl-direction reverse --iters 500

Writes to --out (default out/distill): metrics.csv (one row per iteration and HRM),
hrm_sweep.png (log KL on top, causal-LM loss below, one column per HRM), teacher.pt,
student_hrm<h>.pt, the tokenizer and the tokenised corpus (cached for the next run), and with
--compare-loss (on by default in the gpu preset) loss_compare.csv: training throughput and peak
memory of the fused loss against hrmkernels.reference, measured in the same process.
"""
import argparse
import csv
import math
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm

from hrmkernels import FusedHRMLoss
from hrmkernels.reference import hrm_loss_reference

# Values the command line leaves unset come from the preset. The CPU preset is sized to finish
# in under 4 minutes on 2 cores, tokenizer and teacher included (about 2.5 on idle cores).
PRESETS = {
    "cpu": dict(corpus_mb=3.0, vocab_size=8192, block_size=64, batch_size=16,
                teacher_layers=4, teacher_dim=192, teacher_heads=4, teacher_iters=250,
                student_layers=2, student_dim=96, student_heads=2, iters=120,
                eval_every=30, eval_iters=4, compare_loss=False),
    "gpu": dict(corpus_mb=0.0, vocab_size=32768, block_size=256, batch_size=32,
                teacher_layers=8, teacher_dim=512, teacher_heads=8, teacher_iters=2000,
                student_layers=4, student_dim=256, student_heads=4, iters=1000,
                eval_every=100, eval_iters=20, compare_loss=True),
}
EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- model (nanoGPT)

@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x):                                            # x: (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                        # weight tying, as GPT-2
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, idx):                                           # idx: (B, T) int64
        """The final hidden states (B, T, C), what lm_head maps to the logits."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx):
        return self.lm_head(self.hidden(idx))                        # logits: (B, T, V)


# ----------------------------------------------------------------------------- data

def read_corpus(max_mb):
    """pydoc's topics (English) plus standard-library sources (code), as a list of documents.

    Files are shuffled with a fixed seed before the byte budget cuts them, so the corpus mixes
    packages instead of being the alphabetically first ones; max_mb <= 0 takes them all.
    """
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    random.Random(0).shuffle(files)
    size = sum(map(len, docs))
    for path in files:
        if max_mb > 0 and size >= max_mb * 1e6:
            break
        docs.append(path.read_text(encoding="utf-8", errors="ignore"))
        size += len(docs[-1])
    return docs


def load_tokens(out, vocab_size, corpus_mb):
    """Train a byte-level BPE on the corpus and tokenise it, or load both from the cache in out."""
    tag = f"v{vocab_size}_" + (f"{corpus_mb:g}mb" if corpus_mb > 0 else "all")
    tok_path, ids_path = out / f"tokenizer_{tag}.json", out / f"tokens_{tag}.pt"
    if tok_path.exists() and ids_path.exists():
        return Tokenizer.from_file(str(tok_path)), torch.load(ids_path)
    docs = read_corpus(corpus_mb)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    eot = tok.token_to_id(EOT)
    ids = torch.tensor([i for enc in tok.encode_batch(docs) for i in enc.ids + [eot]],
                       dtype=torch.int32)                            # int32: 4 bytes a token
    tok.save(str(tok_path))
    torch.save(ids, ids_path)
    return tok, ids


def get_batch(data, batch_size, block_size, gen, device):
    """batch_size random windows of block_size + 1 tokens: inputs x[:, :-1], targets x[:, 1:]."""
    i = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([data[j:j + block_size + 1] for j in i.tolist()]).long().to(device)
    return x[:, :-1], x[:, 1:]


# ----------------------------------------------------------------------------- training helpers

def get_lr(it, iters, lr):
    """Linear warm-up over the first 5% of iterations, then cosine decay to lr / 10."""
    warmup = max(1, iters // 20)
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (it - warmup) / max(1, iters - warmup))))


def peak_memory_mb(device):
    """CUDA: peak allocated memory since the last reset (train_student resets it every step).
    CPU: the process's peak resident set since it started, not a per-step figure."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:                                              # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def sync(device):
    if device.type == "cuda":                                        # kernels run asynchronously
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(student, teacher, val, args, ctx, gen_seed):
    """Validation CE and KL (mean per token) on the same eval_iters batches every time."""
    student.eval()
    gen = torch.Generator().manual_seed(gen_seed)
    kl_fn = FusedHRMLoss(0.0, temperature=args.temperature, kl_direction=args.kl_direction,
                         backend=args.backend, return_components=True)
    ce = kl = 0.0
    for _ in range(args.eval_iters):
        x, y = get_batch(val, args.batch_size, args.block_size, gen, args.device)
        with ctx:
            out = kl_fn(student(x), teacher(x), y)
        ce, kl = ce + out.ce.item(), kl + out.kl.item()
    student.train()
    return ce / args.eval_iters, kl / args.eval_iters


def train_teacher(args, cfg, train, val, ctx):
    """Train the teacher with plain cross-entropy, or load it from a matching earlier checkpoint.

    Returns the teacher (eval mode, no gradients) and its validation CE.
    """
    path = args.out / "teacher.pt"
    key = dict(config=asdict(cfg), iters=args.teacher_iters, corpus_mb=args.corpus_mb,
               seed=args.seed, lr=args.lr, batch_size=args.batch_size, dtype=args.dtype)
    torch.manual_seed(args.seed)
    teacher = GPT(cfg).to(args.device)
    if path.exists():
        ckpt = torch.load(path, map_location=args.device)
        if ckpt["key"] == key:
            teacher.load_state_dict(ckpt["model"])
            print(f"teacher: loaded {path} (val CE {ckpt['val_ce']:.3f})")
            return teacher.eval().requires_grad_(False), ckpt["val_ce"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr, weight_decay=0.1)
    bar = tqdm(range(args.teacher_iters), desc="teacher", dynamic_ncols=True)
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = get_lr(it, args.teacher_iters, args.lr)
        x, y = get_batch(train, args.batch_size, args.block_size, gen, args.device)
        with ctx:
            logits = teacher(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        bar.set_postfix(ce=f"{loss.item():.3f}")
    teacher.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad(), ctx:
        val_ce = sum(F.cross_entropy(teacher(x).flatten(0, 1).float(), y.flatten()).item()
                     for x, y in (get_batch(val, args.batch_size, args.block_size, gen, args.device)
                                  for _ in range(args.eval_iters))) / args.eval_iters
    print(f"teacher: val CE {val_ce:.3f}, saved {path}")
    torch.save(dict(key=key, model=teacher.state_dict(), val_ce=val_ce), path)
    return teacher, val_ce


def train_student(hrm, args, cfg, teacher, train, val, ctx, loss_name="fused", iters=None,
                  desc=None):
    """Train one student with CE + hrm * KL; returns it and its metrics, one dict an iteration."""
    iters = iters or args.iters
    torch.manual_seed(args.seed)                          # same initial student for every HRM ...
    gen = torch.Generator().manual_seed(args.seed + 3)    # ... and the same batches
    student = GPT(cfg).to(args.device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.1)
    opts = dict(temperature=args.temperature, kl_direction=args.kl_direction,
                return_components=True)
    if loss_name == "fused":
        loss_fn = FusedHRMLoss(hrm, backend=args.backend, **opts)
    else:                                                 # the plain-PyTorch specification
        loss_fn = partial(hrm_loss_reference, hrm=hrm, **opts)
    tokens = args.batch_size * args.block_size
    rows = []
    bar = tqdm(range(iters), desc=desc or f"student hrm={hrm:g}", dynamic_ncols=True)
    for it in bar:
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = get_lr(it, iters, args.lr)
        x, y = get_batch(train, args.batch_size, args.block_size, gen, args.device)
        with torch.no_grad(), ctx:
            teacher_logits = teacher(x)                   # (B, T, V), no graph kept
        with ctx:
            student_logits = student(x)
        loss, ce, kl = loss_fn(student_logits, teacher_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        loss, ce, kl = loss.item(), ce.item(), kl.item()  # .item() also waits for the GPU
        sync(args.device)
        dt = time.perf_counter() - t0
        row = dict(hrm=hrm, iter=it + 1, loss=loss, ce=ce, kl=kl,
                   log_kl=math.log(max(kl, 1e-12)),       # the clamp keeps log finite at KL = 0
                   tokens_per_s=tokens / dt, peak_mem_mb=peak_memory_mb(args.device),
                   val_ce="", val_kl="")
        if args.eval_every and ((it + 1) % args.eval_every == 0 or it + 1 == iters):
            row["val_ce"], row["val_kl"] = evaluate(student, teacher, val, args, ctx, args.seed + 4)
        rows.append(row)
        bar.set_postfix(ce=f"{ce:.3f}", kl=f"{kl:.3f}", tok_s=f"{tokens / dt:.0f}")
    return student, rows


def compare_losses(args, cfg, teacher, train, val, ctx):
    """Training throughput and peak memory, fused loss vs hrmkernels.reference, same process.

    Each loss trains a fresh student (same seed, same batches) for --compare-iters steps at the
    middle HRM of the sweep; the first 20% of steps are warm-up and left out of the throughput.
    """
    hrm = sorted(args.hrm)[len(args.hrm) // 2]
    rows = []
    for name in ("reference", "fused"):
        _, metrics = train_student(hrm, args, cfg, teacher, train, val, ctx, loss_name=name,
                                   iters=args.compare_iters, desc=f"compare {name}")
        timed = metrics[len(metrics) // 5:]
        rows.append(dict(loss=name, hrm=hrm, vocab=cfg.vocab_size,
                         tokens=args.batch_size * args.block_size,
                         tokens_per_s=len(timed) / sum(1 / m["tokens_per_s"] for m in timed),
                         peak_mem_mb=max(m["peak_mem_mb"] for m in metrics),
                         final_ce=metrics[-1]["ce"], final_kl=metrics[-1]["kl"]))
    write_csv(args.out / "loss_compare.csv", rows)
    print(f"\nloss comparison ({args.device}, V={cfg.vocab_size}, "
          f"{args.batch_size}x{args.block_size} tokens/step, hrm={hrm:g}):")
    print(f"{'loss':>10} {'tokens/s':>10} {'peak MiB':>10}")
    for r in rows:
        print(f"{r['loss']:>10} {r['tokens_per_s']:>10.0f} {r['peak_mem_mb']:>10.1f}")
    if args.device.type != "cuda":
        print("(CPU: peak MiB is the process's peak RSS, not a per-loss figure)")


# ----------------------------------------------------------------------------- outputs

def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(rows, hrms, path, teacher_val_ce):
    """2 x len(hrms) grid: log KL (blue) on top, causal-LM loss (red) below, rows share y.

    Lines are the training batches, dots the validation evaluations, the dashed line the
    teacher's validation CE. Both losses are in nats (natural log); the top row plots log(KL).
    A bare Figure (no pyplot) needs no display and leaves no global state behind.
    """
    fig = Figure(figsize=(4.2 * len(hrms), 6.4), layout="tight")
    axes = fig.subplots(2, len(hrms), sharey="row", squeeze=False)
    axes[0, 0].set_ylabel("Log KL Loss: ln(KL), KL in nats")
    axes[1, 0].set_ylabel("Causal LM Loss: CE (nats)")
    for col, hrm in enumerate(hrms):
        axes[1, col].axhline(teacher_val_ce, color="gray", ls="--", lw=1, label="teacher val CE")
        run = [r for r in rows if r["hrm"] == hrm]
        evals = [r for r in run if r["val_ce"] != ""]
        for ax, key, val_key, color, title in [
                (axes[0, col], "log_kl", "val_kl", "tab:blue", "Log KL Loss"),
                (axes[1, col], "ce", "val_ce", "tab:red", "Causal LM Loss")]:
            ax.plot([r["iter"] for r in run], [r[key] for r in run], color=color, lw=1,
                    label="train")
            val = [r[val_key] for r in evals]
            if key == "log_kl":
                val = [math.log(max(v, 1e-12)) for v in val]
            ax.plot([r["iter"] for r in evals], val, "o", color=color, mec="black", ms=5,
                    label="validation")
            ax.set_title(f"{title} (HRM {hrm:g})")
            ax.set_xlabel("Iterations")
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    axes[1, 0].legend()
    fig.savefig(path, dpi=110)


def summary(rows, hrms, teacher_val_ce):
    """One line per HRM: train CE and KL (mean of the last 10 iterations), validation CE and KL."""
    print(f"\nteacher val CE {teacher_val_ce:.3f}; train CE/KL: mean of the last 10 iterations")
    print(f"{'HRM':>8} {'train CE':>9} {'train KL':>9} {'val CE':>8} {'val KL':>8} {'tok/s':>8}")
    for hrm in hrms:
        run = [r for r in rows if r["hrm"] == hrm]
        last = run[-10:]
        evals = [r for r in run if r["val_ce"] != ""]
        val_ce, val_kl = (evals[-1]["val_ce"], evals[-1]["val_kl"]) if evals else (math.nan,) * 2
        print(f"{hrm:>8g} {sum(r['ce'] for r in last) / len(last):>9.3f} "
              f"{sum(r['kl'] for r in last) / len(last):>9.3f} {val_ce:>8.3f} {val_kl:>8.3f} "
              f"{len(run) / sum(1 / r['tokens_per_s'] for r in run):>8.0f}")   # tokens / total time


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="defaults for the size options left unset (default: cpu)")
    p.add_argument("--hrm", type=float, nargs="+", default=[0.001, 0.5, 10.0],
                   help="KL weights to sweep, one student each (default: 0.001 0.5 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of the KL term (default: 1)")
    p.add_argument("--kl-direction", choices=["forward", "reverse"], default="forward",
                   help="forward: KL(teacher || student), reverse: KL(student || teacher)")
    p.add_argument("--backend", default="auto",
                   help="hrmkernels backend: auto, cpu, torch, triton or cuda (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", type=Path, default=Path("out/distill"),
                   help="output and cache folder (default: out/distill)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--compare-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="also time fused vs reference loss (default: on in the gpu preset)")
    p.add_argument("--compare-iters", type=int, default=50,
                   help="training steps per loss in that comparison (default: 50)")
    for name, typ, what in [
            ("corpus_mb", float, "MB of standard-library text (0: all of it)"),
            ("vocab_size", int, "BPE vocabulary"), ("block_size", int, "context length"),
            ("batch_size", int, "sequences per step"), ("teacher_layers", int, "layers"),
            ("teacher_dim", int, "width"), ("teacher_heads", int, "attention heads"),
            ("teacher_iters", int, "teacher training steps"), ("student_layers", int, "layers"),
            ("student_dim", int, "width"), ("student_heads", int, "attention heads"),
            ("iters", int, "student training steps per HRM"),
            ("eval_every", int, "validate every K steps"),
            ("eval_iters", int, "batches per validation")]:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=f"{what} (preset cpu: {PRESETS['cpu'][name]:g}, "
                            f"gpu: {PRESETS['gpu'][name]:g})")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.set_float32_matmul_precision("high")        # TF32 for the float32 matmuls
    args.out.mkdir(parents=True, exist_ok=True)
    # bf16 autocast runs the matmuls in bf16 and hands bf16 logits to the loss, which computes
    # in fp32 internally; float32 disables autocast.
    ctx = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    t0 = time.perf_counter()
    tok, ids = load_tokens(args.out, args.vocab_size, args.corpus_mb)
    # The last 10% of tokens validate: files that training never sees (bar the one cut in two),
    # since the corpus was shuffled file by file.
    n_val = len(ids) // 10
    train, val = ids[:-n_val], ids[-n_val:]
    # Round the model's vocabulary up to a multiple of 64 (tensor-core friendly); BPE may also
    # stop short of vocab_size on a small corpus, and the extra rows simply learn to stay unused.
    vocab = -(-max(args.vocab_size, tok.get_vocab_size()) // 64) * 64
    print(f"data: {len(train):,} train / {len(val):,} val tokens, BPE vocabulary "
          f"{tok.get_vocab_size():,} (model {vocab:,}), {time.perf_counter() - t0:.1f}s")

    teacher_cfg = GPTConfig(vocab, args.block_size, args.teacher_layers, args.teacher_heads,
                            args.teacher_dim)
    student_cfg = GPTConfig(vocab, args.block_size, args.student_layers, args.student_heads,
                            args.student_dim)
    teacher, teacher_val_ce = train_teacher(args, teacher_cfg, train, val, ctx)

    rows = []
    for hrm in args.hrm:
        student, metrics = train_student(hrm, args, student_cfg, teacher, train, val, ctx)
        torch.save(dict(config=asdict(student_cfg), model=student.state_dict(), hrm=hrm),
                   args.out / f"student_hrm{hrm:g}.pt")
        rows += metrics
    write_csv(args.out / "metrics.csv", rows)
    plot_sweep(rows, args.hrm, args.out / "hrm_sweep.png", teacher_val_ce)
    summary(rows, args.hrm, teacher_val_ce)
    if args.compare_loss:
        compare_losses(args, student_cfg, teacher, train, val, ctx)
    print(f"\nwrote {args.out}/metrics.csv, hrm_sweep.png, checkpoints "
          f"({time.perf_counter() - t0:.0f}s)")
    return rows


if __name__ == "__main__":
    main()
