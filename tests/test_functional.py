"""The public API: bad input (docs/design.md section 3), backend choice, FusedHRMLoss, HRMLoss."""
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hrmkernels
from hrmkernels import FusedHRMLoss, HRMLoss, available_backends, fused_hrm_loss

from conftest import CPU_KERNELS_WHY, DEVICE


def _inputs(n=4, v=10):
    return (torch.randn(n, v, device=DEVICE), torch.randn(n, v, device=DEVICE),
            torch.randint(0, v, (n,), device=DEVICE))


BAD = [
    # (what changes, exception, words the message must contain)
    (dict(student_logits=[1.0]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(student_logits=torch.zeros(4, 10, dtype=torch.long)), TypeError,
     "student_logits must be float"),
    (dict(teacher_logits=torch.zeros(4, 10, dtype=torch.int32)), TypeError,
     "teacher_logits must be float"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must be int64 or int32"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape (4,)"),
    (dict(teacher_logits=torch.zeros(4, 12)), ValueError, "teacher_logits[..., :10]"),
    (dict(teacher_logits=torch.zeros(4, 8)), ValueError, "V=8 but student_logits has V=10"),
    (dict(teacher_logits=torch.zeros(3, 10)), ValueError, "teacher_logits leading shape"),
    (dict(student_logits=torch.zeros(4, 0), teacher_logits=torch.zeros(4, 0)), ValueError,
     "V >= 1"),
    (dict(hrm=-0.1), ValueError, "hrm must be a finite float >= 0"),
    (dict(hrm=float("nan")), ValueError, "hrm must not be NaN"),
    (dict(hrm="0.5"), TypeError, "hrm must be a Python float"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite float > 0"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must lie in [0, 1]"),
    (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(kl_direction="backward"), ValueError, "kl_direction must be one of"),
    (dict(backend="cutlass"), ValueError, "backend must be one of"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch must be a finite number >= 0"),
    (dict(num_items_in_batch=float("inf")), ValueError, "num_items_in_batch must be a finite"),
    (dict(num_items_in_batch="4"), TypeError, "num_items_in_batch must be a number"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError,
     "num_items_in_batch must be a number or a 0-d"),
    (dict(jsd_beta=1.5), ValueError, "jsd_beta must lie in [0, 1]"),
    (dict(jsd_beta=float("nan")), ValueError, "jsd_beta must not be NaN"),
    (dict(jsd_beta="0.5"), TypeError, "jsd_beta must be a Python float"),
    (dict(jsd_beta=0.5, kl_direction="reverse"), ValueError, "pass jsd_beta or kl_direction"),
    # degenerate in the kernels' float32, or too wide for their int64: named, with the range
    (dict(hrm=1e39), ValueError, "hrm=1e+39 is computed in float32 and must be 0 or lie in"),
    (dict(hrm=1e-46), ValueError, "hrm=1e-46 is computed in float32"),
    (dict(temperature=1e-46), ValueError, "temperature=1e-46: 1 / temperature = 1e+46 is"),
    (dict(temperature=1e39), ValueError, "temperature=1e+39: 1 / temperature = 1e-39"),
    (dict(hrm=1e30, temperature=1e-10), ValueError, "temperature=1e-10: hrm / temperature"),
    (dict(label_smoothing=1e-40), ValueError, "label_smoothing=1e-40"),
    (dict(ignore_index=2**70), ValueError, "ignore_index=1180591620717411303424 does not fit"),
    (dict(num_items_in_batch=2**130), ValueError, "num_items_in_batch must be a finite number"),
    (dict(teacher_logits=None, hrm=np.float32(0.5)), ValueError,
     "hrm=0.5 weighs a divergence to a teacher"),
    (dict(teacher_logits=torch.zeros(4, 10, dtype=torch.float64), backend="triton"), ValueError,
     "float64 inputs run in float64 on backend='torch'"),
    (dict(jsd_beta=0.5, process_group=object()), ValueError,
     "jsd_beta strictly between 0 and 1 needs the whole vocabulary on one device"),
    (dict(jsd_beta=0.5, student_logits=type("DTensorLike", (), {"to_local": None})()), ValueError,
     "no process_group, no DTensor logits"),
]


@pytest.mark.parametrize("change,exc,words", BAD,
                         ids=[str(list(b[0]))[:40] + str(i) for i, b in enumerate(BAD)])
def test_hrm_loss_bad_input_raises_naming_the_argument(change, exc, words):
    z, u, y = _inputs()
    args = dict(student_logits=z, teacher_logits=u, labels=y, hrm=0.5)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and k != "num_items_in_batch" else v
                 for k, v in change.items()})
    with pytest.raises(exc) as info:
        fused_hrm_loss(**args)
    assert words in str(info.value)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs two devices")
