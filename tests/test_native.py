"""The C++ kernels of csrc/ (backend="cpu" on CPU tensors, backend="cuda" on CUDA tensors, through
hrmkernels.kernels.native and torch.ops.hrmkernels) against the float64 reference.

test_hrm_loss.py sweeps the options (directions, JSD, temperatures, smoothing, masks,
reductions) for every available backend, these two included; this file covers what is specific
to the C++ kernels: the sizes and layouts that choose their code paths (CPU: vectors of 16
lanes, blocks of 1024 elements, a scalar tail, masked blocks refolded by the scalar math,
rows split over threads; CUDA: 16-byte vectors with a scalar head and tail, fully scalar rows,
several blocks per row in the backward), every dtype pair, int32 and strided labels, in-place
backward, int64 offsets past 2**31 elements (GPU), and the availability logic. The ops'
schemas and fakes are checked by tests/test_compile.py (opcheck, torch.compile).

backend="cpu" runs wherever the extension is built or can be built just-in-time (a C++
compiler); backend="cuda" needs a GPU. Elsewhere their tests skip with the reason.
"""
import math
import sys

import pytest
import torch

import hrmkernels
from hrmkernels import _build, available_backends, fused_hrm_loss
from hrmkernels.kernels import native
from hrmkernels.kernels import pytorch as torch_impl
from hrmkernels.reference import hrm_loss_reference

WHY = {b: native.unavailable_reason(b) for b in ("cpu", "cuda")}
NATIVE = [pytest.param(b, marks=pytest.mark.skipif(WHY[b] is not None,
                                                    reason=f"backend={b!r} unavailable: {WHY[b]}"))
          for b in ("cpu", "cuda")]
needs_cuda_backend = pytest.mark.skipif(WHY["cuda"] is not None,
                                        reason=f"backend='cuda' unavailable: {WHY['cuda']}")
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Anywhere: availability is reported, and refusals say why.

def test_cpu_backend_is_built_where_a_compiler_is():
    # CI's guard that backend="cpu" is really tested: with a C++ compiler and torch, the
    # extension is installed or builds just-in-time, and "auto" takes it.
    if _build.why_no_cpu() is not None:
        pytest.skip(f"no C++ build here: {_build.why_no_cpu()}")
    if WHY["cpu"] is not None and "HRMKERNELS_JIT=0" in WHY["cpu"]:
        pytest.skip(WHY["cpu"])
    assert WHY["cpu"] is None
    assert available_backends("cpu")[0] == "cpu"


def test_cuda_backend_listed_only_when_it_can_run():
    if WHY["cuda"] is None:
        assert "cuda" in available_backends("cuda")
    else:
        assert isinstance(WHY["cuda"], str) and WHY["cuda"]
        assert "cuda" not in available_backends()
        with pytest.raises(ValueError, match="backend='cuda' is not available"):
            z = torch.zeros(2, 5, device="cuda" if torch.cuda.is_available() else "cpu")
            fused_hrm_loss(z, z, torch.zeros(2, dtype=torch.long, device=z.device), 0.5,
                           backend="cuda")


def _pretend_not_loaded(monkeypatch, jit):
    """The state of a fresh process without hrmkernels._C; HRMKERNELS_JIT=`jit`."""
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_devices", ())
    monkeypatch.setattr(native, "_prebuilt_error", None)
    monkeypatch.setattr(native, "_jit_error", None)
    monkeypatch.setattr(native, "_has_kernel", lambda device: False)
    monkeypatch.setitem(sys.modules, "hrmkernels._C", None)    # `from hrmkernels import _C` fails
    monkeypatch.delattr(hrmkernels, "_C", raising=False)       # even after an earlier import
    monkeypatch.setenv("HRMKERNELS_JIT", jit)


def test_native_reason_when_jit_is_disabled(monkeypatch):
    # A CUDA machine without the prebuilt extension and with HRMKERNELS_JIT=0.
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    _pretend_not_loaded(monkeypatch, "0")
    for device in ("cuda", "cpu"):
        why = native.unavailable_reason(device)
        assert "hrmkernels._C" in why and "HRMKERNELS_JIT=0" in why
    with pytest.raises(RuntimeError, match="HRMKERNELS_JIT=0"):
        native.hrm_loss_fwd(torch.zeros(1, 1, 1), None, None, 0.5, 1.0, 0.0, -100, 0.0)


