"""Benchmark runner: ``python -m benchmarks.run [--quick] [--n ...] [--v ...] [--providers ...]``.

In one process: measures a device-to-device copy's bandwidth, then for each problem (N, V, T)
and provider checks the forward loss against backend="torch" and times the forward and the
forward+backward (median), recording effective GB/s, the fraction of the copy bandwidth and the
peak memory beyond the inputs. Writes JSON with provenance (on a GPU by default to
benchmarks/results/<gpu>-<date>.json; an existing file of the same GPU, versions and commit is
merged, so a long grid can run in pieces) and prints a table. A provider that cannot run here is
listed as skipped with the reason; a problem that runs out of GPU memory is recorded as "OOM".
"""
import argparse
import datetime
import gc
import importlib.metadata
import json
import operator
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from benchmarks import providers, report
from hrmkernels import fused_hrm_loss

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = RESULTS_DIR.parents[1]
PROVENANCE_KEYS = ("gpu", "device", "torch", "triton", "cuda", "commit", "dirty", "date",
                   "python", "liger_kernel")
# Fields that must match for two runs to share one JSON (the date may differ).
SAME_RUN_KEYS = ("gpu", "torch", "triton", "cuda", "commit", "liger_kernel")
# docs/design.md section 6 on a GPU; CPU sizes keep `pytest benchmarks/` to well under a minute.
GRIDS = {
    ("cuda", False): {"n": (4096, 16384), "v": (32000, 128256, 262144), "t": (1.0, 2.0)},
    ("cuda", True): {"n": (4096,), "v": (32000, 128256), "t": (1.0,)},
    ("cpu", False): {"n": (256,), "v": (4096,), "t": (1.0, 2.0)},
    ("cpu", True): {"n": (64,), "v": (1024,), "t": (1.0,)},
}
HRM = 0.5
LOSS_RTOL = 2e-2   # bf16 inputs, and Liger sums its loss in bf16: ~0.4% is rounding, 2% is a bug


def default_grid(device, quick=False):
    return GRIDS[(torch.device(device).type, quick)]


