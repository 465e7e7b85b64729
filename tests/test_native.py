"""backend="cuda" (csrc/ through hrmkernels.kernels.native and torch.ops.hrmkernels) against the float64 reference, and the ops'
registration (opcheck, torch.compile).

test_hrm_loss.py sweeps the options (directions, temperatures, smoothing, masks, reductions)
for every available backend, this one included; this file covers what is specific to the CUDA
kernels: the sizes and layouts that choose their code paths (16-byte vectors with a scalar head
and tail, fully scalar rows, several blocks per row in the backward), the 3 x 3 dtype pairs,
int32 and strided labels, int64 offsets past 2**31 elements, and the custom-op machinery.

The GPU tests need a CUDA device and the extension (prebuilt hrmkernels._C, or a just-in-time
build of csrc/): elsewhere they skip with the reason. The first tests run anywhere.
"""
import math
import sys

import pytest
import torch

import hrmkernels
from hrmkernels import available_backends, fused_hrm_loss
from hrmkernels.kernels import native
from hrmkernels.kernels import pytorch as torch_impl
from hrmkernels.reference import hrm_loss_reference

WHY = native.unavailable_reason()
needs_cuda_backend = pytest.mark.skipif(WHY is not None, reason=f"backend='cuda' unavailable: {WHY}")
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Anywhere: availability is reported, and refusals say why.

def test_cuda_backend_listed_only_when_it_can_run():
    if WHY is None:
        assert "cuda" in available_backends("cuda")
    else:
        assert isinstance(WHY, str) and WHY
        assert "cuda" not in available_backends()
        with pytest.raises(ValueError, match="backend='cuda' is not available"):
            z = torch.zeros(2, 5, device="cuda" if torch.cuda.is_available() else "cpu")
            fused_hrm_loss(z, z, torch.zeros(2, dtype=torch.long, device=z.device), 0.5,
                           backend="cuda")


def test_native_reason_when_jit_is_disabled(monkeypatch):
    # Pretend a CUDA machine without the prebuilt extension and with HRMKERNELS_JIT=0.
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_load_error", None)
    monkeypatch.setattr(native, "_ops_registered", lambda: False)
    monkeypatch.setitem(sys.modules, "hrmkernels._C", None)    # `from hrmkernels import _C` fails
    monkeypatch.delattr(hrmkernels, "_C", raising=False)       # even after an earlier import
    monkeypatch.setenv("HRMKERNELS_JIT", "0")
    why = native.unavailable_reason()
    assert "hrmkernels._C" in why and "HRMKERNELS_JIT=0" in why
    with pytest.raises(RuntimeError, match="HRMKERNELS_JIT=0"):
        native.hrm_loss_fwd(None, None, None, 0.5, 1.0, 0.0, -100, False)


def test_native_old_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert "compute capability 8.0" in native.unavailable_reason()


def test_native_arch_flags():
    assert native.arch_flags("80+PTX;90a") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80",
        "-gencode=arch=compute_90a,code=sm_90a"]
    assert native.arch_flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a"]


# ----------------------------------------------------------------------------------------------
# On a GPU: the kernels against the float64 reference.

def _make(shape, v, dtype, tdtype, scale=3.0, layout="2d", masked=False):
    """Student and teacher leaves and the (non-copying) views of them the loss receives."""
    rand = lambda *s: torch.randn(*s, device="cuda") * scale
    if layout == "2d":                  # contiguous rows: vector body, scalar head/tail if V % 8
        zl, ul = rand(*shape, v), rand(*shape, v)
        vz = vu = lambda x: x
    elif layout == "shifted":           # logits[:, :-1] and a padded teacher vocabulary [..., :V]
        zl, ul = rand(shape[0], shape[1] + 1, v), rand(shape[0], shape[1] + 1, v + 24)
        vz, vu = (lambda x: x[:, :-1]), (lambda x: x[:, :-1, :v])
    elif layout == "offset":            # rows start 1 element (2 or 4 bytes) past alignment in z
        zl, ul = rand(*shape, v + 1), rand(*shape, v)
        vz, vu = (lambda x: x[..., 1:]), (lambda x: x)
    else:                               # "odd": z and u misaligned differently: scalar rows
        zl, ul = rand(*shape, v + 1), rand(*shape, v + 3)
        vz, vu = (lambda x: x[..., 1:]), (lambda x: x[..., 3:])
    zl, ul = zl.to(dtype), ul.to(tdtype)
    if masked:   # the same -inf entries in both (a masked vocabulary), never all of a row
        m = torch.rand(v, device="cuda") < 0.3
        m[0] = False
        vz(zl)[..., m] = float("-inf")
        vu(ul)[..., m] = float("-inf")
    return zl, ul, vz, vu


