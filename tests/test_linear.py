"""fused_linear_hrm_loss (both stages) against the reference on explicit float64 logits.

Each case changes one thing from BASE, so a failure names its cause. The reference sees the
very same input values, upcast to float64, with ``hidden @ weight.T + bias`` materialised and
differentiated by autograd: loss and every gradient (hidden, weight, bias, and the teacher's
when it requires one) are compared. Stage 2 runs under the Triton interpreter on CPU, so its
sizes stay tiny: V = 197 is neither a power of two nor a multiple of the vocabulary tile.
"""
import pytest
import torch

from hrmkernels import available_backends, fused_hrm_loss
from hrmkernels.api.linear_hrm_loss import FusedLinearHRMLoss, fused_linear_hrm_loss
from hrmkernels.autograd.linear_hrm_loss import chunk_rows
from hrmkernels.experimental import tiled_linear_hrm_loss
from hrmkernels.reference import hrm_loss_reference

from conftest import DEVICE, requires_cuda

# impl: the chunked loss (public) or the logit tiles on chip (hrmkernels.experimental)
IMPLS = {"chunked": fused_linear_hrm_loss, "fused": tiled_linear_hrm_loss}


def _loss(impl="chunked", **kw):
    return IMPLS[impl], kw

BASE = dict(lead=(2, 5), hs=24, ht=20, v=197, dtype=torch.float64, bias=True, teacher="hidden",
            pad=0, teacher_grad=False, frozen_weight=False, direction="forward", t=2.0, eps=0.1,
            hrm=0.6, ignore="some", reduction="mean", num_items=None, budget=6 * 197 * 8,
            components=False, masked=False, shifted=False, jsd=None, s_scale=1.0, t_scale=1.0,
            s_cap=None, t_cap=None, floor=1e-3, fp32_tol=0.0)
SOFTCAP = dict(s_scale=1.7, s_cap=4.0, t_scale=0.6, t_cap=3.0)   # logits ~ N(0, 2^2): tanh bends
# Relative tolerance (of the largest reference value) per input dtype. float64 runs the torch
# backend in float64 (the label-smoothing constant of its backward is an fp32 literal, ~3e-8).
TOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 3e-2}

