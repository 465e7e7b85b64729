"""One distillation step on CPU, per loss provider: peak extra resident memory and time.

    python -m benchmarks.distill_step_cpu                      # N = 4096, every provider
    python -m benchmarks.distill_step_cpu --n 512 --providers hrmkernels-fused-linear liger

The step: forward + backward of a Llama-architecture student, the teacher (Qwen2 architecture)
under no_grad, and the loss CE + hrm * KL(teacher || student) with hrm = 0.5, T = 1 (torchtune
has no temperature), reduction mean over the predicted tokens. Both models are built from
configs with random weights (seeded, the same in every process) and a real vocabulary: the
student's V = 128256 (Llama 3), the teacher's padded Qwen-style to 128512 rows and cut to the
student's V as a view. fp32 (CPU).

Providers (each as its users write it):
  hrmkernels-fused-linear  hrm_distillation_loss (HRMDistillationTrainer's step): hidden states
                           and heads, fused_linear_hrm_loss, default chunk budget (1 GiB: 1024
                           rows at this V)
  hrmkernels-logits        the same with use_fused_linear=False: both models' logits, FusedHRMLoss
  hf-reference             both models' logits, hrmkernels.reference.hrm_loss_reference (eager)
  liger                    Liger-Kernel LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=1,
                           weight_soft_loss=hrm, chunk_size=1024, compiled=False: torch.compile
                           on CPU would time the compiler) on the backbones' hidden states
  torchtune                torchtune's KD recipe: chunked output projections (8 chunks, every
                           chunk kept, as its TransformerDecoder returns them),
                           CEWithChunkedOutputLoss + hrm * ForwardKLWithChunkedOutputLoss. That
                           KL is the soft cross-entropy -sum p log q = KL + H(p): same gradient,
                           loss higher by hrm * H(p) (reported as loss_minus_hrm_teacher_entropy)

Offline teacher (--providers hrmkernels-topk-fused-linear hrmkernels-topk-logits): the batch
carries the teacher's top-k (--topk, default 64) ids and log-probabilities, computed before the
step with hrmkernels.teacher_topk (a cache's columns); the step runs no teacher. Both run
hrm_distillation_loss without a teacher_model (HRMDistillationTrainer's step on a cached
dataset), from hidden states (fused-linear, chunks of --chunk-rows student rows: the budget
is 4 V bytes a row, only student logits) or from the student's logits; they are compared with
hrmkernels-topk-logits.

Memory: each provider runs in its own process. After one warm-up step, each measured step
starts with the gradients freed; the resident set before it is the baseline, the kernel's
high-water mark is reset (/proc/self/clear_refs), and the peak after the step minus the
baseline is the step's peak extra memory: activations, logits, loss temporaries and the
parameter gradients the step creates. glibc's malloc is told to return every allocation of
64 KiB or more to the kernel when freed (MALLOC_MMAP_THRESHOLD_), so that the resident set
follows the live tensors instead of a cache. Time: median wall clock of the measured steps.

Each process also reports its loss and, per parameter group (head, embedding, body), the norm
of the gradient and its dot product with a fixed random tensor; the parent compares them with
hrmkernels-logits' (the loss on logits) and writes JSON and a markdown table under
benchmarks/results/.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDERS = ("hrmkernels-fused-linear", "hrmkernels-logits", "hf-reference", "liger", "torchtune")
TOPK_PROVIDERS = ("hrmkernels-topk-fused-linear", "hrmkernels-topk-logits")
TOPK = 64
HRM = 0.5
V, V_TEACHER = 128256, 128512
STUDENT = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
               num_attention_heads=8, num_key_value_heads=8)
TEACHER = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
               num_attention_heads=12, num_key_value_heads=12)
PROMPT = 24          # label -100 on the first tokens of each row (the prompt)
CHUNK_ROWS = 1024    # Liger's chunk_size = what hrmkernels' default budget gives at this V
TT_CHUNKS = 8        # torchtune's num_output_chunks default


# ---------------------------------------------------------------------------- child process

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current resident set (Linux >= 4.0)


def build(n_tokens, rows, vocab=V, teacher_vocab=V_TEACHER, student_config=STUDENT,
          teacher_config=TEACHER):
    """Student, teacher (frozen) and a batch of rows x (n_tokens / rows + 1) random tokens."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(max_position_embeddings=4096, initializer_range=0.02, attn_implementation="sdpa")
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab,
                                                                     **student_config, **common))
    teacher = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=teacher_vocab,
                                                                     **teacher_config, **common))
    teacher.eval().requires_grad_(False)
    length = n_tokens // rows + 1             # rows x (length - 1) predicted positions
    ids = torch.randint(0, vocab, (rows, length))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return student, teacher, batch


