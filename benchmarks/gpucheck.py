"""One command for a GPU machine: ``python -m benchmarks.gpucheck OUTDIR [--commit HASH]``.

Stages, in order of value, within a wall-clock budget (``--budget-s``, default 480): a stage, a
check or a benchmark problem that would not fit is recorded as "skipped: time budget"; an error
in one is recorded and the next one runs.

  environment  GPU, versions, commit; device-to-device copy bandwidth (bytes read + written)
  extension    hrmkernels.kernels.native built (just-in-time unless installed) in a subprocess,
               timed and bounded, so that backend="cuda" joins every stage below
  correctness  every available backend against the float64 reference at real sizes
               (gpucheck_checks.CASES, LINEAR_CASES): bf16/fp32, both directions, T=1/2, teacher
               gradients, ignored rows, top-k teachers, fused linear (both impls), N*V > 2**31
  cuda_graph   a training step captured in a CUDA graph and replayed, for every backend
  compile      torch.compile(fullgraph=True) of a small model whose loss is FusedHRMLoss
  sanitizer    compute-sanitizer memcheck of a tiny script (a refused device is recorded)
  benchmark    a compact grid through benchmarks/run.py, against peers

OUTDIR gets gpucheck.json (rewritten after every check, so a killed run keeps what it did) and
gpucheck.md. Exit status 1 if any check failed or errored. ``--dry-run`` runs the same stages on
CPU at tiny sizes (Triton under its interpreter); the GPU-only stages are skipped.
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import gpucheck_checks as checks
from benchmarks import providers, run
from hrmkernels import available_backends

ROOT = Path(__file__).resolve().parents[1]   # the checkout this check belongs to
# Benchmark grid (N, V, T), most telling first: it runs until the budget ends. Peers, all of
# benchmarks/providers.py: the eager reference (the spec as a user writes it in PyTorch),
# torch.compile(reference) (what the compiler gives for free), Liger-Kernel's CE + JSD and
# CE + KLDiv (the fused kernels distillation users run; when importable), then each hrmkernels
# backend. Cut Cross-Entropy is left out: it has no teacher term and starts from hidden states.
BENCH = [(4096, 128256, 1.0), (16384, 128256, 1.0), (4096, 32000, 1.0), (4096, 262144, 1.0),
         (4096, 128256, 2.0), (16384, 262144, 1.0)]
DRY_BENCH = [(8, 64, 1.0), (8, 64, 2.0)]
# Seconds a stage or check needs to be started (on a GPU; a tenth in a dry run).
NEED_S = dict(environment=5, extension=60, correctness=30, cuda_graph=15, compile=30,
              sanitizer=40, benchmark=45, check=5, problem=45)


class Skip(Exception):
    """A check or stage that cannot run here; the message says why."""


class Budget:
    """Wall-clock seconds left until the deadline."""

    def __init__(self, seconds, clock=time.monotonic):
        self.clock, self.end = clock, clock() + seconds

    def left(self):
        return self.end - self.clock()


def _need(ctx, what):
    return NEED_S[what] / (10 if ctx.dry else 1)


def _skip(reason):
    raise Skip(reason)


def run_check(ctx, stage, name, fn, need="check"):
    """Run fn() as one check of `stage`, record it, and save the result.

    Status: ok; fail (an AssertionError, or "failures" in the metrics dict fn returns); skipped
    (Skip, a ValueError saying a backend is "not available" for the case, or less time left than
    NEED_S[need]); error (anything else, with its traceback).
    """
    rec, t0, left = {"name": name}, time.perf_counter(), ctx.budget.left()
    try:
        if left < _need(ctx, need):
            raise Skip(f"time budget ({left:.0f} s left)")
        metrics = fn() or {}
        failures = metrics.pop("failures", [])
        rec.update(metrics, status="fail" if failures else "ok", reason="; ".join(failures) or None)
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
    except AssertionError as e:
        rec.update(status="fail", reason=str(e)[:2000])
    except Exception as e:  # noqa: BLE001 (record it, and go on with the next check)
        if isinstance(e, ValueError) and "not available" in str(e):
            rec.update(status="skipped", reason=str(e))
        else:
            rec.update(status="error", reason=f"{type(e).__name__}: {e}"[:1000],
                       traceback=traceback.format_exc()[-2000:])
    if ctx.device.type == "cuda":   # the check's tensors are gone: give their memory back
        torch.cuda.synchronize()   # sync-ok: a script, on no loss path
        torch.cuda.empty_cache()
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    stage["checks"].append(rec)
    print(f"  {rec['status']:7} {name} ({rec['seconds']:.1f} s)"
          + (f": {rec['reason']}" if rec["reason"] else ""), flush=True)
    ctx.save()
    return rec


def run_stages(stages, ctx):
    """Run (name, fn(ctx, stage)) in order, each only if NEED_S[name] fits the time left."""
    for name, fn in stages:
        stage = ctx.result["stages"][name] = {"status": "running", "reason": None, "checks": []}
        t0, left = time.perf_counter(), ctx.budget.left()
        print(f"[{name}] {left:.0f} s left", flush=True)
        try:
            if left < _need(ctx, name):
                raise Skip(f"time budget ({left:.0f} s left, the stage needs "
                           f"~{_need(ctx, name):g} s)")
            fn(ctx, stage)
            status = {c["status"] for c in stage["checks"]}
            if status & {"fail", "error"}:
                stage["status"] = "fail"
            elif status == {"skipped"}:   # e.g. a device compute-sanitizer refuses
                stage.update(status="skipped", reason=stage["checks"][0]["reason"])
            else:
                stage["status"] = "ok"
        except Skip as e:
            stage.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001
            stage.update(status="error", reason=f"{type(e).__name__}: {e}"[:1000],
                         traceback=traceback.format_exc()[-2000:])
        stage["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {stage['status']} in {stage['seconds']} s"
              + (f": {stage['reason']}" if stage["reason"] else ""), flush=True)
        ctx.save()


def _sh(*cmd, timeout=20):
    """A command's output, or None if it is missing or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _child_env(**extra):
    """This environment, with this checkout's hrmkernels first on the path."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_subprocess(cmd, timeout, env=None):
    """(returncode, output, timed_out, seconds) of cmd run in ROOT. On timeout its whole process
    group is killed (nvcc and ninja under a build too)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, timed_out = p.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, timed_out = p.communicate()[0], True
    return p.returncode, out, timed_out, round(time.perf_counter() - t0, 1)