CASES = {
    "base": {},
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "reverse": dict(direction="reverse"),
    "reverse-none": dict(direction="reverse", reduction="none", teacher_grad=True),
    "t1": dict(t=1.0, eps=0.0),
    "hrm0": dict(hrm=0.0),
    "hrm0-components": dict(hrm=0.0, components=True, teacher_grad=True),
    "components": dict(components=True),
    "no-ignored": dict(ignore="none"),
    "all-ignored": dict(ignore="all"),
    "no-bias": dict(bias=False),
    "teacher-grad": dict(teacher_grad=True),
    "frozen-weight": dict(frozen_weight=True),
    "padded-teacher": dict(pad=13),
    "same-hidden": dict(ht=24),
    "teacher-logits": dict(teacher="logits", pad=5),
    "teacher-logits-grad": dict(teacher="logits", teacher_grad=True, reduction="none"),
    "num-items": dict(num_items=7),
    "num-items-tensor": dict(num_items="tensor"),
    "one-chunk": dict(budget=None),
    "row-chunks": dict(budget=1),
    "masked-vocab": dict(masked=True, eps=0.0),   # -inf biases: masked vocabulary entries
    "shifted": dict(shifted=True),                # hidden[:, :-1], as causal LM losses pass it
    "1d": dict(lead=(9,)),
    "3d": dict(lead=(2, 2, 3)),
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16, teacher_grad=True),
    "jsd": dict(jsd=0.3, teacher_grad=True),
    "jsd-none": dict(jsd=0.7, reduction="none", teacher_grad=True, components=True),
    "jsd-bf16": dict(jsd=0.5, dtype=torch.bfloat16),
    "scale": dict(s_scale=1.7, t_scale=0.6, teacher_grad=True),
    "softcap": dict(**SOFTCAP, teacher_grad=True, components=True),
    "softcap-saturated": dict(s_scale=3.0, s_cap=0.5, t_cap=0.7, teacher_grad=True),
    "softcap-student-only": dict(s_cap=2.0, teacher_grad=True),
    "softcap-none": dict(**SOFTCAP, reduction="none", teacher_grad=True),
    "softcap-no-bias": dict(**SOFTCAP, bias=False, teacher_grad=True),
    "softcap-frozen-weight": dict(**SOFTCAP, frozen_weight=True),
    "softcap-row-chunks": dict(**SOFTCAP, budget=1, teacher_grad=True),
    "softcap-teacher-logits": dict(s_scale=1.7, s_cap=4.0, teacher="logits", teacher_grad=True),
    "softcap-jsd": dict(**SOFTCAP, jsd=0.4, teacher_grad=True, components=True),
    "softcap-fp32": dict(**SOFTCAP, dtype=torch.float32, teacher_grad=True),
    "softcap-bf16": dict(**SOFTCAP, dtype=torch.bfloat16, teacher_grad=True),
    "softcap-bf16-jsd-none": dict(**SOFTCAP, dtype=torch.bfloat16, jsd=0.6, reduction="none"),
    # Logits ~1e4. fp32 rounds them by ~1e-3 (test_hrm_loss.py's floor for fp32 arithmetic is
    # 1e-6 |logit| / T ~ 5e-3): values are judged against 1 (floor), not against a peaked row's
    # tiny entropy (~0.04), and the JSD's gradient, which needs lq = a - lse(a) (rounded by
    # ulp(5e3) = 5e-4), gets 2e-4 relative in fp32 (fp32_tol; the KL's cancels the lse).
    "magnitude-1e4": dict(s_scale=4e3, t_scale=3e3, t=4.0, components=True, teacher_grad=True,
                          floor=1.0),
    "magnitude-1e4-jsd": dict(s_scale=4e3, t_scale=3e3, jsd=0.5, components=True, floor=1.0,
                              fp32_tol=2e-4),
}
# Stage 2 under the interpreter: fp32 (its arithmetic), the cases that change what it computes.
FUSED_CASES = ["base", "sum", "none", "reverse-none", "t1", "hrm0", "hrm0-components",
               "all-ignored", "no-bias", "teacher-grad", "frozen-weight", "padded-teacher",
               "same-hidden", "teacher-logits", "teacher-logits-grad", "num-items-tensor",
               "masked-vocab", "shifted", "1d", "bf16", "components", "jsd", "jsd-none",
               "jsd-bf16", "scale", "softcap", "softcap-saturated", "softcap-student-only",
               "softcap-none", "softcap-no-bias", "softcap-teacher-logits", "softcap-jsd",
               "softcap-bf16", "softcap-bf16-jsd-none", "magnitude-1e4", "magnitude-1e4-jsd"]
TRITON_CHUNKED_CASES = ["base", "reverse-none", "teacher-logits-grad", "jsd-none", "softcap-jsd"]


def _inputs(c):
    """(args, kwargs) for fused_linear_hrm_loss, and the leaves that require grad, by name."""
    dt = c["dtype"]
    rand = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE) * scale).to(dt)  # noqa: E731
    lead, v = c["lead"], c["v"]
    hlead = (*lead[:-1], lead[-1] + 1) if c["shifted"] else lead
    leaves = dict(xs=rand(*hlead, c["hs"]), ws=rand(v, c["hs"], scale=0.4))
    if c["bias"]:
        leaves["bs"] = rand(v, scale=0.5)
    if c["teacher"] == "hidden":
        leaves.update(xt=rand(*hlead, c["ht"]), wt=rand(v + c["pad"], c["ht"], scale=0.6))
        if c["bias"]:
            leaves["bt"] = rand(v, scale=0.5)
    else:
        leaves["u"] = rand(*lead, v + c["pad"], scale=3.0)
    if c["masked"]:   # columns 1, 5, 9, ... masked in both models; labels avoid them
        for k in ("bs", "bt"):
            leaves[k][1::4] = float("-inf")
    for k, t in leaves.items():
        teacher = k in ("xt", "wt", "bt", "u")
        t.requires_grad_(c["teacher_grad"] if teacher else not (k == "ws" and c["frozen_weight"]))
    y = torch.randint(0, v, lead, device=DEVICE)
    if c["masked"]:
        y = y // 4 * 4
    if c["ignore"] == "some":
        y.view(-1)[::3] = -100
    elif c["ignore"] == "all":
        y.fill_(-100)
    return leaves, y


