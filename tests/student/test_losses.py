"""Pixel-wise and pair-wise losses against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cache_tools.errors import ConfigError
from student import functional as SF
from student.losses import DistillationWeights, PairWiseLoss, PixelWiseLoss

LN3 = math.log(3.0)


def toy_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """1x2x1x2 logits (2 classes, 2 positions) whose softmax values are simple fractions.

    teacher: position 0 (0, 0)   -> p_T = (1/2, 1/2);  position 1 (ln 3, 0) -> p_T = (3/4, 1/4)
    student: position 0 (0, ln 3) -> p_S = (1/4, 3/4);  position 1 (0, 0)   -> p_S = (1/2, 1/2)
    """
    teacher = torch.tensor([[[[0.0, LN3]], [[0.0, 0.0]]]], dtype=torch.float64)
    student = torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]], dtype=torch.float64)
    return student, teacher


# Soft cross-entropy and KL per position, from the fractions above.
CE_0 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
CE_1 = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))  # = ln 2
KL_0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
KL_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
H_T = (math.log(2.0) - (0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2  # mean teacher entropy


# --------------------------------------------------------------------------------------------------
# align_to
# --------------------------------------------------------------------------------------------------


def test_align_to_is_bilinear_align_corners():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # align_corners=True: the 2 source nodes sit at the 3-grid's nodes 0 and 2; node 1 is the midpoint.
    expected = torch.tensor([[[[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]]])
    torch.testing.assert_close(SF.align_to(x, (3, 3)), expected)
    torch.testing.assert_close(SF.align_to(x, 3), expected)
    assert SF.align_to(x, (2, 2)) is x
    assert SF.align_to(x, torch.Size([5, 7, 2, 2])) is x


def test_pixel_loss_aligns_the_student_to_the_teacher_grid():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 2, 2, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3)
    aligned = F.interpolate(student.detach(), size=(3, 3), mode="bilinear", align_corners=True)
    for loss in (PixelWiseLoss(), PixelWiseLoss("kl")):
        torch.testing.assert_close(loss(student, teacher), loss(aligned, teacher))
    PixelWiseLoss()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Pixel-wise
# --------------------------------------------------------------------------------------------------


def test_official_pixel_loss_by_hand():
    student, teacher = toy_logits()
    # Σ over the batch (1 image) and positions, divided by h·w = 2.
    assert SF.pixel_wise_loss(student, teacher).item() == pytest.approx((CE_0 + CE_1) / 2, abs=1e-12)


def test_official_pixel_loss_sums_over_the_batch_and_kl_averages():
    student, teacher = toy_logits()
    s2, t2 = torch.cat([student, student]), torch.cat([teacher, teacher])
    official = PixelWiseLoss()
    assert official(s2, t2).item() == pytest.approx(2 * (CE_0 + CE_1) / 2, abs=1e-12)
    kl = PixelWiseLoss("kl")
    assert kl(student, teacher).item() == pytest.approx((KL_0 + KL_1) / 2, abs=1e-12)
    assert kl(s2, t2).item() == pytest.approx((KL_0 + KL_1) / 2, abs=1e-12)


def test_official_pixel_loss_gradient_by_hand():
    student, teacher = toy_logits()
    student.requires_grad_(True)
    SF.pixel_wise_loss(student, teacher).backward()
    # d/dz_S of −Σ p_T log softmax(z_S) is p_S − p_T; divided by h·w = 2.
    expected = torch.tensor([[[[0.25 - 0.5, 0.5 - 0.75]], [[0.75 - 0.5, 0.5 - 0.25]]]], dtype=torch.float64) / 2
    torch.testing.assert_close(student.grad, expected)


def test_identical_logits_kl_zero_and_soft_ce_is_teacher_entropy():
    _, teacher = toy_logits()
    assert SF.pixel_kl_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-12)
    assert SF.pixel_wise_loss(teacher.clone(), teacher).item() == pytest.approx(H_T, abs=1e-12)


def test_kl_temperature_squared_factor():
    student, teacher = toy_logits()
    # At τ = 2 the logits halve: ln 3 / 2 = ln √3, so the "3/4, 1/4" split becomes √3/(1+√3), 1/(1+√3).
    r = math.sqrt(3.0)
    a, b = r / (1 + r), 1 / (1 + r)
    kl_0 = 0.5 * math.log(0.5 / b) + 0.5 * math.log(0.5 / a)  # p_T = (1/2, 1/2), p_S = (b, a)
    kl_1 = a * math.log(a / 0.5) + b * math.log(b / 0.5)  # p_T = (a, b), p_S = (1/2, 1/2)
    expected = 2.0**2 * (kl_0 + kl_1) / 2
    assert SF.pixel_kl_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, abs=1e-12)
    assert PixelWiseLoss("kl", temperature=2.0)(student, teacher).item() == pytest.approx(expected, abs=1e-12)


def test_valid_mask_excludes_pixels_and_zeroes_their_gradient():
    student, teacher = toy_logits()
    student.requires_grad_(True)
    mask = torch.tensor([[[True, False]]])
    loss = PixelWiseLoss("kl")(student, teacher, valid_mask=mask)
    assert loss.item() == pytest.approx(KL_0, abs=1e-12)  # one valid pixel: its KL
    loss.backward()
    # position 0: (p_S − p_T) / 1 valid pixel = (1/4 − 1/2, 3/4 − 1/2); position 1: exactly 0
    expected = torch.tensor([[[[-0.25, 0.0]], [[0.25, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(student.grad, expected)
    assert student.grad[..., 1].eq(0).all()


def test_valid_mask_shields_non_finite_ignored_pixels():
    student, teacher = toy_logits()
    student = student.clone()
    student[0, :, 0, 1] = float("nan")
    student.requires_grad_(True)
    loss = SF.pixel_kl_loss(student, teacher, valid_mask=torch.tensor([[[True, False]]]))
    loss.backward()
    assert loss.item() == pytest.approx(KL_0, abs=1e-12)
    assert torch.isfinite(student.grad).all()


def test_empty_valid_mask_gives_zero():
    student, teacher = toy_logits()
    loss = SF.pixel_kl_loss(student, teacher, valid_mask=torch.zeros(1, 1, 2, dtype=torch.bool))
    assert loss.item() == 0.0


def test_official_mode_ignores_the_mask():
    student, teacher = toy_logits()
    mask = torch.tensor([[[True, False]]])
    assert PixelWiseLoss()(student, teacher, mask).item() == pytest.approx((CE_0 + CE_1) / 2, abs=1e-12)


def test_pixel_losses_gradcheck():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    mask = torch.rand(2, 3, 4) > 0.3
    assert torch.autograd.gradcheck(lambda s: SF.pixel_wise_loss(s, teacher), (student,))
    assert torch.autograd.gradcheck(lambda s: SF.pixel_kl_loss(s, teacher, 2.0, mask), (student,))


def test_teacher_logits_get_no_gradient():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    (PixelWiseLoss()(student, teacher) + PixelWiseLoss("kl", 3.0)(student, teacher)).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_pixel_options_are_validated():
    with pytest.raises(ConfigError):
        PixelWiseLoss("soft")
    with pytest.raises(ConfigError):
        PixelWiseLoss("official", temperature=2.0)
    with pytest.raises(ConfigError):
        PixelWiseLoss("kl", temperature=0.0)
    student, teacher = toy_logits()
    with pytest.raises(ValueError):
        SF.pixel_wise_loss(student, teacher[:, :1])
    with pytest.raises(ValueError):
        SF.pixel_kl_loss(student, teacher, valid_mask=torch.ones(1, 2, 2, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Pair-wise: nodes
# --------------------------------------------------------------------------------------------------


def test_node_windows_of_the_official_grids():
    assert SF.node_windows(65, 32) == [(0, 32), (32, 64), (64, 65)]
    assert SF.pair_kernel(65, 65) == (32, 32)
    assert SF.pair_kernel(129, 257) == (64, 128)
    assert SF.node_windows(129, 64) == [(0, 64), (64, 128), (128, 129)]
    assert SF.node_windows(257, 128) == [(0, 128), (128, 256), (256, 257)]
    assert SF.node_windows(64, 2)[-1] == (62, 64) and len(SF.node_windows(64, 2)) == 32
    assert SF.pair_kernel(64, 128, fixed_kernel=2) == (2, 2)


def test_node_windows_match_ceil_mode_max_pool():
    torch.manual_seed(0)
    for size in range(1, 40):
        x = torch.randn(1, 1, 1, size)
        for kernel in range(1, size + 2):
            pooled = F.max_pool2d(x, (1, kernel), stride=(1, kernel), ceil_mode=True)[0, 0, 0]
            windows = SF.node_windows(size, kernel)
            assert len(windows) == pooled.numel(), (size, kernel)
            maxima = torch.stack([x[0, 0, 0, a:b].max() for a, b in windows])
            torch.testing.assert_close(pooled, maxima)


@pytest.mark.parametrize(
    ("shape", "loss", "nodes"),
    [
        ((65, 65), PairWiseLoss.official(), (3, 3)),
        ((129, 257), PairWiseLoss.official(), (3, 3)),
        ((65, 65), PairWiseLoss.paper(), (3, 3)),
        ((64, 128), PairWiseLoss.cirkd(), (32, 64)),
    ],
    ids=["official-65", "official-129x257", "paper-65", "cirkd-64x128"],
)
def test_node_counts(shape, loss, nodes):
    feature = torch.randn(1, 4, *shape)
    assert tuple(loss.nodes(feature).shape) == (1, 4, *nodes)


def test_cirkd_has_2048_nodes_on_64x128():
    assert PairWiseLoss.cirkd().nodes(torch.randn(1, 2, 64, 128))[0, 0].numel() == 2048


def test_pool_nodes_partial_window():
    x = torch.tensor([[[[1.0, 2.0, 6.0]]]])
    # windows [0:2] and [2:3]: max (2, 6); mean over the real extent (1.5, 6), not (1.5, 3)
    torch.testing.assert_close(SF.pool_nodes(x, (1, 2), "max"), torch.tensor([[[[2.0, 6.0]]]]))
    torch.testing.assert_close(SF.pool_nodes(x, (1, 2), "avg"), torch.tensor([[[[1.5, 6.0]]]]))


# --------------------------------------------------------------------------------------------------
# Pair-wise: loss
# --------------------------------------------------------------------------------------------------


def toy_nodes() -> tuple[torch.Tensor, torch.Tensor]:
    """Two nodes per image. Student (C=2): f1 = (3, 4), f2 = (1, 0). Teacher (C=3): (1, 0, 0), (0, 1, 0)."""
    student = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    return student, teacher


def test_pair_loss_by_hand():
    student, teacher = toy_nodes()
    # a_T = I. a_S: f̂1 = (0.6, 0.8), f̂2 = (1, 0), so a_S = [[1, 0.6], [0.6, 1]].
    # L = Σ (a_T − a_S)² / (N²·B) = (0 + 0.36 + 0.36 + 0) / 4 = 0.18
    for detach_norm in (True, False):
        loss = SF.pair_wise_loss(student, teacher, detach_norm=detach_norm)
        assert loss.item() == pytest.approx(0.18, abs=1e-7)
    torch.testing.assert_close(
        SF.similarity(student)[0], torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_pair_loss_gradient_detached_norm_vs_normalize():
    # With the norm n_k detached, a_ij = f_i·f_j / (n_i n_j) and
    #   dL/df_k = 4/(N²·B) · Σ_j (a_kj − t_kj) · f̂_j / n_k          (N = 2, B = 1: factor 1)
    # f1: [(1 − 1)·f̂1 + (0.6 − 0)·f̂2] / 5 = 0.6·(1, 0) / 5 = (0.12, 0)
    # f2: [(0.6 − 0)·f̂1 + (1 − 1)·f̂2] / 1 = 0.6·(0.6, 0.8) = (0.36, 0.48)
    student, teacher = toy_nodes()
    student.requires_grad_(True)
    SF.pair_wise_loss(student, teacher, detach_norm=True).backward()
    detached = student.grad.clone()
    torch.testing.assert_close(detached[0, :, 0, 0], torch.tensor([0.12, 0.0], dtype=torch.float64))
    torch.testing.assert_close(detached[0, :, 0, 1], torch.tensor([0.36, 0.48], dtype=torch.float64))

    # Through the norm (F.normalize) the radial part is projected out: g − (g·f̂) f̂.
    # f1: (0.12, 0) − 0.072·(0.6, 0.8) = (0.0768, −0.0576);  f2: (0.36, 0.48) − 0.36·(1, 0) = (0, 0.48)
    student.grad = None
    SF.pair_wise_loss(student, teacher, detach_norm=False).backward()
    full = student.grad
    torch.testing.assert_close(full[0, :, 0, 0], torch.tensor([0.0768, -0.0576], dtype=torch.float64))
    torch.testing.assert_close(full[0, :, 0, 1], torch.tensor([0.0, 0.48], dtype=torch.float64))
    assert not torch.allclose(detached, full)


def test_detached_norm_gradient_matches_analytic_formula_on_random_nodes():
    torch.manual_seed(0)
    b, n = 2, 6
    student = torch.randn(b, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(b, 7, 2, 3, dtype=torch.float64)
    SF.pair_wise_loss(student, teacher).backward()
    f = student.detach().flatten(2)  # (B, C, N)
    norm = f.norm(dim=1, keepdim=True) + 1e-8
    f_hat = f / norm
    a_s = f_hat.transpose(1, 2) @ f_hat
    t_hat = teacher.flatten(2) / (teacher.flatten(2).norm(dim=1, keepdim=True) + 1e-8)
    a_t = t_hat.transpose(1, 2) @ t_hat
    expected = 4 / (n * n * b) * (f_hat @ (a_s - a_t)) / norm  # column k: Σ_j (a_kj − t_kj) f̂_j / n_k
    torch.testing.assert_close(student.grad.flatten(2), expected)


def test_pair_losses_gradcheck():
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for loss in (PairWiseLoss.cirkd(), PairWiseLoss(pool="avg", detach_norm=False), PairWiseLoss(detach_norm=False)):
        teacher_nodes = loss.nodes(teacher)
        assert torch.autograd.gradcheck(lambda s, loss=loss, t=teacher_nodes: loss(s, t), (feature,))


def test_pair_loss_on_a_different_student_grid():
    torch.manual_seed(0)
    loss = PairWiseLoss.official()
    student = torch.randn(2, 8, 64, 64, requires_grad=True)  # e.g. a non-ceil-mode student: 64x64
    teacher_nodes = loss.nodes(torch.randn(2, 16, 65, 65))  # 3x3
    value = loss(student, teacher_nodes, teacher_grid_size=(65, 65))
    aligned = F.interpolate(student.detach(), size=(65, 65), mode="bilinear", align_corners=True)
    expected = SF.pair_wise_loss(F.max_pool2d(aligned, 32, 32, ceil_mode=True), teacher_nodes)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert student.grad is not None
    with pytest.raises(ValueError, match="teacher_grid_size"):
        loss(student, teacher_nodes)  # 64 pools to 2x2 with kernel 32


def test_pair_loss_teacher_gets_no_gradient():
    torch.manual_seed(0)
    loss = PairWiseLoss.official()
    student = torch.randn(2, 8, 65, 65, requires_grad=True)
    teacher_feature = torch.randn(2, 16, 65, 65, requires_grad=True)
    loss(student, loss.nodes(teacher_feature)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_feature.grad is None


def test_pair_options_are_validated():
    with pytest.raises(ConfigError):
        PairWiseLoss(pool="min")
    with pytest.raises(ConfigError):
        PairWiseLoss(pool_scale=0.0)
    with pytest.raises(ConfigError):
        PairWiseLoss(fixed_kernel=0)
    with pytest.raises(ConfigError):
        SF.pool_nodes(torch.zeros(1, 1, 4, 4), 2, "sum")


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def test_distillation_weights_defaults_are_the_official_script():
    w = DistillationWeights()
    assert (w.lambda_pi, w.lambda_pa, w.lambda_d, w.lambda_gp, w.aux_weight) == (10.0, 0.5, 0.1, 10.0, 0.4)
    assert w.lambda_d * w.lambda_gp == pytest.approx(1.0)  # the effective GP weight
    with pytest.raises(ConfigError):
        DistillationWeights(lambda_pa=-1.0)
