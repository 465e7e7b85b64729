"""The checks of ``python -m benchmarks.gpucheck`` (which runs, times and records them).

- Loss and fused-linear cases against the float64 reference (``CASES``, ``LINEAR_CASES``): a
  problem function draws the inputs and evaluates the reference once; a check function runs one
  backend on them and returns its errors, with ``failures`` beyond the tolerances of
  tests/test_hrm_loss.py and tests/test_linear.py.
- A small model whose loss is FusedHRMLoss (as tests/test_compile.py): a training step captured
  in a CUDA graph and replayed, and ``torch.compile(fullgraph=True)`` against eager.
- A tiny script for compute-sanitizer memcheck, and the verdict read from the tool's output.

Only the public API and hrmkernels.reference are used, so the checks follow the library as it
changes; a backend without a path for a case raises a ValueError saying it is "not available".
This is a script on no loss path: it reads results on the host (lines marked "sync-ok").
"""
import copy
import math
import re

import torch

from hrmkernels import FusedHRMLoss, fused_hrm_loss, fused_linear_hrm_loss
from hrmkernels.experimental import tiled_linear_hrm_loss
from hrmkernels.reference import hrm_loss_reference, hrm_loss_topk_reference

N, V, H = 4096, 128256, 4096   # Llama 3's vocabulary and width
# Loss checks. Each dict holds keyword arguments of fused_hrm_loss and of the reference (hrm=0.5
# and reduction="none" unless given), plus the PROBLEM_KEYS: dtype (both logits), n and v
# (default N, V; tiny in a dry run), teacher_grad, topk (a top-k teacher of k entries instead of
# the logits), tail (compare only the last rows: their offsets exceed 2**31 elements), backends
# (only these). Every available backend runs every case: append a dict to add a check (a JSD
# objective, say: dict(dtype="bfloat16", jsd_beta=0.5)).
CASES = [
    dict(dtype="bfloat16", temperature=1.0),
    dict(dtype="bfloat16", temperature=2.0, label_smoothing=0.1, teacher_grad=True),
    dict(dtype="bfloat16", kl_direction="reverse", temperature=1.0, teacher_grad=True),
    dict(dtype="bfloat16", kl_direction="reverse", temperature=2.0),
    dict(dtype="float32", temperature=2.0, teacher_grad=True),
    dict(dtype="float32", kl_direction="reverse", temperature=1.0, label_smoothing=0.1),
    dict(dtype="float32", temperature=1.0, reduction="mean"),
    dict(dtype="float32", kl_direction="reverse", temperature=2.0, teacher_grad=True,
         reduction="mean"),
    dict(dtype="bfloat16", temperature=2.0, topk=128, backends=("triton", "torch")),
    dict(dtype="bfloat16", kl_direction="reverse", temperature=1.0, topk=128,
         topk_mode="renormalize", backends=("triton", "torch")),
    dict(dtype="bfloat16", temperature=2.0, teacher_grad=True, n=2**31 // V + 64, tail=4),
    dict(dtype="bfloat16", jsd_beta=0.5, temperature=2.0, teacher_grad=True,
         backends=("triton", "torch")),
    dict(dtype="float32", jsd_beta=0.1, temperature=1.0, label_smoothing=0.1, reduction="mean",
         backends=("triton", "torch")),
    dict(dtype="bfloat16", jsd_beta=0.5, temperature=2.0, topk=128, backends=("triton", "torch")),
]
# fused_linear_hrm_loss from hidden states (n x h) and heads (v x h), reduction "mean"; the same
# keys, h the width (default H).
LINEAR_CASES = [
    dict(impl="chunked", dtype="bfloat16", temperature=2.0),
    dict(impl="fused", dtype="bfloat16", kl_direction="reverse", backends=("triton",)),
    dict(impl="fused", dtype="bfloat16", jsd_beta=0.5, student_logit_scale=2.0,
         student_softcap=5.0, teacher_softcap=6.0, backends=("triton",)),
    dict(impl="chunked", dtype="bfloat16", jsd_beta=0.5, student_logit_scale=2.0,
         student_softcap=5.0, teacher_softcap=6.0, backends=("triton", "torch")),
]
TRANSFORMS = ("student_logit_scale", "student_softcap", "teacher_logit_scale", "teacher_softcap")
PROBLEM_KEYS = ("dtype", "n", "v", "h", "teacher_grad", "topk", "tail", "backends")
DRY = dict(n=16, v=301, h=24, topk=8)   # dry-run sizes: V=301 fits no vector width or block
HALF = (torch.bfloat16, torch.float16)


def case_name(case):
    return " ".join(f"{k}={v}" for k, v in case.items() if k != "backends")


def _split(case, dry, linear=False):
    """(problem dict, keyword arguments) of a case, at dry-run sizes if `dry`."""
    p = {"n": N, "v": V, "h": H, "teacher_grad": False, "topk": None, "tail": None,
         "backends": None, **{k: case[k] for k in PROBLEM_KEYS if k in case}}
    if dry:
        p.update(n=DRY["n"] + (p["tail"] or 0), v=DRY["v"], h=DRY["h"],
                 topk=p["topk"] and min(p["topk"], DRY["topk"]))
    p["dtype"] = getattr(torch, p["dtype"])
    kw = {"hrm": 0.5, "reduction": "mean" if linear else "none",
          **{k: v for k, v in case.items() if k not in PROBLEM_KEYS}}
    return p, kw


def _labels(n, v, gen, device):
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    y[::3] = -100   # ignored rows: 0 loss and 0 gradient
    return y


def _chunks(rows, v):
    step = max(1, 2**25 // v)   # 32M float64 elements (256 MiB) per reference temporary
    return [slice(i, min(i + step, rows.stop)) for i in range(rows.start, rows.stop, step)]


def _stats(a, b):
    """max |a - b|, max |b|, ||a - b||, ||b|| against float64 b, a few rows at a time (no
    float64 copy of the whole of a)."""
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    step = max(1, 2**25 // max(1, a[0].numel()))
    m = mb = s = sb = 0.0
    for i in range(0, a.shape[0], step):
        y = b[i:i + step]
        d = a[i:i + step].double() - y
        stats = torch.stack([d.abs().max(), y.abs().max(), d.square().sum(), y.square().sum()])
        dm, ym, ds, ys = stats.tolist()   # sync-ok
        m, mb, s, sb = max(m, dm), max(mb, ym), s + ds, sb + ys
    return m, mb, math.sqrt(s), math.sqrt(sb)


def loss_problem(case, device, seed, dry=False):
    """Inputs of a loss case and the float64 reference's outputs and gradients on its rows."""
    p, kw = _split(case, dry)
    n, v, dt = p["n"], p["v"], p["dtype"]
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, v, generator=gen, device=device, dtype=dt).mul_(3.0)
    u = torch.randn(n, v, generator=gen, device=device, dtype=dt).mul_(3.0)
    y = _labels(n, v, gen, device)
    rows = slice(n - p["tail"], n) if p["tail"] else slice(0, n)
    t, topk = kw.get("temperature", 1.0), None
    if p["topk"]:
        logp, idx = torch.log_softmax(u.float() / t, -1).topk(p["topk"], -1)
        topk = (idx, logp)
    # Upstream gradient: random per row for "none" (not 1), a scalar otherwise.
    g = (torch.rand(n, generator=gen, device=device) * 2 - 0.5 if kw["reduction"] == "none"
         else torch.tensor(1.7, device=device))
    denom = None if kw["reduction"] == "none" else (
        (y != -100).sum().clamp_min(1).double() if kw["reduction"] == "mean" else 1.0)
    g_rows = g.double() if denom is None else (g.double() / denom).expand(n)
    ref_kw = {**kw, "reduction": "none", "return_components": True}
    outs, dz, du = [], [], []
    for r in _chunks(rows, v):   # rows are independent: the reference a few at a time
        zc = z[r].double().requires_grad_()
        uc = None if topk else u[r].double().requires_grad_(p["teacher_grad"])
        ref = (hrm_loss_topk_reference(zc, (topk[0][r], topk[1][r].double()), y[r], **ref_kw)
               if topk else hrm_loss_reference(zc, uc, y[r], **ref_kw))
        (ref[0] * g_rows[r]).sum().backward()
        outs.append([x.detach() for x in ref])
        dz.append(zc.grad)
        if p["teacher_grad"]:
            du.append(uc.grad if uc.grad is not None else torch.zeros_like(uc))   # hrm == 0
    ref = [torch.cat(x) for x in zip(*outs)]
    if denom is not None:
        ref = [x.sum() / denom for x in ref]
    # fp32 floors of tests/test_hrm_loss.py: a few ulps of the log-sum-exps (~|logit| / T) in
    # the losses; a few ulps of the gradient's terms, times |g|, in the gradients.
    teacher = topk[1] if topk else u
    zmax, umax, gmax = [x.abs().max().item() for x in (z, teacher, g_rows[rows])]  # sync-ok
    mag = max(1.0, max(zmax, umax) / t, math.log(v))
    g_floor = 5e-7 * gmax * math.sqrt(rows.stop - rows.start) * (
        max(1.0, zmax) + kw["hrm"] / t * mag)
    return dict(p=p, kw=kw, z=z, u=None if topk else u, y=y, topk=topk, g=g, rows=rows, ref=ref,
                mag=mag, g_floor=g_floor, dz=torch.cat(dz), du=torch.cat(du) if du else None)


def loss_check(prob, backend):
    """fused_hrm_loss(backend=...) on a loss_problem: errors, and failures beyond tolerance."""
    p, kw, rows = prob["p"], prob["kw"], prob["rows"]
    zl = prob["z"].detach().requires_grad_()
    ul = None if prob["topk"] else prob["u"].detach().requires_grad_(p["teacher_grad"])
    teacher = dict(teacher_topk=prob["topk"]) if prob["topk"] else dict(teacher_logits=ul)
    out = fused_hrm_loss(zl, labels=prob["y"], backend=backend, return_components=True,
                         **teacher, **kw)
    (out[0] * prob["g"]).sum().backward()
    metrics, failures, atol = {}, [], 1e-6 * prob["mag"]
    for name, a, b in zip(("loss", "ce", "kl"), out, prob["ref"]):
        a = (a[rows] if kw["reduction"] == "none" else a).double()
        metrics[f"{name}_max_err"] = _stats(a, b)[0]
        far = (~torch.isclose(a, b, rtol=1e-5, atol=atol, equal_nan=True)).sum().item()  # sync-ok
        if far:
            failures.append(f"{name}: {far} value(s) beyond 1e-5 |ref| + {atol:.2g}, max |error| "
                            f"{metrics[f'{name}_max_err']:.3g}")
    grads = [("dz", zl.grad, prob["dz"])]
    grads += [("du", ul.grad, prob["du"])] if p["teacher_grad"] else []
    for name, d, d_ref in grads:
        if d is None or d.dtype != p["dtype"]:
            failures.append(f"{name}: {None if d is None else d.dtype}, expected {p['dtype']}")
            continue
        _, _, err, size = _stats(d[rows], d_ref)
        tol = 1e-2 if p["dtype"] in HALF else 1e-5
        metrics[f"{name}_rel_err"] = err / max(size, 1e-30)
        if not err <= tol * size + prob["g_floor"]:
            failures.append(f"{name}: ||error|| / ||ref|| = {metrics[f'{name}_rel_err']:.3g} "
                            f"> {tol:g} (+ fp32 floor {prob['g_floor']:.2g})")
    return dict(metrics, failures=failures)


def linear_problem(case, device, seed, dry=False):
    """Inputs of a fused-linear case and the float64 reference's loss and student gradients."""
    p, kw = _split(case, dry, linear=True)
    n, v, h, dt = p["n"], p["v"], p["h"], p["dtype"]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device).mul_(scale).to(dt)

    # Student logits ~ N(0, 2^2), teacher's ~ N(0, 3^2): the spread of trained LM heads.
    xs, ws = rand(n, h), rand(v, h, scale=2 / h**0.5)
    xt, wt = rand(n, h), rand(v, h, scale=3 / h**0.5)
    y = _labels(n, v, gen, device)
    denom = (y != -100).sum().clamp_min(1).double() if kw["reduction"] == "mean" else 1.0
    ref_kw = {k: x for k, x in kw.items()
              if k not in ("impl", "chunk_budget_bytes", *TRANSFORMS)}
    r64 = [x.double().requires_grad_(i < 2) for i, x in enumerate((xs, ws, xt, wt))]

    def transformed(x, who):   # the head's logit scale, then its softcap (TRL's order)
        x = x * kw.get(f"{who}_logit_scale", 1.0)
        cap = kw.get(f"{who}_softcap")
        return x if cap is None else cap * torch.tanh(x / cap)

    loss = 0.0
    for r in _chunks(slice(0, n), v):
        rows = hrm_loss_reference(transformed(r64[0][r] @ r64[1].T, "student"),
                                  transformed(r64[2][r] @ r64[3].T, "teacher"), y[r],
                                  **{**ref_kw, "reduction": "none"})
        (rows.sum() * 1.7 / denom).backward()
        loss = loss + rows.detach().sum() / denom
    return dict(p=p, kw=kw, inputs=(xs, ws, xt, wt), y=y, ref=(loss, r64[0].grad, r64[1].grad))


def linear_check(prob, backend):
    """fused_linear_hrm_loss(backend=...) on a linear_problem: loss and student gradients."""
    xs, ws, xt, wt = prob["inputs"]
    xs, ws = xs.detach().requires_grad_(), ws.detach().requires_grad_()
    kw = dict(prob["kw"])
    fn = tiled_linear_hrm_loss if kw.pop("impl") == "fused" else fused_linear_hrm_loss
    loss = fn(xs, ws, xt, wt, prob["y"], backend=backend, **kw)
    (loss * 1.7).backward()
    tol = 3e-2 if prob["p"]["dtype"] in HALF else 2e-5   # tests/test_linear.py: of max |ref|
    metrics, failures = {}, []
    for name, a, b in zip(("loss", "dx", "dw"), (loss, xs.grad, ws.grad), prob["ref"]):
        err, scale, _, _ = _stats(a, b)
        metrics[f"{name}_rel_err"] = err / max(scale, 1e-3)
        if not metrics[f"{name}_rel_err"] <= tol:
            failures.append(f"{name}: max |error| / max |ref| = "
                            f"{metrics[f'{name}_rel_err']:.3g} > {tol:g}")
    return dict(metrics, failures=failures)


# ---------------------------------------------------------------------------------------------
# A small model in a training step (mirrors tests/test_compile.py)

class _Student(torch.nn.Module):
    """Embedding, tanh, linear head: the smallest model whose logits feed the loss."""

    def __init__(self, vocab=512, dim=32):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def _batch(device, vocab=512):
    x = torch.randint(0, vocab, (2, 9), device=device)
    y = torch.roll(x, -1, 1)
    y[0, 3] = -100
    u = torch.randn(2, 9, vocab + 8, device=device)   # a padded teacher vocabulary: a view below
    lp, idx = torch.log_softmax(u[..., :vocab] / 2.0, -1).topk(5, -1)
    return [x, y, u, idx, lp]


def _step_loss(model, loss_fn, teachers, x, y, u, idx, lp):
    """A causal-LM step's loss: shifted views, a dense and (if listed) a top-k teacher."""
    z = model(x)[:, :-1]
    loss = loss_fn(z, u[:, :-1, : z.shape[-1]], y[:, 1:])
    if "topk" in teachers:
        loss = loss + loss_fn(z, labels=y[:, 1:], teacher_topk=(idx[:, :-1], lp[:, :-1]))
    return loss


def _model_setup(backend, device):
    torch.manual_seed(0)
    model, batch = _Student().to(device), _batch(device)
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, label_smoothing=0.1, backend=backend)
    try:   # a top-k teacher too, where the backend has a path for it
        _step_loss(model, loss_fn, ("topk",), *batch)
        teachers = ("dense", "topk")
    except ValueError as e:
        if "not available" not in str(e):
            raise
        teachers = ("dense",)
    return model, loss_fn, batch, teachers