def _hidden(c, x):
    return x[..., :-1, :] if c["shifted"] and x is not None else x


def _call(c, leaves, y, **kw):
    v, g = c["v"], leaves.get
    teacher = dict(teacher_bias=g("bt"), teacher_logit_scale=c["t_scale"],
                   teacher_softcap=c["t_cap"])
    if c["teacher"] == "hidden":
        xt, wt = _hidden(c, g("xt")), g("wt")[:v]     # a padded teacher vocabulary: a view
    else:
        xt = wt = None
        teacher = dict(teacher_logits=g("u")[..., :v])
    if c["jsd"] is not None:
        kw = dict(kw, jsd_beta=c["jsd"])
    num_items = c["num_items"]
    if num_items == "tensor":
        num_items = torch.tensor(13, device=DEVICE)
    fn, kw = _loss(**kw)
    return fn(
        _hidden(c, g("xs")), g("ws"), xt, wt, y, c["hrm"], student_bias=g("bs"), **teacher,
        student_logit_scale=c["s_scale"], student_softcap=c["s_cap"],
        temperature=c["t"], label_smoothing=c["eps"], kl_direction=c["direction"],
        reduction=c["reduction"], num_items_in_batch=num_items, chunk_budget_bytes=c["budget"],
        return_components=c["components"], **kw)


def _transformed(x, scale, cap):
    """TRL's order: the logit scale, then the softcap (autograd differentiates the tanh)."""
    return cap * torch.tanh(scale * x / cap) if cap is not None else scale * x


def _reference(c, leaves, y):
    r = {k: t.detach().double().requires_grad_(t.requires_grad) for k, t in leaves.items()}
    v = c["v"]
    z = _hidden(c, r["xs"]) @ r["ws"].T + (r["bs"] if "bs" in r else 0)
    z = _transformed(z, c["s_scale"], c["s_cap"])
    if c["teacher"] == "hidden":
        u = _hidden(c, r["xt"]) @ r["wt"][:v].T + (r["bt"] if "bt" in r else 0)
        u = _transformed(u, c["t_scale"], c["t_cap"])
    else:
        u = r["u"][..., :v]
    num_items = c["num_items"]
    if num_items == "tensor":
        num_items = torch.tensor(13, device=DEVICE)
    divergence = (dict(jsd_beta=c["jsd"]) if c["jsd"] is not None
                  else dict(kl_direction=c["direction"]))
    out = hrm_loss_reference(z, u, y, c["hrm"], temperature=c["t"], label_smoothing=c["eps"],
                             reduction=c["reduction"], num_items_in_batch=num_items,
                             return_components=True, **divergence)
    return out, r


def _close(name, actual, expected, tol, floor=1e-3):
    actual = actual.detach().double()
    scale = max(expected.abs().max().item(), floor) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert err <= tol, f"{name}: max error {err:.2e} (relative to {scale:.3g}) > {tol:.0e}"


