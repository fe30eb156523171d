"""Tests for dgan.losses: known values, masking, and the exact R1 of a linear D."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dgan.losses import balanced_adv_surrogate, d_loss, diffusion_loss, g_adv_loss, r1_penalty

LOG2 = math.log(2.0)


def test_diffusion_loss_is_mean_squared_error() -> None:
    eps = torch.zeros(2, 1, 2, 2)
    eps_hat = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]).view(2, 1, 2, 2)
    assert diffusion_loss(eps_hat, eps).item() == pytest.approx(6.0 / 8.0)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 1))


def test_zero_logits_give_log2_terms() -> None:
    zeros = torch.zeros(4, 1, 3, 3)
    assert d_loss(zeros, zeros).item() == pytest.approx(2 * LOG2)
    assert g_adv_loss(zeros).item() == pytest.approx(LOG2)


def test_d_loss_rewards_a_correct_discriminator() -> None:
    real, fake = torch.full((3, 1, 2, 2), 2.0), torch.full((3, 1, 2, 2), -1.0)
    expected = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))
    assert d_loss(real, fake).item() == pytest.approx(expected)
    # Swapping real and fake must cost more: the loss is not symmetric in its arguments.
    assert d_loss(fake, real).item() > d_loss(real, fake).item() + 1.0


def test_g_adv_loss_known_value_and_gradient_sign() -> None:
    fake = torch.full((2, 1, 2, 2), 1.5, requires_grad=True)
    loss = g_adv_loss(fake)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    loss.backward()
    assert torch.all(fake.grad < 0)  # G wants the fake logits pushed up


def test_g_adv_loss_weight_averages_only_kept_samples() -> None:
    # Per-sample patch maps with different sizes of loss; sample 1 is huge but dropped.
    fake = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, -50.0, 2.0, 1.0)])
    fake.requires_grad_(True)
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = g_adv_loss(fake, weight)
    expected = (F.softplus(torch.tensor(0.0)) + F.softplus(torch.tensor(-2.0))) / 2
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert torch.all(fake.grad[1] == 0) and torch.all(fake.grad[3] == 0)
    assert torch.all(fake.grad[0] != 0)
    # A bool mask means the same as its 0/1 float.
    assert g_adv_loss(fake, weight.bool()).item() == pytest.approx(loss.item())


def test_all_zero_weight_gives_zero_that_still_backpropagates() -> None:
    fake = torch.randn(3, 1, 2, 2, requires_grad=True)
    loss = g_adv_loss(fake, torch.zeros(3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(fake.grad, torch.zeros_like(fake))


def test_dropped_nonfinite_fake_does_not_poison_the_loss() -> None:
    fake = torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1).requires_grad_(True)
    loss = g_adv_loss(fake, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(LOG2)
    loss.backward()
    assert torch.isfinite(fake.grad).all()


def test_d_loss_fake_weight_masks_only_the_fake_term() -> None:
    real = torch.zeros(4, 1, 2, 2)
    fake = torch.tensor([0.0, 30.0, 0.0, 30.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    masked = d_loss(real, fake, fake_weight=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert masked.item() == pytest.approx(2 * LOG2)
    none_kept = d_loss(real, fake, fake_weight=torch.zeros(4))
    assert none_kept.item() == pytest.approx(LOG2)  # the real term is never masked
    with pytest.raises(ValueError, match="weight must have shape"):
        d_loss(real, fake, fake_weight=torch.ones(4, 1))


def test_r1_of_linear_d_is_squared_weight_norm() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    logits = (w * x).sum(dim=(1, 2, 3))  # D(x) = <w, x> per sample
    penalty = r1_penalty(logits, x)
    assert penalty.item() == pytest.approx(w.pow(2).sum().item(), rel=1e-12)


def test_r1_sums_patch_logits_and_is_backpropagatable() -> None:
    # D(x) = a * x^2 per patch: grad = 2 a x, so R1 = mean_b sum 4 a^2 x^2 and d/da = 8 a mean_b sum x^2.
    a = torch.tensor(0.7, requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(2, 1, 1, 2).requires_grad_(True)
    penalty = r1_penalty(a * x.pow(2), x)
    sq = torch.tensor([5.0, 10.0])
    assert penalty.item() == pytest.approx((4 * 0.49 * sq).mean().item())
    (grad_a,) = torch.autograd.grad(penalty, a)
    assert grad_a.item() == pytest.approx((8 * 0.7 * sq).mean().item())


def test_r1_requires_grad_on_inputs() -> None:
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.sum(dim=(1, 2, 3)), x)


class NoHostSync(TorchFunctionMode):
    """Fails on any tensor operation that reads a value back to the host."""
    forbidden = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if getattr(func, "__name__", "") in self.forbidden:
            raise AssertionError(f"host sync via {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_masked_losses_make_no_host_sync() -> None:
    fake = torch.randn(4, 1, 2, 2, requires_grad=True)
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with NoHostSync():
        loss = g_adv_loss(fake, weight) + d_loss(fake.detach(), fake, fake_weight=weight)
        loss = loss + diffusion_loss(fake, torch.zeros_like(fake))
    assert loss.requires_grad


def _balance_case(adv_factor: float = 1.0):
    """G's output for 6 samples (the first 3 are fakes), its diffusion loss and a D-like loss."""
    torch.manual_seed(0)
    out = torch.randn(6, 1, 4, 4, requires_grad=True) * 2
    L_diff = diffusion_loss(out, torch.randn(6, 1, 4, 4))
    L_adv = adv_factor * g_adv_loss(out[:3].pow(2).mean(dim=(1, 2, 3)) - out[:3].mean(dim=(1, 2, 3)))
    return out, L_diff, L_adv


