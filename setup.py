"""Build script: the pure-Python package (configured in pyproject.toml), plus the C++ extension
hrmkernels._C from csrc/ when it can be built (sources and flags: hrmkernels/_build.py).

- The CPU kernels (backend="cpu") are built wherever a C++ compiler is, a CPU-only torch
  included; the CUDA kernels (backend="cuda") are added when torch is a CUDA build and a CUDA
  toolkit is found (CUDA_HOME, or nvcc on PATH), never by torch.cuda.is_available() (build
  machines often have no GPU).
- The CPU kernels are compiled for the build machine's vector unit (AVX-512, AVX2 + FMA, or
  the portable fallback; _build.py says why): a source install builds where it runs.
- HRMKERNELS_BUILD_EXT=0 skips the extension; =1 requires it (the install fails if it cannot
  be built); unset or "auto" builds it when possible, and otherwise, or if the build fails,
  installs the pure-Python package and says why (pip shows it with -v). backend="cpu" / "cuda"
  then build csrc/ just-in-time on first use, where they can.
- HRMKERNELS_CUDA_ARCHS: GPU architectures, default "80+PTX;90a" (Ampere, with PTX that newer
  GPUs compile at load time, and Hopper).

torch's BuildExtension compiles with ninja when it is installed (the README installs it), e.g.
``pip install torch==2.13.0 ninja && pip install --no-build-isolation -e ".[test]"``.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _log(msg):
    print(f"hrmkernels setup: {msg}", file=sys.stderr, flush=True)


def _load_build_config():
    # hrmkernels/_build.py by path: importing the package would import torch and triton, and
    # triton may not be installed yet while pip builds.
    path = ROOT / "hrmkernels" / "_build.py"
    spec = importlib.util.spec_from_file_location("hrmkernels_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_args():
    """The ext_modules / cmdclass keywords for setup(), empty for the pure-Python package."""
    mode = os.environ.get("HRMKERNELS_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"HRMKERNELS_BUILD_EXT must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        _log("HRMKERNELS_BUILD_EXT=0: installing the pure-Python package without the extension")
        return {}
    build = _load_build_config()
    why = build.why_no_cpu()
    if why:
        if mode == "1":
            raise SystemExit(f"HRMKERNELS_BUILD_EXT=1 but the extension cannot be built: {why}")
        _log(f"installing the pure-Python package without the C++ extension: {why}. "
             "backend='torch' runs everywhere; backend='cpu' and 'cuda' try a just-in-time build.")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class BuildExtensionOrSkip(BuildExtension):
        """In "auto" mode a failed build leaves the pure-Python package, with the reason."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                if mode == "1":
                    raise
                _log(f"the C++ extension failed to build ({e}); installing the pure-Python "
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

    sources = [f"csrc/{s}" for s in build.CPU_SOURCES]
    compile_args = {"cxx": build.cxx_flags()}
    why_no_cuda = build.why_no_cuda()
    capability = build.cpu_capability()
    if why_no_cuda:
        _log(f"building hrmkernels._C with the CPU kernels ({capability}); no CUDA kernels: "
             f"{why_no_cuda}")
        ext = CppExtension("hrmkernels._C", sources=sources, include_dirs=[str(ROOT / "csrc")],
                           extra_compile_args=compile_args)
    else:
        archs = os.environ.get("HRMKERNELS_CUDA_ARCHS") or build.DEFAULT_CUDA_ARCHS
        _log(f"building hrmkernels._C with the CPU kernels ({capability}) and the CUDA kernels "
             f"for {archs}")
        sources += [f"csrc/{s}" for s in build.CUDA_SOURCES]
        compile_args["nvcc"] = ["-O3", *build.cuda_arch_flags(archs)]
        ext = CUDAExtension("hrmkernels._C", sources=sources, include_dirs=[str(ROOT / "csrc")],
                            extra_compile_args=compile_args)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtensionOrSkip}}


setup(**_extension_args())