def _check(case, fp64_as=None, **kw):
    """Run `case` with the keywords kw; fp64_as: the dtype that replaces float64 inputs."""
    c = {**BASE, **CASES[case]}
    if fp64_as is not None and c["dtype"] == torch.float64:
        c["dtype"] = fp64_as
    leaves, y = _inputs(c)
    out = _call(c, leaves, y, **kw)
    ref, r = _reference(c, leaves, y)
    ref_loss = ref.loss
    loss = out.loss if c["components"] else out
    tol = TOL[c["dtype"]] if c["dtype"] == torch.float64 else max(TOL[c["dtype"]], c["fp32_tol"])
    _close("loss", loss, ref_loss.detach(), tol)
    if c["components"]:
        for name in ("ce", "kl", "entropy"):
            _close(name, getattr(out, name), getattr(ref, name), tol, c["floor"])
    # A grad_output other than 1: random per token for "none", a scalar otherwise.
    cot = torch.rand_like(ref_loss) + 0.5 if c["reduction"] == "none" else torch.tensor(1.7)
    names = [k for k, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad((loss * cot.to(loss)).sum(), [leaves[k] for k in names])
    refs = torch.autograd.grad((ref_loss * cot.to(ref_loss)).sum(), [r[k] for k in names],
                               allow_unused=True, materialize_grads=True)   # hrm = 0: no teacher
    for k, g, e in zip(names, grads, refs):
        assert g.dtype == leaves[k].dtype, f"d {k}: dtype {g.dtype}"
        _close(f"d {k}", g, e, tol)


CHUNKED_BACKENDS = [b for b in ("torch", "cpu") if b in available_backends(DEVICE)]


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_linear_hrm_loss_chunked(case, backend):
    _check(case, impl="chunked", backend=backend)


@pytest.mark.parametrize("case", TRITON_CHUNKED_CASES)
def test_linear_hrm_loss_chunked_triton(case):
    _check(case, fp64_as=torch.float32, impl="chunked", backend="triton")


@pytest.mark.parametrize("case", FUSED_CASES)
def test_linear_hrm_loss_fused(case):
    _check(case, fp64_as=torch.float32, impl="fused")


@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_linear_hrm_loss_fused_vocab_split(split, beta, scale):
    """The ranges' online states merge as exactly as one range (forward only; the merge), also
    at logits ~1e4 where a rounded log-sum-exp would shift the ranges' weights."""
    from hrmkernels.kernels.triton import linear as k
    xs, ws, xt, wt = (torch.randn(s, device=DEVICE) for s in ((7, 16), (197, 16), (7, 8), (197, 8)))
    xs, xt = xs * scale, xt * scale
    y = torch.randint(0, 197, (7,), device=DEVICE)
    y[2] = -100
    ws[5] = 0
    out = k.linear_hrm_loss_fwd(xs, ws, None, xt, wt, None, None, y, 0.5, 1.5, 0.1, -100, beta,
                                split=split)
    ref = hrm_loss_reference((xs @ ws.T).double(), (xt @ wt.T).double(), y, 0.5, temperature=1.5,
                             label_smoothing=0.1, jsd_beta=beta, reduction="none",
                             return_components=True)
    for name, a, e in zip(("loss", "ce", "kl", "entropy"), out, (*ref, ref.entropy)):
        _close(name, a, e, 2e-5 if scale == 1 else 1e-5 * scale)


def test_linear_hrm_loss_no_grad_and_module():
    c = {**BASE, "dtype": torch.float32}
    leaves, y = _inputs(c)
    loss = _call(c, leaves, y)
    with torch.no_grad():
        loss_ng = _call(c, leaves, y)
    assert not loss_ng.requires_grad
    module = FusedLinearHRMLoss(c["hrm"], temperature=c["t"], label_smoothing=c["eps"],
                                chunk_budget_bytes=c["budget"])
    loss_m = module(leaves["xs"], leaves["ws"], leaves["xt"], leaves["wt"], y,
                    student_bias=leaves["bs"], teacher_bias=leaves["bt"])
    torch.testing.assert_close(loss_ng, loss.detach())
    torch.testing.assert_close(loss_m, loss)
    assert "chunk_budget_bytes=" in repr(module)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_linear_hrm_loss_autocast(impl):
    """Under autocast, fp32 weights and hidden states meet in autocast's dtype, as in F.linear."""
    c = {**BASE, "dtype": torch.float32}
    leaves, y = _inputs(c)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = _call(c, leaves, y, impl=impl)
        grads = torch.autograd.grad(loss, [leaves["xs"], leaves["ws"]])
    half = {k: t.detach().to(torch.bfloat16).requires_grad_(k in ("xs", "ws"))
            for k, t in leaves.items()}
    loss_h = _call(c, half, y, impl=impl)
    grads_h = torch.autograd.grad(loss_h, [half["xs"], half["ws"]])
    torch.testing.assert_close(loss, loss_h)
    for g, g_h in zip(grads, grads_h):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_h.float())


