"""The holistic critic: the official SKD discriminator (SAGAN-style), with a depth that adapts to the grid.

Official source: ``networks/sagan_models.py::Discriminator`` with ``preprocess_GAN_mode=1`` (input
BatchNorm), ``conv_dim=64``, ``imsize_for_adv=65`` (skd_spec §3.3). It scores raw logits, not
probabilities, and in the official code it does not see the image; the paper says it does, so image
conditioning is an option here (``image_channels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from cache_tools.errors import ConfigError

__all__ = ["Critic", "SelfAttention"]


def _down(n: int) -> int:
    """Output size of a 4x4 / stride 2 / pad 1 convolution."""
    return (n - 2) // 2 + 1


class SelfAttention(nn.Module):
    """SAGAN self-attention: ``out = γ·attn(x) + x`` with γ initialised to 0.

    Query and key are 1x1 convolutions to ``C/8`` channels, value a 1x1 convolution to ``C``; the
    attention of each position is a softmax over all key positions.

    Shape:
        ``(B, C, h, w) -> (B, C, h, w)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2)  # (B, C/8, N)
        k = self.key_conv(x).flatten(2)  # (B, C/8, N)
        v = self.value_conv(x).flatten(2)  # (B, C, N)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N_query, N_key)
        out = v @ attn.transpose(1, 2)  # (B, C, N): out[:, :, i] = Σ_j v[:, :, j]·attn[i, j]
        return self.gamma * out.view(b, c, h, w) + x


def _sn_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.1))


class Critic(nn.Module):
    """The SKD discriminator over a logit map.

    Layers (``conv_dim`` = 64, a 65×65 grid):

    * ``input_bn``: ``BatchNorm2d(K [+ image channels])`` on the raw input (the official code keeps the
      critic in train mode throughout, so it normalises with batch statistics).
    * ``l1``–``l3``: spectral-norm conv 4×4/2 p1 with LeakyReLU(0.1): K→64 (32), 64→128 (16),
      128→256 (8); then ``attn1`` = :class:`SelfAttention` (256).
    * ``l4``: 256→512 (4), then ``attn2`` (512). The official code builds ``l4`` only for
      ``imsize == 65`` (and then cannot run other sizes); here it exists when the map after ``l3`` is at
      least 8 on both axes, so 64 and 65 grids get it and a 17×17 grid does not.
    * ``last``: a plain conv 4×4, no padding → 1 channel. When the final map is smaller than 4 along an
      axis, the kernel along that axis is the map's size. A score map larger than 1×1 (e.g. 1×5 for a
      64×128 grid) is averaged, as CIRKD does.

    Spectral norm is ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration per forward
    in training mode, like SAGAN's; unlike SAGAN's it starts from 15 iterations at construction).
    For K = 19 on a 65×65 grid the critic has 3,191,721 parameters (≈ 3.19 M, skd_spec §3.3).

    Args:
        num_classes: K, the logit channels.
        input_size: the logit grid the critic is built for, ``h`` or ``(h, w)`` (the teacher's grid); it
            fixes the depth and the last kernel. Other sizes run as long as they fit those layers.
        image_channels: 0 (official: logits only) or the number of image channels to condition on
            (the paper: 3).
        conv_dim: width of ``l1`` (doubles per block).

    Shape:
        ``logits (B, K, h, w)``, ``image (B, image_channels, H, W)`` → scores ``(B,)``.

    Raises:
        ConfigError: a grid smaller than 8 or negative image channels.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int | Sequence[int] = 65,
        image_channels: int = 0,
        conv_dim: int = 64,
    ):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else map(int, input_size)
        if min(h, w) < 8:
            raise ConfigError(f"the critic needs a logit grid of at least 8x8, got {h}x{w}")
        if image_channels < 0:
            raise ConfigError(f"image_channels must be >= 0, got {image_channels}")
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.input_size = (h, w)

        c_in = num_classes + image_channels
        self.input_bn = nn.BatchNorm2d(c_in)
        self.l1 = _sn_block(c_in, conv_dim)
        self.l2 = _sn_block(conv_dim, conv_dim * 2)
        self.l3 = _sn_block(conv_dim * 2, conv_dim * 4)
        self.attn1 = SelfAttention(conv_dim * 4)
        channels = conv_dim * 4
        for _ in range(3):
            h, w = _down(h), _down(w)
        if min(h, w) >= 8:
            self.l4: nn.Module | None = _sn_block(channels, channels * 2)
            self.attn2: nn.Module | None = SelfAttention(channels * 2)
            channels *= 2
            h, w = _down(h), _down(w)
        else:
            self.l4 = self.attn2 = None
        self.last_kernel = (min(4, h), min(4, w))
        self.last = nn.Conv2d(channels, 1, self.last_kernel)

    def _image_channels(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Raw pixels -> the extra input channels on the logit grid.

        The image is the model input of the pipeline's contract (``docs/architecture.md``): raw values in
        0–255, NaN where padded. It is mapped to [−1, 1] (``x/127.5 − 1``; padding becomes 0, mid-grey),
        then resampled bilinearly with ``align_corners=True`` to the logit grid, i.e. sampled at the grid's
        node positions. The input BatchNorm then equalises its scale with the logits'.
        """
        x = torch.nan_to_num(image.detach().to(torch.float32) / 127.5 - 1.0, nan=0.0)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def forward(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """Score a batch of logit maps.

        Args:
            logits: ``(B, K, h, w)`` raw logits.
            image: ``(B, image_channels, H, W)`` raw pixels (0–255, NaN padding), any size; required when
                the critic was built with ``image_channels > 0`` and refused otherwise.

        Returns:
            ``(B,)`` scores.
        """
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}, h, w), got {tuple(logits.shape)}")
        x = logits
        if self.image_channels:
            if image is None:
                raise ValueError(f"this critic is conditioned on {self.image_channels} image channels")
            if image.dim() != 4 or image.shape[0] != logits.shape[0] or image.shape[1] != self.image_channels:
                raise ValueError(
                    f"expected image (B={logits.shape[0]}, {self.image_channels}, H, W), got {tuple(image.shape)}"
                )
            img = self._image_channels(image, tuple(logits.shape[-2:])).to(logits.dtype)
            x = torch.cat([logits, img], dim=1)
        elif image is not None:
            raise ValueError("this critic takes no image (built with image_channels=0)")

        out = self.l3(self.l2(self.l1(self.input_bn(x))))
        out = self.attn1(out)
        if self.l4 is not None:
            out = self.attn2(self.l4(out))
        if out.shape[-2] < self.last_kernel[0] or out.shape[-1] < self.last_kernel[1]:
            raise ValueError(f"a {tuple(logits.shape[-2:])} grid is too small for a critic built for {self.input_size}")
        return self.last(out).mean(dim=(1, 2, 3))  # (B,)
