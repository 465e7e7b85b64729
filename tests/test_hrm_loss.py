"""Every backend against the float64 reference (docs/design.md section 1), at awkward sizes and
layouts.

Each case changes one thing from a base configuration, so a failure names its cause. Loss, CE, KL
and gradients are compared with the reference evaluated in float64 on the very same (rounded)
input values: the only error left is the backend's fp32 arithmetic and its output rounding.
"""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

import hrmkernels.kernels
from hrmkernels import available_backends, fused_hrm_loss
from hrmkernels.kernels import pytorch as torch_impl
from hrmkernels.kernels.triton import common as triton_common
from hrmkernels.reference import hrm_loss_reference

from conftest import DEVICE

BACKENDS = [b for b in ("torch", "triton", "cuda", "cpu") if b in available_backends(DEVICE)]
HALF = (torch.bfloat16, torch.float16)

BASE = dict(n=9, v=1271, dtype=torch.float32, tdtype=None, layout="2d", direction="forward",
            t=2.0, eps=0.1, hrm=0.5, ignore="some", reduction="mean", teacher_grad=False,
            num_items=None, scale=3.0, masked=None, jsd=None)
JSD_BACKENDS = ("torch", "triton", "cpu")   # backends with a JSD kernel (strictly 0 < beta < 1)