def step_fn(name, student, teacher, batch, chunk_rows=CHUNK_ROWS, topk=TOPK):
    """The provider's step: a closure computing the loss (the caller runs the backward).

    chunk_rows: Liger's chunk_size, and hrmkernels' chunk budget in rows (student and teacher
    fp32 logits, 8 V bytes a row; 1024 rows is the default budget's 1 GiB at V = 128256; the
    top-k providers: student logits only, 4 V bytes a row).
    """
    import torch
    import torch.nn.functional as F

    v = student.config.vocab_size
    labels = batch["labels"][:, 1:]
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if name in TOPK_PROVIDERS:
        from hrmkernels import FusedHRMLoss, teacher_topk
        from hrmkernels.integrations.hf import hrm_distillation_loss
        with torch.no_grad():   # the offline teacher, before the step: what a cache holds
            ht = teacher.model(**model_inputs, use_cache=False).last_hidden_state
            idx, lp = teacher_topk(ht, teacher.lm_head.weight[:v], topk)
        cached = {**batch, "teacher_topk_indices": idx.int(), "teacher_topk_logprobs": lp}
        del ht
        loss_fn = FusedHRMLoss(HRM)
        fused = name == "hrmkernels-topk-fused-linear"
        return lambda: hrm_distillation_loss(student, cached, loss_fn, use_fused_linear=fused,
                                             chunk_budget_bytes=chunk_rows * 4 * v)
    if name.startswith("hrmkernels"):
        from hrmkernels import FusedHRMLoss
        from hrmkernels.integrations.hf import hrm_distillation_loss
        loss_fn = FusedHRMLoss(HRM)
        fused = name == "hrmkernels-fused-linear"
        return lambda: hrm_distillation_loss(student, batch, loss_fn, teacher,
                                             use_fused_linear=fused,
                                             chunk_budget_bytes=chunk_rows * 8 * v)
    if name == "hf-reference":
        from hrmkernels.reference import hrm_loss_reference

        def step():
            z = student(**model_inputs).logits
            with torch.no_grad():
                u = teacher(**model_inputs).logits
            return hrm_loss_reference(z[:, :-1], u[:, :-1, :v], labels, HRM)
        return step

    def hidden():
        h = student.model(**model_inputs, use_cache=False).last_hidden_state[:, :-1]
        with torch.no_grad():
            ht = teacher.model(**model_inputs, use_cache=False).last_hidden_state[:, :-1]
        return h, ht

    w, wt = student.lm_head.weight, teacher.lm_head.weight[:v]
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=HRM, beta=0.0,
                                          temperature=1.0, compiled=False, chunk_size=chunk_rows)

        def step():
            h, ht = hidden()
            return loss_fn(h.reshape(-1, h.shape[-1]), w, ht.reshape(-1, ht.shape[-1]), wt,
                           labels.reshape(-1))
        return step
    if name == "torchtune":
        from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss
        ce_fn = CEWithChunkedOutputLoss(num_output_chunks=TT_CHUNKS)
        kd_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=TT_CHUNKS)

        def step():
            h, ht = hidden()
            logits = [F.linear(c, w) for c in h.chunk(TT_CHUNKS, dim=1)]
            with torch.no_grad():
                teacher_logits = [F.linear(c, wt) for c in ht.chunk(TT_CHUNKS, dim=1)]
            return ce_fn(logits, labels) + HRM * kd_fn(logits, teacher_logits, labels)
        return step
    raise ValueError(f"unknown provider {name!r}")


def _groups(student):
    return {"head": [student.lm_head.weight], "embedding": [student.model.embed_tokens.weight],
            "body": [p for n, p in student.named_parameters()
                     if n not in ("lm_head.weight", "model.embed_tokens.weight")]}


def fingerprint(student):
    """Per group: gradient norm and the dot product with fixed random tensors."""
    import torch
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for group, params in _groups(student).items():
        norm2, dot = 0.0, 0.0
        for p in params:
            g = p.grad.double()
            norm2 += float((g * g).sum())
            dot += float((g * torch.randn(g.shape, generator=gen, dtype=torch.float64)).sum())
        out[group] = {"norm": norm2 ** 0.5, "dot": dot}
    return out


