"""backend="cpu" and backend="cuda": the C++ kernels of csrc/, as the custom ops
torch.ops.hrmkernels.* (one schema; CPU and CUDA implementations chosen by the tensors' device).

The ops live in a compiled extension, found in this order:

1. ``hrmkernels._C``, built by setup.py at install: the CPU kernels wherever a C++ compiler is,
   plus the CUDA kernels when torch is a CUDA build and a CUDA toolkit is present;
2. otherwise a just-in-time build of csrc/ with the same sources and flags (hrmkernels/_build.py;
   ``torch.utils.cpp_extension.load`` with ninja), cached under ``$TORCH_EXTENSIONS_DIR``
   (default ``~/.cache/torch_extensions``): half a minute for the CPU kernels, a minute or two
   with CUDA; later processes reuse the cached library. It needs a source checkout (csrc/ next to
   the package), ninja and a C++ compiler (and nvcc for the CUDA kernels).

Environment: ``HRMKERNELS_JIT=0`` forbids the just-in-time build; ``HRMKERNELS_CUDA_ARCHS``
("90a", "80;90a", ...) sets its GPU architectures (default: the current GPU's, sm_90a on
Hopper); ``HRMKERNELS_CPU_CAPABILITY`` its CPU instruction set (_build.py);
``HRMKERNELS_VERBOSE=1`` shows the compiler's output.

The launchers follow the contract of kernels/__init__.py: float32 outputs, float64 when an
input is float64 (CPU only). This module registers the fake (meta) implementations that
torch.compile and torch.export use.
"""
import os
import threading
from pathlib import Path

import torch

from hrmkernels import _build

CSRC = Path(__file__).resolve().parents[2] / "csrc"
JIT_NAME = "hrmkernels_C"

_lock = threading.Lock()
_loaded = False
_devices = ()            # the devices whose kernels the loaded library has: "cpu", "cuda"
_prebuilt_error = None   # why hrmkernels._C does not import, once it has failed to
_jit_error = None        # why the just-in-time build failed, once it has


def unavailable_reason(device="cuda", build=True):
    """None when the native kernels can run on `device` ("cpu" or "cuda") here, else why not.

    The first call loads the extension; with `build` (the default) it is built just-in-time if
    the package was installed without it (once per machine: the build is cached). build=False
    only takes an extension that is installed or already loaded (backend="auto" never compiles).
    """
    device = torch.device(device).type
    if device not in ("cpu", "cuda"):
        return f"the native kernels run on CPU and CUDA tensors, not {device}"
    if device == "cuda":
        if torch.version.cuda is None:
            return (f"torch {torch.__version__} is a CPU-only build; the CUDA backend needs a "
                    "CUDA build of torch")
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return (f"the CUDA kernels need compute capability 8.0 or newer; this GPU has "
                    f"{major}.{minor}")
    why = _load(build)
    if why is None and device not in _devices:
        why = (f"the loaded extension has no {device.upper()} kernels (hrmkernels._C is built "
               "with the CUDA kernels only where torch is a CUDA build and nvcc is found)")
    return why


