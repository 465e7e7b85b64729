"""Peak memory of a forward + backward with shift_labels=True against hand-shifted labels (CPU).

    python -m benchmarks.shift_memory                  # the table of benchmarks/NOTES.md
    python -m benchmarks.shift_memory --b 2 --s 129    # smaller

The measurements run one after another in a process of their own, whose glibc mmap threshold is
fixed so that freed tensors leave the resident set. For each: after the inputs exist, the peak
resident set is reset (``echo 5 > /proc/self/clear_refs``, Linux), one forward + backward runs,
and the peak above the resident set at the reset is read from /proc/self/status (VmHWM).
"hand" passes the labels shifted and padded by hand (``labels[..., 1:]`` then -100, what
shift_labels=True does inside), so both calls see the same logits and rows; a slice of the
logits, as the loss took before, costs one more N x V gradient (the slice's backward).
"trainer" is HRMDistillationTrainer's logits path (``hrm_distillation_loss(...,
use_fused_linear=False)``) on a one-layer GPT-2 whose logits dominate, with the batch's
``labels`` against the same batch carrying ``shift_labels`` (as padding-free collators pass).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _step(args):
    """The inputs and the closure of one measurement (in the measuring process)."""
    import torch

    from hrmkernels import FusedHRMLoss, fused_hrm_loss
    torch.manual_seed(0)
    b, s, v = args.b, args.s, args.v
    y = torch.randint(0, v, (b, s))
    y[:, :3] = -100                                       # a prompt
    hand = torch.nn.functional.pad(y[:, 1:], (0, 1), value=-100)
    if args.case == "trainer":
        from transformers import GPT2Config, GPT2LMHeadModel

        from hrmkernels.integrations.hf import hrm_distillation_loss
        config = GPT2Config(vocab_size=v, n_positions=s, n_embd=16, n_layer=1, n_head=2)
        student, teacher = GPT2LMHeadModel(config), GPT2LMHeadModel(config).eval()
        batch = dict(input_ids=torch.randint(0, v, (b, s)))
        batch.update(labels=y) if args.shift else batch.update(shift_labels=hand)
        loss_fn = FusedHRMLoss(0.5, temperature=2.0, backend=args.backend)

        def step():
            hrm_distillation_loss(student, batch, loss_fn, teacher,
                                  use_fused_linear=False).backward()
            student.zero_grad(set_to_none=True)
        return step
    z = torch.randn(b, s, v, requires_grad=True)
    u = torch.randn(b, s, v)
    kw = dict(temperature=2.0, backend=args.backend, inplace_backward=args.inplace)
    labels, shift = (y, True) if args.shift else (hand, False)

    def step():
        fused_hrm_loss(z, u, labels, 0.5, shift_labels=shift, **kw).backward()
        z.grad = None
    return step


def measure_here(args):
    step = _step(args)
    step()                                                # once first: lazy initialisation
    Path("/proc/self/clear_refs").write_text("5")         # VmHWM := VmRSS
    start = _rss_mb("VmRSS")
    step()
    return _rss_mb("VmHWM") - start


CONFIGS = [(backend, "logits", inplace) for backend in ("torch", "cpu")
           for inplace in (False, True)]
CONFIGS += [("cpu", "trainer", False)]


def measure(b=4, s=513, v=32000, configs=CONFIGS):
    """{(backend, case, inplace, shift): peak MB above the start of one forward + backward},
    measured one after another in one fresh process (the resident set is reset between)."""
    cmd = [sys.executable, "-m", "benchmarks.shift_memory", "--inside", "--b", str(b), "--s",
           str(s), "--v", str(v), "--configs", json.dumps(configs)]
    # glibc serves a freed large block's successors from its heap once its mmap threshold has
    # grown past them, and the heap keeps their pages: a fixed threshold returns every block
    # above 128 KiB to the system when freed, so the resident set follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return {tuple(k): mb for k, mb in json.loads(out.stdout.splitlines()[-1])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inside", action="store_true", help="the measuring process (internal)")
    ap.add_argument("--configs", default=json.dumps(CONFIGS))
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--s", type=int, default=513)
    ap.add_argument("--v", type=int, default=32000)
    args = ap.parse_args(argv)
    configs = [tuple(c) for c in json.loads(args.configs)]
    if args.inside:
        out = []
        for backend, case, inplace in configs:
            for shift in (True, False):
                one = argparse.Namespace(**vars(args), backend=backend, case=case,
                                         inplace=inplace, shift=shift)
                out.append(((backend, case, inplace, shift), measure_here(one)))
        print(json.dumps(out))
        return
    peaks = measure(args.b, args.s, args.v, configs)
    print(f"B={args.b}, S={args.s}, V={args.v}, fp32, forward + backward, peak MB above the start")
    print("| backend | case | inplace_backward | shift_labels=True | labels shifted by hand |")
    print("|---|---|---|---|---|")
    for backend, case, inplace in configs:
        print(f"| {backend} | {case} | {inplace} | {peaks[backend, case, inplace, True]:.0f} | "
              f"{peaks[backend, case, inplace, False]:.0f} |")


if __name__ == "__main__":
    main()
