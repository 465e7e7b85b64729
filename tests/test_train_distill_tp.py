"""The vocabulary-parallel example runs under torchrun (2 CPU processes, gloo), and its sharded
loss equals the single-device loss (the script asserts it at the first step)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU (gloo) run; GPUs use --device cuda")
def test_train_distill_tp_runs_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "train_distill_tp.py"), "--iters", "6", "--teacher-iters", "3",
           "--vocab-size", "512", "--corpus-mb", "0.2", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "check: sharded loss" in run.stdout and "iter    5" in run.stdout