def graph_check(backend, device):
    """A training step captured in a CUDA graph, replayed on new data, against eager steps."""
    model, loss_fn, static, teachers = _model_setup(backend, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=False)   # the graph keeps writing the same .grad tensors
        loss = _step_loss(model, loss_fn, teachers, *static)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()             # warm up (Triton JIT, allocator) off the graph
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(3):
        for dst, src in zip(static, _batch(device)):   # new data into the captured inputs
            dst.copy_(src)
        graph.replay()
        ref_opt.zero_grad()
        ref_loss = _step_loss(ref_model, loss_fn, teachers, *static)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(static_loss, ref_loss)
        for a, b in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b)
    return {"teachers": list(teachers), "replays": 3}


def compile_check(backend, device, compiler="inductor"):
    """torch.compile(fullgraph=True) of a step's loss (a graph break raises) against eager."""
    torch._dynamo.reset()
    model, loss_fn, batch, teachers = _model_setup(backend, device)
    params = list(model.parameters())
    expected = _step_loss(model, loss_fn, teachers, *batch)
    grads = torch.autograd.grad(expected, params)
    got = torch.compile(_step_loss, fullgraph=True, backend=compiler)(model, loss_fn, teachers,
                                                                       *batch)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, params), grads):
        torch.testing.assert_close(a, b)
    return {"teachers": list(teachers), "compiler": compiler}