def test_auto_never_compiles(monkeypatch):
    # Without an installed extension, "auto" on CPU takes backend="torch" at once: a
    # just-in-time build happens only for an explicit backend="cpu".
    _pretend_not_loaded(monkeypatch, "1")
    monkeypatch.setattr(native, "_jit_build", lambda: pytest.fail("auto started a C++ build"))
    assert "never compiles" in native.unavailable_reason("cpu", build=False)
    assert available_backends("cpu")[0] == "torch"
    z = torch.randn(3, 7)
    loss = fused_hrm_loss(z, z, torch.tensor([1, 2, 3]), 0.5)
    torch.testing.assert_close(loss, hrm_loss_reference(z, z, torch.tensor([1, 2, 3]), 0.5))


def test_cpu_backend_unavailable_says_why(monkeypatch):
    _pretend_not_loaded(monkeypatch, "0")
    with pytest.raises(ValueError, match="backend='cpu' is not available.*HRMKERNELS_JIT=0"):
        fused_hrm_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]), 0.5,
                       backend="cpu")


def test_native_old_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert "compute capability 8.0" in native.unavailable_reason("cuda")


def test_native_arch_flags():
    assert native.arch_flags("80+PTX;90a") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80",
        "-gencode=arch=compute_90a,code=sm_90a"]
    assert native.arch_flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_cpu_build_flags(monkeypatch):
    monkeypatch.setenv("HRMKERNELS_CPU_CAPABILITY", "avx2")
    assert {"-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"} <= set(
        _build.cxx_flags())
    monkeypatch.setenv("HRMKERNELS_CPU_CAPABILITY", "DEFAULT")
    assert _build.cxx_flags() == ["-O3", "-DCPU_CAPABILITY=DEFAULT"]
    monkeypatch.setenv("HRMKERNELS_CPU_CAPABILITY", "SSE9")
    with pytest.raises(ValueError, match="HRMKERNELS_CPU_CAPABILITY"):
        _build.cpu_capability()


# ----------------------------------------------------------------------------------------------
# The kernels against the float64 reference.

def _make(backend, shape, v, dtype, tdtype, scale=3.0, layout="2d", masked=False):
    """Student and teacher leaves and the (non-copying) views of them the loss receives."""
    rand = lambda *s: torch.randn(*s, device=backend) * scale  # noqa: E731
    if layout == "2d":                  # contiguous rows
        zl, ul = rand(*shape, v), rand(*shape, v)
        vz = vu = lambda x: x  # noqa: E731
    elif layout == "shifted":           # logits[:, :-1] and a padded teacher vocabulary [..., :V]
        zl, ul = rand(shape[0], shape[1] + 1, v), rand(shape[0], shape[1] + 1, v + 24)
        vz, vu = (lambda x: x[:, :-1]), (lambda x: x[:, :-1, :v])
    elif layout == "offset":            # rows start 1 element (2 or 4 bytes) past alignment in z
        zl, ul = rand(*shape, v + 1), rand(*shape, v)
        vz, vu = (lambda x: x[..., 1:]), (lambda x: x)
    else:                               # "odd": z and u misaligned differently
        zl, ul = rand(*shape, v + 1), rand(*shape, v + 3)
        vz, vu = (lambda x: x[..., 1:]), (lambda x: x[..., 3:])
    zl, ul = zl.to(dtype), ul.to(tdtype)
    if masked:   # the same -inf entries in both (a masked vocabulary), never all of a row
        m = torch.rand(v, device=backend) < 0.3
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


