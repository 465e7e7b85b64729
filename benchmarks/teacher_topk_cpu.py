"""The teacher's top-k (or samples) per token on CPU: hrmkernels.teacher_topk / teacher_sample
against the full-logits recipe, peak extra resident memory and time, one process per provider.

    python -m benchmarks.teacher_topk_cpu                      # N = 4096, V = 128256, H = 768
    python -m benchmarks.teacher_topk_cpu --n 512 --providers hrmkernels-topk full-topk

Providers (fp32, T = 1, random hidden states and head, seeded alike in every process):
  full-topk          torch.log_softmax(hidden @ W.T, -1).topk(k, -1): the recipe users write
  hrmkernels-topk    hrmkernels.teacher_topk(hidden, W, k): chunks of 1024 tokens x tiles of
                     16384 vocabulary entries, online log-sum-exp, running top-k merge
  full-sample        torch.multinomial(torch.softmax(hidden @ W.T, -1), n, replacement=True),
                     then the distinct ids and their counts (as teacher_sample returns them)
  hrmkernels-sample  hrmkernels.teacher_sample(hidden, W, n, generator=...)
  full-topk-logits   the recipe on given logits (N x V fp32, part of the baseline)
  hrmkernels-topk-logits  teacher_topk(logits=...) on the same logits

Memory: as benchmarks/distill_step_cpu.py (resident set's high-water mark over the baseline,
reset through /proc/self/clear_refs; glibc returns allocations of 64 KiB or more when freed).
Time: median wall clock of --repeats calls after a warm-up call at N = 256. Each process also
reports a fingerprint (sum of the log-probabilities, a hash of the first 64 tokens' ids) so
that the parent can check that hrmkernels returns the recipe's top-k.
"""
import argparse
import datetime
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.distill_step_cpu import _cpu_name, _git, _reset_peak, _rss_kib, _versions

RESULTS = Path(__file__).resolve().parent / "results"
PROVIDERS = ("full-topk", "hrmkernels-topk", "full-sample", "hrmkernels-sample",
             "full-topk-logits", "hrmkernels-topk-logits")


def make(name, n, v, h, k, draws):
    """The provider's inputs and a closure computing (ids, log-probabilities)."""
    import torch

    from hrmkernels import teacher_sample, teacher_topk
    from hrmkernels.api.teacher_topk import _distinct

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h ** 0.5 * 3   # logits of a few units
    logits = hidden @ weight.T if name.endswith("-logits") else None
    sampler = torch.Generator().manual_seed(1)
    fns = {
        "full-topk": lambda: torch.log_softmax(hidden @ weight.T, -1).topk(k, -1)[::-1],
        "hrmkernels-topk": lambda: teacher_topk(hidden, weight, k),
        "full-sample": lambda: _distinct(torch.multinomial(
            torch.softmax(hidden @ weight.T, -1), draws, replacement=True, generator=sampler),
            draws),
        "hrmkernels-sample": lambda: teacher_sample(hidden, weight, draws, generator=sampler),
        "full-topk-logits": lambda: torch.log_softmax(logits, -1).topk(k, -1)[::-1],
        "hrmkernels-topk-logits": lambda: teacher_topk(logits=logits, k=k),
    }
    return fns[name]


