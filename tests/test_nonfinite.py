"""The non-finite contract (docs/design.md, "Non-finite inputs"), on every backend.

A hypothesis property test draws shapes (V at the CPU kernels' vector widths and their scalar
tails), layouts, dtypes, options and logits with NaN, -inf, +-1e4 and rows masked entirely in one
model, and compares every available backend with the float64 reference on the same rounded
values, row by row: each output is NaN, +inf or finite exactly where the reference's is, finite
values agree to fp32 rounding, a gradient row is finite exactly where the reference's is (then
close to it), and a row whose loss is NaN has a NaN gradient (at every entry not masked). The
issue's reproducers follow.
"""
import os

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrmkernels import available_backends, fused_hrm_loss
from hrmkernels.reference import hrm_loss_reference

from conftest import DEVICE

BACKENDS = [b for b in ("torch", "cpu", "triton", "cuda") if b in available_backends(DEVICE)]
F64_BACKENDS = [b for b in BACKENDS if b in available_backends(DEVICE, torch.float64)]
NAN, INF = float("nan"), float("inf")


def _kind(x):
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.where(x.isnan(), 1, torch.where(x == INF, 2, torch.where(x == -INF, 3, 0)))


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    dtypes += [torch.float64] if backend in F64_BACKENDS else []
    c = dict(backend=backend, n=draw(st.integers(1, 4)),
             v=draw(st.sampled_from([1, 2, 7, 8, 9, 16, 17, 33, 100])),
             dtype=draw(st.sampled_from(dtypes)), tdtype=draw(st.sampled_from(dtypes)),
             shifted=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 8.0])),
             t=draw(st.sampled_from([0.5, 1.0, 2.0])), eps=draw(st.sampled_from([0.0, 0.1])),
             hrm=draw(st.sampled_from([0.0, 0.5])),
             divergence=draw(st.sampled_from([dict(kl_direction="forward"),
                                              dict(kl_direction="reverse"),
                                              dict(jsd_beta=0.3)])),
             teacher_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))
    cells = st.tuples(st.integers(0, c["n"] - 1), st.integers(0, c["v"] - 1), st.booleans(),
                      st.sampled_from([NAN, -INF, -INF, -INF, 1e4, -1e4, -150.0]))
    c["specials"] = draw(st.lists(cells, max_size=5))
    c["masked_row"] = draw(st.sampled_from([None, "student", "teacher"]))
    c["label_at_special"] = draw(st.booleans())
    return c


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    n, v = c["n"], c["v"]
    z = torch.randn(n + 1, v, generator=g, dtype=torch.float64) * c["scale"]
    u = torch.randn(n + 1, v + 5, generator=g, dtype=torch.float64) * c["scale"]
    for row, col, student, value in c["specials"]:
        (z if student else u)[row, col] = value
    if c["masked_row"]:
        (z if c["masked_row"] == "student" else u)[n - 1] = -INF
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.25] = -100
    if c["label_at_special"] and c["specials"]:
        y[c["specials"][0][0]] = c["specials"][0][1]
    z, u = z.to(c["dtype"]).to(DEVICE), u.to(c["tdtype"]).to(DEVICE)
    if c["shifted"]:   # a (1, n, V) view of (1, n + 1, V) and a padded teacher vocabulary
        view = lambda x: x[None, :-1, :v]  # noqa: E731
    else:
        view = lambda x: x[:n, :v]  # noqa: E731
    return z, u, y.to(DEVICE).view(view(z).shape[:-1]), view


def _run(loss, z, u, y, view, c, g):
    z, u = z.detach().requires_grad_(), u.detach().requires_grad_(c["teacher_grad"])
    out = loss(view(z), view(u), y, c["hrm"], temperature=c["t"], label_smoothing=c["eps"],
               reduction="none", return_components=True, **c["divergence"])
    (out.loss * g).sum().backward()
    du = u.grad if u.grad is not None else torch.zeros_like(u)   # the reference at hrm = 0
    grads = [view(z.grad)] + ([view(du)] if c["teacher_grad"] else [])
    return [t.reshape(-1) for t in (*out, out.entropy)], [d.reshape(-1, d.shape[-1]) for d in grads]


