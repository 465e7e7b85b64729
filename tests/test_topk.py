"""Top-k teachers (teacher_topk=(ids, log-probabilities)) against the float64 reference.

Each case changes one thing from BASE. The reference sees the very same (rounded) inputs in
float64, and computes the rest bucket by masking the top-k out of the student's row, not by the
kernels' formulas, so a cancellation or a wrong mask shows up as a mismatch.
"""
import math

import pytest
import torch
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrmkernels import FusedHRMLoss, available_backends, fused_hrm_loss
from hrmkernels.kernels import pytorch as torch_impl
from hrmkernels.kernels.triton import common as triton_common
from hrmkernels.kernels.triton import topk as topk_kernels
from hrmkernels.reference import hrm_loss_reference, hrm_loss_topk_reference

BACKENDS = [b for b in ("torch", "triton") if b in available_backends(DEVICE)]

BASE = dict(n=9, v=1271, k=17, dtype=torch.float32, ldtype=torch.float32, mode="rest",
            direction="forward", t=2.0, eps=0.1, hrm=0.5, ignore="some", reduction="mean",
            num_items=None, layout="2d", scale=3.0, case=None, jsd=None)
JSD_BACKENDS = ("torch", "triton")   # backends with a top-k JSD kernel (0 < jsd_beta < 1)


def _inputs(c):
    """Student leaf, the view the loss sees, labels, and the teacher's (ids, log-probs)."""
    n, v, k = c["n"], c["v"], c["k"]
    lead = {"2d": (n,), "3d": (2, n), "shifted": (2, n + 1)}[c["layout"]]
    z = torch.randn(*lead, v, device=DEVICE) * c["scale"]
    u = torch.randn(*lead, v, device=DEVICE) * c["scale"]
    if c["case"] == "peaked teacher":          # P ~ 1e-9: the rest mass must not round to 0
        u[..., min(5, v - 1)] += 25.0
    elif c["case"] == "clustered teacher":     # the top-k are ids 100 .. 100 + k - 1
        u[..., 100:100 + k] += 30.0
    lp, idx = torch.log_softmax(u / c["t"], -1).topk(k, -1)
    perm = torch.randperm(k, device=DEVICE)    # ids in no particular order
    lp, idx = lp[..., perm], idx[..., perm]
    if c["case"] == "confident student":       # Q ~ exp(-40): 1 - sum q_top cancels to 0
        z.scatter_add_(-1, idx[..., :1], torch.full_like(z[..., :1], 80.0))
    elif c["case"] == "student -inf":          # masked entries outside the top-k
        top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
        z = torch.where(~top & (torch.rand(v, device=DEVICE) < 0.3), float("-inf"), z)
    elif c["case"] == "student -inf in top-k":  # q = 0 where p > 0: reverse KL only (else inf)
        z.scatter_(-1, idx[..., -2:], float("-inf"))
    elif c["case"] == "student only top-k":    # Q = 0 exactly: reverse KL only (forward: inf)
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
        z = torch.where(keep, z, float("-inf"))
    elif c["case"] == "teacher -inf":          # p = 0 inside the top-k: forward KL only
        lp[..., -3:] = float("-inf")
    z, lp = z.to(c["dtype"]), lp.to(c["ldtype"])
    view = (lambda x: x[:, :-1]) if c["layout"] == "shifted" else (lambda x: x)
    y = torch.randint(0, v, view(z).shape[:-1], device=DEVICE)
    if c["ignore"] == "all":
        y.fill_(-100)
    elif c["ignore"] == "some":
        y.view(-1)[::3] = -100
    return z, view, y, (view(idx), view(lp))


def _run(fn, z, view, y, topk, c, g):
    z = z.detach().requires_grad_()
    divergence = (dict(jsd_beta=c["jsd"]) if c["jsd"] is not None
                  else dict(kl_direction=c["direction"]))
    out = fn(view(z), labels=y, hrm=c["hrm"], teacher_topk=topk, topk_mode=c["mode"],
             temperature=c["t"], label_smoothing=c["eps"], reduction=c["reduction"],
             num_items_in_batch=c["num_items"], return_components=True, **divergence)
    (out[0] * g).sum().backward()
    return out, z.grad


