"""fused_linear_hrm_loss with a sparse teacher (teacher_topk=) against the float64 reference.

The reference materialises the student's logits ``transform(hidden @ W.T + b)`` in float64 and
differentiates hrm_loss_topk_reference on them with autograd; the fused path must give the same
loss, components and gradients of hidden, weight and bias without more than a chunk of logits.
Each case changes one thing from BASE. V = 197: not a power of two, several chunks of rows.
"""
import pytest
import torch

from hrmkernels import FusedLinearHRMLoss, available_backends, fused_hrm_loss, fused_linear_hrm_loss
from hrmkernels.reference import hrm_loss_topk_reference

from conftest import DEVICE

BASE = dict(lead=(2, 5), h=24, v=197, k=9, dtype=torch.float64, bias=True, mode="rest",
            direction="forward", jsd=None, t=2.0, eps=0.1, hrm=0.6, ignore="some",
            reduction="mean", num_items=None, budget=3 * 197 * 8, scale=1.0, cap=None,
            teacher=None, shifted=False)
TOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 3e-2}
CASES = {
    "base": {},
    "renormalize": dict(mode="renormalize"),
    "reverse": dict(direction="reverse"),
    "renormalize-reverse": dict(mode="renormalize", direction="reverse"),
    "jsd": dict(jsd=0.3),
    "renormalize-jsd": dict(mode="renormalize", jsd=0.6),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "none-reverse-jsd": dict(reduction="none", jsd=0.5, mode="renormalize"),
    "num-items": dict(num_items=11),
    "all-ignored": dict(ignore="all"),
    "one-row": dict(lead=(1,)),
    "one-chunk": dict(budget=None),
    "row-chunks": dict(budget=1),
    "no-bias": dict(bias=False),
    "hrm0": dict(hrm=0.0),
    "t1": dict(t=1.0, eps=0.0),
    "k=V": dict(k=197),
    "k=1": dict(k=1),
    "scale-softcap": dict(scale=1.7, cap=4.0),
    "softcap-reverse-none": dict(scale=0.6, cap=3.0, direction="reverse", reduction="none"),
    "masked-vocab": dict(teacher="masked", eps=0.0),   # -inf student logits outside the top-k
    "sampled": dict(teacher="sampled"),          # distinct ids, -inf padding, tail mass 0
    "sampled-jsd": dict(teacher="sampled", jsd=0.4),
    "shifted": dict(shifted=True),               # HF labels: hidden[:, :-1] views
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16-softcap-jsd": dict(dtype=torch.bfloat16, scale=1.7, cap=4.0, jsd=0.5),
}
TRITON_CASES = ["base", "renormalize-reverse", "jsd", "none", "sampled", "scale-softcap",
                "all-ignored"]


def _transformed(x, scale, cap):
    return cap * torch.tanh(scale * x / cap) if cap is not None else scale * x


def _inputs(c):
    dt, v, k = c["dtype"], c["v"], c["k"]
    lead = (*c["lead"][:-1], c["lead"][-1] + 1) if c["shifted"] else c["lead"]
    xs = torch.randn(*lead, c["h"], device=DEVICE).to(dt).requires_grad_()
    ws = (torch.randn(v, c["h"], device=DEVICE) * 0.4).to(dt).requires_grad_()
    bs = (torch.randn(v, device=DEVICE) * 0.5).to(dt) if c["bias"] else None
    u = torch.randn(*lead, v, device=DEVICE) * 3
    if c["teacher"] == "sampled":   # 12 draws: ids with their log-frequencies, -inf padding
        from hrmkernels import teacher_sample
        idx, lp = teacher_sample(logits=u, n=12, temperature=c["t"],
                                 generator=torch.Generator(DEVICE).manual_seed(1))
    else:
        lp, idx = torch.log_softmax(u / c["t"], -1).topk(k, -1)
        idx = idx.flip(-1)                         # ids in no particular order
        lp = lp.flip(-1)
    if c["teacher"] == "masked":                   # the student masks 40% of the rest
        keep = torch.zeros(*lead, v, dtype=torch.bool, device=DEVICE).scatter_(-1, idx, True)
        masked = ~keep.any(tuple(range(len(lead)))) & (torch.rand(v, device=DEVICE) < 0.4)
        bs = torch.where(masked, float("-inf"), bs.float()).to(dt)
    if bs is not None:
        bs.requires_grad_()
    y = torch.randint(0, v, c["lead"], device=DEVICE)
    if c["teacher"] == "masked":
        y = torch.where(masked[y], idx[..., 0], y)   # labels never masked
    if c["ignore"] == "some":
        y.view(-1)[::3] = -100
    elif c["ignore"] == "all":
        y.fill_(-100)
    if c["shifted"]:   # labels as HF gives them: position i + 1 is predicted at position i
        y = torch.cat([torch.full_like(y[..., :1], -100), y], -1)
    return xs, ws, bs, (idx, lp), y


