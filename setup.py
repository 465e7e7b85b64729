"""Build script: the pure-Python package (configured in pyproject.toml), plus the CUDA extension
hrmkernels._C from csrc/ when it can be built.

Whether to build the extension is decided by the build machine's software, never by
torch.cuda.is_available() (build machines often have no GPU):

- HRMKERNELS_BUILD_EXT=0 skips it; =1 requires it (the install fails if it cannot be built);
  unset or "auto" builds it when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME,
  or nvcc on PATH), and otherwise, or if the build fails, installs the pure-Python package and
  says why (pip shows it with -v). backend="cuda" then builds csrc/ just-in-time on first use.
- HRMKERNELS_CUDA_ARCHS: GPU architectures, default "80+PTX;90a" (Ampere, with PTX that newer
  GPUs compile at load time, and Hopper with its thread-block-cluster kernels).

The build uses ninja when it is installed (torch's BuildExtension), e.g.
``pip install --no-build-isolation -e ".[test]"`` with torch already installed.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCES = ["csrc/hrm_loss.cpp", "csrc/cuda/hrm_loss_kernels.cu", "csrc/cuda/hrm_loss_cluster.cu"]
DEFAULT_ARCHS = "80+PTX;90a"


def _log(msg):
    print(f"hrmkernels setup: {msg}", file=sys.stderr, flush=True)


def _arch_flags(archs):
    """nvcc -gencode flags for "80+PTX;90a"-style lists (as hrmkernels.kernels.native.arch_flags)."""
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


def _why_no_extension():
    """None if the CUDA extension can be attempted here, else the reason it cannot."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return (f"torch cannot be imported at build time ({e}); install torch first and build "
                "with pip install --no-build-isolation")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    missing = [s for s in SOURCES if not (ROOT / s).is_file()]
    if missing:
        return f"the sources {', '.join(missing)} are missing"
    return None


def _extension_args():
    """The ext_modules / cmdclass keywords for setup(), empty for the pure-Python package."""
    mode = os.environ.get("HRMKERNELS_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"HRMKERNELS_BUILD_EXT must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        _log("HRMKERNELS_BUILD_EXT=0: installing the pure-Python package without the CUDA extension")
        return {}
    why = _why_no_extension()
    if why:
        if mode == "1":
            raise SystemExit(f"HRMKERNELS_BUILD_EXT=1 but the CUDA extension cannot be built: {why}")
        _log(f"installing the pure-Python package without the CUDA extension: {why}. "
             "backend='cuda' will try a just-in-time build where torch has CUDA.")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class BuildExtensionOrSkip(BuildExtension):
        """In "auto" mode a failed build leaves the pure-Python package, with the reason."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                if mode == "1":
                    raise
                _log(f"the CUDA extension failed to build ({e}); installing the pure-Python "
                     "package without it. Set HRMKERNELS_BUILD_EXT=1 to see the error fail the "
                     "install.")
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

        def copy_extensions_to_source(self):
            if self.extensions:
                super().copy_extensions_to_source()

    archs = os.environ.get("HRMKERNELS_CUDA_ARCHS") or DEFAULT_ARCHS
    _log(f"building the CUDA extension hrmkernels._C for {archs}")
    ext = CUDAExtension(
        "hrmkernels._C",
        sources=SOURCES,
        include_dirs=[str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *_arch_flags(archs)]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtensionOrSkip}}


setup(**_extension_args())