def _grads(fn, zl, ul, vz, vu, y, g, teacher_grad, **kw):
    zl = zl.detach().requires_grad_()
    ul = ul.detach().requires_grad_(teacher_grad)
    out = fn(vz(zl), vu(ul), y, kw.pop("hrm"), reduction="none", return_components=True, **kw)
    (out[0] * g).sum().backward()
    return out, zl.grad, ul.grad


def check(n=6, v=1000, dtype=torch.float32, tdtype=None, layout="2d", hrm=0.5, t=2.0, eps=0.1,
          direction="forward", teacher_grad=True, ignore=True, scale=3.0, masked=False,
          label_dtype=torch.int64, label_stride=1):
    tdtype = tdtype or dtype
    shape = (2, n) if layout == "shifted" else (n,)
    zl, ul, vz, vu = _make(shape, v, dtype, tdtype, scale, layout, masked)
    rows = vz(zl).shape[:-1]
    y = torch.randint(0, v, (*rows[:-1], rows[-1] * label_stride), device="cuda")[..., ::label_stride]
    if masked:
        y = vz(zl).float().argmax(-1)    # a label that is not masked
    if ignore:
        y[..., ::3] = -100
    y = y.to(label_dtype)
    g = torch.rand(rows, device="cuda") * 2 - 0.5
    kw = {"hrm": hrm, "temperature": t, "label_smoothing": eps, "kl_direction": direction}
    got, dz, du = _grads(lambda *a, **k: fused_hrm_loss(*a, backend="cuda", **k), zl, ul, vz, vu, y,
                         g, teacher_grad, **kw)
    ref, dz_ref, du_ref = _grads(hrm_loss_reference, zl.double(), ul.double(), vz, vu, y.long(),
                                 g.double(), teacher_grad, **kw)
    # fp32 floors as in test_hrm_loss.py: a few ulps of the log-sum-exps (~|logit| / T).
    fin = [x[x.isfinite()] for x in (zl, ul)]
    mag = max(1.0, max(f.abs().max().item() if f.numel() else 0.0 for f in fin) / t)
    for name, a, b in zip(("loss", "ce", "kl"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * mag, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    g_floor = 5e-7 * g.abs().max().item() * math.sqrt(y.numel()) * (1 + hrm / t * mag)
    pairs = [(dz, dz_ref, dtype)] + ([(du, du_ref, tdtype)] if teacher_grad else [])
    for d, d_ref, dt in pairs:
        d_ref = torch.zeros_like(d, dtype=torch.float64) if d_ref is None else d_ref   # hrm == 0
        assert d.dtype == dt
        err, size = (d.double() - d_ref).norm().item(), d_ref.norm().item()
        assert err <= (1e-2 if dt in HALF else 1e-5) * size + g_floor, (err, size)
    return got, dz, du


# V: 1 and 7 (head/tail only), 8 and 9, 4095 / 4096 / 4097 around one backward block
# (256 threads x 16), 32003 (contiguous rows misaligned by a different head each), and the
# common vocabularies, one or two rows each.
SIZES = [(5, 1), (5, 7), (5, 8), (5, 9), (4, 100), (4, 4095), (3, 4096), (3, 4097), (2, 32000),
         (2, 32003), (2, 50257), (1, 128256), (1, 151936), (1, 262144)]


@needs_cuda_backend
@pytest.mark.parametrize("n,v", SIZES, ids=[f"n={n},V={v}" for n, v in SIZES])
@pytest.mark.parametrize("layout", ["2d", "shifted", "offset", "odd"])
def test_cuda_sizes_and_layouts(n, v, layout):
    check(n=n, v=v, layout=layout, dtype=torch.bfloat16)


@needs_cuda_backend
@pytest.mark.parametrize("tdtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [1000, 1001])
def test_cuda_dtype_pairs(dtype, tdtype, v):
    check(v=v, dtype=dtype, tdtype=tdtype)


@needs_cuda_backend
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("t,eps,hrm", [(1.0, 0.0, 0.5), (2.0, 0.1, 0.5), (0.5, 1.0, 10.0),
                                       (4.0, 0.1, 0.0), (1.0, 0.1, 0.001)])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_options(direction, t, eps, hrm, masked):
    check(v=3001, direction=direction, t=t, eps=eps, hrm=hrm, masked=masked)
    check(v=3000, direction=direction, t=t, eps=eps, hrm=hrm, masked=masked, dtype=torch.bfloat16)


@needs_cuda_backend
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("label_stride", [1, 3])
def test_cuda_labels(label_dtype, label_stride):
    check(v=999, label_dtype=label_dtype, label_stride=label_stride)


@needs_cuda_backend
def test_cuda_large_logits():
    check(v=5000, scale=1e4, t=4.0)
    check(v=5000, scale=1e4, direction="reverse")


@needs_cuda_backend
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_launchers_match_torch_impl(reverse):
    # The launcher contract itself: outputs and saved stats, then both gradients with a
    # stride-0 grad, against the torch backend evaluated in float64.
    z, u = torch.randn(3, 5, 777, device="cuda"), torch.randn(3, 5, 777, device="cuda") * 2
    y = torch.randint(0, 777, (15,), device="cuda")
    y[4] = -100
    args = (0.5, 2.0, 0.1, -100, reverse)
    got = native.hrm_loss_fwd(z, u, y, *args)
    ref = torch_impl.hrm_loss_fwd(z.double(), u.double(), y, *args)
    keep = y != -100
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a[keep].double(), b[keep], rtol=1e-5, atol=1e-5)
    assert (got[0][4] == 0) and (got[1][4] == 0) and (got[2][4] == 0)
    assert (got[3][4] == 0).all()     # ignored row: the stats are 0 too
    grad = torch.full((), 0.7, device="cuda").expand(15)
    dz, du = torch.empty_like(z), torch.empty_like(u)
    native.hrm_loss_bwd(z, u, y, got[3], grad, *args, dz, du)
    dz_ref, du_ref = torch.empty_like(z, dtype=torch.float64), torch.empty_like(u, dtype=torch.float64)
    torch_impl.hrm_loss_bwd(z.double(), u.double(), y, ref[3], grad.double(), *args, dz_ref, du_ref)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du.double(), du_ref, rtol=1e-5, atol=1e-6)
    assert (dz.view(15, -1)[4] == 0).all() and (du.view(15, -1)[4] == 0).all()


@needs_cuda_backend
def test_cuda_out_of_range_labels_are_nan_not_a_crash():
    z, u = torch.randn(5, 4099, device="cuda"), torch.randn(5, 4099, device="cuda")
    y = torch.tensor([1, 4099, -100, -2, 2**40], device="cuda")
    zl = z.clone().requires_grad_()
    loss = fused_hrm_loss(zl, u, y, 0.5, backend="cuda", reduction="none")
    loss.sum().backward()
    torch.cuda.synchronize()      # an out-of-bounds access would surface here
    assert torch.isnan(loss[[1, 3, 4]]).all() and loss[2] == 0 and torch.isfinite(loss[0])
    assert (zl.grad[2] == 0).all()


@needs_cuda_backend
def test_cuda_inplace_backward():
    z, u = torch.randn(2, 6, 1001, device="cuda"), torch.randn(2, 6, 1001, device="cuda")
    y = torch.randint(0, 1001, (2, 5), device="cuda")
    zl = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fused_hrm_loss(zl[:, :-1], u[:, :-1], y, 0.5, backend="cuda"), zl)
    buf = z.clone().requires_grad_() * 1.0
    loss = fused_hrm_loss(buf[:, :-1], u[:, :-1], y, 0.5, backend="cuda", inplace_backward=True)
    (dz,) = torch.autograd.grad(loss, buf)
    torch.testing.assert_close(dz, expected)
    torch.testing.assert_close(buf.detach()[:, -1], z[:, -1])     # nothing else was written


