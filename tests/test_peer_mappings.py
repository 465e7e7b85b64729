"""The README's "coming from Liger / TRL / torchtune" conversions, run against the peers
themselves where they are installed (CPU, float64 where the peer allows it).

Each test computes the peer's loss and ours with the documented mapping, and compares values
and student gradients.
"""
import pytest
import torch
import torch.nn.functional as F

from hrmkernels import fused_hrm_loss, fused_linear_hrm_loss

N, V, H = 13, 41, 8


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _logits():
    z = (torch.randn(2, N, V) * 2).requires_grad_()
    u = torch.randn(2, N, V) * 2
    y = torch.randint(0, V, (2, N))
    y[0, :4] = -100
    return z, u, y


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_generalized_jsd_is_our_divergence(beta):
    """TRL (GKD, GOLD): loss = JSD_beta(T), no CE term. Ours: jsd_beta=beta, same temperature;
    the divergence alone is ``.kl`` of return_components, and our loss is CE + hrm * TRL's."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    z, u, y = _logits()
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(z, u, y, beta=beta, temperature=2.0)
    ours = fused_hrm_loss(z, u, y, 0.7, jsd_beta=beta, temperature=2.0, return_components=True)
    torch.testing.assert_close(ours.kl, trl_loss.detach())
    ce = F.cross_entropy(z.flatten(0, 1), y.flatten())
    torch.testing.assert_close(ours.loss, ce + 0.7 * trl_loss)
    torch.testing.assert_close(_grad(ours.loss, z), _grad(ce + 0.7 * trl_loss, z))


def test_liger_fused_linear_jsd_is_our_fused_linear_loss():
    """Liger: w_hard * CE + w_soft * JSD_beta(T) from hidden states. Ours: w_hard *
    fused_linear_hrm_loss(..., hrm=w_soft / w_hard, jsd_beta=beta, temperature=T)."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    xs, xt = torch.randn(2 * N, H, requires_grad=True), torch.randn(2 * N, H + 3)
    ws, wt = torch.randn(V, H) * 0.5, torch.randn(V, H + 3) * 0.5
    y = torch.randint(0, V, (2 * N,))
    y[:5] = -100
    w_hard, w_soft, beta, t = 0.3, 0.7, 0.4, 1.5
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=w_hard, weight_soft_loss=w_soft,
                                            beta=beta, temperature=t, compiled=False)
    expected = liger(xs, ws, xt, wt, y)
    ours = w_hard * fused_linear_hrm_loss(xs, ws, xt, wt, y, w_soft / w_hard, jsd_beta=beta,
                                          temperature=t)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(_grad(ours, xs), _grad(expected, xs))


def test_torchtune_kd_recipe_is_ours_up_to_the_teacher_entropy():
    """torchtune's KD recipe: (1 - kd_ratio) CE + kd_ratio ForwardKLLoss, which is the soft
    cross-entropy KL + H(p) at T = 1. Ours: hrm = kd_ratio / (1 - kd_ratio), times
    (1 - kd_ratio); the two differ by kd_ratio * H(p), a constant for the student."""
    loss_mod = pytest.importorskip("torchtune.modules.loss")
    z, u, y = _logits()
    r = 0.25
    kd = loss_mod.ForwardKLLoss()(z, u, y)
    expected = (1 - r) * F.cross_entropy(z.flatten(0, 1), y.flatten()) + r * kd
    ours = (1 - r) * fused_hrm_loss(z, u, y, r / (1 - r))
    p = torch.softmax(u, -1)
    teacher_entropy = (-(p * p.log()).sum(-1))[y != -100].mean()
    torch.testing.assert_close(ours + r * teacher_entropy, expected)
    torch.testing.assert_close(_grad(ours, z), _grad(expected, z))


def test_hinton_convention_is_hrm_alpha_t_squared():
    """Hinton et al.: (1 - alpha) CE + alpha T**2 KL(p_T || q_T). Ours: hrm = alpha T**2 /
    (1 - alpha), times (1 - alpha). None of TRL, Liger, torchtune applies T**2."""
    z, u, y = _logits()
    alpha, t = 0.6, 3.0
    keep = y != -100
    kl = F.kl_div(torch.log_softmax(z / t, -1), torch.log_softmax(u / t, -1), log_target=True,
                  reduction="none").sum(-1)[keep].mean()
    expected = (1 - alpha) * F.cross_entropy(z.flatten(0, 1), y.flatten()) + alpha * t**2 * kl
    ours = (1 - alpha) * fused_hrm_loss(z, u, y, alpha * t**2 / (1 - alpha), temperature=t)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(_grad(ours, z), _grad(expected, z))