def _time_ms(fn, device):
    """Median ms of fn(): CUDA events (do_bench, L2 flushed) on a GPU, a host clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sanitizer_path():
    from torch.utils.cpp_extension import CUDA_HOME
    guess = Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "compute-sanitizer"
    return shutil.which("compute-sanitizer") or (str(guess) if guess.is_file() else None)


# ---------------------------------------------------------------------------------------------
# Stages

def stage_environment(ctx, stage):
    env, dev = ctx.result["environment"], ctx.device
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        nvcc = re.search(r"release \S+ V\S+", _sh("nvcc", "--version") or "")
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 1e6, 1),
                   nvidia_smi=_sh("nvidia-smi", "--format=csv", "--query-gpu=driver_version,"
                                  "clocks.sm,clocks.max.sm,clocks.mem,power.limit"),
                   nvcc=nvcc and nvcc[0], compute_sanitizer=_sanitizer_path())
    env.update(platform=platform.platform(), cpus=os.cpu_count(), hrmkernels=str(ROOT),
               triton_interpret=os.environ.get("TRITON_INTERPRET"))

    def copy_bandwidth():
        # Random data (zeros can run faster), far larger than the L2: bytes read + written.
        src = torch.randn((1 << 28) if dev.type == "cuda" else (1 << 23), device=dev)
        dst = torch.empty_like(src)
        ms = _time_ms(lambda: dst.copy_(src), dev)
        ctx.result["copy_gbps"] = env["copy_gbps"] = 2 * src.nbytes / ms / 1e6
        return {"gbps": round(env["copy_gbps"], 1), "ms": ms, "bytes": 2 * src.nbytes}

    run_check(ctx, stage, "device-to-device copy", copy_bandwidth)


BUILD_SCRIPT = ("import json, time; t = time.perf_counter(); "
                "from hrmkernels.kernels import native; why = native.unavailable_reason(); "
                "print('GPUCHECK-BUILD ' + json.dumps({'reason': why, "
                "'seconds': time.perf_counter() - t}))")


def build_extension(timeout):
    """Load hrmkernels.kernels.native in a subprocess, building it just-in-time unless it is
    installed: the metrics of a check, with the reason it is unavailable as a failure.

    A subprocess, so that a hung build cannot take the whole budget; the library it leaves in
    the torch extensions cache is what this process loads next. After a failure HRMKERNELS_JIT=0
    (the module's documented switch) spares this process and its children a second attempt.
    """
    prebuilt = importlib.util.find_spec("hrmkernels._C") is not None
    rc, out, timed_out, secs = run_subprocess([sys.executable, "-c", BUILD_SCRIPT], timeout,
                                              _child_env(HRMKERNELS_VERBOSE="1"))
    found = re.search(r"GPUCHECK-BUILD (.*)", out)
    why = json.loads(found[1])["reason"] if found else (
        f"timed out after {timeout:.0f} s" if timed_out else f"exit status {rc}")
    metrics = {"how": "prebuilt hrmkernels._C" if prebuilt else "just-in-time build",
               "build_seconds": secs, "timeout_s": timeout}
    if why:
        os.environ["HRMKERNELS_JIT"] = "0"
        metrics.update(failures=[why], output_tail=out[-3000:])
    return metrics


def stage_extension(ctx, stage):
    if ctx.dry:
        raise Skip("no GPU (dry run)")
    timeout = max(30, min(300, ctx.budget.left() - 200))   # leave 200 s to the stages after
    if run_check(ctx, stage, "build", lambda: build_extension(timeout))["status"] == "ok":
        def load():
            from hrmkernels.kernels import native
            t0 = time.perf_counter()
            why = native.unavailable_reason()
            assert why is None, why
            return {"load_seconds": round(time.perf_counter() - t0, 2)}
        run_check(ctx, stage, "load", load)


def stage_correctness(ctx, stage):
    backends = stage["backends"] = available_backends(ctx.device)
    cases = [(c, checks.loss_problem, checks.loss_check, "") for c in checks.CASES]
    cases += [(c, checks.linear_problem, checks.linear_check, "linear ")
              for c in checks.LINEAR_CASES]
    for seed, (case, problem, check, kind) in enumerate(cases):
        name, held = kind + checks.case_name(case), {}

        def reference(case=case, problem=problem, seed=seed):
            # Inputs and the float64 reference once per case, shared by the backends' checks.
            held["prob"] = problem(case, ctx.device, seed, ctx.dry)
            return {k: held["prob"]["p"][k] for k in ("n", "v", "h")}

        ok = run_check(ctx, stage, f"reference: {name}", reference)["status"] == "ok"
        for b in [b for b in backends if b in (case.get("backends") or backends)]:
            run_check(ctx, stage, f"{b}: {name}", lambda b=b, check=check: (
                check(held["prob"], b) if ok else _skip("the reference did not run")))
        held.clear()


def stage_cuda_graph(ctx, stage):
    if ctx.dry:
        raise Skip("no GPU (dry run)")
    for b in available_backends(ctx.device):
        run_check(ctx, stage, b, lambda b=b: checks.graph_check(b, ctx.device))


def stage_compile(ctx, stage):
    # Dry run: aot_eager still traces with Dynamo and AOT autograd (graph breaks, fake
    # kernels), without inductor's C++ compile, which takes minutes on a small CPU.
    compiler = "aot_eager" if ctx.dry else "inductor"
    for b in available_backends(ctx.device):
        run_check(ctx, stage, b, lambda b=b: checks.compile_check(b, ctx.device, compiler),
                  need="compile")


def stage_sanitizer(ctx, stage):
    if ctx.dry:
        raise Skip("no GPU (dry run)")
    tool = _sanitizer_path()
    if tool is None:
        raise Skip("compute-sanitizer is not installed")

    def memcheck():
        timeout = max(20, min(240, ctx.budget.left() - 10))
        # No caching allocator: each tensor is its own allocation, so memcheck knows its bounds.
        cmd = [tool, "--tool", "memcheck", "--report-api-errors", "no", sys.executable, "-c",
               checks.SANITIZER_SCRIPT]
        rc, out, timed_out, secs = run_subprocess(
            cmd, timeout, _child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
        status, why = checks.memcheck_verdict(out, rc, timed_out)
        if status == "skipped":
            raise Skip(why)
        if status == "error":
            raise RuntimeError(why)
        metrics = {"ran": re.findall(r"^ran (.*)$", out, re.M), "sanitizer_seconds": secs}
        return dict(metrics, failures=[why], output_tail=out[-3000:]) if why else metrics

    run_check(ctx, stage, "memcheck", memcheck)


def stage_benchmark(ctx, stage):
    res, estimate = ctx.result, _need(ctx, "problem")
    res.update(hrm=run.HRM, dtype="bfloat16")
    for n, v, t in DRY_BENCH if ctx.dry else BENCH:
        def problem(n=n, v=v, t=t):
            nonlocal estimate
            if ctx.budget.left() < estimate:
                raise Skip(f"time budget ({ctx.budget.left():.0f} s left, a problem takes "
                           f"~{estimate:.0f} s)")
            t0 = time.perf_counter()
            one = run.run([n], [v], [t], list(providers.PROVIDERS), device=ctx.device,
                          warmup_ms=1 if ctx.dry else 25, rep_ms=2 if ctx.dry else 100,
                          commit=res["provenance"]["commit"], argv=ctx.argv)
            estimate = max(estimate, time.perf_counter() - t0)
            res["providers"] = res["providers"] or one["providers"]
            res["copy_gbps"] = res["copy_gbps"] or one["copy_gbps"]   # a rerun without stage 1
            res["results"] += one["results"]
            res["runs"] += one["runs"]
            # A peer's failure (the eager reference's OOM, say) is news, not a failed check.
            bad = [r for r in one["results"]
                   if r["provider"] in providers.BACKEND_OF and r["status"] != "ok"]
            return {"rows": len(one["results"]), "failures": [
                f"{r['provider']} {r['mode']}: {r['status']} {r.get('reason') or ''}" for r in bad]}
        run_check(ctx, stage, f"N={n} V={v} T={t:g}", problem)


STAGES = [("environment", stage_environment), ("extension", stage_extension),
          ("correctness", stage_correctness), ("cuda_graph", stage_cuda_graph),
          ("compile", stage_compile), ("sanitizer", stage_sanitizer),
          ("benchmark", stage_benchmark)]


# ---------------------------------------------------------------------------------------------
# Provenance, output, command line

def provenance(device, commit=None):
    """benchmarks/run.py's provenance keys, so that benchmarks/report.py reads this JSON."""
    git = _sh("git", "rev-parse", "HEAD")
    status = _sh("git", "status", "--porcelain", "--untracked-files=no")

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})",
            "device": device.type, "torch": torch.__version__, "triton": version("triton"),
            "cuda": torch.version.cuda,
            # The device machine gets a copy of the tree without .git: pass --commit there.
            "commit": commit or git or "unknown",
            "dirty": (status != "") if (git and not commit) else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "liger_kernel": version("liger-kernel")}


