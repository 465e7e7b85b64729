"""The implementations we time, each as a loss function ``(z, u, y) -> scalar loss``.

    z: student logits (N, V), requires grad    u: teacher logits (N, V)    y: labels (N,)

Every provider computes the same "mean" loss, CE(z, y) + hrm * KL(softmax(u/T) || softmax(z/T)),
the way its users would write it; ``why_skipped`` says why one cannot run here. The work is the
problem's, not the provider's, so every provider is charged the same bytes (``bytes_moved``) and
GB/s compare fairly.
"""
import functools

import torch

from hrmkernels import fused_hrm_loss
from hrmkernels.backends import available_backends, resolve
from hrmkernels.reference import hrm_loss_reference

# name -> what it is; the order is the order of the table columns.
PROVIDERS = {
    "reference": "hrmkernels.reference.hrm_loss_reference, eager",
    "reference-compiled": "torch.compile(hrm_loss_reference)",
    "liger-jsd": "Liger-Kernel LigerCrossEntropyLoss + LigerJSD(beta=0) on fp32 log_softmax(x/T)",
    "liger-kldiv": "Liger-Kernel LigerCrossEntropyLoss + LigerKLDIVLoss(log_target=True, "
                   "batchmean) on fp32 log_softmax(x/T)",
    "torch": 'fused_hrm_loss(backend="torch")',
    "triton": 'fused_hrm_loss(backend="triton")',
    "triton-inplace": 'fused_hrm_loss(backend="triton", inplace_backward=True)',
    "cuda": 'fused_hrm_loss(backend="cuda")',
    "cpu": 'fused_hrm_loss(backend="cpu")',
    "cpu-inplace": 'fused_hrm_loss(backend="cpu", inplace_backward=True)',
}
# Cut Cross-Entropy is left out: it fuses the lm-head matmul (its inputs are hidden states and
# the classifier weight, not logits) and has no teacher term, so its work is not this problem's.

MODES = ("fwd", "fwd+bwd")
BACKEND_OF = {"torch": "torch", "triton": "triton", "triton-inplace": "triton", "cuda": "cuda",
              "cpu": "cpu", "cpu-inplace": "cpu"}


def bytes_moved(mode, n, v, elem_size):
    """Fewest bytes the problem moves (docs/design.md section 6), the same for every provider.

    The forward reads z and u once (2 N V); forward+backward reads them again and writes the
    student gradient (5 N V). Per-row traffic (labels, LSEs) is under 0.1% and left out.
    """
    return (2 if mode == "fwd" else 5) * n * v * elem_size


def _liger_missing():
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 (ImportError, or a Liger/Triton mismatch at import)
        return f"liger_kernel cannot be imported ({type(e).__name__}: {e})"
    return None


def why_skipped(name, device):
    """None if provider `name` can be timed on `device`, else the reason it cannot."""
    device = torch.device(device)
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    if name in ("reference", "reference-compiled"):
        return None
    if name.startswith("liger"):
        if device.type != "cuda":
            return "Liger-Kernel's Triton kernels need a CUDA device"
        return _liger_missing()
    backend = BACKEND_OF[name]
    if backend == "triton" and device.type == "cpu":
        # available_backends lists triton on CPU under TRITON_INTERPRET=1 (the tests set it):
        # the interpreter checks kernels, its speed means nothing.
        return ("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), for tests, "
                "not timing")
    if backend in available_backends(device):
        return None
    try:
        resolve(backend, device)   # backend="cpu" is built just-in-time where it can be
    except ValueError as e:
        return str(e)
    return None


def loss_fn(name, hrm, temperature):
    """The loss closure of provider `name` for one (hrm, T); call it as ``loss(z, u, y)``."""
    if name == "reference":
        return functools.partial(hrm_loss_reference, hrm=hrm, temperature=temperature)
    if name == "reference-compiled":
        # Dynamo caches compiled graphs per code object, and a few recompiles (one per size or
        # T) would make it fall back to eager silently: start each problem from a clean cache.
        torch._dynamo.reset()
        return torch.compile(functools.partial(hrm_loss_reference, hrm=hrm,
                                               temperature=temperature))
    if name.startswith("liger"):
        return _liger_loss(name.split("-")[1], hrm, temperature)
    return functools.partial(fused_hrm_loss, hrm=hrm, temperature=temperature,
                             backend=BACKEND_OF[name], inplace_backward=name.endswith("-inplace"))


def _liger_loss(kl_kind, hrm, temperature):
    """CE + hrm * KL from Liger-Kernel's separate kernels, combined as its users would.

    Its KL kernels take log-probabilities, so the temperature-scaled log-softmaxes are
    materialised in fp32 (as Liger's own fused-linear JSD does; bf16 log-probs near log(1/V)
    would carry errors of ~0.05 nats per element). Forward KL(teacher || student) is
    JSD(beta=0)(log_q, log_p) or KLDiv(input=log_q, target=log_p, log_target=True).
    """
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss

    ce = LigerCrossEntropyLoss()
    if kl_kind == "jsd":
        kl = LigerJSD(beta=0.0)
    else:
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(z, u, y):
        # log_softmax before the CE: Liger's CE writes its gradient into z's storage during
        # the forward (log_softmax's backward needs only its output, so autograd stays right).
        log_q = torch.log_softmax(z.float() / temperature, dim=-1)
        log_p = torch.log_softmax(u.float() / temperature, dim=-1)
        kd = kl(log_q, log_p, y) if kl_kind == "jsd" else kl(log_q, log_p)
        return ce(z, y) + hrm * kd

    return loss


def step(loss, mode, z, u, y):
    """One timed call: the loss alone ("fwd") or the loss and d loss / d z ("fwd+bwd").

    The student requires grad in both modes, as in training, so "fwd" is the forward a training
    step pays (Liger's CE, for one, computes its gradient there). autograd.grad returns the
    gradient instead of accumulating it into z.grad, which would add a read-modify-write pass.
    """
    if mode == "fwd":
        return lambda: loss(z, u, y)
    return lambda: torch.autograd.grad(loss(z, u, y), z)[0]