def _options(c):
    div = dict(jsd_beta=c["jsd"]) if c["jsd"] is not None else dict(kl_direction=c["direction"])
    return dict(topk_mode=c["mode"], temperature=c["t"], label_smoothing=c["eps"],
                reduction=c["reduction"], num_items_in_batch=c["num_items"],
                return_components=True, **div)


def _reference(c, xs, ws, bs, topk, y):
    r = [t.detach().double().requires_grad_() if t is not None else None for t in (xs, ws, bs)]
    z = _transformed(r[0] @ r[1].T + (r[2] if bs is not None else 0), c["scale"], c["cap"])
    idx, lp = topk
    if c["shifted"]:
        z, idx, lp, y = z[..., :-1, :], idx[..., :-1, :], lp[..., :-1, :], y[..., 1:]
    out = hrm_loss_topk_reference(z, (idx, lp.double()), y, c["hrm"], **_options(c))
    return out, r


def _close(name, a, e, tol):
    a = a.detach().double()
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    scale = max(e.abs().max().item(), 1e-3) if e.numel() else 1.0
    err = (a - e).abs().max().item() / scale if e.numel() else 0.0
    assert err <= tol, f"{name}: max error {err:.2e} (relative to {scale:.3g}) > {tol:.0e}"


def check(case, backend, dtype=None):
    c = {**BASE, **CASES[case]}
    if dtype is not None and c["dtype"] == torch.float64:
        c["dtype"] = dtype
    xs, ws, bs, topk, y = _inputs(c)
    out = fused_linear_hrm_loss(xs, ws, None, None, y, c["hrm"], student_bias=bs,
                                teacher_topk=topk, student_logit_scale=c["scale"],
                                student_softcap=c["cap"], shift_labels=c["shifted"],
                                chunk_budget_bytes=c["budget"], backend=backend, **_options(c))
    ref, r = _reference(c, xs, ws, bs, topk, y)
    tol = TOL[c["dtype"]]
    for name in ("loss", "ce", "kl", "entropy"):
        _close(name, getattr(out, name), getattr(ref, name).detach(), tol)
    g = torch.rand_like(ref.loss) + 0.5 if c["reduction"] == "none" else torch.tensor(1.7)
    leaves = [t for t in (xs, ws, bs) if t is not None]
    grads = torch.autograd.grad((out.loss * g.to(out.loss)).sum(), leaves)
    refs = torch.autograd.grad((ref.loss * g.to(ref.loss)).sum(), [t for t in r if t is not None])
    for name, got, want, leaf in zip(("d hidden", "d weight", "d bias"), grads, refs, leaves):
        assert got.dtype == leaf.dtype, name
        _close(name, got, want, tol)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_linear_hrm_loss_topk_chunked(case):
    check(case, "torch")


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="no Triton backend")
@pytest.mark.parametrize("case", TRITON_CASES)
def test_linear_hrm_loss_topk_chunked_triton(case):
    check(case, "triton", dtype=torch.float32)


