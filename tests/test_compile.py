"""torch.compile, custom ops and CUDA graphs (issue 7, parts 1 and 2).

CPU: every backend op passes torch.library.opcheck (the Triton ops as the interpreter's opaque
custom ops), a tiny model whose loss is FusedHRMLoss compiles with fullgraph=True (no graph
break) and matches eager, and forward + backward issue no host-synchronising op. GPU: the same
with the real triton_op and CUDA ops, plus a training step captured in a CUDA graph and replayed,
and forward + backward under torch.cuda.set_sync_debug_mode("error").
"""
import pathlib
import re

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from torch.utils._python_dispatch import TorchDispatchMode

import hrmkernels.kernels
from hrmkernels import FusedHRMLoss, available_backends, backends, fused_hrm_loss
from hrmkernels.kernels import pytorch as torch_impl

BACKENDS = available_backends(DEVICE)
TOPK_BACKENDS = [b for b in BACKENDS if b not in ("cuda", "cpu")]
NATIVE = "cuda" if HAS_CUDA else "cpu"    # the C++ kernels' backend on this machine


def _op_samples(backend):
    """(op, args) pairs covering each op of `backend`: dtypes, T, eps, direction, du or None."""
    dense, topk = backends.resolve(backend, DEVICE), backends.resolve(backend, DEVICE, topk=True) \
        if backend in TOPK_BACKENDS else None
    suffix = {"torch": "_torch", "triton": "_triton", "cuda": "", "cpu": ""}[backend]
    ops = torch.ops.hrmkernels
    z = torch.randn(2, 5, 33, device=DEVICE)
    u = torch.randn(2, 5, 33, device=DEVICE)
    y = torch.randint(0, 33, (10,), device=DEVICE)
    y[3] = -100
    lp, idx = torch.log_softmax(u, -1).topk(4, -1)
    g = torch.rand(10, device=DEVICE)
    samples = []
    cases = [(z, (0.5, 2.0, 0.1, -100, 0.0)), (z.bfloat16(), (0.5, 1.0, 0.0, -100, 1.0))]
    if backend in ("torch", "cpu"):   # the JSD, and float64 in and out
        cases += [(z, (0.5, 2.0, 0.0, -100, 0.3)), (z.double(), (0.5, 2.0, 0.1, -100, 0.0))]
    for zz, options in cases:
        out = dense.hrm_loss_fwd(zz, u, y, *options)
        samples.append((getattr(ops, "hrm_loss_fwd" + suffix), (zz, u, y, *options)))
        for du, grad in ((torch.empty_like(u), g),
                         (None, torch.ones((), device=DEVICE).expand(10))):
            samples.append((getattr(ops, "hrm_loss_bwd" + suffix),
                            (zz, u, y, out[4], grad, *options, torch.empty_like(zz), du)))
        if topk is not None and options[-1] in (0.0, 1.0):   # top-k teachers: KL only
            for renormalize in (False, True):
                out = topk.hrm_loss_topk_fwd(zz, idx, lp, y, *options, renormalize)
                samples.append((getattr(ops, "hrm_loss_topk_fwd" + suffix),
                                (zz, idx, lp, y, *options, renormalize)))
                samples.append((getattr(ops, "hrm_loss_topk_bwd" + suffix),
                                (zz, idx, lp, y, out[4], g, *options, renormalize,
                                 torch.empty_like(zz))))
    return samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_hrm_loss_ops_pass_opcheck(backend):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch of each op.
    for op, args in _op_samples(backend):
        torch.library.opcheck(op, args)


class Student(torch.nn.Module):
    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def _batch(vocab=64, device=DEVICE):
    x = torch.randint(0, vocab, (2, 9), device=device)
    y = torch.roll(x, -1, 1)
    y[0, 3] = -100
    u = torch.randn(2, 9, vocab + 8, device=device)           # a padded teacher vocabulary
    lp, idx = torch.log_softmax(u[..., :vocab] / 2.0, -1).topk(5, -1)
    return x, y, u, idx, lp


def _loss(model, loss_fn, x, y, u, idx, lp):
    """A causal-LM step: shifted views, a padded teacher as a view, a dense and a top-k teacher."""
    z = model(x)[:, :-1]
    dense = loss_fn(z, u[:, :-1, : z.shape[-1]], y[:, 1:])
    return dense + loss_fn(z, labels=y[:, 1:], teacher_topk=(idx[:, :-1], lp[:, :-1]))


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_compiled_model_with_fused_hrm_loss_has_no_graph_break(backend):
    torch._dynamo.reset()
    model = Student().to(DEVICE)
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, label_smoothing=0.1, backend=backend)
    batch = _batch()
    expected = _loss(model, loss_fn, *batch)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    compiled = torch.compile(_loss, fullgraph=True)            # raises on any graph break
    got = compiled(model, loss_fn, *batch)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("jsd_beta", [None, 0.5])
