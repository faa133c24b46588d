"""KD, CWD, DIST and IFVD against values derived here from the reference formulas (numpy, float64).

References (read at these commits): CIRKD ``losses/kd.py``, ``losses/cwd.py``, ``losses/ifvd.py`` @
``60f4425``; DIST ``segmentation/losses/dist_kd.py`` @ ``a0e5071``. The derivations below are written
from those formulas with numpy loops, independently of :mod:`student.functional`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_tools.errors import ConfigError
from student import functional as SF
from student.losses import ChannelWiseLoss, DISTLoss, IFVDLoss, KDLoss, TargetNeed


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _logits(seed: int, shape=(2, 5, 6, 7), scale=3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale, torch.randn(
        shape, generator=g, dtype=torch.float64
    ) * scale


def ref_kd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    b, _, h, w = s.shape
    total = 0.0
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                ps = _softmax(s[bi, :, i, j] / tau, 0)
                pt = _softmax(t[bi, :, i, j] / tau, 0)
                total += float((pt * (np.log(pt) - np.log(ps))).sum())
    return total / (b * h * w) * tau**2


def ref_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    b, k = s.shape[:2]
    total = 0.0
    for bi in range(b):
        for c in range(k):
            ps = _softmax(s[bi, c].ravel() / tau, 0)
            pt = _softmax(t[bi, c].ravel() / tau, 0)
            total += float((pt * (np.log(pt) - np.log(ps))).sum())
    return total / (b * k) * tau**2


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-8))


def ref_dist(s: np.ndarray, t: np.ndarray, beta: float, gamma: float, tau: float) -> float:
    k = s.shape[1]
    ys = _softmax(s / tau, 1).transpose(0, 2, 3, 1).reshape(-1, k)
    yt = _softmax(t / tau, 1).transpose(0, 2, 3, 1).reshape(-1, k)
    inter = 1 - np.mean([_pearson(ys[i], yt[i]) for i in range(ys.shape[0])])
    intra = 1 - np.mean([_pearson(ys[:, c], yt[:, c]) for c in range(k)])
    return tau**2 * (beta * inter + gamma * intra)


def ref_ifvd(fs: np.ndarray, ft: np.ndarray, label: np.ndarray, k: int) -> float:
    """label already on the feature grid."""

    def cos_map(f: np.ndarray) -> np.ndarray:
        b, _, h, w = f.shape
        out = np.ones((b, h, w))
        for bi in range(b):
            for cls in range(k):
                where = label[bi] == cls
                if not where.any():
                    continue
                proto = f[bi][:, where].sum(axis=1) / (where.sum() + 1e-6)
                for i, j in zip(*np.nonzero(where), strict=True):
                    v = f[bi, :, i, j]
                    out[bi, i, j] = v @ proto / max(np.linalg.norm(v) * np.linalg.norm(proto), 1e-8)
        return out

    return float(((cos_map(fs) - cos_map(ft)) ** 2).mean())


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_reference(tau):
    s, t = _logits(0)
    got = KDLoss(tau)(s, t)
    assert got.item() == pytest.approx(ref_kd(s.numpy(), t.numpy(), tau), rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_reference(tau):
    s, t = _logits(1)
    got = ChannelWiseLoss(tau)(s, t)
    assert got.item() == pytest.approx(ref_cwd(s.numpy(), t.numpy(), tau), rel=1e-10)


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_reference(beta, gamma, tau):
    s, t = _logits(2)
    got = DISTLoss(beta, gamma, tau)(s, t)
    assert got.item() == pytest.approx(ref_dist(s.numpy(), t.numpy(), beta, gamma, tau), rel=1e-9)


def test_ifvd_matches_reference_with_ignored_pixels():
    g = torch.Generator().manual_seed(3)
    fs = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 9, 5, 7, generator=g, dtype=torch.float64)  # channel counts may differ
    label = torch.randint(0, 4, (2, 5, 7), generator=g)
    label[0, 0, :3] = 255
    got = IFVDLoss(4)(fs, ft, label)
    assert got.item() == pytest.approx(ref_ifvd(fs.numpy(), ft.numpy(), label.numpy(), 4), rel=1e-10)


def test_ifvd_label_is_downsampled_nearest_to_the_feature_grid():
    g = torch.Generator().manual_seed(4)
    fs = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    ft = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (1, 16, 16), generator=g)
    small = label[:, ::4, ::4]  # nearest: source index floor(i * 16 / 4)
    assert SF.ifvd_loss(fs, ft, label, 3).item() == pytest.approx(SF.ifvd_loss(fs, ft, small, 3).item(), rel=1e-12)


@pytest.mark.parametrize("loss", [KDLoss(2.0), ChannelWiseLoss(4.0), DISTLoss()], ids=["kd", "cwd", "dist"])
def test_identical_logits_give_zero_and_teacher_gets_no_gradient(loss):
    s, t = _logits(5)
    t = t.clone().requires_grad_(True)
    # DIST's Pearson has the reference's eps = 1e-8 in its denominator, so "identical" is 1 - O(1e-8)
    assert loss(t.detach(), t.detach()).abs().item() < 1e-6
    s = s.clone().requires_grad_(True)
    loss(s, t).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_student_on_another_grid_is_resampled_to_the_teacher_grid():
    s, t = _logits(6, shape=(1, 4, 9, 9))
    coarse = s[:, :, ::2, ::2]  # 5x5 student, 9x9 teacher
    for loss in (KDLoss(), ChannelWiseLoss(), DISTLoss()):
        assert torch.isfinite(loss(coarse, t))


def test_losses_declare_what_they_read_from_the_store():
    assert KDLoss.needs is TargetNeed.LOGITS and ChannelWiseLoss.needs is TargetNeed.LOGITS
    assert DISTLoss.needs is TargetNeed.LOGITS and IFVDLoss.needs is TargetNeed.FULL_FEATURE


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperatures_are_config_errors(bad):
    for make in (KDLoss, ChannelWiseLoss, lambda tau: DISTLoss(temperature=tau)):
        with pytest.raises(ConfigError):
            make(bad)