def child(name, n, v, h, k, draws, repeats):
    import torch
    torch.set_num_threads(os.cpu_count())
    with torch.no_grad():
        make(name, 256, v, h, k, draws)()                      # warm-up, small
        fn = make(name, n, v, h, k, draws)
        runs = []
        for _ in range(repeats):
            gc.collect()
            base = _rss_kib("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            idx, lp = fn()
            seconds = time.perf_counter() - t0
            runs.append((seconds, (_rss_kib("VmHWM") - base) * 1024))
    finite = lp[lp.isfinite()].double()
    print("RESULT " + json.dumps({
        "provider": name, "step_s": statistics.median(r[0] for r in runs),
        "step_s_all": [r[0] for r in runs], "peak_extra_bytes": max(r[1] for r in runs),
        "peak_extra_bytes_all": [r[1] for r in runs],
        "load_average_1min_before": os.getloadavg()[0],
        "logprob_sum": float(finite.sum()),
        "ids_sha1": hashlib.sha1(idx[:64].to(torch.int64).numpy().tobytes()).hexdigest()}),
        flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (default 4096)")
    p.add_argument("--v", type=int, default=128256, help="vocabulary (default 128256)")
    p.add_argument("--h", type=int, default=768, help="teacher hidden size (default 768)")
    p.add_argument("--k", type=int, default=64, help="top-k (default 64)")
    p.add_argument("--draws", type=int, default=32, help="samples per token (default 32)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--out", help="JSON path (default benchmarks/results/teacher-topk-cpu-<date>"
                   ".json; the table beside it as .md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.n, args.v, args.h, args.k, args.draws, args.repeats)
    date = datetime.datetime.now(datetime.timezone.utc)
    # "gpu" names the device as benchmarks/run.py does (no GPU here: the CPU and its cores)
    result = {"machine": {"gpu": f"cpu ({_cpu_name()}, {os.cpu_count()} cores)",
                          "cpu": _cpu_name(), "cores": os.cpu_count(), "device": "cpu",
                          **_versions()},
              "commit": _git("rev-parse", "HEAD"),
              "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
              "date": date.isoformat(timespec="seconds"),
              "command": "python -m benchmarks.teacher_topk_cpu " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "setup": {k: getattr(args, k) for k in ("n", "v", "h", "k", "draws", "repeats")},
              "results": []}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in args.providers:
        cmd = [sys.executable, "-m", "benchmarks.teacher_topk_cpu", "--child", name,
               *(f"--{k}={getattr(args, k)}" for k in ("n", "v", "h", "k", "draws", "repeats"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=RESULTS.parents[1])
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        row = (json.loads(line[len("RESULT "):]) if line else
               {"provider": name, "status": "error",
                "reason": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
        result["results"].append(row)
        print(f"{name}: " + (f"{row['peak_extra_bytes'] / 2**30:.2f} GiB, {row['step_s']:.1f} s"
                             if "step_s" in row else f"error: {row['reason']}"), flush=True)
    by = {r["provider"]: r for r in result["results"] if "step_s" in r}
    for ours, recipe in (("hrmkernels-topk", "full-topk"),
                         ("hrmkernels-topk-logits", "full-topk-logits")):
        if ours in by and recipe in by:   # the same top-k: ids of the first 64 tokens, sums
            a, b = by[ours], by[recipe]
            a["same_ids_as_recipe"] = a["ids_sha1"] == b["ids_sha1"]
            a["logprob_sum_rel_diff"] = abs(a["logprob_sum"] - b["logprob_sum"]) / abs(
                b["logprob_sum"])
    out = Path(args.out) if args.out else RESULTS / f"teacher-topk-cpu-{date:%Y-%m-%d}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


def markdown(result):
    m, s = result["machine"], result["setup"]
    lines = [f"Teacher top-{s['k']} / {s['draws']} samples per token on CPU ({m['cpu']}, "
             f"{m['cores']} cores shared with other jobs; 1-min load average in parentheses), "
             f"fp32, N = {s['n']}, V = {s['v']}, H = {s['h']}; peak extra resident memory, one "
             f"process per provider.\n`{result['command']}` at {result['commit']}, "
             f"{result['date']}.\n",
             "| provider | peak extra memory | time (load) | same top-k as the recipe |",
             "|---|---|---|---|"]
    for r in result["results"]:
        if "step_s" not in r:
            lines.append(f"| {r['provider']} | {r.get('status')}: {r.get('reason', '')[:100]} |"
                         " | |")
            continue
        same = ""
        if "same_ids_as_recipe" in r:
            same = (f"ids {'equal' if r['same_ids_as_recipe'] else 'differ'} (first 64 tokens), "
                    f"log-prob sum rel. diff {r['logprob_sum_rel_diff']:.1e}")
        lines.append(f"| {r['provider']} | {r['peak_extra_bytes'] / 2**30:.2f} GiB | "
                     f"{r['step_s']:.1f} s ({r['load_average_1min_before']:.1f}) | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
