"""How the extension hrmkernels._C is built from csrc/: sources and compiler flags, shared by
setup.py (which loads this file by path, before the package can be imported) and the
just-in-time build of kernels/native.py. Standard library at import; torch only inside functions.

- The CPU kernels are always built (any C++ compiler, a CPU-only torch included).
- The CUDA kernels are added only when torch is a CUDA build AND a CUDA toolkit is found
  (CUDA_HOME, or nvcc on PATH); never decided by torch.cuda.is_available(), since build
  machines often have no GPU.

CPU instruction set: the extension is built where it runs (a source install), so it targets the
build machine: the widest vector unit torch itself dispatches to there
(torch.backends.cpu.get_cpu_capability(): AVX512, AVX2 or DEFAULT), with ATen's flags and
CPU_CAPABILITY macros, so that at::vec::Vectorized<float> has 16 lanes (AVX-512), 8 (AVX2 + FMA)
or falls back to its portable implementation (correct everywhere, about 1.7x slower than AVX2).
Measured on a 2-core AMD EPYC (Zen 4, whose AVX-512 is 256 bits wide internally), one thread:
the AVX-512 build ran the forward 1.4x and the backward 1.7x faster than the AVX2 one, which is
why AVX-512 is taken where torch takes it. HRMKERNELS_CPU_CAPABILITY=AVX512|AVX2|DEFAULT
overrides the choice (e.g. to build for an older machine than the build machine).
"""
import os
import platform
import shutil

CPU_SOURCES = ("hrm_loss.cpp", "cpu/hrm_loss_cpu.cpp", "cpu/hrm_loss_fwd.cpp",
               "cpu/hrm_loss_bwd.cpp", "cpu/hrm_loss_fwd_bwd.cpp")
CUDA_SOURCES = ("cuda/hrm_loss_cuda.cpp", "cuda/hrm_loss_kernels.cu")
DEFAULT_CUDA_ARCHS = "80+PTX;90a"
# ATen's own flags for its AVX2 / AVX-512 kernels (cmake/Codegen.cmake).
CPU_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def cpu_capability():
    """AVX512, AVX2 or DEFAULT: HRMKERNELS_CPU_CAPABILITY, else what torch dispatches to here."""
    chosen = os.environ.get("HRMKERNELS_CPU_CAPABILITY", "").strip().upper()
    if chosen:
        if chosen not in CPU_CAPABILITY_FLAGS:
            raise ValueError(f"HRMKERNELS_CPU_CAPABILITY must be one of "
                             f"{', '.join(CPU_CAPABILITY_FLAGS)}, got {chosen!r}")
        return chosen
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    import torch
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in CPU_CAPABILITY_FLAGS else "DEFAULT"


def cxx_flags(capability=None):
    """Host compiler flags for the CPU kernels."""
    capability = capability or cpu_capability()
    defines = [f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        defines.append(f"-DCPU_CAPABILITY_{capability}")
    return ["-O3", *CPU_CAPABILITY_FLAGS[capability], *defines]


def cuda_arch_flags(archs):
    """nvcc -gencode flags for "80;90a"-style lists; "+PTX" also embeds PTX for newer GPUs."""
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


def cxx_compiler():
    """The C++ compiler torch.utils.cpp_extension would use (CXX, else c++), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def why_no_cpu():
    """None if the extension (its CPU part) can be compiled here, else the reason."""
    if cxx_compiler() is None:
        return f"no C++ compiler was found ({os.environ.get('CXX', 'c++')} is not on PATH)"
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return (f"torch cannot be imported at build time ({e}); install torch first and build "
                "with pip install --no-build-isolation")
    return None


def why_no_cuda():
    """None if the CUDA kernels can be compiled here too, else the reason."""
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    return None
