"""The holistic critic and the adversarial losses (stand-in critics give hand-computable values)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cache_tools.errors import ConfigError
from student import functional as SF
from student.critic import Critic, SpectralNorm
from student.losses import HolisticLoss

# --------------------------------------------------------------------------------------------------
# The critic network
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "has_l4", "last_kernel"),
    [((65, 65), True, (4, 4)), ((64, 64), True, (4, 4)), ((17, 17), False, (2, 2)), ((64, 128), True, (4, 4))],
    ids=["65", "64", "17", "64x128"],
)
def test_critic_scores_one_value_per_sample(grid, has_l4, last_kernel):
    torch.manual_seed(0)
    critic = Critic(19, input_size=grid)
    assert (critic.l4 is not None) == has_l4
    assert critic.last_kernel == last_kernel
    scores = critic(torch.randn(2, 19, *grid))
    assert scores.shape == (2,)
    assert torch.isfinite(scores).all()


def test_critic_parameter_count_matches_the_official_discriminator():
    critic = Critic(19, input_size=65)
    # BN(19) 38; l1 19·64·16 + 64; l2 64·128·16 + 128; l3 128·256·16 + 256;
    # attn(256) 2·(256·32 + 32) + 256·256 + 256 + 1; l4 256·512·16 + 512;
    # attn(512) 2·(512·64 + 64) + 512·512 + 512 + 1; last 512·16 + 1
    expected = (
        38
        + (19 * 64 * 16 + 64)
        + (64 * 128 * 16 + 128)
        + (128 * 256 * 16 + 256)
        + (2 * (256 * 32 + 32) + 256 * 256 + 256 + 1)
        + (256 * 512 * 16 + 512)
        + (2 * (512 * 64 + 64) + 512 * 512 + 512 + 1)
        + (512 * 16 + 1)
    )
    n = sum(p.numel() for p in critic.parameters())
    assert n == expected == 3_191_721
    assert n == pytest.approx(3.19e6, rel=0.01)


def test_critic_structure():
    critic = Critic(19)
    for block in (critic.l1, critic.l2, critic.l3, critic.l4):
        assert isinstance(block[0], SpectralNorm)
        assert isinstance(block[1], nn.LeakyReLU) and block[1].negative_slope == 0.1
    assert isinstance(critic.last[0], nn.Conv2d)  # the last conv is plain
    assert critic.attn1.gamma.item() == 0.0 and critic.attn2.gamma.item() == 0.0
    bn = critic.preprocess_additional
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 19


def test_critic_image_conditioning():
    torch.manual_seed(0)
    critic = Critic(19, input_size=65, image_channels=3)
    assert critic.preprocess_additional.num_features == 22
    image = torch.rand(2, 3, 512, 512) * 255
    image[:, :, 500:] = float("nan")  # padded rows
    scores = critic(torch.randn(2, 19, 65, 65), image)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(ValueError):
        critic(torch.randn(2, 19, 65, 65))
    with pytest.raises(ValueError):
        Critic(19)(torch.randn(2, 19, 65, 65), image)


def test_critic_rejects_unusable_sizes():
    with pytest.raises(ConfigError):
        Critic(19, input_size=7)
    with pytest.raises(ValueError):
        Critic(19, input_size=65)(torch.randn(2, 19, 17, 17))  # too small for the l4 + 4x4 head


# --------------------------------------------------------------------------------------------------
# Adversarial losses with a stand-in critic D(x) = Σ w·x
# --------------------------------------------------------------------------------------------------


class LinearCritic(nn.Module):
    """D(x) = Σ_{c,i,j} w·x per sample; its input gradient is w everywhere, so ‖∇D‖ = ‖w‖."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return (self.w * x).sum(dim=(1, 2, 3))


W = torch.tensor([[[[1.0, 2.0], [2.0, 0.0]]]])  # ‖w‖ = √(1 + 4 + 4) = 3, Σw = 5
REAL = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])  # D = 5, 10
FAKE = torch.stack([torch.zeros(1, 2, 2), -torch.ones(1, 2, 2)])  # D = 0, −5


def test_gradient_penalty_of_a_linear_critic_is_norm_minus_one_squared():
    critic = LinearCritic(W.clone())
    for alpha in (torch.tensor([0.0, 1.0]), torch.tensor([0.3, 0.9]), None):
        gp = SF.gradient_penalty(critic, REAL, FAKE, alpha=alpha)
        assert gp.item() == pytest.approx((3.0 - 1.0) ** 2, abs=1e-6)
    unit = LinearCritic(W / 3)
    assert SF.gradient_penalty(unit, REAL, FAKE).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_trains_the_critic():
    # GP = (‖w‖ − 1)², d/dw = 2(‖w‖ − 1)·w/‖w‖ = 2·2·w/3
    critic = LinearCritic(W.clone())
    SF.gradient_penalty(critic, REAL, FAKE).backward()
    torch.testing.assert_close(critic.w.grad, 4 * W / 3)