# ---------------------------------------------------------------------------------------------
# compute-sanitizer memcheck

# Run under memcheck: every backend's forward and backward on rows whose length (4099) hits the
# kernels' scalar heads and tails, with ignored and out-of-range labels (a NaN loss, never an
# out-of-bounds read), top-k teachers, and both fused-linear impls.
SANITIZER_SCRIPT = """
import torch
from hrmkernels import available_backends, fused_hrm_loss, fused_linear_hrm_loss
from hrmkernels.experimental import tiled_linear_hrm_loss
v = 4099
z, u = torch.randn(6, v, device="cuda").bfloat16(), torch.randn(6, v, device="cuda")
y = torch.tensor([1, v - 1, -100, v, -2, 7], device="cuda")
lp, idx = torch.log_softmax(u, -1).topk(16, -1)
for b in available_backends("cuda"):
    for teacher in (dict(teacher_logits=u.clone().requires_grad_()), dict(teacher_topk=(idx, lp))):
        for d in ("forward", "reverse"):
            zl = z.clone().requires_grad_()
            try:
                loss = fused_hrm_loss(zl, labels=y, hrm=0.5, temperature=2.0, kl_direction=d,
                                      backend=b, **teacher)
            except ValueError as e:
                if "not available" in str(e):
                    continue
                raise
            loss.backward()
            print("ran", b, *teacher, d, flush=True)
h, w = torch.randn(6, 64, device="cuda"), torch.randn(v, 64, device="cuda") / 8
for fn in (fused_linear_hrm_loss, tiled_linear_hrm_loss):
    fn(h.clone().requires_grad_(), w, h, w, y, 0.5).backward()
    print("ran linear", fn.__name__, flush=True)
torch.cuda.synchronize()   # sync-ok: every kernel has run before the tool's summary
print("GPUCHECK-SANITIZER-DONE")
"""


def memcheck_verdict(out, returncode, timed_out):
    """("ok" | "fail" | "skipped" | "error", why) from compute-sanitizer's output.

    A device the tool refuses ("Device not supported", then error 999 at the first allocation,
    as seen on one runtime) is "skipped"; memory errors are "fail"; a script that did not
    finish for another reason is "error".
    """
    done = "GPUCHECK-SANITIZER-DONE" in out
    refusal = re.search(r".*(not supported|error 999|CUDA_ERROR_UNKNOWN).*", out, re.I)
    errors = re.search(r"ERROR SUMMARY: (\d+) errors?", out)
    if not done and refusal:
        return "skipped", f"compute-sanitizer refused the device: {refusal[0].strip()[:300]}"
    if errors and int(errors[1]) > 0:
        found = re.findall(r"^=+ +(?:Invalid|Out of bounds|Misaligned|Uninitialized).*$", out, re.M)
        return "fail", f"{errors[0]}: " + " | ".join(x.strip("= ") for x in found[:5])
    if timed_out:
        return "error", "timed out"
    if not done or returncode != 0:
        return "error", f"exit status {returncode}: {out[-1500:]}"
    return "ok", None
