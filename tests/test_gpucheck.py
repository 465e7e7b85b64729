"""python -m benchmarks.gpucheck: its dry run end to end, its time budget, its verdicts.

The dry run runs in a subprocess (TRITON_INTERPRET must be set before triton is imported) and
every check it can run on CPU must pass; the GPU-only stages must say why they were skipped.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpucheck
from benchmarks import gpucheck_checks as checks
from hrmkernels import available_backends

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = ("extension", "cuda_graph", "sanitizer")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpucheck", str(out), "--dry-run",
                           "--commit", "abc123"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, out


def test_gpucheck_dry_run_passes_every_cpu_check(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpucheck.json").read_text())
    assert result["status"] == "ok" and result["dry_run"] is True
    assert result["provenance"]["commit"] == "abc123" and result["provenance"]["device"] == "cpu"
    assert result["environment"]["triton_interpret"] == "1" and result["copy_gbps"] > 0
    assert list(result["stages"]) == [name for name, _ in gpucheck.STAGES]
    for name, stage in result["stages"].items():
        assert isinstance(stage["seconds"], float), name
        if name in GPU_ONLY:
            assert stage["status"] == "skipped" and stage["reason"] == "no GPU (dry run)", name
            continue
        assert stage["status"] == "ok" and stage["checks"], name
        for check in stage["checks"]:
            assert check["status"] == "ok", (name, check)
            assert check["seconds"] >= 0
    # Every available backend ran every case (the Triton interpreter included).
    correctness = result["stages"]["correctness"]
    assert set(correctness["backends"]) == set(available_backends("cpu"))
    assert "triton" in correctness["backends"]
    names = {c["name"] for c in correctness["checks"]}
    for kind, cases in (("", checks.CASES), ("linear ", checks.LINEAR_CASES)):
        for case in cases:
            for b in case.get("backends") or correctness["backends"]:
                assert f"{b}: {kind}{checks.case_name(case)}" in names
    compiled = {c["name"] for c in result["stages"]["compile"]["checks"]}
    assert compiled == set(available_backends("cpu"))
    assert (out / "gpucheck.md").read_text().startswith("# gpucheck: cpu")


def test_gpucheck_json_is_a_benchmark_result(dry_run, tmp_path):
    # The file carries benchmarks/run.py's fields: benchmarks/report.py renders it as it is.
    sys.path.insert(0, str(ROOT))
    from benchmarks import providers, report, run
    result = json.loads((dry_run[1] / "gpucheck.json").read_text())
    assert set(run.PROVENANCE_KEYS) <= set(result["provenance"])
    assert set(result["providers"]) == set(providers.PROVIDERS)
    rows = result["results"]
    runnable = [p for p in providers.PROVIDERS if providers.why_skipped(p, "cpu") is None]
    assert {(r["provider"], r["t"]) for r in rows} == {(p, t) for p in runnable
                                                        for t in (1.0, 2.0)}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    text = report.markdown(result, dry_run[1] / "gpucheck.json", tmp_path)
    assert "| 8 | 64 | 1 |" in text


def _ctx(budget):
    return SimpleNamespace(budget=budget, dry=False, device=torch.device("cpu"),
                           result={"stages": {}}, save=lambda: None)


def test_gpucheck_budget_skips_later_stages():
    now = [0.0]
    ctx = _ctx(gpucheck.Budget(100, clock=lambda: now[0]))

    def slow(ctx, stage):
        now[0] += 80
        gpucheck.run_check(ctx, stage, "a check", lambda: {"x": 1})

    def checks_(ctx, stage):
        for i in range(3):
            gpucheck.run_check(ctx, stage, f"c{i}", lambda: now.__setitem__(0, now[0] + 5))

    gpucheck.run_stages([("environment", slow), ("correctness", checks_),
                         ("compile", lambda c, s: None), ("cuda_graph", lambda c, s: None)], ctx)
    stages = ctx.result["stages"]
    assert stages["environment"]["status"] == "ok"
    assert stages["environment"]["checks"][0]["x"] == 1
    # 20 s left: the stage (needs 30) is skipped, and so is compile (30); cuda_graph (15) runs.
    assert stages["correctness"]["status"] == "skipped"
    assert stages["correctness"]["reason"].startswith("time budget")
    assert stages["compile"]["status"] == "skipped" and stages["cuda_graph"]["status"] == "ok"
    # Within a stage, each check looks at the clock too (5 s per check).
    now[0] = 92
    stage = {"checks": []}
    checks_(ctx, stage)
    assert [c["status"] for c in stage["checks"]] == ["ok", "skipped", "skipped"]
    assert stage["checks"][1]["reason"].startswith("time budget")


def test_gpucheck_check_statuses():
    ctx, stage = _ctx(gpucheck.Budget(1e6)), {"checks": []}

    def raises(e):
        def fn():
            raise e
        return fn

    gpucheck.run_check(ctx, stage, "ok", lambda: {"err": 0.1, "failures": []})
    gpucheck.run_check(ctx, stage, "fail", lambda: {"failures": ["dz: too far", "du: too"]})
    gpucheck.run_check(ctx, stage, "assert", raises(AssertionError("not close")))
    gpucheck.run_check(ctx, stage, "skip", raises(gpucheck.Skip("no GPU")))
    gpucheck.run_check(ctx, stage, "unavailable", raises(ValueError("backend='cuda' is not "
                                                                    "available for cpu tensors")))
    gpucheck.run_check(ctx, stage, "bad value", raises(ValueError("hrm must be >= 0")))
    gpucheck.run_check(ctx, stage, "error", raises(RuntimeError("kernel exploded")))
    got = {c["name"]: (c["status"], c["reason"]) for c in stage["checks"]}
    assert got["ok"] == ("ok", None) and stage["checks"][0]["err"] == 0.1
    assert got["fail"] == ("fail", "dz: too far; du: too")
    assert got["assert"] == ("fail", "not close")
    assert got["skip"] == ("skipped", "no GPU")
    assert got["unavailable"][0] == "skipped"
    assert got["bad value"][0] == "error" and got["error"][0] == "error"
    assert "kernel exploded" in stage["checks"][-1]["traceback"]


def test_gpucheck_zero_budget_writes_skipped_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # as the dry run sets it (no re-exec here)
    assert gpucheck.main([str(tmp_path), "--dry-run", "--budget-s", "0"]) == 0
    result = json.loads((tmp_path / "gpucheck.json").read_text())
    assert result["status"] == "ok" and result["provenance"]["commit"]
    for stage in result["stages"].values():
        assert stage["status"] == "skipped" and stage["reason"].startswith("time budget")


SANITIZER_OUTPUTS = {
    "ok": ("ran triton teacher_logits forward\nGPUCHECK-SANITIZER-DONE\n"
           "========= ERROR SUMMARY: 0 errors\n", 0, False),
    "fail": ("========= Invalid __global__ read of size 2 bytes\n=========     at _kernel+0x1f0\n"
             "GPUCHECK-SANITIZER-DONE\n========= ERROR SUMMARY: 4 errors\n", 0, False),
    "skipped": ("========= Error: Device not supported\nRuntimeError: CUDA error: unknown error"
                " (error 999)\n========= ERROR SUMMARY: 0 errors\n", 1, False),
    "error": ("Traceback (most recent call last):\nRuntimeError: boom\n"
              "========= ERROR SUMMARY: 0 errors\n", 1, False),
}


@pytest.mark.parametrize("expected", list(SANITIZER_OUTPUTS))
def test_gpucheck_memcheck_verdict(expected):
    status, why = checks.memcheck_verdict(*SANITIZER_OUTPUTS[expected])
    assert status == expected
    if expected == "fail":
        assert "4 errors" in why and "Invalid __global__ read" in why
    if expected == "skipped":
        assert "Device not supported" in why
    assert checks.memcheck_verdict("partial output", -9, True) == ("error", "timed out")


def test_gpucheck_subprocess_timeout_kills_the_group():
    rc, out, timed_out, secs = gpucheck.run_subprocess(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    assert timed_out and rc != 0 and secs < 30 and "started" in out


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch would build")
def test_gpucheck_build_extension_says_why_not(monkeypatch):
    monkeypatch.delenv("HRMKERNELS_JIT", raising=False)   # restored after: build_extension sets it
    metrics = gpucheck.build_extension(120)
    assert metrics["failures"] and "CPU-only build" in metrics["failures"][0]
    assert metrics["build_seconds"] > 0 and os.environ["HRMKERNELS_JIT"] == "0"