def test_linear_hrm_loss_chunk_rows():
    x32, w16 = torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.bfloat16)
    row = 100 * 4 + 100 * 4   # student logits (fp32) + teacher logits (fp32), fp32 weights
    assert chunk_rows(1000, 100, 10 * row, x32, x32, x32, None, False) == 10
    assert chunk_rows(1000, 100, 10 * row + 1, x32, x32, x32, None, False) == 10
    assert chunk_rows(1001, 100, 10 * row, x32, x32, x32, None, False) == 10   # 101 balanced chunks
    assert chunk_rows(7, 100, 1, x32, x32, x32, None, False) == 1
    assert chunk_rows(7, 100, 1 << 40, x32, x32, x32, None, False) == 7
    # bf16 weights add the rounded dz (2 B); teacher logits given: no teacher buffer.
    assert chunk_rows(100, 100, 600 * 10, w16, w16, None, torch.zeros(1), False) == 10
    # a student softcap's derivative: one more fp32 row
    assert chunk_rows(100, 100, 1000 * 10, w16, w16, None, torch.zeros(1), False, True) == 10


def _bad_inputs():
    xs, ws, bs = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randn(11)
    xt, wt = torch.randn(2, 3, 6), torch.randn(11, 6)
    y = torch.randint(0, 11, (2, 3))
    return dict(student_hidden=xs, student_weight=ws, teacher_hidden=xt, teacher_weight=wt,
                labels=y, hrm=0.5, student_bias=bs)