def _reference(student_logits, labels, hrm, teacher_topk, topk_mode, **kw):
    return hrm_loss_topk_reference(student_logits, teacher_topk, labels, hrm, topk_mode=topk_mode,
                                   **kw)


def check(backend, **kw):
    c = {**BASE, **kw}
    if c["jsd"] is not None and 0 < c["jsd"] < 1 and backend not in JSD_BACKENDS:
        pytest.skip(f"backend={backend!r} has no top-k JSD kernel yet")
    z, view, y, (idx, lp) = _inputs(c)
    g = torch.rand(y.shape if c["reduction"] == "none" else (), device=DEVICE) * 2 - 0.5
    fused = lambda *a, **k: fused_hrm_loss(*a, backend=backend, **k)
    got, dz = _run(fused, z, view, y, (idx, lp), c, g)
    ref, dz_ref = _run(_reference, z.double(), view, y, (idx, lp.double()), c, g.double())
    # fp32 floors as in test_hrm_loss.py: a few ulps of the log-sum-exps (~|logit| / T).
    mag = max(1.0, z[z.isfinite()].abs().max().item() / c["t"], math.log(c["v"]))
    for name, a, b in zip(("loss", "ce", "kl", "entropy"), (*got, got.entropy),
                          (*ref, ref.entropy)):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * mag, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    if not torch.isfinite(ref[0]).all():
        return got     # an infinite KL (reverse "rest" with P = 0 < Q): no gradient to compare
    mag_z = max(1.0, z[z.isfinite()].abs().max().item())   # ulps of lse(z) in softmax(z) - onehot
    g_floor = 5e-7 * g.abs().max().item() * math.sqrt(y.numel()) * (mag_z + c["hrm"] / c["t"] * mag)
    tol = 1e-2 if c["dtype"] in (torch.bfloat16, torch.float16) else 1e-5
    assert dz.dtype == c["dtype"]
    err = (dz.double() - dz_ref).norm()
    assert err <= tol * dz_ref.norm() + g_floor, (err / dz_ref.norm()).item()
    return got


CASES = {
    **{f"V={v} k={k}": dict(v=v, k=k, n=n) for v, k, n in
       [(1, 1, 5), (7, 7, 9), (7, 3, 9), (1000, 1, 9), (1000, 128, 9), (32003, 64, 3)]},
    **{f"{m} {d} T={t} eps={e}": dict(mode=m, direction=d, t=t, eps=e)
       for m in ("rest", "renormalize") for d in ("forward", "reverse")
       for t in (0.5, 1.0, 4.0) for e in (0.0, 0.1)},
    **{f"{m} {d} {case}": dict(mode=m, direction=d, case=case)
       for m in ("rest", "renormalize") for d in ("forward", "reverse")
       for case in ("peaked teacher", "confident student", "student -inf")},
    **{f"{m} {case}": dict(mode=m, direction=d, case=case) for m in ("rest", "renormalize")
       for d, case in (("forward", "teacher -inf"), ("reverse", "student -inf in top-k"))},
    "student only top-k": dict(case="student only top-k", direction="reverse"),
    "student bf16": dict(dtype=torch.bfloat16),
    "student fp16 T=1": dict(dtype=torch.float16, t=1.0),
    "log-probs bf16": dict(ldtype=torch.bfloat16), "log-probs fp16 renormalize":
        dict(ldtype=torch.float16, mode="renormalize", direction="reverse"),
    "layout 3d": dict(layout="3d", n=4), "layout shifted": dict(layout="shifted", n=5),
    **{f"hrm={h}": dict(hrm=h) for h in (0.0, 10.0)},
    **{f"ignore={i}": dict(ignore=i) for i in ("all", "none")},
    **{f"reduction={r}": dict(reduction=r) for r in ("sum", "none")},
    "num_items int": dict(num_items=7), "num_items tensor": dict(num_items=torch.tensor(11)),
    "magnitude 1e4": dict(scale=1e4, t=4.0),
    **{f"jsd {m} beta={b} T={t}": dict(mode=m, jsd=b, t=t)
       for m in ("rest", "renormalize") for b in (0.0, 0.1, 0.5, 0.9, 1.0)
       for t in (0.5, 1.0, 2.0)},
    **{f"jsd {m} {case}": dict(mode=m, jsd=0.5, case=case) for m in ("rest", "renormalize")
       for case in ("peaked teacher", "confident student", "student -inf", "teacher -inf",
                    "student -inf in top-k")},
    "jsd student only top-k": dict(case="student only top-k", jsd=0.3),
    "jsd k=V": dict(v=7, k=7, jsd=0.5), "jsd k=1": dict(v=1000, k=1, jsd=0.5),
    "jsd student bf16": dict(dtype=torch.bfloat16, jsd=0.4),
    "jsd log-probs bf16": dict(ldtype=torch.bfloat16, jsd=0.6),   # P clamped at 0: still finite
    "jsd layout shifted": dict(layout="shifted", n=5, jsd=0.5, mode="renormalize"),
    "jsd reduction none": dict(reduction="none", jsd=0.7), "jsd hrm=0": dict(hrm=0.0, jsd=0.5),
    "jsd ignore all": dict(ignore="all", jsd=0.5),
    "jsd magnitude 1e4": dict(scale=1e4, t=4.0, jsd=0.5),
    "jsd magnitude 1e4 renormalize": dict(scale=1e4, t=1.0, jsd=0.5, mode="renormalize"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_hrm_loss_topk_matches_reference(backend, case):
    check(backend, **CASES[case])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_topk_multi_block_and_chunk_paths(backend, monkeypatch):
    # Several vocabulary blocks (Triton) and row chunks (torch): the sorted ids' runs per block,
    # a block holding many of them, and blocks holding none.
    monkeypatch.setattr(triton_common, "MAX_BLOCK_V", 64)   # on a GPU
    monkeypatch.setattr(triton_common, "INTERPRETER_BLOCK_V", 64)
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 2000)
    for mode in ("rest", "renormalize"):
        for direction in ("forward", "reverse"):
            check(backend, v=1000, k=40, n=7, layout="3d", mode=mode, direction=direction)
        check(backend, v=1000, k=40, n=7, mode=mode, case="confident student", t=1.0)
        if backend in JSD_BACKENDS:
            check(backend, v=1000, k=40, n=7, layout="3d", mode=mode, jsd=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", [dict(kl_direction="forward"), dict(kl_direction="reverse"),
                                        dict(jsd_beta=0.3)], ids=["forward", "reverse", "jsd"])