def test_compiled_model_with_the_cpp_kernels(jsd_beta):
    # backend="cpu" here, "cuda" on a GPU: dense teachers only (no top-k path in C++).
    if NATIVE not in BACKENDS:
        pytest.skip(f"backend={NATIVE!r} is not available here")
    if jsd_beta is not None and NATIVE == "cuda":
        pytest.skip("the CUDA kernels have no JSD")
    torch._dynamo.reset()
    model = Student().to(DEVICE)
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, label_smoothing=0.1, jsd_beta=jsd_beta,
                           backend=NATIVE)
    x, y, u, _, _ = _batch()
    step = lambda: loss_fn(model(x)[:, :-1], u[:, :-1, :64], y[:, 1:])
    expected = step()
    grads = torch.autograd.grad(expected, list(model.parameters()))
    got = torch.compile(step, fullgraph=True)()                # raises on any graph break
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), grads):
        torch.testing.assert_close(a, b)


class _SyncRecorder(TorchDispatchMode):
    """Records the aten ops that make the host wait for the device when run on a GPU."""
    SYNCING = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "unique",
               "_unique2", "item"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_hrm_loss_forward_backward_make_no_host_sync(monkeypatch):
    # The torch backend's device path, op by op: its launchers are pointed at the Python bodies
    # (a dispatch mode cannot see inside a custom op) and the CPU-only input checks are off.
    for name in ("fwd", "bwd", "topk_fwd", "topk_bwd"):
        monkeypatch.setattr(torch_impl, f"hrm_loss_{name}", getattr(torch_impl, f"_{name}"))
    monkeypatch.setattr(hrmkernels.kernels, "host_checks", lambda t: False)
    z = torch.randn(2, 9, 50, requires_grad=True)
    _, y, u, idx, lp = _batch(50, "cpu")
    teachers = (dict(teacher_logits=u[:, :-1, :50]), dict(teacher_topk=(idx[:, :-1], lp[:, :-1])),
                dict(teacher_topk=(idx[:, :-1], lp[:, :-1]), topk_mode="renormalize"))
    for teacher in teachers:
        for reduction, num_items in (("mean", None), ("mean", torch.tensor(5)), ("sum", None)):
            with _SyncRecorder() as rec:
                loss = fused_hrm_loss(z[:, :-1], labels=y[:, 1:], hrm=0.5, temperature=2.0,
                                      reduction=reduction, num_items_in_batch=num_items,
                                      backend="torch", **teacher)
                loss.backward()
            assert not rec.seen, (list(teacher), reduction, rec.seen)


def test_hrm_loss_no_host_sync_in_library_source_static():
    # The Triton and CUDA launchers cannot run here: scan every library file for calls that
    # synchronise (lines marked "sync-ok" say why they are safe, e.g. CPU-only checks).
    root = pathlib.Path(__file__).parents[1] / "hrmkernels"
    pattern = re.compile(r"\.item\(\)|\.tolist\(\)|torch\.equal\(|\.nonzero\(|\.cpu\(\)|\.numpy\(\)"
                         r"|synchronize\(|\bif\b.*\.(any|all)\(\)")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in root.rglob("*.py") if p.name != "reference.py"
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and "sync-ok" not in line]
    assert not hits, hits


GPU_CASES = [(b, t) for b in ("triton", "cuda", "torch") for t in ("dense", "topk")
             if not (b == "cuda" and t == "topk")]


def _gpu_backend(backend):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} is not available here")


def _step_loss(model, loss_fn, teacher, x, y, u, idx, lp):
    z = model(x)[:, :-1]
    if teacher == "dense":
        return loss_fn(z, u[:, :-1, : z.shape[-1]], y[:, 1:])
    return loss_fn(z, labels=y[:, 1:], teacher_topk=(idx[:, :-1], lp[:, :-1]))


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_training_step_is_captured_in_a_cuda_graph(backend):
    # The check the GPU session runs: a step with a dense (and, where the backend has one, a
    # top-k) teacher captured in a CUDA graph, replayed on new data, equal to eager steps.
    _gpu_backend(backend)
    from benchmarks.gpucheck_checks import graph_check
    graph_check(backend, torch.device("cuda"))


@pytest.mark.parametrize("backend,teacher", GPU_CASES)
def test_forward_backward_pass_cuda_sync_debug_mode(backend, teacher):
    _gpu_backend(backend)
    model = Student().cuda()
    loss_fn = FusedHRMLoss(0.5, temperature=2.0, backend=backend)
    batch = _batch()
    _step_loss(model, loss_fn, teacher, *batch).backward()     # warm up: JIT, extension load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step_loss(model, loss_fn, teacher, *batch).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
