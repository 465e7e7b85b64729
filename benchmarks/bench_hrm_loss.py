"""pytest-benchmark view of the runner's problems: ``pytest benchmarks/ --benchmark-only``.

CPU: small sizes, the eager reference against backend="torch". GPU: docs/design.md section 6 sizes
(``--bench-quick`` for a subset) and every provider that can run, torch.compile(reference) and
the Triton backend among them. pytest-benchmark reads a host clock, so each timed call ends with
a CUDA synchronisation. For GB/s against a copy's bandwidth and the JSON, use benchmarks.run.
"""
import gc
import time

import pytest
import torch

from benchmarks import providers, run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
TARGET_SECONDS = 0.3   # per benchmark; the slowest eager problems still get 3 rounds


def pytest_generate_tests(metafunc):
    grid = run.default_grid(DEVICE, metafunc.config.getoption("--bench-quick"))
    problems = [(n, v, t) for n in grid["n"] for v in grid["v"] for t in grid["t"]]
    metafunc.parametrize("n,v,t", problems, ids=[f"N{n}-V{v}-T{t:g}" for n, v, t in problems])


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


@pytest.mark.parametrize("mode", providers.MODES)
@pytest.mark.parametrize("provider", list(providers.PROVIDERS))
def test_bench_hrm_loss(benchmark, provider, mode, n, v, t):
    why = providers.why_skipped(provider, DEVICE)
    if why:
        pytest.skip(why)
    try:
        z, u, y = run.make_inputs(n, v, DTYPE, DEVICE)
        fn = _synced(providers.step(providers.loss_fn(provider, run.HRM, t), mode, z, u, y))
        fn()   # compile and autotune outside the timing
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        fn = z = u = y = None
    if fn is None:
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at N={n}, V={v}")
    nbytes = providers.bytes_moved(mode, n, v, z.element_size())
    rounds = max(3, min(100, int(TARGET_SECONDS / seconds)))
    benchmark.extra_info.update(provider=provider, mode=mode, n=n, v=v, t=t, bytes=nbytes)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gbps_median"] = nbytes / benchmark.stats.stats.median / 1e9
