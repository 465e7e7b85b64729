"""The one place that chooses an implementation: backend name + device -> launcher module.

Each backend module exposes the same two launchers, ``hrm_loss_fwd`` and ``hrm_loss_bwd``
(see kernels/triton/hrm_loss.py for their contract); for top-k teachers, ``hrm_loss_topk_fwd``
and ``hrm_loss_topk_bwd`` (kernels/triton/topk.py), which the torch and Triton backends have.
"""
import torch

from hrmkernels.kernels import pytorch


def _triton_module(topk=False):
    try:
        from hrmkernels.kernels.triton import hrm_loss, topk as topk_loss
    except ImportError as e:
        return None, f"triton cannot be imported ({e})"
    return (topk_loss if topk else hrm_loss), None


def _cuda_module():
    try:
        from hrmkernels.kernels import native
    except ImportError as e:
        return None, f"the CUDA extension of hrmkernels is not available ({e})"
    return native, native.unavailable_reason()


def _why_unavailable(name, device, topk=False):
    """None if backend `name` can run on tensors of `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cuda" and topk:
        return "the CUDA kernels have no top-k teacher path (backend='triton' or 'torch' has one)"
    if name == "triton":
        module, why = _triton_module()
        if why:
            return why
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "torch sees no CUDA device"
        if device.type == "cpu" and module.INTERPRETED:
            return None
        return (f"Triton kernels need a CUDA device, not {device.type} (on CPU they run only under "
                "TRITON_INTERPRET=1, set before hrmkernels is imported)")
    if name == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, not {device.type}"
        return _cuda_module()[1]
    raise ValueError(f"unknown backend {name!r}")


def _order(device):
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("torch", "triton", "cuda")


def available_backends(device=None):
    """Backends that can run on `device` here, fastest first; ``backend="auto"`` takes the first.

    `device` defaults to the current CUDA device when there is one, else the CPU. On CPU the
    torch backend comes first: the Triton interpreter is for tests, not speed.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"available_backends({str(device)!r}): torch sees no CUDA device here "
                         f"(torch {torch.__version__}), so no backend runs on CUDA tensors")
    return [name for name in _order(device) if _why_unavailable(name, device) is None]


def resolve(backend, device, topk=False):
    """The launcher module for `backend` ("auto", "triton", "cuda", "torch") on `device`;
    `topk`: for a top-k teacher (the launchers hrm_loss_topk_fwd / hrm_loss_topk_bwd)."""
    if backend == "auto":
        # the first that can run; stopping there spares a just-in-time CUDA build behind it
        backend = next(n for n in _order(device) if _why_unavailable(n, device, topk) is None)
    why = _why_unavailable(backend, device, topk)
    if why:
        raise ValueError(f"backend={backend!r} is not available for {device} tensors"
                         f"{' with a top-k teacher' if topk else ''}: {why}")
    if backend == "torch":
        return pytorch
    return _triton_module(topk)[0] if backend == "triton" else _cuda_module()[0]
