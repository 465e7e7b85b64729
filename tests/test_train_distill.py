"""examples/train_distill.py end to end on CPU with tiny sizes: the outputs exist and make sense."""
import csv
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_distill.py"
COLUMNS = ["hrm", "iter", "loss", "ce", "kl", "log_kl", "tokens_per_s", "peak_mem_mb",
           "val_ce", "val_kl"]


def test_train_distill_cpu_tiny(tmp_path):
    # A tiny model trained for enough iterations that HRM 10 pulls the student towards the
    # teacher far more than HRM 0.001 does; --compare-loss also runs the reference-loss path.
    iters, hrms = 60, ["0.001", "10"]
    argv = ["--device", "cpu", "--threads", "2", "--out", str(tmp_path), "--hrm", *hrms,
            "--corpus-mb", "0.3", "--vocab-size", "512", "--block-size", "32", "--batch-size", "8",
            "--teacher-layers", "2", "--teacher-dim", "64", "--teacher-heads", "2",
            "--teacher-iters", "100", "--student-layers", "1", "--student-dim", "32",
            "--student-heads", "2", "--iters", str(iters), "--eval-every", "20",
            "--eval-iters", "2", "--compare-loss", "--compare-iters", "5"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(tmp_path / "metrics.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == iters * len(hrms)
    for hrm in hrms:
        run = [r for r in rows if r["hrm"] == str(float(hrm))]
        assert [int(r["iter"]) for r in run] == list(range(1, iters + 1))
        for r in run:
            values = [float(r[k]) for k in ("loss", "ce", "kl", "log_kl", "tokens_per_s")]
            assert all(math.isfinite(v) for v in values), r
            assert float(r["kl"]) >= 0 and float(r["tokens_per_s"]) > 0
            assert math.isclose(float(r["log_kl"]), math.log(max(float(r["kl"]), 1e-12)),
                                rel_tol=1e-6)
            assert math.isclose(float(r["loss"]), float(r["ce"]) + float(hrm) * float(r["kl"]),
                                rel_tol=1e-4, abs_tol=1e-5)
        evals = [r for r in run if r["val_ce"]]
        assert [int(r["iter"]) for r in evals] == [20, 40, 60]
        assert all(math.isfinite(float(r["val_ce"])) for r in evals)
        assert float(run[-1]["ce"]) < float(run[0]["ce"])            # the student learned

    def final(hrm, key):                    # mean of the last 10 iterations: less batch noise
        run = [r for r in rows if r["hrm"] == str(float(hrm))][-10:]
        return sum(float(r[key]) for r in run) / len(run)

    assert final(10, "kl") < 0.8 * final(0.001, "kl")
    val_kl = {h: float([r for r in rows if r["hrm"] == str(float(h)) and r["val_kl"]][-1]["val_kl"])
              for h in hrms}
    assert val_kl["10"] < val_kl["0.001"]

    png = (tmp_path / "hrm_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for name in ["teacher.pt", "student_hrm0.001.pt", "student_hrm10.pt", "loss_compare.csv"]:
        assert (tmp_path / name).exists(), name
    with open(tmp_path / "loss_compare.csv") as f:
        assert [r["loss"] for r in csv.DictReader(f)] == ["reference", "fused"]
    assert "val CE" in proc.stdout                                     # the summary table