def teacher_entropy(teacher, batch, v):
    """Mean H(p) of the teacher over the predicted tokens (torchtune's loss includes it)."""
    import torch
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        ht = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).last_hidden_state[:, :-1]
        total = 0.0
        for c, y in zip(ht.chunk(TT_CHUNKS, 1), labels.chunk(TT_CHUNKS, 1)):
            logp = torch.log_softmax(c @ teacher.lm_head.weight[:v].T, -1)
            total += float(-(logp.exp() * logp).sum(-1)[y != -100].sum())
    return total / int((labels != -100).sum())


def child(name, n_tokens, rows, repeats, chunk_rows, topk=TOPK):
    """Run one provider; print one JSON line."""
    import torch
    torch.set_num_threads(os.cpu_count())
    student, teacher, batch = build(n_tokens, rows)
    step = step_fn(name, student, teacher, batch, chunk_rows, topk)
    # The forward of the teacher runs inside the step: its activations count too, as in training.

    def one():
        student.zero_grad(set_to_none=True)
        gc.collect()
        base = _rss_kib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        loss = step()
        if not torch.is_tensor(loss):
            loss = loss[0]   # HRMLoss / Liger tuples
        loss.backward()
        seconds = time.perf_counter() - t0
        peak = _rss_kib("VmHWM")
        return float(loss.detach()), seconds, (peak - base) * 1024, base * 1024

    t0 = time.perf_counter()
    first = one()
    result = {"provider": name, "first_step_s": time.perf_counter() - t0, "loss": first[0],
              "load_average_1min_before": os.getloadavg()[0]}   # other users of the cores
    runs = [one() for _ in range(repeats)]
    result.update(
        step_s=statistics.median(r[1] for r in runs), step_s_all=[r[1] for r in runs],
        peak_extra_bytes=max(r[2] for r in runs), peak_extra_bytes_all=[r[2] for r in runs],
        first_step_peak_extra_bytes=first[2], baseline_rss_bytes=runs[-1][3],
        grads=fingerprint(student))
    if name == "torchtune":
        h_p = teacher_entropy(teacher, batch, V)
        result.update(teacher_entropy=h_p, loss_minus_hrm_teacher_entropy=first[0] - HRM * h_p)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- parent process

def _versions():
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "triton", "transformers", "liger-kernel", "torchtune", "torchao", "trl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=RESULTS.parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _against(provider):
    """The logits path a provider is compared with: the dense one, or the top-k one."""
    return "hrmkernels-topk-logits" if provider in TOPK_PROVIDERS else "hrmkernels-logits"


def _compare(results):
    """Relative differences of each provider's loss and gradient fingerprints from its logits
    path's (_against)."""
    for r in results:
        ref = next((x for x in results if x.get("provider") == _against(r["provider"])
                    and "grads" in x), None)
        if ref is None or "grads" not in r or r.get("n_tokens") != ref.get("n_tokens"):
            continue   # another batch: nothing to compare with
        loss = r.get("loss_minus_hrm_teacher_entropy", r["loss"])
        r["loss_rel_diff"] = abs(loss - ref["loss"]) / abs(ref["loss"])
        r["grad_rel_diff"] = max(
            max(abs(r["grads"][g][k] - ref["grads"][g][k]) / abs(ref["grads"][g][k])
                for k in ("norm", "dot")) for g in ref["grads"])


def table(result):
    """The markdown table of a result dict."""
    rows = result["results"]
    lines = ["| provider | N | peak extra memory | vs logits path | step time (load) | loss | "
             "max rel. diff from logits path (loss, gradients) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r.get("n_tokens", "")
        if "step_s" not in r:
            lines.append(f"| {r['provider']} | {n} | {r.get('status', 'failed')}: "
                         f"{r.get('reason', '')[:120]} | | | | |")
            continue
        base = next((x for x in rows if x["provider"] == _against(r["provider"])
                     and "step_s" in x), None)
        same_n = base and base.get("n_tokens") == r.get("n_tokens")
        ratio = f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}x" if same_n else ""
        loss = f"{r['loss']:.5f}"
        if "loss_minus_hrm_teacher_entropy" in r:
            loss += f" (- hrm H(p): {r['loss_minus_hrm_teacher_entropy']:.5f})"
        diff = (f"{r['loss_rel_diff']:.1e}, {r['grad_rel_diff']:.1e}"
                if "grad_rel_diff" in r else "")
        load = r.get("load_average_1min_before")
        load = f" ({load:.1f})" if load is not None else ""
        lines.append(f"| {r['provider']} | {n} | {r['peak_extra_bytes'] / 2**30:.2f} GiB | "
                     f"{ratio} | {r['step_s']:.0f} s{load} | {loss} | {diff} |")
    return "\n".join(lines)