def time_ms(fn, device, warmup_ms=25, rep_ms=100):
    """Median milliseconds of fn() after warm-up.

    CUDA: triton.testing.do_bench (CUDA events, the L2 cache flushed before each call). Else a
    host clock around each call, which is synchronous there.
    """
    if torch.device(device).type == "cuda":
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    times = []
    for _ in range(min(1000, max(5, int(rep_ms / estimate_ms)))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss(field):
    """VmRSS / VmHWM (peak) of this process in bytes, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


def peak_extra_bytes(fn, device):
    """Peak memory fn() allocates beyond what was allocated before it.

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak resident set, reset by
    /proc/self/clear_refs, minus the resident set before (large CPU tensors are mmap'd and
    returned to the system when freed, so this follows the tensors); None where it cannot be
    measured.
    """
    if torch.device(device).type != "cuda":
        try:
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
            base = _rss("VmRSS")
            out = fn()
            peak = _rss("VmHWM") - base
        except (OSError, AttributeError):
            return None
        del out
        return peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def copy_gbps(device, warmup_ms=25, rep_ms=100):
    """Bandwidth of a device-to-device copy, counting bytes read plus bytes written."""
    nbytes = 1 << 30 if torch.device(device).type == "cuda" else 256 << 20   # >> any cache
    src = torch.randn(nbytes // 4, device=device)   # random data, not zeros (METHOD.md)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    return 2 * src.nbytes / ms / 1e6


def make_inputs(n, v, dtype, device, seed=0):
    """Random student logits (requiring grad), teacher logits and labels of one problem."""
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, v, generator=gen, device=device, dtype=dtype).requires_grad_(True)
    u = torch.randn(n, v, generator=gen, device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    return z, u, y


def expected_loss(n, v, t, dtype, device):
    """The loss every provider must match, from the memory-frugal torch backend."""
    z, u, y = make_inputs(n, v, dtype, device)
    with torch.no_grad():
        return fused_hrm_loss(z, u, y, HRM, temperature=t, backend="torch").item()


def measure(loss, mode, n, v, dtype, device, expected, warmup_ms, rep_ms):
    """Check, then time one provider's loss on one problem; returns the row's measured fields.

    Fresh inputs for every call of this function: Liger and inplace_backward overwrite the
    student logits, and the peak memory is measured above inputs allocated before it.
    """
    z, u, y = make_inputs(n, v, dtype, device)
    # The first call compiles (Triton JIT, torch.compile) and checks the value before timing.
    got = loss(z, u, y).item()
    rel_err = abs(got - expected) / abs(expected)
    if not rel_err <= LOSS_RTOL:   # also catches NaN
        return {"status": "mismatch", "loss_rel_err": rel_err,
                "reason": f"loss {got:.6g} differs from the torch backend's {expected:.6g}"}
    fn = providers.step(loss, mode, z, u, y)
    fn()   # warm the backward too (its compile, its autotuning)
    extra = peak_extra_bytes(fn, device)
    ms = time_ms(fn, device, warmup_ms, rep_ms)
    return {"status": "ok", "loss_rel_err": rel_err, "ms": ms, "peak_extra_bytes": extra}


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def provenance(device, commit=None):
    """Where and with what the numbers were measured."""
    device = torch.device(device)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"
    git_commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        liger = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger = None
    return {
        "gpu": gpu,
        "device": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        # The device machine gets a copy of the tree without .git: pass --commit there.
        "commit": commit or git_commit or "unknown",
        "dirty": (status != "") if (git_commit and not commit) else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "liger_kernel": liger,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def run(ns, vs, ts, names=tuple(providers.PROVIDERS), modes=providers.MODES,
        dtype=torch.bfloat16, device=None, warmup_ms=25, rep_ms=100, commit=None, argv=None,
        log=print, on_row=None):
    """Measure every (N, V, T) x provider x mode; returns the JSON-ready result dict.

    on_row(result) is called after each measured row (the CLI saves the JSON there, so a run
    stopped by a time limit keeps what it measured).
    """
    started = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(device, commit)
    bandwidth = copy_gbps(device, warmup_ms, rep_ms)
    log(f"{prov['gpu']}: device-to-device copy {bandwidth:.0f} GB/s")
    this_run = {"id": uuid.uuid4().hex[:12], "date": prov["date"], "argv": argv,
                "copy_gbps": bandwidth, "seconds": 0.0}
    result = {"provenance": prov, "hrm": HRM, "dtype": str(dtype).removeprefix("torch."),
              "copy_gbps": bandwidth, "providers": {}, "results": [], "runs": [this_run]}
    for name in names:
        why = providers.why_skipped(name, device)
        result["providers"][name] = {"description": providers.PROVIDERS[name],
                                     "status": "skipped" if why else "run", "reason": why}
        if why:
            log(f"skip {name}: {why}")
    names = [name for name in names if result["providers"][name]["status"] == "run"]
    elem_size = torch.empty((), dtype=dtype).element_size()
    for n in ns:
        for v in vs:
            for t in ts:
                expected = expected_loss(n, v, t, dtype, device)
                free_memory(device)
                for name in names:
                    loss = None   # one per problem: both modes share its torch.compile
                    for mode in modes:
                        row = {"provider": name, "mode": mode, "n": n, "v": v, "t": t,
                               "bytes": providers.bytes_moved(mode, n, v, elem_size),
                               "copy_gbps": bandwidth}
                        try:
                            if loss is None:
                                loss = providers.loss_fn(name, HRM, t)
                            row.update(measure(loss, mode, n, v, dtype, device, expected,
                                               warmup_ms, rep_ms))
                        except torch.cuda.OutOfMemoryError:
                            row.update(status="OOM")
                        # One broken provider must not end the run: record it and go on.
                        except Exception as e:  # noqa: BLE001
                            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
                        free_memory(device)   # the failed frame is gone: its tensors can go
                        if row["status"] == "ok":
                            row["gbps"] = row["bytes"] / row["ms"] / 1e6
                            row["copy_fraction"] = row["gbps"] / bandwidth
                        result["results"].append(row)
                        this_run["seconds"] = round(time.time() - started, 1)
                        log(report.text_row(row))
                        if on_row:
                            on_row(result)
    return result


def save(result, path):
    """Write result to path, merged into an existing file of the same GPU, versions and commit.

    Rows of the new result replace rows of the same (provider, mode, n, v, t); a run already in
    the file (same id) is replaced too, so saving the same run again is harmless.
    """
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        differ = [k for k in SAME_RUN_KEYS
                  if old["provenance"].get(k) != result["provenance"].get(k)]
        differ += [k for k in ("dtype", "hrm") if old[k] != result[k]]
        if differ:
            raise SystemExit(f"{path} holds a run with other {', '.join(differ)}; "
                             "choose another --out")
        key = operator.itemgetter("provider", "mode", "n", "v", "t")
        new_keys = {key(r) for r in result["results"]}
        rows = [r for r in old["results"] if key(r) not in new_keys] + result["results"]
        # A provider that ran in either piece is "run"; else the newest reason to skip it.
        merged = {**old["providers"], **result["providers"]}
        for name, info in old["providers"].items():
            if info["status"] == "run":
                merged[name] = info
        ids = {r["id"] for r in result["runs"]}
        runs = [r for r in old["runs"] if r["id"] not in ids] + result["runs"]
        result = {**result, "providers": merged, "results": rows, "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)   # never leave a half-written file behind a killed run
    return result


def default_out(prov):
    slug = re.sub(r"[^a-z0-9]+", "-", prov["gpu"].lower()).strip("-")
    return RESULTS_DIR / f"{slug}-{prov['date'][:10]}.json"


def main(argv=None):
    """Command-line entry point; see ``python -m benchmarks.run --help``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset of the sizes")
    p.add_argument("--n", type=int, nargs="+", help="token counts (default: by device)")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes (default: by device)")
    p.add_argument("--t", type=float, nargs="+", help="temperatures (default: by device)")
    p.add_argument("--providers", nargs="+", default=list(providers.PROVIDERS),
                   choices=list(providers.PROVIDERS), metavar="NAME",
                   help=f"default: all ({', '.join(providers.PROVIDERS)})")
    p.add_argument("--modes", nargs="+", default=list(providers.MODES), choices=providers.MODES)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup-ms", type=float, default=25, help="default 25 (do_bench's)")
    p.add_argument("--rep-ms", type=float, default=100, help="default 100 (do_bench's)")
    p.add_argument("--commit", help="commit hash to record when the tree has no .git")
    p.add_argument("--out", help="JSON path (default on a GPU: benchmarks/results/<gpu>-<date>"
                   ".json; on CPU nothing is written unless given)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)

    grid = default_grid(args.device, args.quick)
    out = args.out
    if out is None and torch.device(args.device).type == "cuda":
        out = default_out(provenance(args.device, args.commit))
    result = run(args.n or grid["n"], args.v or grid["v"], args.t or grid["t"],
                 args.providers, args.modes, getattr(torch, args.dtype), args.device,
                 args.warmup_ms, args.rep_ms, args.commit, argv,
                 on_row=(lambda res: save(res, out)) if out else None)
    if out:
        save(result, out)   # also when no row was measured: the skipped providers are news
        print(f"wrote {out}")
    print(report.text_table(result))
    return result


if __name__ == "__main__":
    main()
