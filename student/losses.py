"""The three SKD distillation losses as small modules over :mod:`student.functional`.

Structured Knowledge Distillation for Semantic Segmentation (Liu et al., CVPR 2019, arXiv 1903.04197).
Defaults follow the official code (``irfanICMLL/structure_knowledge_distillation`` @ ``ce208e1``); the
paper's and CIRKD's variants are constructor options or presets. Student maps are resampled to the
teacher's grid with :func:`student.functional.align_to` before every loss, and teacher tensors are
detached.

The student's total objective (official script, skd_spec §3.4)::

    L_S = L_mc + λ_pi·L_pi + λ_pa·L_pa + λ_d·(−mean D(z_S))

and the critic's ``λ_d·[−mean D(z_T) + mean D(z_S) + λ_gp·GP]``; the weights are
:class:`DistillationWeights`. The modules return unweighted values; the trainer applies the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Literal

from torch import Tensor, nn

from cache_tools.errors import ConfigError
from student import functional as SF

__all__ = [
    "ChannelWiseLoss",
    "DISTLoss",
    "IFVDLoss",
    "KDLoss",
    "TargetNeed",
    "AdversarialKind",
    "DistillationWeights",
    "HolisticLoss",
    "PairWiseLoss",
    "PixelMode",
    "PixelWiseLoss",
]

#: Pixel-wise variants: the official batch-summed soft cross-entropy, or CIRKD's per-pixel KL.
PixelMode = Literal["official", "kl"]
#: Critic objectives: the official WGAN-GP, or CIRKD's hinge.
AdversarialKind = Literal["wgan-gp", "hinge"]


class TargetNeed(str, Enum):
    """What a loss reads from the teacher, so a cache can be checked before training starts.

    * ``LOGITS``: the stride-8 logits (every cache holds them).
    * ``NODES``: pair-wise nodes, composed from the stored feature cells.
    * ``FULL_FEATURE``: the feature map itself, one vector per grid position: a cache built with
      ``--features-block 1x1``.
    """

    LOGITS = "logits"
    NODES = "nodes"
    FULL_FEATURE = "full-feature"


@dataclass(frozen=True, kw_only=True)
class DistillationWeights:
    """Loss weights; the defaults are the official script's (``run_train_val.sh``).

    Attributes:
        lambda_pi: pixel-wise weight (official 10; note the official pixel loss sums over the batch).
        lambda_pa: pair-wise weight (script 0.5; code default 1.0; paper 10).
        lambda_d: holistic weight, applied to both the student's adversarial term and the whole critic
            loss (GP included).
        lambda_gp: gradient-penalty weight inside the critic loss (effective weight λ_d·λ_gp = 1).
        aux_weight: weight of the auxiliary (dsn) head's cross-entropy.
    """

    lambda_pi: float = 10.0
    lambda_pa: float = 0.5
    lambda_d: float = 0.1
    lambda_gp: float = 10.0
    aux_weight: float = 0.4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0:
                raise ConfigError(f"{f.name} must be >= 0, got {value}")


class PixelWiseLoss(nn.Module):
    """Pixel-wise distillation of the class distributions.

    * ``mode="official"`` (default): soft-target cross-entropy at T = 1, **summed over the batch** and
      averaged over the ``h·w`` positions, no ignore mask (:func:`~student.functional.pixel_wise_loss`).
    * ``mode="kl"`` (CIRKD): mean over (valid) pixels of ``KL(p_T‖p_S)`` at temperature τ, times τ²
      (:func:`~student.functional.pixel_kl_loss`).

    Args:
        mode: ``"official"`` or ``"kl"``.
        temperature: τ; must be 1 in official mode.

    Shape:
        ``student_logits (B, K, h, w)``, ``teacher_logits (B, K, H, W)``, ``valid_mask (B, H, W)`` bool on
        the teacher grid → scalar. The mask is used in ``"kl"`` mode only and ignored in official mode,
        which covers every position by definition.
    """

    needs = TargetNeed.LOGITS

    def __init__(self, mode: PixelMode = "official", temperature: float = 1.0):
        super().__init__()
        if mode not in ("official", "kl"):
            raise ConfigError(f"pixel-wise mode must be 'official' or 'kl', got {mode!r}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if mode == "official" and temperature != 1.0:
            raise ConfigError("the official pixel-wise loss has temperature 1; use mode='kl' for another")
        self.mode = mode
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        if self.mode == "official":
            return SF.pixel_wise_loss(student_logits, teacher_logits)
        return SF.pixel_kl_loss(student_logits, teacher_logits, self.temperature, valid_mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, temperature={self.temperature}"


class PairWiseLoss(nn.Module):
    """Pair-wise distillation of the node-to-node cosine similarities of a feature map.

    Nodes are a ceil-mode pooling of the feature with stride = kernel; the kernel comes from the
    **teacher's** grid (:func:`~student.functional.pair_kernel`). The teacher side arrives already pooled
    (from a cache, or from :meth:`nodes` on an online teacher's feature); the student's feature is resampled
    to the teacher grid and pooled the same way, then :func:`~student.functional.pair_wise_loss` compares
    the ``N × N`` matrices (channel counts may differ).

    Presets: :meth:`official` (max pool, kernel ⌊h/2⌋ → 3×3 nodes at 65×65, detached norm), :meth:`paper`
    (average pool, same kernel), :meth:`cirkd` (max pool, fixed 2×2 kernel, ``F.normalize``).

    Args:
        pool: ``"max"`` (official, CIRKD) or ``"avg"`` (paper).
        pool_scale: s in ``kernel = ⌊h·s⌋``.
        fixed_kernel: overrides the scale rule (CIRKD: 2).
        detach_norm: official normalisation (True) or gradient through the norm (False).

    Shape:
        ``student_feature (B, C_S, h, w)``, ``teacher_nodes (B, C_T, n_h, n_w)`` → scalar.
    """

    needs = TargetNeed.NODES

    def __init__(
        self,
        pool: SF.PoolMode = "max",
        pool_scale: float = 0.5,
        fixed_kernel: int | tuple[int, int] | None = None,
        detach_norm: bool = True,
    ):
        super().__init__()
        if pool not in ("max", "avg"):
            raise ConfigError(f"pair-wise pool must be 'max' or 'avg', got {pool!r}")
        SF.pair_kernel(65, 65, pool_scale, fixed_kernel)  # validates the options
        self.pool = pool
        self.pool_scale = float(pool_scale)
        self.fixed_kernel = fixed_kernel
        self.detach_norm = detach_norm

    @classmethod
    def official(cls) -> PairWiseLoss:
        """Official code: max pool, kernel = half the teacher grid, detached norm."""
        return cls(pool="max", pool_scale=0.5, fixed_kernel=None, detach_norm=True)

    @classmethod
    def paper(cls) -> PairWiseLoss:
        """The paper's β×β average pooling (same kernel rule; official normalisation)."""
        return cls(pool="avg", pool_scale=0.5, fixed_kernel=None, detach_norm=True)

    @classmethod
    def cirkd(cls) -> PairWiseLoss:
        """CIRKD: fixed 2×2 max pool (2048 nodes on 64×128), ``F.normalize`` with gradient."""
        return cls(pool="max", fixed_kernel=2, detach_norm=False)

    def kernel(self, grid_size: Sequence[int]) -> tuple[int, int]:
        """The pooling kernel for a feature on ``grid_size`` (``(h, w)`` or a full shape)."""
        h, w = grid_size[-2:]
        return SF.pair_kernel(int(h), int(w), self.pool_scale, self.fixed_kernel)

    def nodes(self, feature: Tensor) -> Tensor:
        """Pool a feature on its own grid into nodes: ``(B, C, h, w) -> (B, C, n_h, n_w)``."""
        return SF.pool_nodes(feature, self.kernel(feature.shape), self.pool)

    def forward(
        self,
        student_feature: Tensor,
        teacher_nodes: Tensor,
        teacher_grid_size: Sequence[int] | None = None,
    ) -> Tensor:
        """Pair-wise loss of a student feature against pooled teacher nodes.

        Args:
            student_feature: ``(B, C_S, h, w)``.
            teacher_nodes: ``(B, C_T, n_h, n_w)``, pooled from the teacher's feature with :meth:`nodes`
                (or composed from cached cells with :func:`~student.functional.node_windows`); detached.
            teacher_grid_size: the teacher feature's ``(H, W)``. Needed when it differs from the student's
                grid (e.g. 65 vs 64), since the node count alone does not determine it; None means the
                student's own grid.

        Returns:
            Scalar loss.
        """
        grid = tuple(student_feature.shape[-2:]) if teacher_grid_size is None else teacher_grid_size
        student_nodes = self.nodes(SF.align_to(student_feature, grid))
        if student_nodes.shape[-2:] != teacher_nodes.shape[-2:]:
            raise ValueError(
                f"the student feature {tuple(student_feature.shape[-2:])} pools to "
                f"{tuple(student_nodes.shape[-2:])} nodes but the teacher has {tuple(teacher_nodes.shape[-2:])}; "
                "pass teacher_grid_size (the teacher feature's grid) when the grids differ"
            )
        return SF.pair_wise_loss(student_nodes, teacher_nodes, self.detach_norm)

    def extra_repr(self) -> str:
        return (
            f"pool={self.pool!r}, pool_scale={self.pool_scale}, fixed_kernel={self.fixed_kernel}, "
            f"detach_norm={self.detach_norm}"
        )


class HolisticLoss(nn.Module):
    """Holistic (adversarial) distillation with a critic over logit maps.

    ``kind="wgan-gp"`` (official): critic loss ``−mean D(z_T) + mean D(z_S) + λ_gp·GP``;
    ``kind="hinge"`` (CIRKD): ``mean ReLU(1 − D(z_T)) + mean ReLU(1 + D(z_S))``, no penalty. The student's
    term is ``−mean D(z_S)`` for both.

    Both terms are returned **unweighted**; the trainer multiplies each by λ_d. Because the gradient
    penalty lives inside :meth:`critic_term`, it is scaled by λ_d too, so the effective GP weight is
    λ_d·λ_gp = 0.1·10 = 1, exactly as the official code. Student logits are resampled to the teacher grid
    first; the critic holds no reference to any tensor between calls.

    Args:
        critic: the discriminator, e.g. :class:`student.critic.Critic` (a submodule of this loss).
        kind: ``"wgan-gp"`` or ``"hinge"``.
        lambda_gp: GP weight inside the critic term (WGAN-GP only).
    """

    needs = TargetNeed.LOGITS

    def __init__(self, critic: nn.Module, kind: AdversarialKind = "wgan-gp", lambda_gp: float = 10.0):
        super().__init__()
        if kind not in ("wgan-gp", "hinge"):
            raise ConfigError(f"holistic kind must be 'wgan-gp' or 'hinge', got {kind!r}")
        if not lambda_gp >= 0:
            raise ConfigError(f"lambda_gp must be >= 0, got {lambda_gp}")
        self.critic = critic
        self.kind = kind
        self.lambda_gp = float(lambda_gp)

    def generator_term(
        self,
        student_logits: Tensor,
        teacher_grid_size: Sequence[int],
        image: Tensor | None = None,
    ) -> Tensor:
        """The student's adversarial term ``−mean D(z_S)`` (unweighted).

        The gradient flows through the critic into the student logits only. The official code also
        computes gradients for the critic's parameters here and zeroes them before the critic's step;
        skd freezes the parameters for this forward instead (same update, half the backward's work).
        This call is the step's first critic forward: it runs the spectral norms' power step and
        updates the input BatchNorm's running statistics, as the official ``student_backward`` does.

        Args:
            student_logits: ``(B, K, h, w)``.
            teacher_grid_size: the teacher logits' ``(H, W)`` (the critic's grid).
            image: conditioning image, for a critic built with ``image_channels``.
        """
        params = [p for p in self.critic.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return SF.generator_loss(self.critic, SF.align_to(student_logits, teacher_grid_size), image)
        finally:
            for p in params:
                p.requires_grad_(True)

    def critic_term(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        image: Tensor | None = None,
        alpha: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic's loss on detached logits (unweighted; the WGAN-GP penalty is inside).

        The critic runs on the teacher, the student, then the interpolation (official order); with
        the official spectral norm, the backward of all three uses the u and v of the last call.

        Args:
            student_logits: ``(B, K, h, w)`` (fake); detached.
            teacher_logits: ``(B, K, H, W)`` (real); detached.
            image: conditioning image, for a critic built with ``image_channels``.
            alpha: fixed ``(B,)`` interpolation weights for the penalty (tests); drawn if None.

        Returns:
            ``(loss, parts)``: see :func:`~student.functional.wgan_gp_critic_loss` and
            :func:`~student.functional.hinge_critic_loss`.
        """
        fake = SF.align_to(student_logits.detach(), teacher_logits.shape)
        real = teacher_logits.detach()
        if self.kind == "wgan-gp":
            return SF.wgan_gp_critic_loss(self.critic, real, fake, self.lambda_gp, image, alpha)
        return SF.hinge_critic_loss(self.critic, real, fake, image)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, lambda_gp={self.lambda_gp}"


class KDLoss(nn.Module):
    """Hinton KD on every (valid) pixel: ``τ² · mean KL(p_T‖p_S)`` at temperature τ.

    Hinton et al., *Distilling the Knowledge in a Neural Network* (2015), applied per pixel as CIRKD's
    ``CriterionKD`` (``losses/kd.py`` @ ``60f4425``: ``kl_div(..., 'batchmean')`` over ``B·h·w`` rows,
    times τ²; its default τ = 1). The maths is :func:`~student.functional.pixel_kl_loss`.

    Shape:
        ``student_logits (B, K, h, w)``, ``teacher_logits (B, K, H, W)``, ``valid_mask (B, H, W)`` → scalar.
    """

    needs = TargetNeed.LOGITS

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        SF._check_temperature(temperature)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return SF.pixel_kl_loss(student_logits, teacher_logits, self.temperature, valid_mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ChannelWiseLoss(nn.Module):
    """Channel-wise distillation of logits (CWD; Shu et al., ICCV 2021): :func:`~student.functional.channel_wise_loss`.

    Shape:
        ``student_logits (B, K, h, w)``, ``teacher_logits (B, K, H, W)`` → scalar.
    """

    needs = TargetNeed.LOGITS

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        SF._check_temperature(temperature)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return SF.channel_wise_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class DISTLoss(nn.Module):
    """DIST (Huang et al., NeurIPS 2022): inter- and intra-class correlation, :func:`~student.functional.dist_loss`.

    Shape:
        ``student_logits (B, K, h, w)``, ``teacher_logits (B, K, H, W)`` → scalar.
    """

    needs = TargetNeed.LOGITS

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        SF._check_temperature(temperature)
        if not (beta >= 0 and gamma >= 0):
            raise ConfigError(f"DIST weights must be >= 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return SF.dist_loss(student_logits, teacher_logits, self.beta, self.gamma, self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


class IFVDLoss(nn.Module):
    """Intra-class feature variation distillation (IFVD; Wang et al., ECCV 2020): :func:`~student.functional.ifvd_loss`.

    Reads the teacher's feature map itself, so a cache serves it only when it stores the full map
    (``skdcache build --features-block 1x1``); pooled pair-wise cells lose the per-pixel variation.

    Shape:
        ``student_feature (B, C_s, h, w)``, ``teacher_feature (B, C_t, H, W)``, ``label (B, H_img, W_img)``
        → scalar.
    """

    needs = TargetNeed.FULL_FEATURE

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, label: Tensor) -> Tensor:
        return SF.ifvd_loss(student_feature, teacher_feature, label, self.num_classes)