BAD = {
    "hidden-weight-size": (dict(student_weight=torch.randn(11, 7)), ValueError, "student_weight"),
    "weight-1d": (dict(student_weight=torch.randn(88)), ValueError, "student_weight"),
    "teacher-weight-size": (dict(teacher_weight=torch.randn(11, 8)), ValueError, "teacher_weight"),
    "teacher-vocab": (dict(teacher_weight=torch.randn(16, 6)), ValueError, "teacher_weight[:11]"),
    "teacher-lead": (dict(teacher_hidden=torch.randn(3, 2, 6)), ValueError, "teacher_hidden"),
    "bias-shape": (dict(student_bias=torch.randn(12)), ValueError, "student_bias"),
    "bias-dtype": (dict(student_bias=torch.randn(11, dtype=torch.float64)), TypeError,
                   "student_bias"),
    "weight-dtype": (dict(student_weight=torch.randn(11, 8, dtype=torch.bfloat16)), TypeError,
                     "student_weight"),
    "hidden-int": (dict(student_hidden=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError,
                   "student_hidden"),
    "hidden-list": (dict(student_hidden=[[1.0]]), TypeError, "student_hidden"),
    "labels-float": (dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
    "labels-shape": (dict(labels=torch.zeros(6, dtype=torch.int64)), ValueError, "labels"),
    "weight-device": (dict(student_weight=torch.randn(11, 8, device="meta")), ValueError,
                      "student_weight is on meta"),
    "teacher-device": (dict(teacher_hidden=torch.randn(2, 3, 6, device="meta")), ValueError,
                       "teacher_hidden is on meta"),
    "labels-device": (dict(labels=torch.zeros(2, 3, dtype=torch.int64, device="meta")),
                      ValueError, "labels is on meta"),
    "teacher-twice": (dict(teacher_logits=torch.randn(2, 3, 11)), ValueError, "not both"),
    "teacher-missing": (dict(teacher_weight=None), ValueError, "teacher_weight"),
    "logits-vocab": (dict(teacher_hidden=None, teacher_weight=None,
                          teacher_logits=torch.randn(2, 3, 12)), ValueError, "[..., :11]"),
    "impl": (dict(impl="fused"), TypeError, "impl"),   # the tiles: hrmkernels.experimental
    "budget": (dict(chunk_budget_bytes=0), ValueError, "chunk_budget_bytes"),
    "fused-backend": (dict(tiles=True, backend="torch"), ValueError, "backend"),
    "hrm": (dict(hrm=-1.0), ValueError, "hrm"),
    "scale-zero": (dict(student_logit_scale=0.0), ValueError, "student_logit_scale must be a "
                   "positive finite float"),
    "scale-inf": (dict(teacher_logit_scale=float("inf")), ValueError, "teacher_logit_scale"),
    "scale-nan": (dict(student_logit_scale=float("nan")), ValueError, "student_logit_scale"),
    "scale-none": (dict(student_logit_scale=None), TypeError, "student_logit_scale"),
    "scale-bool": (dict(teacher_logit_scale=True), TypeError, "teacher_logit_scale"),
    "softcap-negative": (dict(student_softcap=-30.0), ValueError,
                         "student_softcap must be a positive finite float or None"),
    "softcap-str": (dict(teacher_softcap="30"), TypeError, "teacher_softcap"),
    "softcap-teacher-logits": (dict(teacher_hidden=None, teacher_weight=None, teacher_softcap=30.0,
                                    teacher_logits=torch.randn(2, 3, 11)), ValueError,
                               "teacher_logits are used as given"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_linear_hrm_loss_bad_input(case):
    change, error, words = BAD[case]
    kw = {**_bad_inputs(), **change}
    fn = tiled_linear_hrm_loss if kw.pop("tiles", False) else fused_linear_hrm_loss
    args = [kw.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden",
                                "teacher_weight", "labels", "hrm")]
    with pytest.raises(error, match=words.replace("[", r"\[").replace(".", r"\.")):
        fn(*args, **kw)


def test_linear_hrm_loss_module_bad_transform():
    with pytest.raises(ValueError, match="student_softcap"):
        FusedLinearHRMLoss(0.5, student_softcap=0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_hrm_loss_transforms_equal_the_logits_api(backend):
    """fused_linear_hrm_loss with scales and softcaps == fused_hrm_loss on the transformed
    logits (computed in fp32 by autograd): values and every head gradient."""
    xs, ws, bs = torch.randn(6, 16), torch.randn(97, 16) * 0.5, torch.randn(97)
    xt, wt, bt = torch.randn(6, 12), torch.randn(97, 12) * 0.7, torch.randn(97)
    leaves = [t.to(DEVICE).requires_grad_() for t in (xs, ws, bs, xt, wt, bt)]
    y = torch.randint(0, 97, (6,), device=DEVICE)
    y[1] = -100
    kw = dict(temperature=1.5, jsd_beta=0.3, backend=backend, return_components=True)
    caps = dict(student_logit_scale=1.3, student_softcap=3.0, teacher_logit_scale=0.8,
                teacher_softcap=2.5)
    out = fused_linear_hrm_loss(leaves[0], leaves[1], leaves[3], leaves[4], y, 0.5,
                                student_bias=leaves[2], teacher_bias=leaves[5], **caps, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    z = _transformed(leaves[0] @ leaves[1].T + leaves[2], 1.3, 3.0)
    u = _transformed(leaves[3] @ leaves[4].T + leaves[5], 0.8, 2.5)
    ref = fused_hrm_loss(z, u, y, 0.5, **kw)
    ref_grads = torch.autograd.grad(ref.loss, leaves)
    for a, b in zip((*out, out.entropy, *grads), (*ref, ref.entropy, *ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_linear_hrm_loss_full_size_cuda(impl):
    """bf16 at H=4096, V=128256 (a Llama-3 head) against float64 on the same values; no sync."""
    n, h, v = 1024, 4096, 128256
    xs = torch.randn(n, h, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    ws = (torch.randn(v, h, device=DEVICE) * h ** -0.5).to(torch.bfloat16).requires_grad_()
    xt = torch.randn(n, h, device=DEVICE, dtype=torch.bfloat16)
    wt = (torch.randn(v, h, device=DEVICE) * 2 * h ** -0.5).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device=DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = IMPLS[impl](xs, ws, xt, wt, y, 0.5, temperature=2.0)
        gx, gw = torch.autograd.grad(loss, (xs, ws))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    r = [t.detach().double().requires_grad_() for t in (xs, ws)]
    ref = hrm_loss_reference(r[0] @ r[1].T, xt.double() @ wt.double().T, y, 0.5, temperature=2.0)
    ref_g = torch.autograd.grad(ref, r)
    _close("loss", loss, ref.detach(), 1e-4)
    _close("d xs", gx, ref_g[0], TOL[torch.bfloat16])
    _close("d ws", gw, ref_g[1], TOL[torch.bfloat16])


def test_linear_hrm_loss_shift_labels_takes_hugging_face_labels():
    xs, xt = torch.randn(2, 6, 8, device=DEVICE), torch.randn(2, 6, 5, device=DEVICE)
    ws, wt = torch.randn(30, 8, device=DEVICE), torch.randn(30, 5, device=DEVICE)
    y = torch.randint(0, 30, (2, 6), device=DEVICE)
    kw = dict(temperature=2.0, reduction="none")
    expected = fused_linear_hrm_loss(xs[:, :-1], ws, xt[:, :-1], wt, y[:, 1:], 0.5, **kw)
    torch.testing.assert_close(fused_linear_hrm_loss(xs, ws, xt, wt, y, 0.5, shift_labels=True,
                                                     **kw), expected)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_linear_hrm_loss_without_a_teacher_is_the_fused_linear_cross_entropy(impl):
    if impl == "fused" and "triton" not in available_backends(DEVICE):
        pytest.skip("impl='fused' needs Triton")
    xs = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    ws = torch.randn(37, 16, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 37, (7,), device=DEVICE)
    out = IMPLS[impl](xs, ws, None, None, y, 0.0, return_components=True)
    expected = torch.nn.functional.cross_entropy(xs @ ws.T, y)
    torch.testing.assert_close(out.loss, expected)
    assert out.kl.item() == 0
    for a, b in zip(torch.autograd.grad(out.loss, (xs, ws)),
                    torch.autograd.grad(expected, (xs, ws))):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no teacher was given"):
        fused_linear_hrm_loss(xs, ws, None, None, y, 0.5)


def test_linear_fp32_output_gemm_is_read_from_the_dispatcher(monkeypatch):
    """Whether a bf16 GEMM can write fp32 is decided without running one (no error to catch: an
    out-of-memory must not be taken for a missing kernel and cached)."""
    from hrmkernels.autograd import linear_hrm_loss as impl

    def no_products(*args, **kwargs):
        raise AssertionError("a product ran to decide the capability")
    monkeypatch.setattr(torch, "mm", no_products)
    monkeypatch.setattr(torch, "addmm", no_products)
    impl._fp32_out_gemm.cache_clear()
    try:
        assert impl._fp32_out_gemm("cpu", torch.bfloat16) is False
        assert impl._fp32_out_gemm("cuda", torch.float32) is False   # fp32 needs no widening
        assert isinstance(impl._fp32_out_gemm("cuda", torch.bfloat16), bool)
    finally:
        impl._fp32_out_gemm.cache_clear()
