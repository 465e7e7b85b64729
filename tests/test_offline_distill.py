"""examples/offline_distill.py end to end on CPU at tiny sizes: caches on disk, one student per
variant, the table, the curves and the figure."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "offline_distill.py"
COLUMNS = ["variant", "cache_mb", "bytes_per_token", "cache_s", "val_kl", "val_ce", "step_ms",
           "peak_mem_mb"]


def test_offline_distill_cpu_tiny(tmp_path):
    argv = ["--device", "cpu", "--threads", "2", "--out", str(tmp_path), "--corpus-mb", "0.2",
            "--vocab-size", "384", "--block-size", "16", "--batch-size", "4",
            "--teacher-layers", "1", "--teacher-dim", "32", "--teacher-heads", "2",
            "--teacher-iters", "10", "--student-layers", "1", "--student-dim", "16",
            "--student-heads", "2", "--iters", "6", "--eval-every", "3", "--eval-iters", "1",
            "--ks", "4", "--samples", "8", "--logprob-dtype", "float16"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "offline.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = {r["variant"]: r for r in reader}
    assert list(rows) == ["dense teacher", "top-4", "sampled n=8"]
    for r in rows.values():
        assert all(math.isfinite(float(r[k])) and float(r[k]) >= 0
                   for k in ("val_kl", "val_ce", "step_ms"))
    # ids int32 + float16 log-probs: 6 bytes an entry, plus Arrow's list offsets: 4 bytes a
    # position per column (Array2D is a list of lists), 4 a row (16 tokens)
    assert float(rows["top-4"]["bytes_per_token"]) == 6 * 4 + 8 + 0.5
    assert float(rows["sampled n=8"]["bytes_per_token"]) == 6 * 8 + 8 + 0.5
    assert rows["dense teacher"]["cache_mb"] == ""
    with open(tmp_path / "offline_curves.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["variant"] == "top-4"]
    assert steps == [3, 6]
    import datasets
    cache = datasets.load_from_disk(str(tmp_path / "cache_k4"))
    assert cache.features["teacher_topk_logprobs"].dtype == "float16"
    assert len(cache[0]["teacher_topk_indices"]) == len(cache[0]["input_ids"]) == 16
    with open(tmp_path / "offline_storage.csv") as f:
        (err,) = csv.DictReader(f)   # k = 4: the KL to the top-4 in fp32, and what fp16 changes
    assert float(err["kl_topk_fp32"]) <= float(err["kl_full"]) + 1e-6
    assert 0 <= float(err["fp16_mean_abs_change"]) <= float(err["fp16_max_abs_change"]) < 0.05
    png = (tmp_path / "offline_distill.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val KL" in proc.stdout