def check(c):
    z, u, y, view = _inputs(c)
    g = torch.linspace(0.5, 1.5, y.numel(), device=DEVICE).view(y.shape)      # != 1
    fused = lambda *a, **k: fused_hrm_loss(*a, backend=c["backend"], **k)  # noqa: E731
    got, grads = _run(fused, z, u, y, view, c, g)
    ref, ref_grads = _run(hrm_loss_reference, z.double(), u.double(), y, view, c, g.double())
    finite = [x[x.isfinite()] for x in (z.double(), u.double())]
    mag = max([1.0] + [x.abs().max().item() / c["t"] for x in finite if x.numel()])
    for name, a, b in zip(("loss", "ce", "div", "entropy"), got, ref):
        assert torch.equal(_kind(a), _kind(b)), (name, a, b)
        ok = _kind(b) == 0
        torch.testing.assert_close(a.double()[ok], b[ok], rtol=2e-5, atol=2e-6 * mag,
                                   msg=lambda m: f"{name}: {m}")
    # the rows whose gradient is NaN: the student's where the loss is NaN, the teacher's where
    # the divergence is NaN and weighs in (hrm > 0; else its gradient is 0), at every entry but
    # the masked ones (a -inf logit's gradient is 0 or NaN: it has nowhere to move)
    nan_rows = (ref[0].isnan(), ref[2].isnan() & (c["hrm"] > 0))
    logits = [x.reshape(-1, x.shape[-1]) for x in (view(z), view(u))]
    for name, d, d_ref, nan_row, x in zip(("d student", "d teacher"), grads, ref_grads, nan_rows,
                                          logits):
        half = d.dtype in (torch.bfloat16, torch.float16)
        d = d.double()
        for r in range(d.shape[0]):
            if nan_row[r]:
                live = x[r] != -INF
                assert d[r][live].isnan().all(), (name, r, "a NaN row has a NaN gradient", d[r])
            elif d_ref[r].isfinite().all():
                err = (d[r] - d_ref[r]).abs().max().item()
                tol = (1e-2 if half else 2e-5) * d_ref[r].abs().max().item() + 2e-6 * mag
                assert err <= tol, (name, r, err, tol, d[r], d_ref[r])
            else:
                assert not d[r].isfinite().all(), (name, r, "finite where the reference is not")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=int(os.environ.get("HRM_PROPERTY_EXAMPLES", 150)), deadline=None,
          derandomize=os.environ.get("HRM_PROPERTY_EXAMPLES") is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_hrm_loss_nonfinite_contract_on_every_backend(c):
    check(c)


# The reproducers, on every backend that runs here (each gave a different answer).

def _all(fn):
    return {b: fn(b) for b in BACKENDS}


def test_hrm_loss_nan_teacher_entry_is_nan_in_the_jsd():
    z, u = torch.randn(1, 100, device=DEVICE), torch.randn(1, 100, device=DEVICE)
    u[0, 3] = NAN
    y = torch.tensor([1], device=DEVICE)
    for b, out in _all(lambda b: fused_hrm_loss(z, u, y, 0.5, jsd_beta=0.5, backend=b,
                                                return_components=True)).items():
        assert out.loss.isnan() and out.kl.isnan(), b
    z2 = z.clone()
    z2[0, 3] = NAN                                       # a NaN student entry: NaN KL too
    for b, out in _all(lambda b: fused_hrm_loss(z2, u.nan_to_num(), y, 0.5, jsd_beta=0.5,
                                                backend=b, return_components=True)).items():
        assert out.kl.isnan(), b


@pytest.mark.parametrize("masked,divergence", [("student", dict()),
                                               ("teacher", dict(kl_direction="reverse"))])
def test_hrm_loss_masked_entry_whose_other_probability_underflows_is_infinite(masked, divergence):
    """-inf in one model where the other's probability underflows in fp32 (logit -150): the
    true KL is +inf; the JSD stays finite."""
    z, u = torch.randn(1, 64, device=DEVICE), torch.randn(1, 64, device=DEVICE)
    (z if masked == "student" else u)[0, 10] = -INF
    (u if masked == "student" else z)[0, 10] = -150.0
    y = torch.tensor([1], device=DEVICE)
    for b, loss in _all(lambda b: fused_hrm_loss(z, u, y, 0.5, backend=b, **divergence)).items():
        assert loss == INF, (b, loss)
    ref = hrm_loss_reference(z.double(), u.double(), y, 0.5, jsd_beta=0.5)
    for b, loss in _all(lambda b: fused_hrm_loss(z, u, y, 0.5, backend=b, jsd_beta=0.5)).items():
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v", [1, 3, 8, 15, 17])
def test_hrm_loss_nan_in_the_scalar_tail_of_the_vector_kernels(v):
    """V below or just past the CPU kernels' vector width (16 fp32 lanes, 8 fp64): the tail's
    guards keep NaN (they test the logits, and the JSD's max and min propagate it)."""
    z, u = torch.randn(1, v, device=DEVICE), torch.randn(1, v, device=DEVICE)
    u[0, v - 1] = NAN
    y = torch.tensor([0], device=DEVICE)
    for beta in (0.0, 0.5, 1.0):
        for b, loss in _all(lambda b: fused_hrm_loss(z, u, y, 0.5, jsd_beta=beta,
                                                     backend=b)).items():
            assert loss.isnan(), (b, beta, v)


def test_hrm_loss_numpy_hrm_without_a_teacher_is_refused():
    z, y = torch.randn(4, 10, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises(ValueError, match="hrm=0.5 weighs a divergence to a teacher"):
        fused_hrm_loss(z, None, y, np.float32(0.5))