def test_balanced_adversarial_gradient_is_a_fixed_share_of_each_fakes_diffusion_gradient() -> None:
    out, L_diff, L_adv = _balance_case()
    (g_diff,) = torch.autograd.grad(L_diff, out, retain_graph=True)
    (g_adv,) = torch.autograd.grad(L_adv, out, retain_graph=True)
    (g,) = torch.autograd.grad(balanced_adv_surrogate(out, L_diff, L_adv, slice(0, 3), 0.1), out)
    ratio = g[:3].flatten(1).norm(dim=1) / g_diff[:3].flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.full((3,), 0.1), rtol=1e-4)
    assert g[3:].abs().max() == 0  # the samples that made no fake get no adversarial push
    # its direction is D's, and a D whose gradient is 1000x larger pushes no harder
    assert F.cosine_similarity(g[:3].flatten(1), g_adv[:3].flatten(1)).min() > 0.9999
    out2, L_diff2, L_adv2 = _balance_case(adv_factor=1000.0)
    (g2,) = torch.autograd.grad(balanced_adv_surrogate(out2, L_diff2, L_adv2, slice(0, 3), 0.1), out2)
    assert torch.allclose(g2, g, rtol=1e-4, atol=1e-9)


def test_balanced_adversarial_term_without_fakes_or_weight_is_zero() -> None:
    out, L_diff, L_adv = _balance_case()
    for fakes, ratio in ((slice(0, 0), 0.1), (slice(0, 3), 0.0)):  # no fake; the warm-up's zero gain
        term = balanced_adv_surrogate(out, L_diff, L_adv, fakes, ratio)
        assert term.item() == 0
        (L_diff + term).backward(retain_graph=True)  # adds to the diffusion loss as it is


def test_balanced_fakes_without_a_diffusion_target_use_the_batch_mean() -> None:
    """G's own samples (the last rows) have no diffusion target: their push is ratio x the mean
    diffusion-gradient norm of the rows that do."""
    torch.manual_seed(1)
    out = torch.randn(5, 1, 4, 4, requires_grad=True) * 2
    L_diff = diffusion_loss(out[:3], torch.randn(3, 1, 4, 4))
    L_adv = g_adv_loss(out[3:].mean(dim=(1, 2, 3)))
    (g_diff,) = torch.autograd.grad(L_diff, out, retain_graph=True)
    (g,) = torch.autograd.grad(balanced_adv_surrogate(out, L_diff, L_adv, slice(3, 5), 0.2, own_reference=False), out)
    mean_norm = g_diff[:3].flatten(1).norm(dim=1).mean()
    assert torch.allclose(g[3:].flatten(1).norm(dim=1), 0.2 * mean_norm.expand(2), rtol=1e-4)
    assert g[:3].abs().max() == 0


@pytest.mark.parametrize("own_reference", [True, False])
def test_balanced_adversarial_term_makes_no_host_sync(own_reference: bool) -> None:
    out, L_diff, L_adv = _balance_case()
    with NoHostSync():
        term = balanced_adv_surrogate(out, L_diff, L_adv, slice(0, 3), 0.1, own_reference=own_reference)
    assert term.requires_grad