def _has_kernel(device):
    """True if a loaded library implements the ops for `device` ("cpu" or "cuda")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("hrmkernels::hrm_loss_fwd",
                                                              device.upper())
    except RuntimeError:   # "operator hrmkernels::hrm_loss_fwd does not exist"
        return False


def _load(build):
    """Load the ops once (installed, else just-in-time when `build`); None or the reason."""
    global _loaded, _devices, _prebuilt_error, _jit_error
    if _loaded:
        return None
    with _lock:
        if _loaded:
            return None
        if not (_has_kernel("cpu") or _has_kernel("cuda")):
            if _prebuilt_error is None:
                try:
                    from hrmkernels import _C  # noqa: F401  (loading it registers the ops)
                    _prebuilt_error = ""
                except ImportError as e:
                    _prebuilt_error = f"hrmkernels._C is not installed or does not load ({e})"
            if _prebuilt_error:
                if not build:
                    return f"{_prebuilt_error} (and backend='auto' never compiles it just-in-time)"
                if _jit_error is None:
                    _jit_error = _jit_build() or ""
                if _jit_error:
                    return f"{_prebuilt_error}, and {_jit_error}"
        _register_fakes()
        _devices = tuple(d for d in ("cpu", "cuda") if _has_kernel(d))
        _loaded = True
        return None


def _jit_build():
    """Build and load csrc/ with torch.utils.cpp_extension.load; None or why it failed."""
    if os.environ.get("HRMKERNELS_JIT", "1") == "0":
        return "the just-in-time build is disabled by HRMKERNELS_JIT=0"
    why = _build.why_no_cpu()
    if why:
        return f"it cannot be built just-in-time: {why}"
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "the just-in-time build needs ninja (pip install ninja)"
    sources = list(_build.CPU_SOURCES)
    if torch.cuda.is_available() and _build.why_no_cuda() is None:
        sources += _build.CUDA_SOURCES
    missing = [name for name in sources if not (CSRC / name).is_file()]
    if missing:
        return (f"the just-in-time build needs the sources {', '.join(missing)} in {CSRC} "
                "(a source checkout or an editable install)")
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(CSRC / name) for name in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=_build.cxx_flags(),
            extra_cuda_cflags=["-O3", *arch_flags(os.environ.get("HRMKERNELS_CUDA_ARCHS"))]
            if len(sources) > len(_build.CPU_SOURCES) else None,
            is_python_module=False,
            verbose=os.environ.get("HRMKERNELS_VERBOSE", "0") == "1",
        )
    except Exception as e:  # noqa: BLE001  (a compiler error, a toolkit/torch mismatch, ...)
        lines = str(e).strip().splitlines()
        return (f"the just-in-time build failed ({lines[-1] if lines else type(e).__name__}; "
                "HRMKERNELS_VERBOSE=1 shows the compiler output)")
    return None


def arch_flags(archs=None):
    """nvcc -gencode flags for "80;90a"-style lists; "+PTX" also embeds PTX for newer GPUs.

    Default: the current GPU's architecture, with the "a" suffix on sm_90 (Hopper).
    """
    if not archs:
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    return _build.cuda_arch_flags(archs)


def _out_dtype(z, u):
    return torch.float64 if torch.float64 in (z.dtype, u.dtype) else torch.float32


def _register_fakes():
    """Shapes and dtypes of the ops' outputs, for FakeTensor tracing (torch.compile, export)."""

    def outputs(z, u, n):
        dtype = _out_dtype(z, u)
        return (*(z.new_empty((n,), dtype=dtype) for _ in range(4)),
                z.new_empty((n, 5), dtype=dtype))

    @torch.library.register_fake("hrmkernels::hrm_loss_fwd")
    def _(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
        return outputs(z, u, labels.shape[0])

    @torch.library.register_fake("hrmkernels::hrm_loss_fwd_bwd")
    def _(z, u, labels, grad, hrm, temperature, label_smoothing, ignore_index, beta, dz, du):
        return outputs(z, u, labels.shape[0])

    @torch.library.register_fake("hrmkernels::hrm_loss_bwd")
    def _(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index, beta,
          dz, du):
        return None

    @torch.library.register_fake("hrmkernels::hrm_loss_scale_grad")
    def _(grad, dz, du):
        return None


def _require(device):
    if not _loaded:
        why = unavailable_reason(device)
        if why:
            raise RuntimeError(f"the hrmkernels {device.type.upper()} backend is not available: "
                               f"{why}")


def hrm_loss_fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
    """z, u: (B, S, V) row views; labels: (N,). Returns loss, ce, div, entropy (N,) and
    stats (N, 5), float32 (float64 when z or u is float64, CPU only)."""
    _require(z.device)
    return torch.ops.hrmkernels.hrm_loss_fwd(z, u, labels, float(hrm), float(temperature),
                                             float(label_smoothing), int(ignore_index),
                                             float(beta))


def _grad_dtype(grad, stats):
    """The kernels read grad as float32 or in the stats' dtype (float64 inputs)."""
    return grad if grad.dtype in (torch.float32, stats.dtype) else grad.to(stats.dtype)


def hrm_loss_bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
                 beta, dz, du):
    """Write d(sum_r grad_r * loss_r)/dz into dz and, when du is not None, d/du into du.

    grad is (N,), possibly a stride-0 expansion of a scalar; dz may be z itself (in place).
    """
    _require(z.device)
    torch.ops.hrmkernels.hrm_loss_bwd(z, u, labels, stats, _grad_dtype(grad, stats), float(hrm),
                                      float(temperature), float(label_smoothing),
                                      int(ignore_index), float(beta), dz, du)


def hrm_loss_fwd_bwd(z, u, labels, grad, hrm, temperature, label_smoothing, ignore_index, beta,
                     dz, du):
    """hrm_loss_fwd and hrm_loss_bwd in one call, for rows' gradients known before the forward.

    Returns loss, ce, div, entropy, stats as hrm_loss_fwd and writes dz (and du) as
    hrm_loss_bwd; dz may be z itself (each row's loss is computed before its gradient
    overwrites it). CPU tensors only: one sweep over each row, the gradient pass reading the
    row while the forward has left it in cache (csrc/cpu/hrm_loss_fwd_bwd.cpp).
    """
    _require(z.device)
    if grad.dtype not in (torch.float32, _out_dtype(z, u)):   # float64 on CPU, for fp64 inputs
        grad = grad.float()
    return torch.ops.hrmkernels.hrm_loss_fwd_bwd(z, u, labels, grad, float(hrm),
                                                 float(temperature), float(label_smoothing),
                                                 int(ignore_index), float(beta), dz, du)


def fwd_grad_available(device):
    """True where hrm_loss_fwd_bwd and hrm_loss_scale_grad run (CPU tensors, extension loaded):
    the autograd path that computes the gradient in the forward (HRMLossFwdGradFunction)."""
    return device.type == "cpu" and _loaded and "cpu" in _devices


def hrm_loss_scale_grad(grad, dz, du=None):
    """dz (and du) *= grad, a one-element CPU tensor read inside the op (no Python branch on
    its value, no sync); when grad is exactly 1, nothing is touched (CPU only)."""
    _require(dz.device)
    torch.ops.hrmkernels.hrm_loss_scale_grad(grad, dz, du)