@needs_cuda_backend
def test_cuda_int64_offsets():
    # N * V > 2**31 elements: rows past the 2**31-th element must be addressed with int64 offsets.
    n, v = 16500, 131072
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    z = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    zl = z.requires_grad_()
    loss = fused_hrm_loss(zl, u, y, 0.5, temperature=2.0, backend="cuda", reduction="none")
    g = torch.rand(n, device="cuda")
    loss.backward(g)
    tail = slice(n - 3, n)            # rows that start beyond element 2**31
    assert (n - 3) * v > 2**31
    zt = z.detach()[tail].double().requires_grad_()
    ref = hrm_loss_reference(zt, u[tail].double(), y[tail], 0.5, temperature=2.0, reduction="none")
    ref.backward(g[tail].double())
    torch.testing.assert_close(loss[tail].double(), ref, rtol=1e-5, atol=1e-5)
    err = (zl.grad[tail].double() - zt.grad).norm() / zt.grad.norm()
    assert err < 1e-2


# ----------------------------------------------------------------------------------------------
# hrm_loss_fwd_bwd: one pass over a row held on chip by a thread-block cluster (Hopper), else the
# two kernels; either way the same results as hrm_loss_fwd then hrm_loss_bwd.

FUSED = [(1000, torch.bfloat16, torch.bfloat16), (1001, torch.bfloat16, torch.bfloat16),
         (32000, torch.bfloat16, torch.bfloat16), (128256, torch.bfloat16, torch.bfloat16),
         (151936, torch.bfloat16, torch.float32), (262144, torch.bfloat16, torch.bfloat16),
         (262144, torch.float32, torch.float32), (50000, torch.float16, torch.float16)]


