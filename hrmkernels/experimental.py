"""Experimental: code that works and is tested, but that no measurement yet supports using.

``tiled_linear_hrm_loss`` is :func:`hrmkernels.fused_linear_hrm_loss` (same arguments and
results) computed by Triton kernels that keep each logit tile on chip: an online log-sum-exp
over vocabulary tiles in the forward, tiles recomputed in the backward, nothing N x V written.
It is not the default and not part of the public API because its backward accumulates dx and
dW with fp32 atomics: by its own count about 4 N V H (1/BLOCK_V + 1/BLOCK_N) bytes of atomic
traffic (about 270 GB at N = 4096, V = 128256, H = 4096, BLOCK = 64) against about 2 GB of
chunk logits for the chunked path, with sums that differ from run to run (benchmarks/NOTES.md).
It has not run on a GPU. Checked under the Triton interpreter and compiled ahead of time for
sm_80/86/90/100 like every kernel.
"""
import inspect

from hrmkernels.api.linear_hrm_loss import _linear_hrm_loss, fused_linear_hrm_loss

_SIGNATURE = inspect.signature(fused_linear_hrm_loss)


def tiled_linear_hrm_loss(*args, **kwargs):
    """fused_linear_hrm_loss on logit tiles kept on chip (Triton only: backend "auto" or
    "triton"). For bf16/fp16 heads, or fp32 at matmul precision "medium" (tf32); fp32 at "high"
    or "highest" takes small tiles and runs slowly; float64 heads raise (Triton computes in
    float32: fused_linear_hrm_loss keeps float64)."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return _linear_hrm_loss("fused", **bound.arguments)
