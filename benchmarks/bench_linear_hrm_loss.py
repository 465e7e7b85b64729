"""Fused linear HRM loss: time and peak memory of one loss + backward from hidden states.

    pytest benchmarks/bench_linear_hrm_loss.py --benchmark-only \
        --benchmark-json benchmarks/results/linear_hrm_loss-<gpu>.json

Every provider does the same work: student logits x_s W_s^T and teacher logits x_t W_t^T, then
CE + hrm * KL(softmax(u/T) || softmax(z/T)) ("mean"), and the gradients of the student hidden
states and weight (the teacher is frozen):

    materialized   N x V logits in the input dtype + fused_hrm_loss (backend "auto")
    chunked        fused_linear_hrm_loss (token chunks)
    fused          hrmkernels.experimental.tiled_linear_hrm_loss (logit tiles, Triton; GPU only)
    liger-fljsd    Liger-Kernel LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=1,
                   weight_soft_loss=hrm): CE + hrm * KL, chunked, torch.compile'd. Which KL
                   direction beta=0 means has changed between Liger versions; the work is the same.
    cce, cce-exact Apple's Cut Cross-Entropy linear_cross_entropy (default filtered gradient,
                   and impl="cce_exact"): cross-entropy only, so timed at hrm = 0 only.

GPU: N = 16384, H = 4096, V in {128256, 262144}, bf16. CPU: a tiny size, the torch providers,
seconds in all. extra_info holds the peak memory above the inputs (torch.cuda.max_memory_allocated
minus what was allocated before the step) and the GPU, torch and triton versions. A provider
whose package is missing, or that runs out of memory, is skipped with the reason.
"""
import gc
import importlib.util

import pytest
import torch
import triton

from hrmkernels import fused_hrm_loss
from hrmkernels import fused_linear_hrm_loss
from hrmkernels.experimental import tiled_linear_hrm_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
SIZES = [(16384, 4096, 128256), (16384, 4096, 262144)] if GPU else [(256, 64, 1000)]
HRMS = (0.5, 0.0)
TEMPERATURE = 2.0
PROVIDERS = ("materialized", "chunked", "fused", "liger-fljsd", "cce", "cce-exact")
ROUNDS = 5 if GPU else 3


def why_skipped(provider, hrm):
    """None if `provider` can be timed here at this hrm, else why not."""
    if provider == "fused" and not GPU:
        return "stage 2 on CPU runs only in the Triton interpreter: for tests, not timing"
    if provider.startswith("liger"):
        if not GPU:
            return "Liger-Kernel needs a CUDA device"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
    if provider.startswith("cce"):
        if hrm != 0:
            return "Cut Cross-Entropy has no teacher term: compared at hrm=0 only"
        if not GPU:
            return "Cut Cross-Entropy needs a CUDA device"
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut_cross_entropy is not installed"
    return None


def make_inputs(n, h, v):
    """Student hidden (N, H) and weight (V, H) require grad; the teacher's (same sizes) do not."""
    scale = h ** -0.5   # logits of order 1, as a trained head gives
    xs = torch.randn(n, h, device=DEVICE, dtype=DTYPE).requires_grad_()
    ws = (torch.randn(v, h, device=DEVICE) * scale).to(DTYPE).requires_grad_()
    xt = torch.randn(n, h, device=DEVICE, dtype=DTYPE)
    wt = (torch.randn(v, h, device=DEVICE) * 2 * scale).to(DTYPE)
    y = torch.randint(0, v, (n,), device=DEVICE)
    return xs, ws, xt, wt, y


def loss_fn(provider, hrm):
    """The loss closure of `provider`: ``loss(xs, ws, xt, wt, y) -> scalar``."""
    if provider == "materialized":
        def loss(xs, ws, xt, wt, y):
            z = xs @ ws.T
            with torch.no_grad():
                u = xt @ wt.T if hrm > 0 else z.detach()   # hrm=0: no teacher work, like the rest
            return fused_hrm_loss(z, u, y, hrm, temperature=TEMPERATURE)
        return loss
    if provider in ("chunked", "fused"):
        fn = fused_linear_hrm_loss if provider == "chunked" else tiled_linear_hrm_loss
        return lambda xs, ws, xt, wt, y: fn(xs, ws, xt, wt, y, hrm, temperature=TEMPERATURE)
    if provider == "liger-fljsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=hrm, beta=0.0,
                                     temperature=TEMPERATURE)
        return lambda xs, ws, xt, wt, y: fn(xs, ws, xt, wt, y, None, None)
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce_exact" if provider == "cce-exact" else "cce"
    return lambda xs, ws, xt, wt, y: linear_cross_entropy(xs, ws, y, impl=impl)


def _step(loss, inputs):
    xs, ws = inputs[:2]

    def step():
        out = torch.autograd.grad(loss(*inputs), (xs, ws))
        if GPU:
            torch.cuda.synchronize()   # pytest-benchmark reads a host clock
        return out
    return step


def _peak_extra_mb(step):
    """Memory one step allocates above what exists before it, in MB (GPU only)."""
    if not GPU:
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


@pytest.mark.parametrize("hrm", HRMS, ids=lambda h: f"hrm{h:g}")
@pytest.mark.parametrize("n,h,v", SIZES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_linear_hrm_loss(benchmark, provider, n, h, v, hrm):
    why = why_skipped(provider, hrm)
    if why:
        pytest.skip(why)
    inputs = None
    try:
        inputs = make_inputs(n, h, v)
        step = _step(loss_fn(provider, hrm), inputs)
        step()   # compile, autotune and warm the allocator outside the timing
        peak = _peak_extra_mb(step)
    except torch.cuda.OutOfMemoryError:
        step = inputs = None
    if step is None:
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at N={n}, H={h}, V={v}")
    benchmark.extra_info.update(
        provider=provider, n=n, h=h, v=v, hrm=hrm, temperature=TEMPERATURE, dtype=str(DTYPE),
        peak_extra_mb=peak, torch=torch.__version__, triton=triton.__version__,
        device=torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
        cuda=torch.version.cuda)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
