"""The gradient in the forward on CPU: forward + backward of fused_hrm_loss(backend="cpu"),
reduction "mean", the one-sweep path (hrm_loss_fwd_bwd: each row's gradient written while the
row is in cache) against today's two calls (hrm_loss_fwd, then hrm_loss_bwd in the backward:
the same kernels through reduction="none" and the mean taken outside, as the API did).

    python -m benchmarks.fwd_grad_cpu                  # N = 2048, V = 32000, fp32 and bf16
    python -m benchmarks.fwd_grad_cpu --n 256 --repeats 5 --out /tmp/r.json

T = 2, hrm = 0.5, forward KL, a teacher without grad, 2 threads (torch.set_num_threads). Both
paths run in one process, interleaved (the order alternates every repeat), after a warm-up of
each; every call gets fresh gradient memory (z.grad freed), as a training step does. Time:
median wall clock of --repeats calls. Bytes per element predicted from memory (design.md): two
calls read z, u twice and write dz (bf16: 10 B, fp32: 20 B); one sweep reads them once and
writes dz (6 B, 12 B), the gradient pass re-reading the row from cache.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.distill_step_cpu import _cpu_name, _git

RESULTS = Path(__file__).resolve().parent / "results"


def _step(z, u, y, one_sweep):
    from hrmkernels import fused_hrm_loss
    z.grad = None
    t0 = time.perf_counter()
    if one_sweep:
        loss = fused_hrm_loss(z, u, y, 0.5, temperature=2.0, backend="cpu")
    else:
        rows = fused_hrm_loss(z, u, y, 0.5, temperature=2.0, backend="cpu", reduction="none")
        loss = rows.sum() / (y != -100).sum().clamp_min(1)
    loss.backward()
    dt = time.perf_counter() - t0
    return dt, loss.item()


def measure(n, v, dtype, repeats):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_()
    u = (torch.randn(n, v, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    times = {"one_sweep": [], "two_calls": []}
    losses, grads = {}, {}
    for one in (True, False):   # warm-up, and the results to compare
        _, losses[one] = _step(z, u, y, one)
        grads[one] = z.grad.clone()
    for r in range(repeats):
        for one in ((True, False) if r % 2 == 0 else (False, True)):
            times["one_sweep" if one else "two_calls"].append(_step(z, u, y, one)[0])
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "v": v,
            "one_sweep_s": med["one_sweep"], "two_calls_s": med["two_calls"],
            "ratio": med["one_sweep"] / med["two_calls"], "times_s": times,
            "loss_rel_diff": abs(losses[True] - losses[False]) / abs(losses[False]),
            "grad_max_abs_diff": (grads[True].float() - grads[False].float()).abs().max().item()}


def _triton_version():
    """The installed Triton (unused by the C++ CPU kernels measured here), or None."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path,
                    default=RESULTS / f"fwd_grad_cpu_{datetime.date.today().isoformat()}.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(args.n, args.v, dt, args.repeats) for dt in (torch.float32, torch.bfloat16)]
    out = {"benchmark": "fwd_grad_cpu", "device": "CPU", "cpu": _cpu_name(),
           "gpu": f"cpu ({_cpu_name()}, {os.cpu_count()} cores)", "triton": _triton_version(),
           "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
           "commit": _git("rev-parse", "HEAD"), "date": datetime.date.today().isoformat(),
           "config": {"temperature": 2.0, "hrm": 0.5, "reduction": "mean",
                      "divergence": "forward KL", "teacher_grad": False,
                      "repeats": args.repeats, "statistic": "median"},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in results:
        print(f"CPU {args.threads} threads, {r['dtype']}, N={r['n']}, V={r['v']}: one sweep "
              f"{r['one_sweep_s'] * 1e3:.1f} ms, two calls {r['two_calls_s'] * 1e3:.1f} ms, "
              f"ratio {r['ratio']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
