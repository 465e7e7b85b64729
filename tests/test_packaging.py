"""The installed package stands alone: a wheel built from this checkout, installed in a fresh
venv, imports every one of its modules without the checkout (no benchmarks/, no csrc/), and the
package imports and computes without Triton (which ships Linux wheels only)."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# In the venv: import every module of the installed package (integrations need transformers,
# trl: present here), then report where each came from and whether anything outside it loaded.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
import hrmkernels
names = [m.name for m in pkgutil.walk_packages(hrmkernels.__path__, "hrmkernels.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"file": hrmkernels.__file__, "modules": names,
                  "outside": sorted(m for m in sys.modules if m.split(".")[0] in
                                    ("benchmarks", "tests", "examples", "conftest"))}))
"""


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_in_a_fresh_venv_imports_every_module(tmp_path):
    env = {**os.environ, "HRMKERNELS_BUILD_EXT": "0"}   # the pure-Python wheel: seconds
    env.pop("PYTHONPATH", None)
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", ".triton-3.6", "*.so", "__pycache__", "out"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist"), str(src)], env=env, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("hrmkernels-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .strip())
    # torch, triton and the integrations' packages from this interpreter, as a plain path entry:
    # its .pth files (among them the editable install of this checkout) are not processed.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
          str(wheel)], env=env)
    report = json.loads(_run([str(python), "-c", IMPORT_ALL], env=env, cwd=tmp_path)
                        .splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site), report["file"]
    assert report["outside"] == []
    for expected in ("hrmkernels.api.hrm_loss", "hrmkernels.autograd.vocab_parallel",
                     "hrmkernels.kernels.triton.common", "hrmkernels.integrations.hf",
                     "hrmkernels.experimental", "hrmkernels.reference"):
        assert expected in report["modules"]


def test_package_imports_and_runs_without_triton():
    code = """
import sys
sys.modules["triton"] = None          # as on macOS and Windows: `import triton` fails
import torch, hrmkernels
from hrmkernels import available_backends, fused_hrm_loss
z, u, y = torch.randn(4, 11), torch.randn(4, 11), torch.tensor([1, 2, -100, 3])
loss = fused_hrm_loss(z, u, y, 0.5)
assert torch.isfinite(loss), loss
assert "triton" not in available_backends("cpu")
try:
    fused_hrm_loss(z, u, y, 0.5, backend="triton")
except ValueError as e:
    assert "triton cannot be imported" in str(e), e
else:
    raise AssertionError("backend='triton' ran without Triton")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert _run([sys.executable, "-c", code], env=env, cwd=ROOT).strip().endswith("ok")