def _finite(x):
    """x with NaN and infinities as strings: strict JSON readers (jq, browsers) refuse them."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return [_finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def summary(result):
    """A short markdown report of a result."""
    p = result["provenance"]
    checks_ = [c for s in result["stages"].values() for c in s["checks"]]
    counts = {k: sum(c["status"] == k for c in checks_) for k in ("ok", "fail", "error", "skipped")}
    out = [f"# gpucheck: {p['gpu']}, {p['date']}", "",
           f"Commit {p['commit']}; torch {p['torch']}, triton {p['triton']}, CUDA {p['cuda']}; "
           f"{result['seconds']} s of a {result['budget_s']:g} s budget"
           + (" (dry run)" if result["dry_run"] else "") + f". **{result['status']}**; checks: "
           + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", "",
           "| stage | status | s | ok / fail / error / skipped | reason |",
           "|---|---|---:|---|---|"]
    for name, s in result["stages"].items():
        n = [sum(c["status"] == k for c in s["checks"]) for k in counts]
        out.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | "
                   f"{' / '.join(map(str, n))} | {(s['reason'] or '')[:200]} |")
    bad = [f"- {name} / {c['name']}: {c['status']}: {(c['reason'] or '')[:300]}"
           for name, s in result["stages"].items() for c in s["checks"]
           if c["status"] in ("fail", "error")]
    out += ["", "Failures:", "", *bad] if bad else []
    if result["results"]:
        from benchmarks import report   # importable: the benchmark stage imported it
        copy = result["copy_gbps"]
        out += ["", f"Benchmark (bf16, hrm={result['hrm']}; device-to-device copy "
                f"{copy and round(copy)} GB/s):", "", "```",
                *map(report.text_row, result["results"]), "```"]
    return "\n".join(out) + "\n"


def write(result, outdir):
    """gpucheck.json and gpucheck.md in outdir, each replaced whole (never half written)."""
    for name, text in (("gpucheck.json", json.dumps(_finite(result), indent=1) + "\n"),
                       ("gpucheck.md", summary(result))):
        tmp = outdir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(outdir / name)


def main(argv=None):
    """Command-line entry point; see ``python -m benchmarks.gpucheck --help``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="where gpucheck.json and gpucheck.md are written")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-clock budget (default 480)")
    ap.add_argument("--commit", help="commit hash to record (the device's copy has no .git)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreted")
    ap.add_argument("--stages", nargs="+", choices=[s for s, _ in STAGES], metavar="STAGE",
                    default=[s for s, _ in STAGES], help="a subset, e.g. for a rerun")
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # triton reads TRITON_INTERPRET when it is imported: set it first, or start again.
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpucheck", *argv])
    if args.dry_run:   # the interpreter also evaluates masked-out lanes (-inf - -inf)
        warnings.filterwarnings("ignore", "(invalid value|overflow) encountered", RuntimeWarning)
    elif not torch.cuda.is_available():
        ap.error("torch sees no CUDA device; --dry-run checks the script on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"tool": "benchmarks.gpucheck", "argv": argv, "dry_run": args.dry_run,
              "budget_s": args.budget_s, "status": "running", "seconds": 0.0,
              "provenance": provenance(device, args.commit), "environment": {}, "stages": {},
              # benchmarks/README.md's "Results JSON", filled by the benchmark stage, so that
              # python -m benchmarks.report renders this file as it is.
              "hrm": None, "dtype": None, "copy_gbps": None, "providers": {}, "results": [],
              "runs": []}

    def save():
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write(result, outdir)

    ctx = SimpleNamespace(device=device, dry=args.dry_run, budget=Budget(args.budget_s),
                          result=result, argv=argv, save=save)
    run_stages([s for s in STAGES if s[0] in args.stages], ctx)
    failed = [n for n, s in result["stages"].items() if s["status"] in ("fail", "error")]
    result["status"] = "fail" if failed else "ok"
    save()
    print(summary(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
