"""The one place that chooses an implementation: backend name + device -> launcher module.

Each backend module exposes the same two launchers, ``hrm_loss_fwd`` and ``hrm_loss_bwd``
(their contract: kernels/__init__.py); for top-k teachers, ``hrm_loss_topk_fwd`` and
``hrm_loss_topk_bwd``, which the torch and Triton backends have. "cpu" and "cuda" are one
module, kernels/native.py (the C++ ops dispatch on the tensors' device). The experimental
fused-linear kernels on logit tiles are chosen here too (resolve_linear_tiles).
"""
import functools
import warnings

import torch

from hrmkernels.kernels import pytorch


def _triton_module(topk=False):
    try:
        from hrmkernels.kernels.triton import hrm_loss, topk as topk_loss
    except ImportError as e:
        return None, f"triton cannot be imported ({e})"
    return (topk_loss if topk else hrm_loss), None


def _native_module(device, build=True):
    try:
        from hrmkernels.kernels import native
    except ImportError as e:
        return None, f"the C++ extension of hrmkernels is not available ({e})"
    return native, native.unavailable_reason(device, build)


def _why_unavailable(name, device, topk=False, build=True, dtype=None):
    """None if backend `name` can run on tensors of `device` (computing in `dtype`: float64 for
    float64 inputs), else the reason it cannot.

    build=False: the C++ kernels count only if installed or loaded (no just-in-time build).
    """
    if name == "torch":
        return None
    if dtype == torch.float64 and (name == "triton" or name == "cuda"):
        return (f"the {name} kernels compute in float32; float64 inputs run in float64 on "
                "backend='torch' (any device) or 'cpu'")
    if name in ("cuda", "cpu") and topk:
        return (f"the {name.upper()} kernels have no top-k teacher path (backend='triton' or "
                "'torch' has one)")
    if name == "triton":
        _, why = _triton_module()
        if why:
            return why
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "torch sees no CUDA device"
        from hrmkernels.kernels.triton.common import INTERPRETED
        if device.type == "cpu" and INTERPRETED:
            return None
        return (f"Triton kernels need a CUDA device, not {device.type} (on CPU they run only under "
                "TRITON_INTERPRET=1, set before hrmkernels is imported)")
    if name in ("cuda", "cpu"):
        if device.type != name:
            return f"the {name.upper()} kernels need {name.upper()} tensors, not {device.type}"
        return _native_module(device, build)[1]
    raise ValueError(f"unknown backend {name!r}")


def _order(device):
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch", "triton")


def available_backends(device=None, dtype=None):
    """Backends that can run on `device` here, fastest first; ``backend="auto"`` takes the first.

    `device` defaults to the current CUDA device when there is one, else the CPU. On CPU, "cpu"
    (the C++ kernels) is listed when the extension is installed or already loaded, as "auto"
    sees it (backend="cpu" itself may build it just-in-time); then "torch"; Triton's interpreter
    last, since it is for tests, not speed. `dtype=torch.float64`: the backends that compute in
    float64 ("cpu" and "torch"; Triton and the CUDA kernels compute in float32 and refuse it).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"available_backends({str(device)!r}): torch sees no CUDA device here "
                         f"(torch {torch.__version__}), so no backend runs on CUDA tensors")
    return [name for name in _order(device)
            if _why_unavailable(name, device, build=name != "cpu", dtype=dtype) is None]


def resolve(backend, device, topk=False, dtype=None):
    """The launcher module for `backend` ("auto", "triton", "cuda", "cpu", "torch") on `device`;
    `topk`: for a top-k teacher (the launchers hrm_loss_topk_fwd / hrm_loss_topk_bwd); `dtype`:
    torch.float64 for float64 inputs, which only backends computing in float64 take."""
    if backend == "auto":
        # the first that can run without compiling anything: no just-in-time C++ build for
        # "cpu", and stopping at Triton spares one for "cuda" behind it
        backend = next(n for n in _order(device)
                       if _why_unavailable(n, device, topk, build=False, dtype=dtype) is None)
        if backend == "torch" and device.type == "cpu" and not topk and \
                not torch.compiler.is_compiling():
            _warn_no_cpu_kernels(device)
    why = _why_unavailable(backend, device, topk, dtype=dtype)
    if why:
        raise ValueError(f"backend={backend!r} is not available for {device} tensors"
                         f"{' with a top-k teacher' if topk else ''}: {why}")
    if backend == "torch":
        return pytorch
    return _triton_module(topk)[0] if backend == "triton" else _native_module(device)[0]


@functools.cache
def _warn_no_cpu_kernels(device):
    """Once per process: "auto" on CPU tensors runs the torch backend, ~10x slower, because the
    C++ kernels are not built. Says why and the command that builds them."""
    warnings.warn(
        "hrmkernels: backend='auto' runs the torch backend on CPU tensors, about 10x slower than "
        f"the C++ CPU kernels, which are not available: {_native_module(device, False)[1]}. "
        "Build them with `pip install --no-build-isolation .` from a source checkout (with "
        "ninja and a C++ compiler; without --no-build-isolation, pip builds in an environment "
        "without torch and leaves them out), or once just-in-time with backend='cpu'.",
        stacklevel=4)


def resolve_linear_tiles(device, dtype=None):
    """The Triton kernels of the fused linear loss on logit tiles (kernels/triton/linear.py), for
    hrmkernels.experimental.tiled_linear_hrm_loss; ValueError where Triton cannot run (float64
    heads included)."""
    why = _why_unavailable("triton", device, dtype=dtype)
    if why:
        raise ValueError(f"tiled_linear_hrm_loss is not available for {device} tensors: {why}")
    from hrmkernels.kernels.triton import linear
    return linear
