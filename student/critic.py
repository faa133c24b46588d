"""The holistic critic: the official SKD discriminator (SAGAN-style), with a depth that adapts to the grid.

Official source: ``networks/sagan_models.py::Discriminator`` with ``preprocess_GAN_mode=1`` (input
BatchNorm), ``conv_dim=64``, ``imsize_for_adv=65`` (skd_spec §3.3), and ``networks/spectral.py::SpectralNorm``.
It scores raw logits, not probabilities, and in the official code it does not see the image; the paper
says it does, so image conditioning is an option here (``image_channels``).

The module and parameter names are the official ones, so an official discriminator's state dict loads
with ``load_state_dict`` (after :func:`official_critic_state_dict` strips the ``DataParallel`` prefix)
and skd's critic state dict loads into the official ``Discriminator``. Critic state dicts written by
earlier skd versions (``torch.nn.utils.parametrizations.spectral_norm`` layout) are renamed on load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache_tools.errors import ConfigError, WeightsError

__all__ = [
    "Critic",
    "SelfAttention",
    "SpectralNorm",
    "UVInBackward",
    "l2normalize",
    "load_official_critic",
    "official_critic_state_dict",
]

#: Which power-iteration vectors the backward of σ uses: ``"last"`` (official: the vectors as they are
#: when the backward runs, i.e. those of the most recent forward) or ``"call"`` (each call's own).
UVInBackward = Literal["last", "call"]

#: The official ``l2normalize`` epsilon: ``x / (‖x‖ + 1e-12)``.
SN_EPS = 1e-12


def l2normalize(x: Tensor, eps: float = SN_EPS) -> Tensor:
    """``x / (‖x‖₂ + eps)``, the official ``networks/spectral.py::l2normalize`` (eps outside the norm)."""
    return x / (x.norm() + eps)


class _Sigma(torch.autograd.Function):
    """σ = u · (W v), with ∂σ/∂W = u vᵀ taken from vectors chosen at backward time.

    ``live=True`` reproduces the official quirk: ``SpectralNorm._update_u_v`` rebinds ``u.data`` and
    ``v.data`` on every forward, and autograd keeps references to those same tensors, so a backward
    that runs after later forwards sees the **latest** u and v. Here the backward reads the buffers
    themselves (updated in place by later forwards); ``live=False`` saves this call's copies instead.
    """

    @staticmethod
    def forward(ctx: Any, w2d: Tensor, u: Tensor, v: Tensor, live: bool) -> Tensor:
        # live: the buffers themselves, read when the backward runs; else this call's copies
        ctx.uv = (u, v) if live else (u.clone(), v.clone())
        return torch.dot(u, torch.mv(w2d, v))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        u, v = ctx.uv
        return grad * torch.outer(u, v), None, None, None


class SpectralNorm(nn.Module):
    """SAGAN's spectral norm of a convolution's weight, with the official semantics and names.

    On **every** forward (training and eval alike) it runs ``power_iterations`` steps in the official
    order ``v = N(Wᵀu)``, then ``u = N(Wv)`` (``N`` = :func:`l2normalize`, W the weight as a
    ``(C_out, −1)`` matrix, no gradient), stores u and v, and convolves with ``W / σ``, ``σ = u·(Wv)``.
    (``torch.nn.utils.parametrizations.spectral_norm`` updates u first, so σ differs.)

    The gradient of σ is ``u vᵀ``. With ``uv_in_backward="last"`` (default, official) the u and v in it
    are those of the most recent forward when the backward runs: in the critic step, the teacher and
    student calls' gradients use the u and v of the interpolated call that comes after them, as in the
    official code (which rebinds ``.data`` in place). ``"call"`` uses each call's own u and v.

    Names follow the official module: the wrapped convolution is ``module``, its raw weight
    ``module.weight_bar`` (a parameter), and ``module.weight_u`` / ``module.weight_v`` (buffers here;
    non-trainable parameters in the official code, which its optimizer filters out). u and v depend only
    on the weight, so replicas with identical weights keep identical u and v without communication.

    Args:
        module: a ``nn.Conv2d`` with zero padding.
        power_iterations: power steps per forward (official 1).
        uv_in_backward: ``"last"`` or ``"call"``.

    Shape:
        as the wrapped convolution.
    """

    def __init__(self, module: nn.Conv2d, power_iterations: int = 1, uv_in_backward: UVInBackward = "last"):
        super().__init__()
        if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros":
            raise ConfigError("SpectralNorm wraps an nn.Conv2d with padding_mode='zeros'")
        if uv_in_backward not in ("last", "call"):
            raise ConfigError(f"uv_in_backward must be 'last' or 'call', got {uv_in_backward!r}")
        if power_iterations < 1:
            raise ConfigError(f"power_iterations must be >= 1, got {power_iterations}")
        self.module = module
        self.power_iterations = power_iterations
        self.uv_in_backward = uv_in_backward
        w = module.weight.detach()
        height = w.shape[0]
        del module._parameters["weight"]
        # official init: u, v ~ N(0, 1), then normalised
        module.register_buffer("weight_u", l2normalize(w.new_empty(height).normal_(0, 1)))
        module.register_buffer("weight_v", l2normalize(w.new_empty(w[0].numel()).normal_(0, 1)))
        module.register_parameter("weight_bar", nn.Parameter(w.clone()))

    def _power_step(self, w2d: Tensor) -> None:
        """The official ``_update_u_v`` order, in place on the buffers."""
        conv = self.module
        with torch.no_grad():
            for _ in range(self.power_iterations):
                conv.weight_v.copy_(l2normalize(torch.mv(w2d.t(), conv.weight_u)))
                conv.weight_u.copy_(l2normalize(torch.mv(w2d, conv.weight_v)))

    def normalized_weight(self) -> Tensor:
        """Run the power step(s) and return ``W / σ`` (what the forward convolves with)."""
        conv = self.module
        w = conv.weight_bar
        w2d = w.reshape(w.shape[0], -1)
        self._power_step(w2d.detach())
        sigma = _Sigma.apply(w2d, conv.weight_u, conv.weight_v, self.uv_in_backward == "last")
        return w / sigma

    def forward(self, x: Tensor) -> Tensor:
        c = self.module
        return F.conv2d(x, self.normalized_weight(), c.bias, c.stride, c.padding, c.dilation, c.groups)

    def extra_repr(self) -> str:
        return f"power_iterations={self.power_iterations}, uv_in_backward={self.uv_in_backward!r}"


def _down(n: int) -> int:
    """Output size of a 4x4 / stride 2 / pad 1 convolution."""
    return (n - 2) // 2 + 1


class SelfAttention(nn.Module):
    """SAGAN self-attention: ``out = γ·attn(x) + x`` with γ initialised to 0 (official ``Self_Attn``).

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