def test_hrm_loss_topk_with_every_id_is_the_dense_loss(backend, divergence):
    # k = V: both modes are the full divergence (no rest outcome), up to the log-probabilities'
    # rounding.
    if "jsd_beta" in divergence and backend not in JSD_BACKENDS:
        pytest.skip(f"backend={backend!r} has no top-k JSD kernel yet")
    z, u = torch.randn(2, 5, 50, device=DEVICE) * 3, torch.randn(2, 5, 50, device=DEVICE) * 3
    y = torch.randint(0, 50, (2, 5), device=DEVICE)
    kw = dict(temperature=2.0, label_smoothing=0.1, backend=backend, return_components=True,
              **divergence)
    dense = fused_hrm_loss(z, u, y, 0.5, **kw)
    lp, idx = torch.log_softmax(u / 2.0, -1).topk(50, -1)
    for mode in ("rest", "renormalize"):
        sparse = fused_hrm_loss(z, labels=y, hrm=0.5, teacher_topk=(idx, lp), topk_mode=mode, **kw)
        for a, b in zip(sparse, dense):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_topk_rest_is_below_the_full_kl(backend):
    # The rest bucket merges outcomes, so its KL never exceeds the full KL (data processing).
    z, u = torch.randn(16, 300, device=DEVICE) * 2, torch.randn(16, 300, device=DEVICE) * 2
    y = torch.randint(0, 300, (16,), device=DEVICE)
    full = fused_hrm_loss(z, u, y, 1.0, reduction="none", return_components=True,
                          backend=backend).kl
    for k in (1, 10, 100):
        lp, idx = torch.log_softmax(u, -1).topk(k, -1)
        kl = fused_hrm_loss(z, labels=y, hrm=1.0, teacher_topk=(idx, lp), reduction="none",
                            return_components=True, backend=backend).kl
        assert (kl <= full + 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_topk_infinite_kl_is_the_true_value(backend):
    # Forward "rest": the teacher has mass P > 0 outside the top-k, the student has none there.
    z = torch.randn(2, 20, device=DEVICE)
    z[:, 3:] = float("-inf")
    idx = torch.tensor([[0, 1, 2]] * 2, device=DEVICE)
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1]] * 2, device=DEVICE))
    y = torch.tensor([0, 1], device=DEVICE)
    out = fused_hrm_loss(z, labels=y, hrm=0.5, teacher_topk=(idx, lp), backend=backend,
                         reduction="none", return_components=True)
    ref = hrm_loss_topk_reference(z, (idx, lp), y, 0.5, reduction="none", return_components=True)
    assert torch.isinf(out.kl).all() and torch.isinf(ref[2]).all() and torch.isfinite(out.ce).all()


