"""The maths of the three SKD distillation terms, as pure functions.

Structured Knowledge Distillation for Semantic Segmentation (Liu et al., CVPR 2019, arXiv 1903.04197).
The default of every function is the official code's semantics (``irfanICMLL/structure_knowledge_distillation``
@ ``ce208e1``: ``utils/criterion.py``, ``utils/utils.py::sim_dis_compute``); the paper's and CIRKD's
(``winycg/CIRKD`` ``losses/kd.py``, ``losses/skd.py``, ``losses/adv.py``) variants are options.
``docs/`` and the spec (``skd_spec.md`` §3, §6) say where the three disagree.

Conventions:

* logits ``(B, K, h, w)`` on the stride-8 grid, features ``(B, C, h, w)``, pair-wise nodes
  ``(B, C, n_h, n_w)``.
* When the student's grid differs from the teacher's, the **student** map is resampled to the teacher
  grid with :func:`align_to` (bilinear, ``align_corners=True``) before the loss.
* Teacher tensors never receive gradients: every loss detaches them.
* Half-precision inputs are computed in float32 (the official pair-wise code calls ``.float()``);
  float64 stays float64 so the losses can be checked with ``torch.autograd.gradcheck``.

The modules in :mod:`student.losses` wrap these functions; :mod:`student.critic` is the holistic critic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cache_tools.errors import ConfigError
from cache_tools.fidelity import node_windows, pool_cells

__all__ = [
    "PoolMode",
    "align_to",
    "channel_wise_loss",
    "dist_loss",
    "generator_loss",
    "gradient_penalty",
    "hinge_critic_loss",
    "ifvd_loss",
    "node_windows",
    "pair_kernel",
    "pair_wise_loss",
    "pixel_kl_loss",
    "pixel_wise_loss",
    "pool_nodes",
    "similarity",
    "wgan_gp_critic_loss",
]

#: Added to the node norm in the official pair-wise normalisation (``utils/utils.py::L2``).
NODE_NORM_EPS = 1e-8

#: How pair-wise nodes pool their window: official/CIRKD max, the paper's average.
PoolMode = Literal["max", "avg"]

#: A critic: ``critic(x)`` or ``critic(x, image)`` -> ``(B,)`` scores.
CriticFn = Callable[..., Tensor]


def _fp32(x: Tensor) -> Tensor:
    """Upcast half precision to float32; leave float32/float64 alone (so gradcheck can run in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _hw(size: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size[-2:]
    return int(h), int(w)


def align_to(x: Tensor, size: Sequence[int] | int) -> Tensor:
    """Resample a ``(B, C, h, w)`` map to the grid ``size`` (``(H, W)`` or an int for a square grid).

    Bilinear with ``align_corners=True``: node ``i`` of an ``h``-node grid sits at ``i·(H−1)/(h−1)`` of the
    target, the official grid convention (``docs/architecture.md``). A map already on that grid is returned
    as it is (same object), so calling this on matching grids costs nothing.

    Args:
        x: ``(B, C, h, w)`` map.
        size: target grid; only the last two entries are used, so a ``torch.Size`` of a full tensor works.

    Returns:
        ``(B, C, H, W)`` map.
    """
    h, w = _hw(size)
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(
            f"logits must be (B, K, h, w); got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch and class count; got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )


# --------------------------------------------------------------------------------------------------
# Pixel-wise
# --------------------------------------------------------------------------------------------------


def pixel_wise_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Official pixel-wise loss: soft-target cross-entropy, summed over the batch, averaged over positions.

    ``L = 1/(h·w) · Σ_{b,i,j} Σ_c −p_T · log p_S`` with ``p_T = softmax(z_T)`` (temperature 1), as in the
    official ``CriterionPixelWise``. It equals ``Σ_b mean_ij KL(p_T‖p_S)`` plus the teacher's entropy, so its
    gradient is the KL gradient; its value is **proportional to the batch size** (B = 8 in the official
    script), and it covers every position (no ignore mask).

    Args:
        student_logits: ``(B, K, h, w)``; resampled to the teacher grid if it differs.
        teacher_logits: ``(B, K, H, W)``; detached.

    Returns:
        Scalar loss.
    """
    _check_logits(student_logits, teacher_logits)
    student = _fp32(align_to(student_logits, teacher_logits.shape))
    teacher = _fp32(teacher_logits.detach())
    h, w = teacher.shape[-2:]
    p_t = torch.softmax(teacher, dim=1)
    log_p_s = torch.log_softmax(student, dim=1)
    return -(p_t * log_p_s).sum() / (h * w)


def pixel_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """CIRKD pixel-wise loss: mean over (valid) pixels of ``KL(p_T‖p_S)`` at temperature τ, times τ².

    ``p = softmax(z / τ)``. Without a mask this is CIRKD's ``CriterionKD`` (``kl_div(..., 'batchmean')``
    over the ``B·h·w`` pixel rows); it does **not** grow with the batch size. The τ² factor keeps the
    gradient's scale independent of τ (Hinton et al., 2015).

    Args:
        student_logits: ``(B, K, h, w)``; resampled to the teacher grid if it differs.
        teacher_logits: ``(B, K, H, W)``; detached.
        temperature: τ > 0.
        valid_mask: optional ``(B, H, W)`` bool on the teacher grid; pixels where it is False contribute
            nothing and get exactly zero gradient. With no valid pixel the loss is 0.

    Returns:
        Scalar loss.

    Raises:
        ConfigError: ``temperature`` is not positive.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    _check_logits(student_logits, teacher_logits)
    student = _fp32(align_to(student_logits, teacher_logits.shape))
    teacher = _fp32(teacher_logits.detach())
    if valid_mask is not None:
        grid = (teacher.shape[0], *teacher.shape[2:])
        if tuple(valid_mask.shape) != grid:
            raise ValueError(f"valid_mask must be (B, H, W) on the teacher grid {grid}, got {tuple(valid_mask.shape)}")
        # Select the valid pixels *before* the softmax (rather than masking the result), so an ignored
        # pixel contributes nothing and gets exactly zero gradient even if its logits are not finite.
        mask = valid_mask.bool()
        student = student.permute(0, 2, 3, 1)[mask]  # (n_valid, K)
        teacher = teacher.permute(0, 2, 3, 1)[mask]
    # classes are dim 1 of both (B, K, H, W) and (n_valid, K)
    log_p_s = torch.log_softmax(student / temperature, dim=1)
    log_p_t = torch.log_softmax(teacher / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # one value per (valid) pixel
    return kl.sum() / max(kl.numel(), 1) * temperature**2


# --------------------------------------------------------------------------------------------------
# Pair-wise
# --------------------------------------------------------------------------------------------------


# node_windows is the format's own definition (cache_tools.fidelity): one partition for the
# loss and for composing nodes from cached cells.


def pair_kernel(
    h: int,
    w: int,
    pool_scale: float = 0.5,
    fixed_kernel: int | tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The pooling kernel (= stride) that turns an ``h × w`` feature map into pair-wise nodes.

    Official rule: ``(⌊h·s⌋, ⌊w·s⌋)`` with ``s = pool_scale`` computed exactly as the official
    ``int(h * scale)`` (same float rounding), clamped to ≥ 1. With s = 0.5: 65×65 → (32, 32) → 3×3 nodes;
    129×257 → (64, 128) → 3×3. CIRKD ignores the map size and uses a fixed 2×2 kernel (``fixed_kernel=2``).

    Args:
        h, w: feature grid (the teacher's).
        pool_scale: s in (0, 1]; ignored when ``fixed_kernel`` is given.
        fixed_kernel: an int or ``(kh, kw)`` that overrides the scale rule.

    Returns:
        ``(kh, kw)``.

    Raises:
        ConfigError: a non-positive kernel or a scale outside (0, 1].
    """
    if fixed_kernel is not None:
        kh, kw = (fixed_kernel, fixed_kernel) if isinstance(fixed_kernel, int) else fixed_kernel
        if kh < 1 or kw < 1:
            raise ConfigError(f"fixed_kernel must be positive, got {fixed_kernel}")
        return int(kh), int(kw)
    if not 0 < pool_scale <= 1:
        raise ConfigError(f"pool_scale must be in (0, 1], got {pool_scale}")
    return max(1, int(h * pool_scale)), max(1, int(w * pool_scale))


#: Pair-wise nodes: ceil-mode pooling with stride = kernel, no padding (``"max"`` the official code,
#: ``"avg"`` the paper's β×β average over each window's real extent), ``(B, C, h, w)`` ->
#: ``(B, C, n_h, n_w)`` with ``n = len(node_windows(size, k))`` per axis; the kernel is an int or
#: ``(kh, kw)``, e.g. from :func:`pair_kernel`. The same pooling as the cache's stored cells.
pool_nodes = pool_cells


def similarity(nodes: Tensor, detach_norm: bool = True) -> Tensor:
    """Cosine similarity between every pair of nodes of each image.

    Official (``detach_norm=True``, ``utils/utils.py::similarity``): ``f̂ = f / (‖f‖₂ + 1e-8)`` with the
    norm **detached**, so the gradient treats each node's length as a constant. CIRKD
    (``detach_norm=False``): ``F.normalize`` (``f / max(‖f‖₂, 1e-12)``), gradient through the norm.

    Args:
        nodes: ``(B, C, n_h, n_w)``; computed in at least float32.
        detach_norm: official (True) or CIRKD (False) normalisation.

    Returns:
        ``(B, N, N)`` with ``N = n_h·n_w`` (node order: row-major over the node grid).
    """
    f = _fp32(nodes).flatten(2)  # (B, C, N)
    if detach_norm:
        norm = torch.linalg.vector_norm(f, dim=1, keepdim=True).detach() + NODE_NORM_EPS
        f = f / norm
    else:
        f = F.normalize(f, p=2, dim=1)
    return f.transpose(1, 2) @ f  # (B, N, N)


def pair_wise_loss(student_nodes: Tensor, teacher_nodes: Tensor, detach_norm: bool = True) -> Tensor:
    """Pair-wise loss: ``Σ_{b,i,j} (a_T − a_S)² / (N²·B)``, the mean squared difference of the similarities.

    The official ``sim_dis_compute`` and CIRKD's ``.mean()`` are the same reduction; they differ only in
    the node pooling and :func:`similarity`'s normalisation. Channel counts may differ (512 vs 128):
    only the ``N × N`` matrices are compared.

    Args:
        student_nodes: ``(B, C_S, n_h, n_w)``.
        teacher_nodes: ``(B, C_T, n_h, n_w)``; detached.
        detach_norm: see :func:`similarity`; applied to both sides (the teacher side has no gradient
            either way).

    Returns:
        Scalar loss.
    """
    if student_nodes.dim() != 4 or teacher_nodes.dim() != 4:
        raise ValueError("nodes must be (B, C, n_h, n_w)")
    if student_nodes.shape[0] != teacher_nodes.shape[0] or student_nodes.shape[2:] != teacher_nodes.shape[2:]:
        raise ValueError(
            f"student and teacher nodes must agree in batch and node grid; got student "
            f"{tuple(student_nodes.shape)} and teacher {tuple(teacher_nodes.shape)}"
        )
    a_s = similarity(student_nodes, detach_norm)
    a_t = similarity(teacher_nodes.detach(), detach_norm)
    return (a_t - a_s).pow(2).mean()


# --------------------------------------------------------------------------------------------------
# Holistic (adversarial)
# --------------------------------------------------------------------------------------------------


def _scores(critic: CriticFn, x: Tensor, image: Tensor | None) -> Tensor:
    """The critic's scores as the official losses see them: its score map when it has one.

    :class:`student.critic.Critic` exposes ``score_map`` (``(B, 1, s_h, s_w)``, 1×5 for a 65×129 grid);
    other callables return ``(B,)``. The losses reduce the result themselves: means over all entries
    (official ``torch.mean(d_out)``), the hinge per entry, the gradient penalty on the sum.
    """
    fn = getattr(critic, "score_map", critic)
    return fn(x) if image is None else fn(x, image)


def gradient_penalty(
    critic: CriticFn,
    real: Tensor,
    fake: Tensor,
    image: Tensor | None = None,
    alpha: Tensor | None = None,
) -> Tensor:
    """WGAN-GP penalty ``mean_b (‖∇_x̂ Σ D(x̂)‖₂ − 1)²`` at ``x̂ = α·real + (1−α)·fake``.

    As the official ``CriterionAdditionalGP``: α ~ U(0, 1) per sample, both ends detached, the gradient of
    the **sum** of the critic's score map over the batch and the map's entries (``grad_outputs`` of ones)
    taken with ``create_graph=True`` so the penalty trains the critic, and the norm over all of a
    sample's logit entries. For a 1×1 map (65×65 grid) the sum is the score; for the 1×5 map of a 65×129
    grid the gradient is 5× that of the map's mean. The image (conditioning, if any) is held fixed; the
    penalty is on the logit input only. Note the critic's input BatchNorm couples the samples of a batch,
    so this is not a strictly per-sample gradient; that is what the official code does.

    Args:
        critic: ``critic(x[, image]) -> (B,)``, or an object with ``score_map`` (see :func:`_scores`).
        real, fake: ``(B, K, h, w)`` on the same grid.
        image: optional conditioning image, passed through to the critic.
        alpha: optional ``(B,)`` (or broadcastable) mixing weights, for tests; drawn if None.

    Returns:
        Scalar penalty (unweighted).
    """
    real, fake = real.detach(), fake.detach()
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    alpha = alpha.to(device=real.device, dtype=real.dtype).reshape(-1, *([1] * (real.dim() - 1)))
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = _scores(critic, mixed, image)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1)
    return (grad_norm - 1).pow(2).mean()


def wgan_gp_critic_loss(
    critic: CriticFn,
    real: Tensor,
    fake: Tensor,
    lambda_gp: float = 10.0,
    image: Tensor | None = None,
    alpha: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """WGAN-GP critic loss ``−mean D(real) + mean D(fake) + λ_gp·GP`` (official ``CriterionAdv`` + GP).

    ``real`` (teacher logits) and ``fake`` (student logits) are detached and scored in separate critic
    calls, in the official order (teacher, student, then the interpolation inside the penalty), so the
    BatchNorm batches and the spectral norms' power steps follow the official sequence. Means are over
    all entries of the score map.

    Args:
        critic: ``critic(x[, image]) -> (B,)``, or an object with ``score_map``.
        real, fake: ``(B, K, h, w)`` on the same grid.
        lambda_gp: weight of :func:`gradient_penalty` inside this loss.
        image: optional conditioning image.
        alpha: optional fixed mixing weights for the penalty (tests); drawn if None.

    Returns:
        ``(loss, parts)``; ``parts`` holds detached scalars ``"real"`` (mean D(real)), ``"fake"``
        (mean D(fake)) and ``"gp"`` (the unweighted penalty).
    """
    d_real = _scores(critic, real.detach(), image).mean()
    d_fake = _scores(critic, fake.detach(), image).mean()
    gp = gradient_penalty(critic, real, fake, image, alpha)
    loss = -d_real + d_fake + lambda_gp * gp
    return loss, {"real": d_real.detach(), "fake": d_fake.detach(), "gp": gp.detach()}


def hinge_critic_loss(
    critic: CriticFn,
    real: Tensor,
    fake: Tensor,
    image: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinge critic loss ``mean ReLU(1 − D(real)) + mean ReLU(1 + D(fake))`` (CIRKD; official ``hinge`` option).

    The ReLU applies to each entry of the score map, then the mean, as in the official code.

    Args:
        critic: ``critic(x[, image]) -> (B,)``, or an object with ``score_map``.
        real, fake: ``(B, K, h, w)``; detached.
        image: optional conditioning image.

    Returns:
        ``(loss, parts)``; ``parts`` holds detached ``"real"`` and ``"fake"`` mean scores.
    """
    d_real = _scores(critic, real.detach(), image)
    d_fake = _scores(critic, fake.detach(), image)
    loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return loss, {"real": d_real.mean().detach(), "fake": d_fake.mean().detach()}


def generator_loss(critic: CriticFn, fake: Tensor, image: Tensor | None = None) -> Tensor:
    """The student's adversarial term ``−mean D(fake)`` (official ``CriterionAdvForG``, WGAN and hinge alike).

    ``fake`` is not detached: the gradient flows through the critic into the student. It also reaches
    the critic's parameters; the trainer must zero the critic's gradients before the critic's own step
    (the official code does ``D_solver.zero_grad()`` there). The mean is over all score-map entries.
    """
    return -_scores(critic, fake, image).mean()


# --------------------------------------------------------------------------------------------------
# Other distillation methods served from the same stored targets (issue 13)
# --------------------------------------------------------------------------------------------------


def channel_wise_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Channel-wise distillation (CWD; Shu et al., ICCV 2021, arXiv 2011.13256) on logits.

    Each channel's map is turned into a distribution over the ``H·W`` spatial positions,
    ``p_c = softmax(z_c / τ)``, and the student matches the teacher channel by channel:
    ``L = τ² / (B·K) · Σ_{b,c} KL(p_T,bc ‖ p_S,bc)``. This is the reference code's normalisation
    (CIRKD ``losses/cwd.py`` ``CriterionCWD(norm_type='channel', divergence='kl')`` @ ``60f4425``, and
    mmrazor's ``ChannelWiseDivergence``: the KL is summed over positions and divided by ``B·K``, not by
    ``H·W``). CIRKD uses τ = 4 on logits; mmrazor's PSPNet config τ = 1 with weight 3.

    Every position counts (no ignore mask): the softmax spans the whole crop by definition.

    Args:
        student_logits: ``(B, K, h, w)``; resampled to the teacher grid if it differs.
        teacher_logits: ``(B, K, H, W)``; detached.
        temperature: τ > 0.

    Returns:
        Scalar loss.
    """
    student, teacher = _tempered_pair(student_logits, teacher_logits, temperature)
    b, k = teacher.shape[:2]
    log_p_s = torch.log_softmax(student.reshape(b, k, -1) / temperature, dim=-1)  # (B, K, H·W)
    log_p_t = torch.log_softmax(teacher.reshape(b, k, -1) / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl / (b * k) * temperature**2


def _pearson_rows(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of matching rows of two ``(N, D)`` matrices (DIST's ``pearson_correlation``)."""
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022, arXiv 2205.10536): correlation, not equality, of the probabilities.

    With ``Y = softmax(z / τ)`` flattened to ``(B·H·W, K)`` rows:

    * inter-class relation: ``1 − mean_rows pearson(Y_S[i], Y_T[i])`` (each pixel's class ranking);
    * intra-class relation: ``1 − mean_cols pearson(Y_S[:, c], Y_T[:, c])`` (each class over all pixels);

    ``L = τ² · (β · inter + γ · intra)``. The segmentation reference (``hunto/DIST_KD``
    ``segmentation/losses/dist_kd.py`` @ ``a0e5071``) has β = γ = 1 and no temperature, which is τ = 1
    here; the τ² factor is the classification reference's (``classification/lib/models/losses/dist_kd.py``).
    Pearson's ``eps`` is the reference's 1e-8. Every position counts (no ignore mask), as in the reference.

    Args:
        student_logits: ``(B, K, h, w)``; resampled to the teacher grid if it differs.
        teacher_logits: ``(B, K, H, W)``; detached.
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: τ > 0.

    Returns:
        Scalar loss.
    """
    student, teacher = _tempered_pair(student_logits, teacher_logits, temperature)
    k = teacher.shape[1]
    y_s = torch.softmax(student / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, k)  # (B·H·W, K)
    y_t = torch.softmax(teacher / temperature, dim=1).permute(0, 2, 3, 1).reshape(-1, k)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _class_centres(feature: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """Each pixel's class prototype: the mean feature of its class in its image; itself where unlabelled.

    ``feature (B, C, H, W)``, ``label (B, H, W)`` on the feature grid → ``(B, C, H, W)``. Matches the
    reference's ``center_feat`` (masked mean with ``+1e-6`` in the denominator; pixels of no listed class,
    e.g. ignore, keep their own feature, so their cosine is 1 for student and teacher alike).
    """
    centres = feature
    for c in range(num_classes):
        mask = (label == c).unsqueeze(1).to(feature.dtype)  # (B, 1, H, W)
        mean = (mask * feature).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + 1e-6)  # (B, C)
        centres = (1 - mask) * centres + mask * mean[:, :, None, None]
    return centres


def ifvd_loss(student_feature: Tensor, teacher_feature: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """Intra-class feature variation distillation (IFVD; Wang et al., ECCV 2020, arXiv 2008.00665).

    For each pixel, the cosine between its feature and its class prototype (the mean feature of its class
    in the same image) is computed for student and teacher, and the student matches the teacher's map by
    mean squared error. Student and teacher may have different channel counts; their grids must agree
    (the student's feature is resampled to the teacher's grid with :func:`align_to`). ``label`` is
    down-sampled to the feature grid by nearest neighbour, as the reference does. Reference: CIRKD
    ``losses/ifvd.py`` ``CriterionIFV`` @ ``60f4425``.

    Args:
        student_feature: ``(B, C_s, h, w)``.
        teacher_feature: ``(B, C_t, H, W)``; detached.
        label: ``(B, H_img, W_img)`` integer labels (ignore index: any value outside ``[0, num_classes)``).
        num_classes: K.

    Returns:
        Scalar loss.
    """
    if student_feature.dim() != 4 or teacher_feature.dim() != 4 or label.dim() != 3:
        raise ValueError("ifvd_loss needs (B, C, h, w) features and (B, H, W) labels")
    teacher = _fp32(teacher_feature.detach())
    student = _fp32(align_to(student_feature, teacher.shape))
    grid = tuple(teacher.shape[-2:])
    lab = F.interpolate(label[:, None].float(), size=grid, mode="nearest")[:, 0]  # (B, H, W)
    cos_s = F.cosine_similarity(student, _class_centres(student, lab, num_classes), dim=1)
    cos_t = F.cosine_similarity(teacher, _class_centres(teacher, lab, num_classes), dim=1)
    return F.mse_loss(cos_s, cos_t)


def _tempered_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Checked (student on the teacher grid, detached teacher) logits in float32 for a tempered loss."""
    _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    return _fp32(align_to(student_logits, teacher_logits.shape)), _fp32(teacher_logits.detach())


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
