"""The kernels of each backend and their launchers, below the autograd Functions.

    triton/    backend="triton": the dense loss (hrm_loss), top-k teachers (topk) and the
               fused linear loss (linear), as torch.library.triton_op custom ops
    pytorch    backend="torch": chunked pure PyTorch, any device
    native     the C++ extension built from csrc/ (backend="cpu" on CPU, "cuda" on CUDA tensors)

hrmkernels.backends chooses a module; nothing here imports the layers above. Every module
exposes the same launchers (the top-k pair only where noted):

    hrm_loss_fwd(z, u, labels, hrm, temperature, label_smoothing, ignore_index, beta)
        -> loss, ce, div, entropy (N,) and stats (N, 5)
    hrm_loss_bwd(z, u, labels, stats, grad, hrm, temperature, label_smoothing, ignore_index,
                 beta, dz, du) -> None
    hrm_loss_topk_fwd(z, idx, lp, labels, ..., beta, renormalize) -> loss, ce, div, entropy, stats
    hrm_loss_topk_bwd(z, idx, lp, labels, stats, grad, ..., beta, renormalize, dz) -> None
        (beta as below, over the top-k teacher's k + 1 or k outcomes; stats (N, 4): topk.py)

z, u: (B, S, V) row views with a unit last stride (hrmkernels._checks.rows_view), N = B * S;
labels (N,). beta chooses the divergence D: 0 is KL(p || q), 1 is KL(q || p), strictly between
is the generalised JSD beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q,
with p = softmax(u / T), q = softmax(z / T). Outputs are float32 (float64 for float64 inputs
where a backend takes them) and exactly 0 at ignored rows: loss = ce + hrm * div (ce alone at
hrm == 0, even where div is infinite), div = D clamped at 0, entropy = H(q). stats holds what
the backward needs: (lse(z), lse(z / T), lse(u / T), mu, 0) for the KL, mu = E_p[b - a]
(forward) or E_q[a - b] (reverse); (lse(z), lse(z / T), lse(u / T), KL(q || m), KL(p || m)) for
the JSD. The backward writes grad_r * d(loss_r) / dz into dz (which may alias z) and likewise
into du unless it is None; grad (N,) fp32 may be a stride-0 expansion of a scalar.
"""
import torch


def host_checks(t):
    """Whether the CPU-only input checks run on `t`: host memory, so reading it costs no device
    synchronisation; not while torch.compile traces (the launchers' ops run them inside)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_label_range(labels, v, ignore_index):
    """ValueError for a label outside [0, v) that is not ignore_index, where host_checks (the
    C++ CPU kernels check the same in C++). Other devices' kernels make that token's loss NaN
    instead (docs/design.md section 3)."""
    if not host_checks(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bad.any():  # sync-ok: CPU tensor
        first = int(bad.reshape(-1).nonzero()[0, 0])  # sync-ok: CPU tensor
        raise ValueError(f"labels must lie in [0, {v}) or equal ignore_index={ignore_index}; "
                         f"found {int(labels.reshape(-1)[first])} at flat position {first}")