def check_inplace_backward(backend, v=333, k=8, **options):
    z = torch.randn(2, 6, v, device=DEVICE)
    lp, idx = torch.log_softmax(torch.randn(2, 5, v, device=DEVICE), -1).topk(k, -1)
    y = torch.randint(0, v, (2, 5), device=DEVICE)
    kw = dict(labels=y, hrm=0.5, teacher_topk=(idx, lp), backend=backend, temperature=2.0,
              **options)
    zl = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fused_hrm_loss(zl[:, :-1], **kw), zl)
    buf = z.clone().requires_grad_() * 1.0   # a non-leaf whose storage the backward may overwrite
    (dz,) = torch.autograd.grad(fused_hrm_loss(buf[:, :-1], inplace_backward=True, **kw), buf)
    torch.testing.assert_close(dz, expected)
    torch.testing.assert_close(buf.detach()[:, :-1], expected[:, :-1])   # written in place
    torch.testing.assert_close(buf.detach()[:, -1], z[:, -1])             # and nowhere else


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_topk_inplace_backward(backend):
    check_inplace_backward(backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not available")
@pytest.mark.parametrize("mode", ["rest", "renormalize"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_hrm_loss_topk_k_in_steps(mode, direction, monkeypatch):
    # The Triton kernels walk the top-k in steps of MAX_BLOCK_K: here k = 40 ids in steps of 16
    # (the last one partial), spread over 8 vocabulary blocks of 64, or clustered (28 of them
    # in one block: its members take two steps to count). A peaked teacher checks that P ~ 1e-9
    # survives the fold across steps; in place, that the backward's top-k values come from the
    # registers, not from the already overwritten logits.
    monkeypatch.setattr(topk_kernels, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(triton_common, "MAX_BLOCK_V", 64)   # on a GPU
    monkeypatch.setattr(triton_common, "INTERPRETER_BLOCK_V", 64)
    divergence = dict(jsd=0.4) if direction == "jsd" else dict(direction=direction)
    for case in (None, "clustered teacher", "peaked teacher"):
        check("triton", v=500, k=40, n=4, layout="shifted", mode=mode, case=case, **divergence)
    check("triton", v=500, k=40, n=4, mode=mode, t=1.0, eps=0.0, **divergence)
    check_inplace_backward("triton", v=500, k=40, topk_mode=mode,
                           **(dict(jsd_beta=0.4) if direction == "jsd" else
                              dict(kl_direction=direction)))


def test_hrm_loss_topk_ids_out_of_range():
    z = torch.randn(3, 30, device=DEVICE)
    y = torch.tensor([1, 2, 3], device=DEVICE)
    idx = torch.tensor([[0, 1], [2, 30], [4, -1]], device=DEVICE)
    lp = torch.full((3, 2), -1.0, device=DEVICE)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"teacher_topk indices must lie in \[0, 30\)"):
            fused_hrm_loss(z, labels=y, hrm=0.5, teacher_topk=(idx, lp), backend="torch")
    for backend in set(BACKENDS) - {"torch"} | ({"torch"} if DEVICE.type == "cuda" else set()):
        # never read out of bounds: the token's KL is NaN, the others are exact
        out = fused_hrm_loss(z, labels=y, hrm=0.5, teacher_topk=(idx, lp), backend=backend,
                             reduction="none", return_components=True)
        assert (torch.isnan(out.kl[1:]).all() and torch.isfinite(out.kl[0])
                and torch.isfinite(out.ce).all())


BAD = [
    (dict(teacher_topk=None), ValueError, "neither teacher_logits nor teacher_topk"),
    (dict(teacher_logits=torch.zeros(4, 10)), TypeError, "takes one teacher"),
    (dict(labels=None), TypeError, "missing labels"),
    (dict(hrm=None), TypeError, "missing hrm"),
    (dict(teacher_topk=torch.zeros(4, 3)), TypeError, "teacher_topk must be a pair"),
    (dict(teacher_topk=(torch.zeros(4, 3), torch.zeros(4, 3))), TypeError, "indices must be int64"),
    (dict(teacher_topk=(torch.zeros(4, 3, dtype=torch.long),) * 2), TypeError,
     "logprobs must be float"),
    (dict(teacher_topk=(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3))), ValueError,
     "indices must have shape (4, 'k')"),
    (dict(teacher_topk=(torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 0))), ValueError,
     "k >= 1"),
    (dict(teacher_topk=(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2))), ValueError,
     "logprobs must have the indices' shape"),
    (dict(teacher_topk=(torch.zeros(4, 11, dtype=torch.long), torch.zeros(4, 11))), ValueError,
     "k=11 entries per token but the student's vocabulary has only V=10"),
    (dict(teacher_topk=(torch.zeros(4, 3, dtype=torch.long),
                        torch.zeros(4, 3, requires_grad=True))),
     ValueError, "pass logprobs.detach()"),
    (dict(topk_mode="ghost"), ValueError, "topk_mode must be one of"),
]