def test_wgan_gp_critic_loss_by_hand():
    critic = LinearCritic(W.clone())
    real, fake = REAL.clone().requires_grad_(True), FAKE.clone().requires_grad_(True)
    loss, parts = SF.wgan_gp_critic_loss(critic, real, fake, lambda_gp=10.0)
    # −mean(5, 10) + mean(0, −5) + 10·(3 − 1)² = −7.5 − 2.5 + 40 = 30
    assert loss.item() == pytest.approx(30.0, abs=1e-5)
    assert parts["real"].item() == pytest.approx(7.5)
    assert parts["fake"].item() == pytest.approx(-2.5)
    assert parts["gp"].item() == pytest.approx(4.0, abs=1e-6)
    loss.backward()
    assert real.grad is None and fake.grad is None  # both ends are detached


def test_hinge_critic_loss_by_hand():
    critic = LinearCritic(W.clone())
    real = torch.stack([torch.ones(1, 2, 2), 0.1 * torch.ones(1, 2, 2)])  # D = 5, 0.5
    loss, parts = SF.hinge_critic_loss(critic, real, FAKE)
    # mean(ReLU(1 − 5), ReLU(1 − 0.5)) + mean(ReLU(1 + 0), ReLU(1 − 5)) = 0.25 + 0.5
    assert loss.item() == pytest.approx(0.75, abs=1e-6)
    assert parts["real"].item() == pytest.approx(2.75)
    assert "gp" not in parts


def test_generator_loss_by_hand():
    critic = LinearCritic(W.clone())
    fake = FAKE.clone().requires_grad_(True)
    loss = SF.generator_loss(critic, fake)
    assert loss.item() == pytest.approx(2.5)  # −mean(0, −5)
    loss.backward()
    torch.testing.assert_close(fake.grad, -W.expand(2, 1, 2, 2) / 2)  # −w / B per sample


def test_image_reaches_the_critic():
    seen = []

    class Spy(LinearCritic):
        def forward(self, x, image=None):
            seen.append(image)
            return super().forward(x)

    image = torch.zeros(2, 3, 4, 4)
    SF.wgan_gp_critic_loss(Spy(W.clone()), REAL, FAKE, image=image)
    assert len(seen) == 3 and all(s is image for s in seen)


# --------------------------------------------------------------------------------------------------
# HolisticLoss with the real critic
# --------------------------------------------------------------------------------------------------


def test_generator_term_reaches_the_student():
    torch.manual_seed(0)
    holistic = HolisticLoss(Critic(19, input_size=65))
    student = torch.randn(2, 19, 64, 64, requires_grad=True)  # a 64 grid against a 65 teacher
    g = holistic.generator_term(student, (65, 65))
    g.backward()
    assert g.dim() == 0
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # the critic's parameters get no gradient from the student's term, and stay trainable
    assert all(p.grad is None and p.requires_grad for p in holistic.critic.parameters())


@pytest.mark.parametrize("kind", ["wgan-gp", "hinge"])
def test_critic_term_trains_only_the_critic(kind):
    torch.manual_seed(0)
    critic = Critic(19, input_size=65)
    holistic = HolisticLoss(critic, kind=kind)
    student = torch.randn(2, 19, 65, 65, requires_grad=True)
    teacher = torch.randn(2, 19, 65, 65, requires_grad=True)
    loss, parts = holistic.critic_term(student, teacher)
    loss.backward()
    assert student.grad is None and teacher.grad is None
    for name, p in critic.named_parameters():
        assert p.grad is not None, name
    if kind == "wgan-gp":
        expected = -parts["real"] + parts["fake"] + 10.0 * parts["gp"]
        torch.testing.assert_close(loss.detach(), expected)


def test_critic_term_with_image_and_different_grids():
    torch.manual_seed(0)
    holistic = HolisticLoss(Critic(19, input_size=65, image_channels=3), lambda_gp=0.0)
    image = torch.rand(2, 3, 512, 512) * 255
    loss, parts = holistic.critic_term(torch.randn(2, 19, 64, 64), torch.randn(2, 19, 65, 65), image)
    torch.testing.assert_close(loss.detach(), -parts["real"] + parts["fake"])
    assert torch.isfinite(holistic.generator_term(torch.randn(2, 19, 64, 64), (65, 65), image))


def test_holistic_options_are_validated():
    with pytest.raises(ConfigError):
        HolisticLoss(Critic(19), kind="lsgan")
    with pytest.raises(ConfigError):
        HolisticLoss(Critic(19), lambda_gp=-1.0)