def check(backend, n=6, v=1000, dtype=torch.float32, tdtype=None, layout="2d", hrm=0.5, t=2.0,
          eps=0.1, beta=0.0, teacher_grad=True, ignore=True, scale=3.0, masked=False,
          label_dtype=torch.int64, label_stride=1):
    tdtype = tdtype or dtype
    if backend == "cuda" and torch.float64 in (dtype, tdtype):
        pytest.skip("float64 runs on backend='cpu' and 'torch'")
    shape = (2, n) if layout == "shifted" else (n,)
    zl, ul, vz, vu = _make(backend, shape, v, dtype, tdtype, scale, layout, masked)
    rows = vz(zl).shape[:-1]
    y = torch.randint(0, v, (*rows[:-1], rows[-1] * label_stride),
                      device=backend)[..., ::label_stride]
    if masked:
        y = vz(zl).float().argmax(-1)    # a label that is not masked
    if ignore:
        y[..., ::3] = -100
    y = y.to(label_dtype)
    g = torch.rand(rows, device=backend) * 2 - 0.5
    div = (dict(jsd_beta=beta) if 0 < beta < 1
           else dict(kl_direction=("forward", "reverse")[int(beta)]))
    kw = {"hrm": hrm, "temperature": t, "label_smoothing": eps, **div}
    got, dz, du = _grads(lambda *a, **k: fused_hrm_loss(*a, backend=backend, **k), zl, ul, vz, vu,
                         y, g, teacher_grad, **kw)
    ref, dz_ref, du_ref = _grads(hrm_loss_reference, zl.double(), ul.double(), vz, vu, y.long(),
                                 g.double(), teacher_grad, **kw)
    # fp32 floors as in test_hrm_loss.py: a few ulps of the log-sum-exps (~|logit| / T).
    fin = [x[x.isfinite()] for x in (zl, ul)]
    mag = max(1.0, max(f.abs().max().item() if f.numel() else 0.0 for f in fin) / t)
    out_dtype = torch.float64 if torch.float64 in (dtype, tdtype) else torch.float32
    for name, a, b in zip(("loss", "ce", "div", "entropy"), (*got, got.entropy),
                          (*ref, ref.entropy)):
        assert a.dtype == out_dtype and a.shape == b.shape, name
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


# V: 1, 7, 8, 9, 15, 16, 17 (a tail only, or around one vector of 16 fp32 lanes / 8 CUDA
# elements), 1023 / 1024 / 1025 and 2047 / 2049 around the CPU's 1024-element blocks,
# 4095 / 4096 / 4097 around one CUDA backward block (256 threads x 16), 32003 (contiguous rows
# misaligned by a different head each on CUDA), and the common vocabularies.
SIZES = [(5, 1), (5, 7), (5, 8), (5, 9), (5, 15), (5, 16), (5, 17), (4, 100), (4, 1023),
         (4, 1024), (4, 1025), (3, 2047), (3, 2049), (4, 4095), (3, 4096), (3, 4097), (2, 32000),
         (2, 32003), (2, 50257), (1, 128256), (1, 151936), (1, 262144)]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("n,v", SIZES, ids=[f"n={n},V={v}" for n, v in SIZES])