def test_linear_hrm_loss_topk_equals_the_logits_api_and_module():
    """Same values and hidden gradient as fused_hrm_loss on the materialised logits, any
    backend; the module passes teacher_topk and topk_mode through."""
    c = {**BASE, "dtype": torch.float32, "mode": "renormalize", "jsd": 0.3}
    xs, ws, bs, topk, y = _inputs(c)
    opts = {k: v for k, v in _options(c).items() if k != "return_components"}
    loss = fused_linear_hrm_loss(xs, ws, None, None, y, 0.6, student_bias=bs, teacher_topk=topk,
                                 **opts)
    logits = xs @ ws.T + bs
    want = fused_hrm_loss(logits, labels=y, hrm=0.6, teacher_topk=topk, **opts)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, xs)[0], torch.autograd.grad(want, xs)[0])
    module = FusedLinearHRMLoss(0.6, **{k: v for k, v in opts.items()
                                        if k != "num_items_in_batch"})
    torch.testing.assert_close(module(xs, ws, None, None, y, student_bias=bs, teacher_topk=topk),
                               loss)


def test_linear_hrm_loss_topk_holds_one_chunk_of_logits(monkeypatch):
    """The launchers see chunks of at most the budget's rows, never N x V."""
    from hrmkernels.kernels import pytorch
    seen = []
    fwd = pytorch.hrm_loss_topk_fwd
    monkeypatch.setattr(pytorch, "hrm_loss_topk_fwd",
                        lambda z, *a: seen.append(tuple(z.shape)) or fwd(z, *a))
    c = {**BASE, "dtype": torch.float32}
    xs, ws, bs, topk, y = _inputs(c)
    fused_linear_hrm_loss(xs, ws, None, None, y, 0.5, teacher_topk=topk, backend="torch",
                          chunk_budget_bytes=4 * 197 * 4).backward()
    assert seen == [(1, 4, 197), (1, 4, 197), (1, 2, 197)]   # 10 rows



def test_linear_hrm_loss_topk_default_budget_is_half_the_dense_one(monkeypatch):
    """No teacher chunk exists with a top-k teacher: its default budget is 512 MiB (1024 rows
    of fp32 logits at V = 128256, measured within a quarter of the logits path), the dense
    path's 1 GiB."""
    from hrmkernels.autograd import linear_hrm_loss as autograd
    budgets = []
    apply = autograd.ChunkedLinearHRMFunction.apply
    monkeypatch.setattr(autograd.ChunkedLinearHRMFunction, "apply",
                        lambda *a: budgets.append(a[12]) or apply(*a))
    c = {**BASE, "dtype": torch.float32}
    xs, ws, bs, topk, y = _inputs(c)
    fused_linear_hrm_loss(xs, ws, None, None, y, 0.5, teacher_topk=topk, backend="torch")
    fused_linear_hrm_loss(xs, ws, xs, ws, y, 0.5, backend="torch")
    assert budgets == [1 << 29, 1 << 30]

BAD = {
    "with-teacher-head": (dict(teacher_hidden=torch.randn(2, 3, 6), teacher_weight=torch.randn(
        11, 6)), ValueError, "pass teacher_hidden and teacher_weight as None"),
    "with-teacher-logits": (dict(teacher_logits=torch.randn(2, 3, 11)), ValueError,
                            "teacher_topk and teacher_logits"),
    "teacher-softcap": (dict(teacher_softcap=30.0), ValueError, "log-probabilities are used as"),
    "fused": (dict(impl="fused"), TypeError, "impl"),   # the tiles: hrmkernels.experimental
    "shape": (dict(teacher_topk=(torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, 4, 3))),
              ValueError, "student_hidden' leading shape"),
    "k>V": (dict(teacher_topk=(torch.zeros(2, 3, 12, dtype=torch.long), torch.zeros(2, 3, 12))),
            ValueError, "only V=11"),
    "not-a-pair": (dict(teacher_topk=torch.zeros(2, 3, 4)), TypeError, "must be a pair"),
    "mode": (dict(topk_mode="ghost"), ValueError, "topk_mode must be one of"),
    "backend": (dict(backend="cpu"), ValueError, "no top-k teacher path"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_linear_hrm_loss_topk_bad_input(case):
    change, error, words = BAD[case]
    kw = {"teacher_hidden": None, "teacher_weight": None,
          "teacher_topk": (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4)), **change}
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(")):
        fused_linear_hrm_loss(torch.randn(2, 3, 8), torch.randn(11, 8), kw.pop("teacher_hidden"),
                              kw.pop("teacher_weight"), torch.zeros(2, 3, dtype=torch.long), 0.5,
                              **kw)
