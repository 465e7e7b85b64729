"""backend="cuda": the CUDA C++ kernels of csrc/, as the custom ops torch.ops.hrmkernels.*.

The ops live in a compiled extension, found in this order:

1. ``hrmkernels._C``, built by setup.py when the package was installed with a CUDA build of
   torch and a CUDA toolkit present;
2. otherwise a just-in-time build of csrc/ (``torch.utils.cpp_extension.load`` with ninja),
   cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``): the first
   call takes a minute or two, later processes reuse the cached library. It needs a source
   checkout (csrc/ next to the package), ninja, and nvcc (``CUDA_HOME`` or on ``PATH``).

Environment: ``HRMKERNELS_JIT=0`` forbids the just-in-time build; ``HRMKERNELS_CUDA_ARCHS``
("90a", "80;90a", ...) sets its GPU architectures (default: the current GPU's, sm_90a on
Hopper); ``HRMKERNELS_VERBOSE=1`` shows the compiler's output.

The launchers ``hrm_loss_fwd`` / ``hrm_loss_bwd`` keep the contract of hrm_loss.py.
This module registers the fake (meta) implementations that torch.compile and torch.export use.
"""
import os
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("hrm_loss.cpp", "cuda/hrm_loss_kernels.cu", "cuda/hrm_loss_cluster.cu")
JIT_NAME = "hrmkernels_C"

_lock = threading.Lock()
_loaded = False
_load_error = None      # why loading failed, once it has


def unavailable_reason():
    """None when backend="cuda" can really run here, else a sentence saying why not.

    The first call on a CUDA machine loads the extension, building it just-in-time if the
    package was installed without it (once per machine: the build is cached).
    """
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; the CUDA backend needs a CUDA "
                "build of torch")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the CUDA kernels need compute capability 8.0 or newer; this GPU has {major}.{minor}"
    return _load()


def _ops_registered():
    """True if a library defining the ops is already loaded (e.g. by an earlier import)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("hrmkernels::hrm_loss_fwd", "CUDA")
    except RuntimeError:   # "operator hrmkernels::hrm_loss_fwd does not exist"
        return False


def _load():
    """Load the ops once (prebuilt, else just-in-time); None on success, else the reason."""
    global _loaded, _load_error
    if _loaded:
        return None
    with _lock:
        if _loaded or _load_error is not None:
            return _load_error
        if not _ops_registered():
            try:
                from hrmkernels import _C  # noqa: F401  (loading it registers the ops)
            except ImportError as e:
                prebuilt = f"hrmkernels._C is not installed or does not load ({e})"
                jit_error = _jit_build()
                if jit_error is not None:
                    _load_error = f"{prebuilt}, and {jit_error}"
                    return _load_error
        _register_fakes()
        _loaded = True
        return None


def _jit_build():
    """Build and load csrc/ with torch.utils.cpp_extension.load; None or why it failed."""
    if os.environ.get("HRMKERNELS_JIT", "1") == "0":
        return "the just-in-time build is disabled by HRMKERNELS_JIT=0"
    missing = [name for name in SOURCES if not (CSRC / name).is_file()]
    if missing:
        return (f"the just-in-time build needs the sources {', '.join(missing)} in {CSRC} "
                "(a source checkout or an editable install)")
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit was found for a just-in-time build (set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "the just-in-time build needs ninja (pip install ninja)"
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(CSRC / name) for name in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", *arch_flags(os.environ.get("HRMKERNELS_CUDA_ARCHS"))],
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
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if not arch:
            continue
        ptx = arch.upper().endswith("+PTX")
        arch = arch[:-4] if ptx else arch
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def _register_fakes():
    """Shapes and dtypes of the ops' outputs, for FakeTensor tracing (torch.compile, export)."""

    def outputs(z, n):
        return (*(z.new_empty((n,), dtype=torch.float32) for _ in range(4)),
                z.new_empty((n, 5), dtype=torch.float32))

    @torch.library.register_fake("hrmkernels::hrm_loss_fwd")
    def _(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
        return outputs(z, labels.shape[0])

    @torch.library.register_fake("hrmkernels::hrm_loss_fwd_bwd")
    def _(z, u, labels, grad, hrm, temperature, label_smoothing, ignore_index, beta, dz, du):
        return outputs(z, labels.shape[0])

    @torch.library.register_fake("hrmkernels::hrm_loss_bwd")
    def _(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index, beta,
          dz, du):
        return None


def _require():
    if not _loaded:
        why = unavailable_reason()
        if why:
            raise RuntimeError(f"the hrmkernels CUDA backend is not available: {why}")


def hrm_loss_fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta):
    """z, u: (B, S, V) CUDA row views; labels: (N,). Returns loss, ce, div, entropy (N,) and
    stats (N, 5), fp32 (the contract of kernels/__init__.py)."""
    _require()
    return torch.ops.hrmkernels.hrm_loss_fwd(z, u, labels, float(hrm), float(temperature),
                                             float(label_smoothing), int(ignore_index),
                                             float(beta))


def hrm_loss_bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
                 beta, dz, du):
    """Write d(sum_r grad_r * loss_r)/dz into dz and, when du is not None, d/du into du.

    grad is (N,), possibly a stride-0 expansion of a scalar; dz may be z itself (in place).
    """
    _require()
    if grad.dtype != torch.float32:
        grad = grad.float()
    torch.ops.hrmkernels.hrm_loss_bwd(z, u, labels, stats, grad, float(hrm), float(temperature),
                                      float(label_smoothing), int(ignore_index), float(beta),
                                      dz, du)


def hrm_loss_fwd_bwd(z, u, labels, grad, hrm, temperature, label_smoothing, ignore_index, beta,
                     dz, du):
    """hrm_loss_fwd and hrm_loss_bwd in one call, for rows' gradients known before the forward.

    Returns loss, ce, kl, stats as hrm_loss_fwd and writes dz (and du) as hrm_loss_bwd. On
    Hopper, with 16-byte aligned rows and V % 8 == 0, one kernel keeps each row on chip (a
    thread-block cluster) and reads z and u once: 6 bytes per element in bf16 instead of 10.
    """
    _require()
    if grad.dtype != torch.float32:
        grad = grad.float()
    return torch.ops.hrmkernels.hrm_loss_fwd_bwd(z, u, labels, grad, float(hrm),
                                                 float(temperature), float(label_smoothing),
                                                 int(ignore_index), float(beta), dz, du)


def fwd_bwd_cluster_size(z, u, dz, du=None):
    """CTAs per row that hrm_loss_fwd_bwd uses for these tensors (0: two kernels instead)."""
    _require()
    return torch.ops.hrmkernels.hrm_loss_fwd_bwd_cluster_size(z, u, dz, du)