@pytest.mark.parametrize("change,exc,words", BAD, ids=[b[2][:30] for b in BAD])
def test_hrm_loss_topk_bad_input_raises_naming_the_argument(change, exc, words):
    idx = torch.zeros(4, 3, dtype=torch.long, device=DEVICE)
    args = dict(student_logits=torch.randn(4, 10, device=DEVICE), hrm=0.5,
                labels=torch.zeros(4, dtype=torch.long, device=DEVICE),
                teacher_topk=(idx, torch.zeros(4, 3, device=DEVICE)))
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else
                 tuple(t.to(DEVICE) for t in v) if isinstance(v, tuple) else v
                 for k, v in change.items()})
    with pytest.raises(exc) as info:
        fused_hrm_loss(**args)
    assert words in str(info.value)


def test_hrm_loss_topk_cuda_backend_says_why():
    idx, lp = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="no top-k teacher path"):
        fused_hrm_loss(torch.randn(4, 10), labels=torch.zeros(4, dtype=torch.long), hrm=0.5,
                       teacher_topk=(idx, lp), backend="cuda")


def test_fused_hrm_loss_module_takes_a_topk_teacher():
    z, u = torch.randn(6, 40, device=DEVICE), torch.randn(6, 40, device=DEVICE)
    y = torch.randint(0, 40, (6,), device=DEVICE)
    lp, idx = torch.log_softmax(u, -1).topk(5, -1)
    module = FusedHRMLoss(0.5, topk_mode="renormalize", kl_direction="reverse")
    torch.testing.assert_close(
        module(z, labels=y, teacher_topk=(idx, lp), num_items_in_batch=9),
        fused_hrm_loss(z, labels=y, hrm=0.5, teacher_topk=(idx, lp), topk_mode="renormalize",
                       kl_direction="reverse", num_items_in_batch=9))
    torch.testing.assert_close(module(z, u, y),
                               hrm_loss_reference(z, u, y, 0.5, kl_direction="reverse"))
    with pytest.raises(ValueError, match="topk_mode"):
        FusedHRMLoss(0.5, topk_mode="bucket")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries(dict(
    n=st.integers(1, 6), v=st.integers(1, 300), k=st.integers(1, 40),
    layout=st.sampled_from(["2d", "3d", "shifted"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    mode=st.sampled_from(["rest", "renormalize"]),
    direction=st.sampled_from(["forward", "reverse"]),
    t=st.sampled_from([0.5, 1.0, 3.0]), eps=st.sampled_from([0.0, 0.1]),
    hrm=st.sampled_from([0.0, 0.5, 10.0]), ignore=st.sampled_from(["all", "none", "some"]),
    reduction=st.sampled_from(["mean", "sum", "none"]), scale=st.sampled_from([0.1, 3.0, 30.0]),
    case=st.sampled_from([None, "confident student", "peaked teacher"]),
    jsd=st.sampled_from([None, None, 0.3]))))
def test_hrm_loss_topk_property_random_shapes_and_options(backend, case):
    torch.manual_seed(0)
    case["k"] = min(case["k"], case["v"])
    check(backend, **case)