@needs_cuda_backend
@pytest.mark.parametrize("v,dtype,tdtype", FUSED, ids=[f"V={v},{d},{t}" for v, d, t in FUSED])
@pytest.mark.parametrize("reverse,t,eps", [(False, 2.0, 0.1), (True, 1.0, 0.0)])
@pytest.mark.parametrize("teacher", [False, True])
def test_cuda_fwd_bwd_matches_two_kernels(v, dtype, tdtype, reverse, t, eps, teacher):
    n = 7
    z = (torch.randn(n, 1, v, device="cuda") * 3).to(dtype)
    u = (torch.randn(n, 1, v, device="cuda") * 3).to(tdtype)
    y = torch.randint(0, v, (n,), device="cuda")
    y[2] = -100
    y[5] = v + 3                       # out of range: NaN loss, no out-of-bounds access
    grad = torch.rand(n, device="cuda")
    args = (0.5, t, eps, -100, reverse)
    dz, du = torch.empty_like(z), torch.empty_like(u) if teacher else None
    if torch.cuda.get_device_capability()[0] >= 9 and v % 8 == 0:
        assert native.fwd_bwd_cluster_size(z, u, dz, du) > 0   # the cluster path runs
    got = native.hrm_loss_fwd_bwd(z, u, y, grad, *args, dz, du)
    ref = native.hrm_loss_fwd(z, u, y, *args)
    dz_ref, du_ref = torch.empty_like(z), torch.empty_like(u) if teacher else None
    native.hrm_loss_bwd(z, u, y, ref[3], grad, *args, dz_ref, du_ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    for d, d_ref in ((dz, dz_ref), (du, du_ref)) if teacher else ((dz, dz_ref),):
        err = (d.double() - d_ref.double()).norm() / d_ref.double().norm()
        assert err < (1e-5 if d.dtype == torch.float32 else 1e-2), err
    assert (dz[2] == 0).all()


@needs_cuda_backend
def test_cuda_fwd_bwd_in_place_and_strided_grad():
    z = torch.randn(2, 4, 128256, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(2, 4, 128256, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 128256, (8,), device="cuda")
    grad = torch.full((), 0.125, device="cuda").expand(8)       # "mean" over 8 rows
    args = (0.5, 2.0, 0.0, -100, False)
    ref = native.hrm_loss_fwd(z, u, y, *args)
    dz_ref = torch.empty_like(z)
    native.hrm_loss_bwd(z, u, y, ref[3], grad, *args, dz_ref, None)
    buf = z.clone()
    got = native.hrm_loss_fwd_bwd(buf, u, y, grad, *args, buf, None)   # dz overwrites z
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    err = (buf.double() - dz_ref.double()).norm() / dz_ref.double().norm()
    assert err < 1e-2


# ----------------------------------------------------------------------------------------------
# The custom ops: schema, fake implementations, torch.compile.

def _op_args(reverse=False, teacher=True):
    z = torch.randn(2, 3, 1003, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(2, 3, 1003, device="cuda")
    y = torch.randint(0, 1003, (6,), device="cuda")
    y[1] = -100
    opts = (0.5, 2.0, 0.1, -100, reverse)
    stats = torch.ops.hrmkernels.hrm_loss_fwd(z, u, y, *opts)[3]
    grad = torch.rand(6, device="cuda")
    du = torch.empty_like(u) if teacher else None
    return (z, u, y, *opts), (z, u, y, stats, grad, *opts, torch.empty_like(z), du)


@needs_cuda_backend
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("teacher", [False, True])
def test_cuda_opcheck(reverse, teacher):
    fwd_args, bwd_args = _op_args(reverse, teacher)
    torch.library.opcheck(torch.ops.hrmkernels.hrm_loss_fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.hrmkernels.hrm_loss_bwd.default, bwd_args)
    z, u, y, _, grad, *opts, dz, du = bwd_args
    torch.library.opcheck(torch.ops.hrmkernels.hrm_loss_fwd_bwd.default,
                          (z, u, y, grad, *opts, dz, du))


@needs_cuda_backend
def test_native_compile_fullgraph():
    _, bwd_args = _op_args()

    def step(z, u, y, stats, grad, dz, du):
        out = native.hrm_loss_fwd(z, u, y, 0.5, 2.0, 0.1, -100, False)
        native.hrm_loss_bwd(z, u, y, out[3], grad, 0.5, 2.0, 0.1, -100, False, dz, du)
        return out[0], dz, du

    z, u, y, stats, grad, _, _, _, _, _, dz, du = bwd_args
    eager = step(z, u, y, stats, grad, torch.empty_like(dz), torch.empty_like(du))
    compiled = torch.compile(step, fullgraph=True)(z, u, y, stats, grad, dz, du)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@needs_cuda_backend
def test_cuda_fused_loss_compiles():
    z = torch.randn(4, 9, 1000, device="cuda", requires_grad=True)
    u = torch.randn(4, 9, 1000, device="cuda")
    y = torch.randint(0, 1000, (4, 9), device="cuda")
    fn = lambda z: fused_hrm_loss(z, u, y, 0.5, temperature=2.0, backend="cuda")
    (g_eager,) = torch.autograd.grad(fn(z), z)
    (g_comp,) = torch.autograd.grad(torch.compile(fn)(z), z)
    torch.testing.assert_close(g_comp, g_eager)


@needs_cuda_backend
def test_cuda_binding_errors_name_the_problem():
    z = torch.randn(1, 4, 10, device="cuda")
    y = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="float64"):
        native.hrm_loss_fwd(z.double(), z, y, 0.5, 1.0, 0.0, -100, False)
    with pytest.raises(RuntimeError, match="unit last stride"):
        u = torch.randn(1, 10, 4, device="cuda").transpose(1, 2)    # (1, 4, 10), strides (40, 1, 4)
        native.hrm_loss_fwd(z, u, y, 0.5, 1.0, 0.0, -100, False)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        native.hrm_loss_fwd(z, z, y[:3], 0.5, 1.0, 0.0, -100, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        native.hrm_loss_fwd(z, z.cpu(), y, 0.5, 1.0, 0.0, -100, False)