def _sn_block(c_in: int, c_out: int, uv_in_backward: UVInBackward) -> nn.Sequential:
    return nn.Sequential(
        SpectralNorm(nn.Conv2d(c_in, c_out, 4, 2, 1), uv_in_backward=uv_in_backward), nn.LeakyReLU(0.1)
    )


# Earlier skd critics used torch's parametrized spectral norm and other module names; the values mean
# the same (raw weight, left/right singular-vector estimates), so they are renamed, not refused.
_LEGACY_KEYS = (
    (re.compile(r"^input_bn\."), "preprocess_additional."),
    (re.compile(r"^last\.(weight|bias)$"), r"last.0.\1"),
    (re.compile(r"^(l\d)\.0\.parametrizations\.weight\.original$"), r"\1.0.module.weight_bar"),
    (re.compile(r"^(l\d)\.0\.parametrizations\.weight\.0\._u$"), r"\1.0.module.weight_u"),
    (re.compile(r"^(l\d)\.0\.parametrizations\.weight\.0\._v$"), r"\1.0.module.weight_v"),
    (re.compile(r"^(l\d)\.0\.bias$"), r"\1.0.module.bias"),
)


def _rename_legacy(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: rename an earlier skd critic layout in place (no-op otherwise)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not any(k[len(prefix) :].startswith("input_bn.") or ".parametrizations." in k for k in keys):
        return
    for key in keys:
        local = key[len(prefix) :]
        for pattern, repl in _LEGACY_KEYS:
            if pattern.match(local):
                state_dict[prefix + pattern.sub(repl, local)] = state_dict.pop(key)
                break


def official_critic_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """An official discriminator's saved state as a state dict for :class:`Critic`.

    Accepts what the official code reads (``utils/utils.py::load_D_model``): a dict with a
    ``"state_dict"`` entry, or the state dict itself, with or without the ``module.`` prefix that
    ``DataParallel`` adds. Parameters are returned as plain tensors (the official u and v are
    non-trainable parameters; here they are buffers).

    Raises:
        WeightsError: no tensors, or keys that are not a SAGAN discriminator's.
    """
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError("not an official discriminator state dict (expected a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if not any(k.endswith(".module.weight_bar") for k in sd) or not any(
        k.startswith("preprocess_additional.") for k in sd
    ):
        raise WeightsError(
            "not an official SAGAN discriminator state dict (no '*.module.weight_bar' or 'preprocess_additional.*' keys)"
        )
    return {k: v.detach() for k, v in sd.items()}


def load_official_critic(critic: Critic, path: str | os.PathLike) -> Critic:
    """Load an official discriminator checkpoint (e.g. ``model_best.pth.tar``) into ``critic``, strictly.

    The file goes through :func:`pipeline.checkpoint_io.load_torch_file`, the same safe reader as
    every checkpoint: tensors and plain containers only, nothing else imported or executed.

    Raises:
        WeightsError: unreadable file, not a discriminator, or shapes that do not fit ``critic``.
    """
    from pipeline.checkpoint_io import load_torch_file

    if not os.path.isfile(path):
        raise WeightsError(f"critic checkpoint {path} does not exist")
    sd = official_critic_state_dict(load_torch_file(path).obj)
    try:
        critic.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{path} does not fit this critic: {' '.join(first[:3])[:300]}") from None
    return critic


class Critic(nn.Module):
    """The SKD discriminator over a logit map.

    Layers (``conv_dim`` = 64, a 65×65 grid), with the official module names:

    * ``preprocess_additional``: ``BatchNorm2d(K [+ image channels])`` on the raw input (the official
      code keeps the critic in train mode throughout, so it normalises with batch statistics).
    * ``l1``–``l3``: :class:`SpectralNorm` conv 4×4/2 p1 with LeakyReLU(0.1): K→64 (32), 64→128 (16),
      128→256 (8); then ``attn1`` = :class:`SelfAttention` (256).
    * ``l4``: 256→512 (4), then ``attn2`` (512). The official code builds ``l4`` only for
      ``imsize == 65`` (and then cannot run other sizes); here it exists when the map after ``l3`` is at
      least 8 on both axes, so 64 and 65 grids get it and a 17×17 grid does not.
    * ``last.0``: a plain conv 4×4, no padding → 1 channel. When the final map is smaller than 4 along an
      axis, the kernel along that axis is the map's size. A 65×129 grid gives a 1×5 score map.

    :meth:`score_map` returns the map; calling the critic returns its per-sample mean. The losses in
    :mod:`student.functional` use the map as the official code does (means over all its entries, the
    gradient penalty on its sum). For K = 19 on a 65×65 grid the critic has 3,191,721 parameters
    (≈ 3.19 M, skd_spec §3.3); u and v are buffers.

    Args:
        num_classes: K, the logit channels.
        input_size: the logit grid the critic is built for, ``h`` or ``(h, w)`` (the teacher's grid); it
            fixes the depth and the last kernel. Other sizes run as long as they fit those layers.
        image_channels: 0 (official: logits only) or the number of image channels to condition on
            (the paper: 3).
        conv_dim: width of ``l1`` (doubles per block).
        uv_in_backward: see :class:`SpectralNorm` (``"last"``: official).

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
        uv_in_backward: UVInBackward = "last",
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
        # registration order = parameters() order, kept from earlier skd versions so that their critic
        # optimizer states still line up on --resume
        self.preprocess_additional = nn.BatchNorm2d(c_in)
        self.l1 = _sn_block(c_in, conv_dim, uv_in_backward)
        self.l2 = _sn_block(conv_dim, conv_dim * 2, uv_in_backward)
        self.l3 = _sn_block(conv_dim * 2, conv_dim * 4, uv_in_backward)
        self.attn1 = SelfAttention(conv_dim * 4)
        channels = conv_dim * 4
        for _ in range(3):
            h, w = _down(h), _down(w)
        if min(h, w) >= 8:
            self.l4: nn.Module | None = _sn_block(channels, channels * 2, uv_in_backward)
            self.attn2: nn.Module | None = SelfAttention(channels * 2)
            channels *= 2
            h, w = _down(h), _down(w)
        else:
            self.l4 = self.attn2 = None
        self.last_kernel = (min(4, h), min(4, w))
        self.last = nn.Sequential(nn.Conv2d(channels, 1, self.last_kernel))
        self.register_load_state_dict_pre_hook(_rename_legacy)

    def _image_channels(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Raw pixels -> the extra input channels on the logit grid.

        The image is the model input of the pipeline's contract (``docs/architecture.md``): raw values in
        0–255, NaN where padded. It is mapped to [−1, 1] (``x/127.5 − 1``; padding becomes 0, mid-grey),
        then resampled bilinearly with ``align_corners=True`` to the logit grid, i.e. sampled at the grid's
        node positions. The input BatchNorm then equalises its scale with the logits'.
        """
        x = torch.nan_to_num(image.detach().to(torch.float32) / 127.5 - 1.0, nan=0.0)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def _input(self, logits: Tensor, image: Tensor | None) -> Tensor:
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}, h, w), got {tuple(logits.shape)}")
        if not self.image_channels:
            if image is not None:
                raise ValueError("this critic takes no image (built with image_channels=0)")
            return logits
        if image is None:
            raise ValueError(f"this critic is conditioned on {self.image_channels} image channels")
        if image.dim() != 4 or image.shape[0] != logits.shape[0] or image.shape[1] != self.image_channels:
            raise ValueError(
                f"expected image (B={logits.shape[0]}, {self.image_channels}, H, W), got {tuple(image.shape)}"
            )
        img = self._image_channels(image, tuple(logits.shape[-2:])).to(logits.dtype)
        return torch.cat([logits, img], dim=1)

    def score_map(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """The critic's score map, as the official ``Discriminator`` returns it.

        Every call runs one power step in each spectral-norm layer (official: also in eval mode).

        Args:
            logits: ``(B, K, h, w)`` raw logits.
            image: ``(B, image_channels, H, W)`` raw pixels (0–255, NaN padding), any size; required when
                the critic was built with ``image_channels > 0`` and refused otherwise.

        Returns:
            ``(B, 1, s_h, s_w)`` scores (1×1 for a 65×65 grid, 1×5 for 65×129).
        """
        x = self._input(logits, image)
        out = self.attn1(self.l3(self.l2(self.l1(self.preprocess_additional(x)))))
        if self.l4 is not None:
            out = self.attn2(self.l4(out))
        if out.shape[-2] < self.last_kernel[0] or out.shape[-1] < self.last_kernel[1]:
            raise ValueError(f"a {tuple(logits.shape[-2:])} grid is too small for a critic built for {self.input_size}")
        return self.last(out)

    def forward(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """Per-sample mean of :meth:`score_map`: ``(B,)``."""
        return self.score_map(logits, image).mean(dim=(1, 2, 3))