def test_hrm_loss_different_devices():
    z, u, y = _inputs()
    with pytest.raises(ValueError, match="teacher_logits is on cpu"):
        fused_hrm_loss(z, u.cpu(), y, 0.5)


def test_hrm_loss_unavailable_backend_says_why():
    z, u, y = _inputs()
    with pytest.raises(ValueError, match="backend='cuda' is not available"):
        fused_hrm_loss(z.cpu(), u.cpu(), y.cpu(), 0.5, backend="cuda")


def test_available_backends():
    names = available_backends(DEVICE)
    assert "torch" in names and set(names) <= {"torch", "triton", "cuda", "cpu"}
    if DEVICE.type == "cpu":
        # auto: the C++ kernels where built, then torch; the interpreter is for tests, not speed
        assert names[:2] == (["cpu", "torch"] if CPU_KERNELS_WHY is None else ["torch"])[:2]
        assert ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert available_backends() == available_backends(DEVICE)


def test_hrm_loss_auto_backend_runs():
    z, u, y = _inputs()
    torch.testing.assert_close(fused_hrm_loss(z, u, y, 0.5),
                               fused_hrm_loss(z, u, y, 0.5, backend=available_backends(DEVICE)[0]))


def test_fused_hrm_loss_module_matches_functional():
    z, u, y = _inputs(v=33)
    kw = dict(temperature=2.0, label_smoothing=0.1, kl_direction="reverse")
    module = FusedHRMLoss(0.5, return_components=True, **kw)
    out = module(z, u, y, num_items_in_batch=7)
    assert isinstance(out, HRMLoss) and not out.ce.requires_grad
    torch.testing.assert_close(out.loss, fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=7, **kw))
    assert "hrm=0.5" in repr(module) and "reverse" in repr(module)
    with pytest.raises(ValueError, match="temperature"):
        FusedHRMLoss(0.5, temperature=-1.0)


def test_hrm_loss_components_are_detached_and_consistent():
    z, u, y = _inputs(v=17)
    z.requires_grad_()
    out = fused_hrm_loss(z, u, y, 0.25, return_components=True, temperature=2.0)
    loss, ce, kl = out    # unpacks as three; the entropy is an attribute
    assert loss.requires_grad and not ce.requires_grad and not kl.requires_grad
    assert not out.entropy.requires_grad and out.entropy.shape == ce.shape
    torch.testing.assert_close(loss.detach(), ce + 0.25 * kl)
    q = torch.softmax(z.detach() / 2.0, -1)
    torch.testing.assert_close(out.entropy, -(q * q.log()).sum(-1).mean())


def test_public_api_is_exactly_the_design():
    assert set(hrmkernels.__all__) == {"FusedHRMLoss", "HRMLoss", "available_backends",
                                       "fused_hrm_loss", "FusedLinearHRMLoss",
                                       "fused_linear_hrm_loss", "teacher_sample", "teacher_topk"}
    assert all(hasattr(hrmkernels, name) for name in hrmkernels.__all__)


def test_hrm_loss_shift_labels_takes_hugging_face_labels():
    z, u = torch.randn(2, 7, 30, device=DEVICE), torch.randn(2, 7, 30, device=DEVICE)
    y = torch.randint(0, 30, (2, 7), device=DEVICE)
    y[0, :3] = -100                                   # a prompt
    kw = dict(temperature=2.0, reduction="none")
    expected = fused_hrm_loss(z[:, :-1], u[:, :-1], y[:, 1:], 0.5, **kw)
    torch.testing.assert_close(fused_hrm_loss(z, u, y, 0.5, shift_labels=True, **kw), expected)
    torch.testing.assert_close(FusedHRMLoss(0.5, shift_labels=True, **kw)(z, u, y), expected)
    lp, idx = torch.log_softmax(u, -1).topk(4, -1)
    torch.testing.assert_close(
        fused_hrm_loss(z, labels=y, hrm=0.5, teacher_topk=(idx, lp), shift_labels=True, **kw),
        fused_hrm_loss(z[:, :-1], labels=y[:, 1:], hrm=0.5, teacher_topk=(idx[:, :-1], lp[:, :-1]),
                       **kw))
    with pytest.raises(ValueError, match="shift_labels=True needs a sequence dimension"):
        fused_hrm_loss(z[0, 0], u[0, 0], y[0, 0], 0.5, shift_labels=True)
    with pytest.raises(TypeError, match="shift_labels must be a bool"):
        fused_hrm_loss(z, u, y, 0.5, shift_labels=1)
    # the shapes the user passed: labels already shifted by hand, with shift_labels=True
    with pytest.raises(ValueError, match=r"must have shape \(2, 7\), the logits' without V; got "
                                         r"\(2, 6\)"):
        fused_hrm_loss(z, u, y[:, 1:], 0.5, shift_labels=True)


