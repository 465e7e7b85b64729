"""The reference is the spec: check it against torch's own CE and KL, and its autograd in
float64."""
import pytest
import torch
import torch.nn.functional as F

from hrmkernels.reference import hrm_loss_reference


def _inputs(n=6, v=11, dtype=torch.float64):
    z, u = torch.randn(n, v, dtype=dtype) * 2, torch.randn(n, v, dtype=dtype) * 2
    y = torch.randint(0, v, (n,))
    y[1] = -100
    return z, u, y


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hrm_loss_reference_matches_torch_composition(direction, eps, reduction):
    z, u, y = _inputs()
    t, hrm = 2.0, 0.7
    ce = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=eps, reduction=reduction)
    log_q, log_p = F.log_softmax(z / t, -1), F.log_softmax(u / t, -1)
    if direction == "reverse":
        log_q, log_p = log_p, log_q
    # F.kl_div(input, target) = KL(target || input) with log_target=True
    kl_rows = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * (y != -100)
    kl = {"none": kl_rows, "sum": kl_rows.sum(),
          "mean": kl_rows.sum() / (y != -100).sum()}[reduction]
    out = hrm_loss_reference(z, u, y, hrm, temperature=t, label_smoothing=eps, reduction=reduction,
                             kl_direction=direction, return_components=True)
    torch.testing.assert_close(out[1], ce)
    torch.testing.assert_close(out[2], kl)
    torch.testing.assert_close(out[0], ce + hrm * kl)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_hrm_loss_reference_gradcheck(direction):
    z, u, y = _inputs(n=4, v=5)
    z.requires_grad_()
    u.requires_grad_()

    def f(z, u):
        return hrm_loss_reference(z, u, y, 0.5, temperature=0.5, label_smoothing=0.1,
                                  kl_direction=direction)

    assert torch.autograd.gradcheck(f, (z, u))


def test_hrm_loss_reference_masked_vocabulary_has_finite_gradients():
    z, u, y = _inputs(n=3, v=8)
    z[:, :2] = u[:, :2] = float("-inf")           # masked in both: contributes exactly 0
    y[0] = 5
    z.requires_grad_()
    loss = hrm_loss_reference(z, u, y, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert (z.grad[:, :2] == 0).all()


def test_hrm_loss_reference_all_ignored_is_zero_not_nan():
    z, u, y = _inputs()
    z.requires_grad_()
    loss = hrm_loss_reference(z, u, torch.full_like(y, -100), 0.5)
    loss.backward()
    assert loss.item() == 0 and (z.grad == 0).all()