@pytest.mark.parametrize("layout", ["2d", "shifted", "offset", "odd"])
def test_native_sizes_and_layouts(backend, n, v, layout):
    check(backend, n=n, v=v, layout=layout, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("tdtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [1000, 1041])
def test_native_dtype_pairs(backend, dtype, tdtype, v):
    check(backend, v=v, dtype=dtype, tdtype=tdtype)
    if backend == "cpu":
        check(backend, v=v, dtype=dtype, tdtype=tdtype, beta=0.3, t=1.0)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("t,eps,hrm", [(1.0, 0.0, 0.5), (2.0, 0.1, 0.5), (0.5, 1.0, 10.0),
                                       (4.0, 0.1, 0.0), (1.0, 0.1, 0.001)])
@pytest.mark.parametrize("masked", [False, True])
def test_native_options(backend, beta, t, eps, hrm, masked):
    if backend == "cuda" and 0 < beta < 1:
        pytest.skip("the CUDA kernels have no JSD")
    check(backend, v=3001, beta=beta, t=t, eps=eps, hrm=hrm, masked=masked)
    check(backend, v=3000, beta=beta, t=t, eps=eps, hrm=hrm, masked=masked, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("label_stride", [1, 3])
def test_native_labels(backend, label_dtype, label_stride):
    check(backend, v=999, label_dtype=label_dtype, label_stride=label_stride)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_native_large_logits(backend, beta):
    if backend == "cuda" and 0 < beta < 1:
        pytest.skip("the CUDA kernels have no JSD")
    check(backend, v=5000, scale=1e4, t=4.0, beta=beta)
    check(backend, v=5000, scale=1e4, t=1.0, beta=beta)


@pytest.mark.parametrize("backend", NATIVE)
def test_native_jsd_far_below_the_mixture_underflow(backend):
    # Log-probabilities of both models below -104 at most entries: a mixture formed as
    # beta p + (1 - beta) q underflows to 0 there in fp32 and log 0 gives NaN (Liger-Kernel
    # #1453); the log-space mixture stays finite and exact.
    if backend == "cuda":
        pytest.skip("the CUDA kernels have no JSD")
    got, _, _ = check(backend, v=4001, scale=60.0, t=1.0, beta=0.5, eps=0.0)
    assert torch.isfinite(got.loss).all()


@pytest.mark.parametrize("backend", NATIVE)
def test_native_masked_entries_in_the_vector_body_and_tail(backend):
    # KL = +inf where q = 0 < p, also when p itself is far below the row's maximum (its
    # exp underflows) and whether the entry falls in a vector or in the row's tail.
    v = 1041                                   # CPU: one block of 1024 and a tail of 17
    z, u = torch.randn(4, v, device=backend), torch.randn(4, v, device=backend)
    z[0, 500] = float("-inf")                  # vector body, p ordinary
    z[1, 1035] = float("-inf")                 # tail
    z[2, 500], u[2, 500] = float("-inf"), -200.0   # p = e^-200 relative: underflows in fp32
    z[3, 7], u[3, 7] = float("-inf"), float("-inf")  # masked in both: contributes 0
    y = torch.tensor([0, 1, 2, 3], device=backend)
    out = fused_hrm_loss(z, u, y, 0.5, backend=backend, reduction="none", return_components=True)
    assert torch.isinf(out.kl[:3]).all() and torch.isfinite(out.kl[3])
    ref = hrm_loss_reference(z[3:].double(), u[3:].double(), y[3:], 0.5, reduction="none",
                             return_components=True)
    torch.testing.assert_close(out.kl[3:].double(), ref.kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_native_launchers_match_torch_impl(backend, beta):
    # The launcher contract itself: outputs and saved stats, then both gradients with a
    # stride-0 grad, against the torch backend evaluated in float64.
    if backend == "cuda" and 0 < beta < 1:
        pytest.skip("the CUDA kernels have no JSD")
    z = torch.randn(3, 5, 777, device=backend)
    u = torch.randn(3, 5, 777, device=backend) * 2
    y = torch.randint(0, 777, (15,), device=backend)
    y[4] = -100
    args = (0.5, 2.0, 0.1, -100, beta)
    got = native.hrm_loss_fwd(z, u, y, *args)
    ref = torch_impl.hrm_loss_fwd(z.double(), u.double(), y, *args)
    keep = y != -100
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a[keep].double(), b[keep], rtol=1e-5, atol=1e-5)
    assert all((t[4] == 0).all() for t in got)     # ignored row: outputs and stats are 0
    grad = torch.full((), 0.7, device=backend).expand(15)
    dz, du = torch.empty_like(z), torch.empty_like(u)
    native.hrm_loss_bwd(z, u, y, got[4], grad, *args, dz, du)
    dz_ref, du_ref = (torch.empty_like(x, dtype=torch.float64) for x in (z, u))
    torch_impl.hrm_loss_bwd(z.double(), u.double(), y, ref[4], grad.double(), *args, dz_ref,
                            du_ref)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du.double(), du_ref, rtol=1e-5, atol=1e-6)
    assert (dz.view(15, -1)[4] == 0).all() and (du.view(15, -1)[4] == 0).all()


@pytest.mark.parametrize("backend", NATIVE)
def test_native_float64_grad(backend):
    # float64 inputs: float64 outputs and stats, and the incoming gradient read as float64.
    if backend == "cuda":
        pytest.skip("float64 runs on backend='cpu' and 'torch'")
    z = torch.randn(1, 4, 300, dtype=torch.float64)
    y = torch.tensor([3, 1, -100, 299])
    out = native.hrm_loss_fwd(z, z * 0.5, y, 0.5, 2.0, 0.0, -100, 0.0)
    assert all(t.dtype == torch.float64 for t in out)
    g = torch.tensor([1.0, 1e-300, 0.0, -2.0], dtype=torch.float64)   # 1e-300: not fp32
    dz = torch.empty_like(z)
    native.hrm_loss_bwd(z, z * 0.5, y, out[4], g, 0.5, 2.0, 0.0, -100, 0.0, dz, None)
    assert (dz[0, 1] != 0).any() and dz[0, 1].abs().max() < 1e-299


@pytest.mark.parametrize("backend", NATIVE)
def test_native_out_of_range_labels(backend):
    """CPU: the torch backend's ValueError, from the C++ kernels (also inside a compiled graph);
    CUDA: NaN at those tokens and never a read out of bounds."""
    z, u = torch.randn(5, 4099, device=backend), torch.randn(5, 4099, device=backend)
    y = torch.tensor([1, 4099, -100, -2, 2**40], device=backend)
    zl = z.clone().requires_grad_()
    if backend == "cpu":
        with pytest.raises(ValueError, match="found 4099 at flat position 1"):
            fused_hrm_loss(zl, u, y, 0.5, backend=backend)
        with pytest.raises(ValueError, match="found -2 at flat position 3"):
            native.hrm_loss_fwd(z[None], u[None], y.clone().fill_(1).index_fill_(0, torch.tensor(
                [3]), -2), 0.5, 1.0, 0.0, -100, 0.0)
        return
    loss = fused_hrm_loss(zl, u, y, 0.5, backend=backend, reduction="none")
    loss.sum().backward()
    torch.cuda.synchronize()      # an out-of-bounds access would surface here
    assert torch.isnan(loss[[1, 3, 4]]).all() and loss[2] == 0 and torch.isfinite(loss[0])
    assert (zl.grad[2] == 0).all()


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_inplace_backward(backend, dtype):
    z = torch.randn(2, 6, 1041, device=backend).to(dtype)
    u = torch.randn(2, 6, 1041, device=backend)
    y = torch.randint(0, 1041, (2, 5), device=backend)
    zl = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fused_hrm_loss(zl[:, :-1], u[:, :-1], y, 0.5,
                                                     backend=backend), zl)
    buf = z.clone().requires_grad_() * 1.0
    loss = fused_hrm_loss(buf[:, :-1], u[:, :-1], y, 0.5, backend=backend, inplace_backward=True)
    (dz,) = torch.autograd.grad(loss, buf)
    torch.testing.assert_close(dz, expected)
    torch.testing.assert_close(buf.detach()[:, -1], z[:, -1])     # nothing else was written


def test_cpu_rows_split_over_threads_give_the_same_bits():
    # at::parallel_for splits the rows (here 2 tasks of 32 rows for V = 1000); each row is
    # computed the same way whichever thread takes it.
    if WHY["cpu"] is not None:
        pytest.skip(WHY["cpu"])
    z, u = torch.randn(1, 64, 1000) * 3, torch.randn(1, 64, 1000) * 3
    y = torch.randint(0, 1000, (64,))
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            out = native.hrm_loss_fwd(z, u, y, 0.5, 2.0, 0.1, -100, 0.0)
            dz = torch.empty_like(z)
            grad = torch.rand(64, generator=torch.Generator().manual_seed(1))
            native.hrm_loss_bwd(z, u, y, out[4], grad, 0.5, 2.0, 0.1, -100, 0.0, dz, None)
        finally:
            torch.set_num_threads(threads)
        results.append((*out, dz))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    check("cpu", n=64, v=1000)


def test_cpu_peaked_rows_flush_denormals_and_restore_the_mode():
    # Logits of scale 30: most probabilities are denormal in fp32; the kernels flush them (as
    # the GPU's ex2.approx.ftz does) and leave the calling thread's floating-point mode as it was.
    if WHY["cpu"] is not None:
        pytest.skip(WHY["cpu"])
    check("cpu", n=8, v=3000, scale=30.0, t=1.0)
    tiny = torch.tensor([1e-39]) * 1.0            # a float32 denormal survives a multiply
    assert tiny.item() != 0.0


def test_cpu_binding_errors_name_the_problem():
    if WHY["cpu"] is not None:
        pytest.skip(WHY["cpu"])
    z = torch.randn(1, 4, 10)
    y = torch.zeros(4, dtype=torch.long)
    fwd = torch.ops.hrmkernels.hrm_loss_fwd
    with pytest.raises(RuntimeError, match="z \\(student logits\\) must be float32.*got Int"):
        fwd(z.int(), z, y, 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="unit last stride"):
        u = torch.randn(1, 10, 4).transpose(1, 2)    # (1, 4, 10), strides (40, 1, 4)
        fwd(z, u, y, 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="labels must have shape \\(4,\\)"):
        fwd(z, z, y[:3], 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="labels must be int64 or int32"):
        fwd(z, z, y.float(), 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="beta must lie in \\[0, 1\\]"):
        fwd(z, z, y, 0.5, 1.0, 0.0, -100, 1.5)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        fwd(z, z, y, 0.5, 0.0, 0.0, -100, 0.0)
    stats = fwd(z, z, y, 0.5, 1.0, 0.0, -100, 0.0)[4]
    bwd = torch.ops.hrmkernels.hrm_loss_bwd
    with pytest.raises(RuntimeError, match="stats must be a contiguous Float \\(4, 5\\)"):
        bwd(z, z, y, stats[:, :4], torch.ones(4), 0.5, 1.0, 0.0, -100, 0.0, z.clone(), None)
    with pytest.raises(RuntimeError, match="dz must have z's dtype"):
        bwd(z, z, y, stats, torch.ones(4), 0.5, 1.0, 0.0, -100, 0.0, z.double(), None)
    with pytest.raises(RuntimeError, match="grad must be float32"):
        bwd(z, z, y, stats, torch.ones(4).half(), 0.5, 1.0, 0.0, -100, 0.0, z.clone(), None)


# ----------------------------------------------------------------------------------------------
# CUDA only: int64 offsets at scale and the CUDA binding's messages.

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


@needs_cuda_backend
def test_cuda_binding_errors_name_the_problem():
    z = torch.randn(1, 4, 10, device="cuda")
    y = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="float64"):
        native.hrm_loss_fwd(z.double(), z, y, 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="unit last stride"):
        u = torch.randn(1, 10, 4, device="cuda").transpose(1, 2)    # (1, 4, 10), strides (40, 1, 4)
        native.hrm_loss_fwd(z, u, y, 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        native.hrm_loss_fwd(z, z, y[:3], 0.5, 1.0, 0.0, -100, 0.0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.hrmkernels.hrm_loss_fwd(z, z.cpu(), y, 0.5, 1.0, 0.0, -100, 0.0)


# ----------------------------------------------------------------------------------------------
# CPU: the gradient in the forward (reduction "mean" / "sum": HRMLossFwdGradFunction runs
# hrm_loss_fwd_bwd, one sweep a row, and its backward only scales by the incoming gradient)

CPU_ONLY = pytest.mark.skipif(WHY["cpu"] is not None, reason=str(WHY["cpu"]))


def _fwd_grad_run(zl, ul, vz, vu, y, g, teacher_grad, two_calls, inplace=False, **kw):
    """Loss and gradients of g * loss on the cpu backend: the one-sweep path, or the two calls
    (reduction "none", then reduced here as api/reduction.py does)."""
    zl = zl.detach().clone().requires_grad_()
    ul = ul.detach().clone().requires_grad_(teacher_grad)
    zin = zl * 1.0 if inplace else zl      # inplace_backward overwrites a non-leaf's storage
    red, n_items = kw.pop("reduction"), kw.pop("num_items_in_batch", None)
    if two_calls:
        rows = fused_hrm_loss(vz(zin), vu(ul), y, backend="cpu", reduction="none", **kw)
        loss = rows.sum()
        if red == "mean":
            from hrmkernels.api.reduction import mean_denominator
            loss = loss / mean_denominator(y, -100, n_items)
    else:
        loss = fused_hrm_loss(vz(zin), vu(ul), y, backend="cpu", reduction=red,
                              num_items_in_batch=n_items, inplace_backward=inplace, **kw)
        assert type(loss.grad_fn).__name__ == "HRMLossFwdGradFunctionBackward"
    (loss * g if g != 1 else loss).backward()
    return loss.detach(), zl.grad, ul.grad


@CPU_ONLY
@pytest.mark.parametrize("reduction,n_items", [("sum", None), ("mean", None), ("mean", 37),
                                               ("mean", "tensor")])
@pytest.mark.parametrize("beta,t,eps", [(0.0, 2.0, 0.1), (1.0, 1.0, 0.0), (0.3, 0.5, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [7, 1041])
@pytest.mark.parametrize("g", [1.0, 0.37])
@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_cpu_gradient_in_forward_matches_two_calls_and_reference(
        reduction, n_items, beta, t, eps, dtype, v, g, teacher_grad, inplace):
    torch.manual_seed(v + int(100 * beta))
    zl, ul, vz, vu = _make("cpu", (2, 5), v, dtype, dtype, layout="shifted")   # [:, :-1] views
    y = torch.randint(0, v, (2, 5))
    y[..., ::3] = -100
    n_items = torch.tensor(37) if n_items == "tensor" else n_items
    div = (dict(jsd_beta=beta) if 0 < beta < 1
           else dict(kl_direction=("forward", "reverse")[int(beta)]))
    kw = dict(hrm=0.5, temperature=t, label_smoothing=eps, reduction=reduction,
              num_items_in_batch=n_items, **div)
    one = _fwd_grad_run(zl, ul, vz, vu, y, g, teacher_grad, False, inplace, **kw)
    two = _fwd_grad_run(zl, ul, vz, vu, y, g, teacher_grad, True, **kw)
    assert torch.equal(one[0], two[0])                     # the same loss, bit for bit
    for a, b in zip(one[1:], two[1:]):
        assert (a is None) == (b is None)
        if a is not None and (g != 1 or beta in (0.0, 1.0)):
            # the KLs' gradient from the forward's exponentials (2^a 2^b, not 2^(a + b)), and
            # scaled after rounding to the dtype: an ulp or two
            torch.testing.assert_close(a, b, rtol=2 ** -6 if dtype in HALF else 1e-5,
                                       atol=1e-6 * b.abs().max().item())
        elif a is not None:   # the JSD at grad 1: the backward's own row code, bit for bit
            assert torch.equal(a, b)
    assert one[2] is None or teacher_grad
    dz = one[1]
    assert torch.all(vz(dz)[y == -100] == 0) and torch.all(dz[:, -1] == 0)   # ignored, outside
    # the float64 reference
    zr = zl.detach().double().requires_grad_()
    ur = ul.detach().double().requires_grad_(teacher_grad)
    ref = hrm_loss_reference(vz(zr), vu(ur), y, **kw)
    (ref * g).backward()
    torch.testing.assert_close(one[0].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    mag = max(1.0, max(zl.abs().max().item(), ul.abs().max().item()) / t)   # as check()
    floor = 5e-7 * g * math.sqrt(y.numel()) * (1 + 0.5 / t * mag)
    for d, d_ref in ((one[1], zr.grad), (one[2], ur.grad)):
        if d is None:
            continue
        err, size = (d.double() - d_ref).norm().item(), d_ref.norm().item()
        assert err <= (1e-2 if dtype in HALF else 1e-5) * size + floor, (err, size)


@CPU_ONLY
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_cpu_gradient_in_forward_hrm_zero_and_no_teacher(beta):
    z = torch.randn(2, 9, 100)
    y = torch.randint(0, 100, (2, 9))
    for teacher in (None, torch.randn(2, 9, 100)):
        kw = dict(jsd_beta=beta) if beta else {}
        grads = []
        for red in ("mean", "none"):
            zl = z.clone().requires_grad_()
            loss = fused_hrm_loss(zl, teacher, y, 0.0, backend="cpu", reduction=red, **kw)
            (loss if red == "mean" else loss.mean()).backward()
            grads.append(zl.grad)
        assert torch.equal(*grads)


@CPU_ONLY
def test_cpu_scale_grad_skips_at_exactly_one():
    # A stride-0 dz cannot be written (mul_ raises on overlapping memory): at grad == 1 the op
    # returns before touching it; any other value scales, NaN included.
    shared = torch.ones(1).expand(4, 1000)
    native.hrm_loss_scale_grad(torch.tensor(1.0), shared, None)
    native.hrm_loss_scale_grad(torch.tensor(1.0, dtype=torch.float64), shared, shared)
    with pytest.raises(RuntimeError):
        native.hrm_loss_scale_grad(torch.tensor(0.37), shared, None)
    dz, du = torch.randn(3, 50), torch.randn(3, 50).bfloat16()
    dz0, du0 = dz.clone(), du.clone()
    native.hrm_loss_scale_grad(torch.tensor(0.37), dz, du)
    torch.testing.assert_close(dz, dz0 * 0.37)
    torch.testing.assert_close(du, du0 * 0.37)
    native.hrm_loss_scale_grad(torch.tensor(float("nan")), dz, None)
    assert dz.isnan().all()


@CPU_ONLY
def test_cpu_gradient_in_forward_backward_returns_the_buffer():
    # inplace_backward: the gradient is the logits' own storage, written in the forward; an
    # incoming 1 returns it as-is (same memory, same bits), 0.37 scales it there.
    z = torch.randn(2, 5, 1041)
    u = torch.randn(2, 5, 1041)
    y = torch.randint(0, 1041, (2, 5))
    results = []
    for g in (1.0, 0.37):
        buf = z.clone().requires_grad_() * 1.0
        loss = fused_hrm_loss(buf, u, y, 0.5, backend="cpu", inplace_backward=True)
        forward_grad = buf.detach().clone()   # written by the forward
        (dz,) = torch.autograd.grad(loss * g if g != 1 else loss, buf)
        assert dz.data_ptr() == buf.data_ptr()
        results.append((forward_grad, dz))
    assert torch.equal(results[0][1], results[0][0])
    torch.testing.assert_close(results[1][1], results[1][0] * 0.37)


@CPU_ONLY
def test_cpu_gradient_in_forward_only_when_a_gradient_is_wanted():
    z = torch.randn(2, 5, 300)
    u = torch.randn(2, 5, 300)
    y = torch.randint(0, 300, (2, 5))
    before = z.clone()
    with torch.no_grad():   # no gradient: the logits are left alone even with inplace_backward
        fused_hrm_loss(z.requires_grad_(), u, y, 0.5, backend="cpu", inplace_backward=True)
    assert torch.equal(z.detach(), before)
    loss = fused_hrm_loss(z.detach(), u, y, 0.5, backend="cpu")
    assert loss.grad_fn is None
    zl = z.detach().requires_grad_()
    loss = fused_hrm_loss(zl, u, y, 0.5, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


@CPU_ONLY
@pytest.mark.parametrize("v", [1000, 65537])     # the exponentials kept (KLs), or not (V > 2^16)
@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_cpu_fwd_bwd_op_matches_the_two_ops(v, t, beta):
    n = 40 if v < 4096 else 3
    z, u = torch.randn(1, n, v) * 3, torch.randn(1, n, v) * 3
    y = torch.randint(0, v, (n,))
    y[::5] = -100
    grad = torch.rand(n)
    args = (0.5, t, 0.1, -100, beta)
    out = native.hrm_loss_fwd(z, u, y, *args)
    dz, du = torch.empty_like(z), torch.empty_like(u)
    native.hrm_loss_bwd(z, u, y, out[4], grad, *args, dz, du)
    dz1, du1 = torch.empty_like(z), torch.empty_like(u)
    got = native.hrm_loss_fwd_bwd(z, u, y, grad, *args, dz1, du1)
    for a, b in zip(out, got):
        assert torch.equal(a, b)     # the forward's outputs, bit for bit
    for a, b in ((dz, dz1), (du, du1)):
        if beta == 0.3 or v > 65536:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


@CPU_ONLY
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_cpu_gradient_in_forward_non_finite(beta):
    # masked (-inf) entries in both models, peaked rows (denormals flushed), a NaN in one
    # teacher row and one student row: the one-sweep path as the two calls (design.md).
    zl, ul, vz, vu = _make("cpu", (6,), 1041, torch.float32, torch.float32, scale=30.0,
                           masked=True)
    y = vz(zl).argmax(-1)
    ul[1, 500] = float("nan")
    zl[2, 17] = float("nan")
    y[4] = -100
    div = (dict(jsd_beta=beta) if 0 < beta < 1
           else dict(kl_direction=("forward", "reverse")[int(beta)]))
    kw = dict(hrm=0.5, temperature=2.0, reduction="sum", **div)
    one = _fwd_grad_run(zl, ul, vz, vu, y, 0.37, True, False, **kw)
    two = _fwd_grad_run(zl, ul, vz, vu, y, 0.37, True, True, **kw)
    torch.testing.assert_close(one[0], two[0], equal_nan=True)
    for a, b in zip(one[1:], two[1:]):
        assert torch.equal(a.isnan(), b.isnan()) and torch.all(a[4] == 0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.nan_to_num().abs().max(),
                                   equal_nan=True)


@CPU_ONLY
@pytest.mark.parametrize("dtype,tdtype", [(torch.float16, torch.float32),
                                          (torch.float64, torch.float64),
                                          (torch.bfloat16, torch.float16)], ids=str)
def test_cpu_gradient_in_forward_other_dtypes(dtype, tdtype):
    zl, ul, vz, vu = _make("cpu", (3,), 1025, dtype, tdtype, layout="odd")
    y = torch.randint(0, 1025, (3,))
    kw = dict(hrm=0.5, temperature=2.0, reduction="mean")
    one = _fwd_grad_run(zl, ul, vz, vu, y, 1.0, True, False, **kw)
    two = _fwd_grad_run(zl, ul, vz, vu, y, 1.0, True, True, **kw)
    assert one[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(one[0], two[0])
    for a, b in zip(one[1:], two[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2 ** -6 if dtype in HALF else 1e-5,
                                   atol=1e-6 * b.abs().max().item())