def test_hrm_loss_num_items_in_batch_has_one_meaning():
    z, u, y = _inputs(n=6)
    y[:2] = -100                                      # 4 tokens count
    with pytest.raises(ValueError, match="denominator of reduction='mean'"):
        fused_hrm_loss(z, u, y, 0.5, reduction="sum", num_items_in_batch=8)
    s = fused_hrm_loss(z, u, y, 0.5, reduction="sum")
    torch.testing.assert_close(fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=8), s / 8)
    torch.testing.assert_close(fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=4), s / 4)
    # a plain denominator, also below this call's own count (TRL: global / world_size) and as a
    # float or a tensor
    for count in (3, 2.5, torch.tensor(3), torch.tensor(2.5, dtype=torch.float64)):
        got = fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=count)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, s / float(count))
    # 0 means "no tokens": it cannot count these four (NaN), and an all-ignored batch gives 0
    for count in (0, torch.tensor(0)):
        assert torch.isnan(fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=count))
    y[:] = -100
    for count in (0, torch.tensor(0), 5):
        assert fused_hrm_loss(z, u, y, 0.5, num_items_in_batch=count).item() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_available_backends_for_cuda_without_cuda_says_why():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        available_backends("cuda")


def test_hrm_loss_without_a_teacher_is_the_fused_cross_entropy():
    z, _, y = _inputs(n=5, v=21)
    y[1] = -100
    z.requires_grad_()
    for backend in available_backends(DEVICE):
        out = fused_hrm_loss(z, None, y, 0.0, label_smoothing=0.1, backend=backend,
                             return_components=True)
        expected = torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1)
        torch.testing.assert_close(out.loss, expected)
        assert out.kl.item() == 0
        (dz,) = torch.autograd.grad(out.loss, z)
        (ref,) = torch.autograd.grad(expected, z)
        torch.testing.assert_close(dz, ref)
    torch.testing.assert_close(FusedHRMLoss(0.0)(z, labels=y),
                               torch.nn.functional.cross_entropy(z, y))
    with pytest.raises(ValueError, match="neither teacher_logits nor teacher_topk"):
        fused_hrm_loss(z, None, y, 0.5)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc needed")
def test_hrm_loss_shift_labels_costs_no_more_memory_than_shifted_labels():
    """shift_labels=True moves the labels, not the logits: no N x V gradient is sliced, so the
    peak memory of a forward + backward is that of hand-shifted labels (within 5%), for every
    backend, in place or not, and on the Trainer's logits path (benchmarks/shift_memory.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.shift_memory import CONFIGS, measure
    peaks = measure(b=2, s=129, v=32000)                  # 33 MB of logits
    for backend, case, inplace in CONFIGS:
        shifted, by_hand = (peaks[backend, case, inplace, shift] for shift in (True, False))
        assert shifted <= 1.05 * by_hand + 1, (backend, case, inplace, shifted, by_hand)


def test_hrm_loss_options_take_any_real_number():
    """numpy scalars and Fractions are the floats they are (ints for ignore_index)."""
    from fractions import Fraction
    z, u, y = _inputs()
    expected = fused_hrm_loss(z, u, y, 0.5, temperature=2.0, ignore_index=-100)
    for hrm, t, ignore in ((np.float32(0.5), np.float64(2.0), np.int64(-100)),
                           (Fraction(1, 2), Fraction(2), -100)):
        torch.testing.assert_close(fused_hrm_loss(z, u, y, hrm, temperature=t,
                                                  ignore_index=ignore), expected)


def test_available_backends_float64_goes_where_it_is_computed_in_float64():
    assert "triton" not in available_backends("cpu", torch.float64)
    assert "torch" in available_backends("cpu", torch.float64)
    z = torch.randn(3, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 3, 6], device=DEVICE)
    got = fused_hrm_loss(z, z.detach() * 2, y, 0.5)        # "auto": a float64 backend
    assert got.dtype == torch.float64
    from hrmkernels.reference import hrm_loss_reference
    torch.testing.assert_close(got, hrm_loss_reference(z, z.detach() * 2, y, 0.5),
                               rtol=1e-12, atol=1e-12)


def test_auto_on_cpu_without_the_cpu_kernels_warns_once(monkeypatch):
    from hrmkernels import backends
    monkeypatch.setattr(backends, "_native_module", lambda device, build=True: (None, "not built"))
    backends._warn_no_cpu_kernels.cache_clear()
    z, u, y = (t.cpu() for t in _inputs())
    with pytest.warns(UserWarning, match=r"runs the torch backend .* not available: not built\. "
                                         r"Build them with `pip install --no-build-isolation"):
        fused_hrm_loss(z, u, y, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_hrm_loss(z, u, y, 0.5)                      # once per process
    backends._warn_no_cpu_kernels.cache_clear()
