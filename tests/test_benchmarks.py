"""The benchmark runner and report on CPU at tiny sizes: what they write, skip and render."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ is not installed
from benchmarks import providers, report, run  # noqa: E402
from hrmkernels.reference import hrm_loss_reference  # noqa: E402

TINY = ["--n", "8", "--v", "64", "--t", "1", "2", "--warmup-ms", "1", "--rep-ms", "2"]


def test_bytes_moved_follows_design():
    # docs/design.md section 6: forward reads z and u; backward reads both again and writes dz.
    assert providers.bytes_moved("fwd", 4096, 32000, 2) == 2 * 4096 * 32000 * 2
    assert providers.bytes_moved("fwd+bwd", 4096, 32000, 2) == 5 * 4096 * 32000 * 2


def test_runner_writes_provenance_and_fields(tmp_path, capsys):
    out = tmp_path / "r.json"
    run.main(TINY + ["--providers", "reference", "torch", "liger-jsd", "cuda",
                     "--commit", "abc123", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(run.PROVENANCE_KEYS) <= set(result["provenance"])
    assert result["provenance"]["commit"] == "abc123"
    assert result["copy_gbps"] > 0 and result["dtype"] == "bfloat16" and result["hrm"] == 0.5
    rows = result["results"]
    assert {(r["provider"], r["mode"], r["t"]) for r in rows} == {
        (p, m, t) for p in ("reference", "torch") for m in providers.MODES for t in (1.0, 2.0)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["loss_rel_err"] < run.LOSS_RTOL
        assert r["copy_fraction"] == pytest.approx(r["gbps"] / result["copy_gbps"])
        assert r["bytes"] == providers.bytes_moved(r["mode"], 8, 64, 2)
        # CPU: the process's peak resident set above the inputs (Linux), else not measured
        assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= 0
    # Missing providers are reported as skipped, with the reason, in the JSON and the table.
    for name in ("liger-jsd", "cuda"):
        assert result["providers"][name]["status"] == "skipped"
        assert result["providers"][name]["reason"]
    printed = capsys.readouterr().out
    assert "skipped liger-jsd: Liger-Kernel" in printed and "skipped cuda:" in printed


def test_runner_records_oom_and_errors_and_goes_on(monkeypatch):
    def fake_loss_fn(name, hrm, temperature):
        def loss(z, u, y):
            if name == "reference":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            raise RuntimeError("kernel exploded")
        return loss
    monkeypatch.setattr(providers, "loss_fn", fake_loss_fn)
    result = run.run([8], [64], [1.0], ["reference", "torch"], log=lambda *a: None)
    status = {(r["provider"], r["mode"]): r for r in result["results"]}
    assert status["reference", "fwd"]["status"] == "OOM" and "ms" not in status["reference", "fwd"]
    assert status["torch", "fwd+bwd"]["status"] == "error"
    assert "kernel exploded" in status["torch", "fwd+bwd"]["reason"]


def test_runner_rejects_a_wrong_loss(monkeypatch):
    monkeypatch.setattr(run, "expected_loss", lambda *a: 123.0)
    result = run.run([8], [64], [1.0], ["torch"], modes=["fwd"], log=lambda *a: None)
    (row,) = result["results"]
    assert row["status"] == "mismatch" and "ms" not in row


def test_save_merges_pieces_of_one_run(tmp_path):
    out = tmp_path / "r.json"
    for v in ("64", "96"):
        run.main(["--n", "8", "--v", v, "--t", "1", "--providers", "torch", "--modes", "fwd",
                  "--warmup-ms", "1", "--rep-ms", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert sorted(r["v"] for r in result["results"]) == [64, 96]
    assert len(result["runs"]) == 2
    other = dict(result, provenance={**result["provenance"], "torch": "0.0"})
    with pytest.raises(SystemExit):
        run.save(other, out)


@pytest.mark.parametrize("name", ["reference", "torch", "triton", "triton-inplace", "cpu"])
def test_provider_matches_reference(name):
    """Each provider's closure computes the spec's loss and student gradient (CPU, fp32)."""
    if name.startswith("triton") and "triton" not in providers.available_backends("cpu"):
        pytest.skip("Triton interpreter not enabled")
    if name == "cpu" and providers.why_skipped("cpu", "cpu"):
        pytest.skip(providers.why_skipped("cpu", "cpu"))
    z, u, y = run.make_inputs(5, 37, torch.float32, "cpu")
    z_ref = z.detach().clone().requires_grad_(True)
    ref = hrm_loss_reference(z_ref, u, y, 0.5, temperature=2.0)
    (grad_ref,) = torch.autograd.grad(ref, z_ref)
    loss = providers.loss_fn(name, 0.5, 2.0)
    torch.testing.assert_close(providers.step(loss, "fwd", z, u, y)(), ref)
    torch.testing.assert_close(providers.step(loss, "fwd+bwd", z, u, y)(), grad_ref)


def _synthetic_result():
    rows = []
    for v, ms in ((32000, 1.0), (128256, 3.5)):
        for name in ("reference", "triton"):
            nbytes = providers.bytes_moved("fwd+bwd", 4096, v, 2)
            ms_p = ms * (5 if name == "reference" else 1)
            rows.append({"provider": name, "mode": "fwd+bwd", "n": 4096, "v": v, "t": 1.0,
                         "bytes": nbytes, "copy_gbps": 3000.0, "status": "ok", "ms": ms_p,
                         "gbps": nbytes / ms_p / 1e6, "copy_fraction": nbytes / ms_p / 1e6 / 3000,
                         "peak_extra_bytes": 10**9, "loss_rel_err": 1e-4})
    rows.append({"provider": "reference", "mode": "fwd", "n": 16384, "v": 262144, "t": 1.0,
                 "bytes": 1, "copy_gbps": 3000.0, "status": "OOM"})
    rows.append({"provider": "triton", "mode": "fwd", "n": 16384, "v": 262144, "t": 1.0,
                 "bytes": 1, "copy_gbps": 3000.0, "status": "error", "reason": "boom"})
    return {
        "provenance": {"gpu": "NVIDIA Test GPU", "device": "cuda", "torch": "2.11.0",
                       "triton": "3.6.0", "cuda": "13.0", "commit": "0123456789abcdef",
                       "dirty": False, "date": "2026-11-25T00:00:00+00:00", "python": "3.12",
                       "liger_kernel": None},
        "hrm": 0.5, "dtype": "bfloat16", "copy_gbps": 3000.0,
        "providers": {"reference": {"status": "run", "reason": None},
                      "triton": {"status": "run", "reason": None},
                      "liger-jsd": {"status": "skipped", "reason": "liger_kernel is missing"}},
        "results": rows,
    }


def test_report_renders_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "results" / "nvidia-test-gpu-2026-11-25.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_synthetic_result()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n{report.START}\nold\n{report.END}\n\nrest\n")
    report.main([str(path), "--readme", str(readme)])
    text = readme.read_text()
    assert path.with_suffix(".png").stat().st_size > 1000
    assert "old" not in text and text.endswith(f"{report.END}\n\nrest\n")
    assert "(results/nvidia-test-gpu-2026-11-25.png)" in text   # links relative to README
    assert "| N | V | T | `reference` | `triton` |" in text
    assert ("| 4096 | 32000 | 1 | 5 ms<br>262 GB/s (9%)<br>+1.00 GB | 1 ms<br>1311 GB/s (44%)"
            in text)
    assert "| 16384 | 262144 | 1 | OOM | error |" in text
    assert "`liger-jsd` not run: liger_kernel is missing" in text
    assert "boom" in text


def test_report_needs_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, "table")
