"""Every CUDA source in csrc/ compiles, on any machine with nvcc (no GPU needed).

This is how CI catches a syntax or template error in the kernels: each .cu is compiled with
nvcc (-c, to an object in tmp_path) for sm_90a, and for sm_80 too (thread-block cluster code
is guarded by __CUDA_ARCH__ >= 900, so the portable kernels must also build for Ampere), with
the flags torch.utils.cpp_extension adds. The torch binding hrm_loss.cpp is checked with the
host compiler against the installed torch's headers: torch's CPU wheel ships c10/cuda but not
its generated c10/cuda/impl/cuda_cmake_macros.h, so a one-line stand-in is written to tmp_path
when it is missing. All compiles start at once (one per core) in a module fixture.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
ARCHS = {"sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
         "sm_80": "-gencode=arch=compute_80,code=sm_80"}


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
NO_NVCC = "nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA kernels were not compiled"


def _cuda_include():
    """The toolkit's include folder: next to bin/nvcc, possibly through a wrapper script."""
    out = subprocess.run([NVCC, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, check=False)
    m = re.search(r"INCLUDES=\"?-I\"?([^\"\s]+)", out.stdout + out.stderr)
    if m and (Path(m.group(1)) / "cuda_runtime_api.h").exists():
        return Path(m.group(1))
    guess = Path(NVCC).resolve().parent.parent / "include"
    return guess if (guess / "cuda_runtime_api.h").exists() else None


def _nvcc_cmd(src, arch, out):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return [NVCC, *COMMON_NVCC_FLAGS, "-std=c++17", "-O3", ARCHS[arch], "-I", str(CSRC),
            "-c", str(src), "-o", str(out)]


def _binding_cmd(tmp):
    """g++ -fsyntax-only on hrm_loss.cpp, or a string saying why it cannot run here."""
    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return "no host C++ compiler (g++ or c++) on PATH"
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        return "the CUDA toolkit's include folder (cuda_runtime_api.h) was not found"
    incs = [Path(p) for p in include_paths()]
    if not (incs[0] / "c10" / "cuda" / "CUDAStream.h").exists():
        return "this torch ships no c10/cuda headers"
    macros = incs[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():    # torch CPU wheel: stand in for the header a CUDA build generates
        stub = tmp / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(tmp / "stub")
    incs += [cuda_inc, Path(sysconfig.get_paths()["include"]), CSRC]
    return [cxx, "-std=c++20", "-fsyntax-only", "-Wall", *(f"-I{p}" for p in incs),
            str(CSRC / "hrm_loss.cpp")]


def _run(cmd):
    if isinstance(cmd, str):
        return cmd
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(file name, arch): CompletedProcess or skip reason}, all compiled concurrently."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    tmp = tmp_path_factory.mktemp("csrc")
    jobs = {(src.name, arch): _nvcc_cmd(src, arch, tmp / f"{src.stem}.{arch}.o")
            for src in CU_FILES for arch in ARCHS}
    jobs[("hrm_loss.cpp", "host")] = _binding_cmd(tmp)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    return results


def _check(result, what):
    if isinstance(result, str):
        pytest.skip(f"{what} not checked: {result}")
    assert result.returncode == 0, (f"{what} failed to compile:\n{' '.join(result.args)}\n"
                                    f"{result.stdout}\n{result.stderr}")


def test_csrc_has_kernels():
    assert CU_FILES, f"no .cu files in {CSRC}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [p.name for p in CU_FILES])
def test_cu_compiles(compiled, src, arch):
    _check(compiled[(src, arch)], f"{src} for {arch}")


def test_binding_compiles_against_torch_headers(compiled):
    _check(compiled[("hrm_loss.cpp", "host")],
           f"hrm_loss.cpp against torch {torch.__version__} headers")