def _leaves(c):
    """Leaf tensors (what gets .grad) and the views of them that the loss receives."""
    n, v, dt, tdt = c["n"], c["v"], c["dtype"], c["tdtype"] or c["dtype"]
    rand = lambda *s: (torch.randn(*s, device=DEVICE) * c["scale"])  # noqa: E731
    if c["layout"] == "2d":
        zl, ul = rand(n, v), rand(n, v)
        view_z = view_u = lambda x: x  # noqa: E731
    elif c["layout"] == "3d":
        zl, ul = rand(3, n, v), rand(3, n, v)
        view_z = view_u = lambda x: x  # noqa: E731
    elif c["layout"] == "shifted":  # logits[:, :-1] and a padded teacher vocabulary [..., :V]
        zl, ul = rand(2, n + 1, v), rand(2, n + 1, v + 13)
        view_z, view_u = (lambda x: x[:, :-1]), (lambda x: x[:, :-1, :v])
    else:  # "4d": leading dims that cannot be merged into (B, S) without a copy
        zl, ul = rand(2, 3, n, v), rand(2, 3, n, v)
        view_z = view_u = lambda x: x.transpose(1, 2)
    zl, ul = zl.to(dt), ul.to(tdt)
    if c["masked"] == "random":      # -inf vocabulary entries, masked in both models
        m = torch.zeros(ul.shape[-1], dtype=torch.bool, device=DEVICE)   # teacher may be wider
        m[:v] = torch.rand(v, device=DEVICE) < 0.3
        m[torch.randint(0, v, ())] = False     # a row with no mass at all is not a distribution
        zl[..., m[:v]] = float("-inf")
        ul[..., m] = float("-inf")
    elif c["masked"] == "leading":   # whole leading blocks masked (running max stays -inf)
        zl[..., : v // 2] = float("-inf")
        ul[..., : v // 2] = float("-inf")
    elif c["masked"] == "underflow":   # log-probabilities from -85 to below -104 under both
        m = torch.rand(v, device=DEVICE) < 0.4   # models: p, q subnormal or 0 in fp32 (#1453)
        for x, lo in ((zl[..., :v], 70.0), (ul[..., :v], 120.0)):
            low = -85.0 - lo * torch.rand(x[..., m].shape, device=DEVICE)
            x[..., m] = low.to(x.dtype) * c["t"]
    return zl, ul, view_z, view_u


def _labels(shape, c):
    y = torch.randint(0, c["v"], shape, device=DEVICE)
    if c["masked"] == "leading":
        y = torch.randint(c["v"] // 2, c["v"], shape, device=DEVICE)
    if c["ignore"] == "all":
        y.fill_(-100)
    elif c["ignore"] == "some":
        y.view(-1)[::3] = -100
    return y


def _run(loss_fn, zl, ul, view_z, view_u, y, c, teacher_grad, g):
    zl = zl.detach().requires_grad_()
    ul = ul.detach().requires_grad_(teacher_grad)
    divergence = (dict(jsd_beta=c["jsd"]) if c["jsd"] is not None
                  else dict(kl_direction=c["direction"]))
    out = loss_fn(view_z(zl), view_u(ul), y, c["hrm"], temperature=c["t"], label_smoothing=c["eps"],
                  reduction=c["reduction"], num_items_in_batch=c["num_items"],
                  return_components=True, **divergence)
    (out[0] * g).sum().backward()
    return out, zl.grad, ul.grad


def _rel_norm(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(backend, **kw):
    c = {**BASE, **kw}
    if c["jsd"] is not None and 0 < c["jsd"] < 1 and backend not in JSD_BACKENDS:
        pytest.skip(f"backend={backend!r} has no JSD kernel yet")
    zl, ul, view_z, view_u = _leaves(c)
    y = _labels(view_z(zl).shape[:-1], c)
    g = torch.rand(y.shape if c["reduction"] == "none" else (), device=DEVICE) * 2 - 0.5  # != 1
    fused = lambda *a, **k: fused_hrm_loss(*a, backend=backend, **k)  # noqa: E731
    got, dz, du = _run(fused, zl, ul, view_z, view_u, y, c, c["teacher_grad"], g)
    ref, dz_ref, du_ref = _run(hrm_loss_reference, zl.double(), ul.double(), view_z, view_u, y, c,
                               c["teacher_grad"], g.double())
    # fp32 arithmetic floors. A KL far below the log-sum-exps it comes from (~|logit| / T) keeps an
    # absolute error of a few ulps of them. A gradient element far below its terms keeps a few ulps
    # of them times |g|: softmax_y - 1 ~ -1e-7 for a confident, correct token (terms ~lse(z) ~ |z|),
    # and p (b - a - E_p[b - a]) for a peaked teacher (terms ~|logit| / T). Bugs are far above.
    mag = max(x[x.isfinite()].abs().max().item() if x.isfinite().any() else 0.0 for x in (zl, ul))
    mag = max(1.0, mag / c["t"], math.log(c["v"]))
    atol = 1e-6 * mag
    for name, a, b in zip(("loss", "ce", "kl", "entropy"), (*got, got.entropy),
                          (*ref, ref.entropy)):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    mag_z = max(1.0, zl[zl.isfinite()].abs().max().item())
    g_floor = 5e-7 * g.abs().max().item() * math.sqrt(y.numel()) * (mag_z + c["hrm"] / c["t"] * mag)
    for d, d_ref, dt in ((dz, dz_ref, c["dtype"]), (du, du_ref, c["tdtype"] or c["dtype"])):
        if d is None and not c["teacher_grad"]:
            continue
        d_ref = torch.zeros_like(d, dtype=torch.float64) if d_ref is None else d_ref   # hrm == 0
        tol = 1e-2 if dt in HALF else 1e-5
        subnormal = math.sqrt(d.numel()) * torch.finfo(dt).smallest_normal * torch.finfo(dt).eps
        assert d.dtype == dt
        assert (d.double() - d_ref).norm() <= tol * d_ref.norm() + g_floor + subnormal, \
            _rel_norm(d, d_ref)
    return got, dz


CASES = {
    **{f"V={v}": dict(v=v, n=n) for v, n in [(1, 5), (7, 9), (1000, 9), (1271, 9), (32003, 3)]},
    "rows=1": dict(n=1), "rows=64": dict(n=64, v=1000),
    "layout=3d": dict(layout="3d", n=4), "layout=shifted": dict(layout="shifted", n=5),
    "layout=4d": dict(layout="4d", n=2),
    **{f"dtype={d}": dict(dtype=getattr(torch, d)) for d in ("bfloat16", "float16")},
    "student bf16, teacher fp32": dict(dtype=torch.bfloat16, tdtype=torch.float32),
    "student fp32, teacher fp16": dict(dtype=torch.float32, tdtype=torch.float16),
    **{f"{d} T={t} eps={e}": dict(direction=d, t=t, eps=e)
       for d in ("forward", "reverse") for t in (0.5, 1.0, 4.0) for e in (0.0, 0.1)},
    **{f"hrm={h}": dict(hrm=h) for h in (0.0, 0.001, 10.0)},
    **{f"ignore={i}": dict(ignore=i) for i in ("all", "none")},
    **{f"reduction={r}": dict(reduction=r) for r in ("sum", "none")},
    "num_items int": dict(num_items=7), "num_items tensor": dict(num_items=torch.tensor(11)),
    "num_items 0": dict(num_items=0, ignore="all"),
    **{f"teacher grad {d}": dict(teacher_grad=True, direction=d) for d in ("forward", "reverse")},
    "teacher grad bf16 T=1": dict(teacher_grad=True, dtype=torch.bfloat16, t=1.0),
    **{f"-inf {m} {d} eps={e}": dict(masked=m, direction=d, eps=e, teacher_grad=True)
       for m in ("random", "leading") for d in ("forward", "reverse") for e in (0.0, 0.1)},
    "magnitude 1e4": dict(scale=1e4, t=4.0),
    "magnitude 1e4 reverse": dict(scale=1e4, direction="reverse"),
    **{f"jsd beta={b} T={t}": dict(jsd=b, t=t, teacher_grad=True)
       for b in (0.0, 0.1, 0.5, 0.9, 1.0) for t in (0.5, 1.0, 2.0)},
    **{f"jsd -inf {m}": dict(jsd=0.5, masked=m, teacher_grad=True) for m in ("random", "leading")},
    **{f"jsd underflow beta={b} T={t}": dict(jsd=b, masked="underflow", t=t, teacher_grad=True)
       for b in (0.0, 0.5, 0.9, 1.0) for t in (0.5, 1.0)},
    "jsd bf16": dict(jsd=0.3, dtype=torch.bfloat16, teacher_grad=True),
    "jsd fp16 teacher fp32": dict(jsd=0.6, dtype=torch.float16, tdtype=torch.float32,
                                  teacher_grad=True, t=1.0),
    "jsd layout=shifted": dict(jsd=0.4, layout="shifted", n=5, teacher_grad=True),
    "jsd magnitude 1e4": dict(jsd=0.5, scale=1e4, t=4.0),
    "jsd magnitude 1e4 T=1 teacher grad": dict(jsd=0.2, scale=1e4, t=1.0, teacher_grad=True),
    "jsd eps=0 ignore=none": dict(jsd=0.5, eps=0.0, ignore="none", teacher_grad=True),
    "jsd hrm=0": dict(jsd=0.5, hrm=0.0, teacher_grad=True),
    "jsd reduction=none": dict(jsd=0.7, reduction="none", ignore="all"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_hrm_loss_matches_reference(backend, case):
    check(backend, **CASES[case])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_multi_block_and_chunk_paths(backend, monkeypatch):
    # Force several vocabulary blocks (Triton) and several row chunks (torch) at small sizes, with
    # the first blocks fully masked: the online log-sum-exp must start from a -inf running max.
    monkeypatch.setattr(triton_common, "MAX_BLOCK_V", 128)   # on a GPU
    monkeypatch.setattr(triton_common, "INTERPRETER_BLOCK_V", 128)
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 2000)
    for masked in (None, "leading"):
        check(backend, v=1000, n=7, layout="3d", masked=masked, teacher_grad=True)
        check(backend, v=1000, n=7, layout="3d", masked=masked, direction="reverse", t=1.0)
        if backend in JSD_BACKENDS:   # the JSD's second pass walks the blocks again
            check(backend, v=1000, n=7, layout="3d", masked=masked, jsd=0.3, teacher_grad=True)


JSD_RUN = [b for b in BACKENDS if b in JSD_BACKENDS]


@pytest.mark.parametrize("backend", JSD_RUN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hrm_loss_jsd_underflow_in_both_models_is_finite(backend, dtype):
    # Liger #1453: an interior beta gave NaN where an entry's log-probability is below about -104
    # under both models (p = q = m = 0 in fp32, then 0 * log 0). Here every row has such entries,
    # some rows put almost all their vocabulary there, and the result must be the true value.
    z, u = torch.randn(4, 300, device=DEVICE) * 2, torch.randn(4, 300, device=DEVICE) * 2
    z[:, 100:] = -90.0 - 60 * torch.rand(4, 200, device=DEVICE)   # subnormal or 0 in fp32
    u[:, 50:] = -90.0 - 100 * torch.rand(4, 250, device=DEVICE)
    z[3, 1:], u[3, 1:] = -300.0, -400.0   # one outcome holds all the mass, the others underflow
    y = torch.tensor([0, 1, -100, 2], device=DEVICE)
    zl, ul = z.to(dtype).requires_grad_(), u.to(dtype).requires_grad_()
    out = fused_hrm_loss(zl, ul, y, 0.5, jsd_beta=0.5, backend=backend, reduction="none",
                         return_components=True)
    out.loss.sum().backward()
    for t in (*out, out.entropy, zl.grad, ul.grad):
        assert torch.isfinite(t).all()
    check(backend, jsd=0.5, masked="underflow", teacher_grad=True, dtype=dtype)


@pytest.mark.parametrize("backend", JSD_RUN)
def test_hrm_loss_jsd_ends_are_the_kls(backend):
    # beta = 0 and 1 are exactly the KLs (TRL's and Liger's convention), gradients included; near
    # the ends the JSD formula itself tends to beta KL(p || q) and (1 - beta) KL(q || p).
    z, u = torch.randn(6, 257, device=DEVICE), torch.randn(6, 257, device=DEVICE)
    y = torch.randint(0, 257, (6,), device=DEVICE)
    y[4] = -100

    def run(hrm=1.0, **kw):
        zl, ul = z.clone().requires_grad_(), u.clone().requires_grad_()
        out = fused_hrm_loss(zl, ul, y, hrm, temperature=1.5, backend=backend, reduction="none",
                             return_components=True, **kw)
        (out.loss * torch.linspace(0.5, 2.0, 6, device=DEVICE)).sum().backward()
        return out.kl, zl.grad, ul.grad

    _, ce_dz, _ = run(hrm=0.0)
    for beta, direction in ((0.0, "forward"), (1.0, "reverse")):
        for a, b in zip(run(jsd_beta=beta), run(kl_direction=direction)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    w = 1e-3
    for beta, direction in ((w, "forward"), (1 - w, "reverse")):
        (d, dz, du), (kl, kl_dz, kl_du) = run(jsd_beta=beta), run(kl_direction=direction)
        assert (kl[y != -100] > 0.05).all()
        torch.testing.assert_close(d / w, kl, rtol=2e-2, atol=0)
        torch.testing.assert_close((dz - ce_dz) / w, kl_dz - ce_dz, rtol=2e-2, atol=2e-4)
        torch.testing.assert_close(du / w, kl_du, rtol=2e-2, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_strided_labels(backend):
    z, u = torch.randn(6, 40, device=DEVICE), torch.randn(6, 40, device=DEVICE)
    y = torch.randint(0, 40, (12,), device=DEVICE)[::2]      # a 1-D view with stride 2
    kw = dict(reduction="none", temperature=2.0)
    torch.testing.assert_close(fused_hrm_loss(z, u, y, 0.5, backend=backend, **kw),
                               hrm_loss_reference(z, u, y, 0.5, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_infinite_kl_is_the_true_value(backend):
    # p_v > 0 where q_v = 0: forward KL is +inf; with hrm = 0 the loss stays the (finite) CE.
    z, u = torch.randn(3, 50, device=DEVICE), torch.randn(3, 50, device=DEVICE)
    z[:, 7] = float("-inf")
    y = torch.tensor([1, 2, 3], device=DEVICE)
    out = fused_hrm_loss(z, u, y, 0.5, backend=backend, reduction="none", return_components=True)
    assert (torch.isinf(out.kl).all() and torch.isinf(out.loss).all()
            and torch.isfinite(out.ce).all())
    out = fused_hrm_loss(z, u, y, 0.0, backend=backend, reduction="none", return_components=True)
    torch.testing.assert_close(out.loss, out.ce)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_inplace_backward(backend):
    z, u = torch.randn(2, 6, 777, device=DEVICE), torch.randn(2, 6, 777, device=DEVICE)
    y = torch.randint(0, 777, (2, 5), device=DEVICE)
    zl = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        fused_hrm_loss(zl[:, :-1], u[:, :-1], y, 0.5, backend=backend), zl)
    buf = z.clone().requires_grad_() * 1.0   # a non-leaf whose storage the backward may overwrite
    loss = fused_hrm_loss(buf[:, :-1], u[:, :-1], y, 0.5, backend=backend, inplace_backward=True)
    (dz,) = torch.autograd.grad(loss, buf)
    torch.testing.assert_close(dz, expected)
    torch.testing.assert_close(buf.detach()[:, :-1], expected[:, :-1])   # written in place
    torch.testing.assert_close(buf.detach()[:, -1], z[:, -1])             # and nowhere else


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_empty_batch(backend):
    z = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = fused_hrm_loss(z, z.detach(), y, 0.5, backend=backend)
    loss.backward()
    assert loss.item() == 0 and z.grad.shape == (0, 10)
    assert fused_hrm_loss(z, z.detach(), y, 0.5, backend=backend, reduction="none").shape == (0,)


def test_hrm_loss_out_of_range_labels(monkeypatch):
    z, u = torch.randn(4, 30, device=DEVICE), torch.randn(4, 30, device=DEVICE)
    y = torch.tensor([1, 30, -100, -2], device=DEVICE)
    if DEVICE.type == "cpu":   # on CPU tensors every backend raises (no device to sync)
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=r"labels must lie in \[0, 30\) or equal "
                                                 r"ignore_index=-100; found 30 at flat position 1"):
                fused_hrm_loss(z, u, y, 0.5, backend=backend)
        # what the GPU kernels do instead, seen through the kernels with the CPU checks off
        # (the C++ CPU kernels check in C++)
        monkeypatch.setattr(hrmkernels.kernels, "host_checks", lambda t: False)
    for backend in set(BACKENDS) - {"cpu"}:
        # the kernels never read out of bounds: the token's loss is NaN, the others are exact
        loss = fused_hrm_loss(z, u, y, 0.5, backend=backend, reduction="none")
        assert torch.isnan(loss[[1, 3]]).all() and loss[2] == 0 and torch.isfinite(loss[0])


def test_hrm_loss_fp32_loss_for_half_inputs():
    z = torch.randn(4, 33, device=DEVICE, dtype=torch.bfloat16)
    y = torch.randint(0, 33, (4,), device=DEVICE)
    for backend in BACKENDS:
        assert fused_hrm_loss(z, z, y, 0.5, backend=backend).dtype == torch.float32


def test_hrm_loss_no_host_sync_in_library_source():
    # forward/backward must stay CUDA-graph capturable: no .item(), .tolist() or torch.equal in the
    # library, except lines marked "sync-ok" with the reason (CPU-only checks).
    import pathlib
    import re

    root = pathlib.Path(__file__).parents[1] / "hrmkernels"
    pattern = re.compile(r"\.item\(\)|\.tolist\(\)|torch\.equal\(")
    hits = [f"{p.name}:{i}" for p in root.rglob("*.py") if p.name != "reference.py"
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and "sync-ok" not in line]
    assert not hits, hits


def test_hrm_loss_denominator_math():
    # mean = sum / max(n, 1): check against an explicit sum at a known count.
    z, u = torch.randn(6, 9, device=DEVICE), torch.randn(6, 9, device=DEVICE)
    y = torch.tensor([0, -100, 2, -100, 4, 5], device=DEVICE)
    kw = dict(backend=BACKENDS[0])
    s = fused_hrm_loss(z, u, y, 0.5, reduction="sum", **kw)
    assert math.isclose(fused_hrm_loss(z, u, y, 0.5, **kw).item(), s.item() / 4, rel_tol=1e-6)
    assert math.isclose(fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=8, **kw).item(),
                        s.item() / 8, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries(dict(
    n=st.integers(1, 8), v=st.integers(1, 300),
    layout=st.sampled_from(["2d", "3d", "shifted", "4d"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    direction=st.sampled_from(["forward", "reverse"]), t=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    eps=st.sampled_from([0.0, 0.1, 1.0]), hrm=st.sampled_from([0.0, 0.001, 0.5, 10.0]),
    ignore=st.sampled_from(["all", "none", "some"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    teacher_grad=st.booleans(), masked=st.sampled_from([None, "random"]),
    scale=st.sampled_from([0.1, 3.0, 30.0]), jsd=st.sampled_from([None, None, 0.5]))))
def test_hrm_loss_property_random_shapes_and_options(backend, case):
    torch.manual_seed(0)    # each example draws its tensors afresh: keep it reproducible
    if case["masked"] == "random" and case["v"] < 4:
        case["masked"] = None   # keep at least some vocabulary unmasked
    check(backend, **case)