def markdown(result):
    """The result's markdown: what was measured, where, with which command, and the table."""
    m, setup = result["machine"], result["setup"]
    return (f"One distillation step on CPU ({m['cpu']}, {m['cores']} cores shared with other "
            f"jobs; the 1-min load average before each provider is in parentheses), fp32: "
            f"student Llama (V = {setup['student']['vocab_size']}), teacher Qwen2 "
            f"(V = {setup['teacher']['vocab_size']} cut to the student's), hrm = {HRM}, T = 1, "
            f"chunks of {setup['chunk_rows']} rows (hrmkernels' budget and Liger's chunk_size). "
            f"Peak extra memory: resident set, one process per provider."
            + (f" hrmkernels-topk-*: an offline teacher, its top-{setup['topk']} computed before "
               "the step (no teacher in the step), compared with hrmkernels-topk-logits."
               if any(r["provider"] in TOPK_PROVIDERS for r in result["results"]) else "")
            + f"\n`{result['command']}` at {result['commit']}, {result['date']}.\n\n"
            + table(result))


def main(argv=None):
    """Command-line entry point; see ``python -m benchmarks.distill_step_cpu --help``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="predicted tokens (default 4096)")
    p.add_argument("--reference-n", type=int,
                   help="tokens for hf-reference (default --n; its fp32 temporaries take about "
                        "5.5 MB a token at this V: 22 GiB at N = 4096)")
    p.add_argument("--rows", type=int, default=4, help="sequences (default 4: 4 x 1025 tokens)")
    p.add_argument("--repeats", type=int, default=3, help="measured steps after a warm-up")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS),
                   choices=PROVIDERS + TOPK_PROVIDERS)
    p.add_argument("--topk", type=int, default=TOPK,
                   help="k of the top-k providers' offline teacher (default 64)")
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS,
                   help="Liger's chunk_size and hrmkernels' chunk budget in rows (default 1024)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/distill-step-cpu-<date>"
                   ".json; the table goes beside it as .md)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown of a result")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.n, args.rows, args.repeats, args.chunk_rows, args.topk)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())) + "\n")
        return None

    date = datetime.datetime.now(datetime.timezone.utc)
    # "gpu" names the device as benchmarks/run.py does (no GPU here: the CPU and its cores)
    result = {"machine": {"gpu": f"cpu ({_cpu_name()}, {os.cpu_count()} cores)",
                          "cpu": _cpu_name(), "cores": os.cpu_count(), "device": "cpu",
                          "python": platform.python_version(), **_versions()},
              "commit": _git("rev-parse", "HEAD"),
              "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
              "date": date.isoformat(timespec="seconds"),
              "command": "python -m benchmarks.distill_step_cpu " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "setup": {"n_tokens": args.n, "rows": args.rows, "hrm": HRM, "temperature": 1.0,
                        "dtype": "float32",
                        "student": {"arch": "llama", "vocab_size": V, **STUDENT},
                        "teacher": {"arch": "qwen2", "vocab_size": V_TEACHER, **TEACHER},
                        "prompt_tokens_ignored_per_row": PROMPT, "repeats": args.repeats,
                        "chunk_rows": args.chunk_rows, "topk": args.topk,
                        "hrmkernels_chunk_budget_bytes": args.chunk_rows * 8 * V,
                        "liger_chunk_size": args.chunk_rows, "torchtune_chunks": TT_CHUNKS},
              "results": []}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for name in args.providers:   # one process at a time: each peak is measured alone
        n = args.reference_n if name == "hf-reference" and args.reference_n else args.n
        cmd = [sys.executable, "-m", "benchmarks.distill_step_cpu", "--child", name,
               "--n", str(n), "--rows", str(args.rows), "--repeats", str(args.repeats),
               "--chunk-rows", str(args.chunk_rows), "--topk", str(args.topk)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=RESULTS.parents[1])
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            row = {"provider": name, "status": "error", "returncode": proc.returncode,
                   "reason": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            row = json.loads(line[len("RESULT "):])
        row["n_tokens"] = n
        row["process_s"] = round(time.time() - t0, 1)
        result["results"].append(row)
        print(f"{name}: " + (f"{row['peak_extra_bytes'] / 2**30:.2f} GiB, {row['step_s']:.2f} s"
                             if "step_s" in row else f"error: {row['reason']}"), flush=True)
    _compare(result["results"])
    out = Path(args.out) if args.out else RESULTS / f"distill-step-cpu-{date:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
