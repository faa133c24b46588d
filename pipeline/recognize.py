"""What a weights file holds, from its keys and shapes alone, and how it initialises a model.

:func:`recognize_state_dict` names the family of a checkpoint (``skd``, ``mmseg``, ``cirkd``, or an
``imagenet`` backbone file), its architecture (PSPNet / DeepLabV3 / backbone only), backbone depth
(blocks per stage counted from the keys), width, class count (the classifier's out channels) and
auxiliary head, and the registered model it loads into, verified by building that model on the
meta device (no memory, no compute) and comparing every key and shape. Layouts:

===================  ===========================================================================
``skd-official``     SKD's InPlace-ABN PSPNet (``head.0.stages``, ``head.1``, ``dsn``, deep stem
                     ``conv1..bn3`` 64/64/128 at the top level); loaded after conversion
``skd``              this project's models (``pspmodule`` / ``aspp`` + ``head``; ``features`` for
                     MobileNetV2); ``skd-safetensors`` when saved by ``save_weights`` with metadata
``mmseg``            ``backbone.stem.*`` (ResNetV1c, 32/32/64), ``decode_head.*``, ``auxiliary_head.*``
``cirkd``            ``pretrained.{conv1..bn3,layerN}`` or ``pretrained.net.features``, ``head.*``,
                     ``auxlayer.*``
``mmcv-v1c``         open-mmlab ``resnetXX_v1c`` ImageNet files (``stem.*``, ``layerN.*``, ``fc.*``)
``deep-stem``        CSAIL's / CIRKD's deep-stem ImageNet ResNets (``conv1..bn3`` 64/64/128, ``fc``)
``timm-deep``        timm ``resnet*c`` / ``resnet*d`` (``conv1.{0,1,3,4,6}`` 32/32/64, ``bn1``)
``torchvision``      torchvision / timm ResNets with one 7x7 stem conv (``conv1``, ``bn1``, ``fc``)
===================  ===========================================================================

A ``module.`` prefix is removed; a backbone saved under ``backbone.`` / ``pretrained.`` without a
head is read as a backbone file. :func:`check_fits` turns a ``--teacher`` that does not fit into one
line naming what the file holds; :func:`backbone_mapping` / :func:`load_backbone` initialise a
model's backbone from any file whose stem, depth and width match it, and refuse the rest in one line.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cache_tools.errors import ModelError, SkdError, WeightsError
from pipeline.checkpoint_io import sniff
from pipeline.registry import create_model, list_models
from pipeline.teachers import Teacher, create_teacher
from pipeline.weights import ABN_EPS, official_key, read_state_dict

__all__ = [
    "BackboneReport",
    "Recognition",
    "backbone_mapping",
    "check_fits",
    "describe_weights_file",
    "load_backbone",
    "load_teacher",
    "recognize_file",
    "recognize_state_dict",
    "resolve_teacher",
    "weights_lines",
]

#: (block kind, blocks per stage) -> ResNet depth.
DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}
#: stem kind -> (first conv's nominal out channels, words for messages).
STEMS = {
    "deep32": (32, "deep stem 3->32->32->64 (ResNetV1c)"),
    "deep64": (64, "deep stem 3->64->64->128 (CSAIL / SKD / CIRKD)"),
    "7x7": (64, "single 7x7 stem conv (torchvision / timm ResNet)"),
    "mbv2": (32, "MobileNetV2 stem"),
}
#: Stem keys of each naming style, in the order conv0, bn0, conv1, bn1, conv2, bn2.
_STEM_NAMES = {
    "v1c": ("stem.0", "stem.1", "stem.3", "stem.4", "stem.6", "stem.7"),
    "timm": ("conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1"),
    "csail": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
    "torchvision": ("conv1", "bn1"),
}
#: Where each family's ImageNet backbone files come from (for refusals).
_BACKBONE_FILES = {
    "deep32": "an open-mmlab resnetXX_v1c file (open-mmlab://resnet18_v1c, resnet101_v1c)",
    "deep64": "a deep-stem file (CSAIL's or CIRKD's resnet18-imagenet.pth / resnet101-imagenet.pth)",
    "7x7": "a torchvision / timm ResNet file",
}
_FAMILY_WORDS = {"skd": "SKD", "mmseg": "mmseg", "cirkd": "CIRKD", "imagenet": "ImageNet backbone", "unknown": "?"}
_ARCH_WORDS = {"pspnet": "PSPNet", "deeplabv3": "DeepLabV3", "backbone": "backbone", "unknown": "model (unknown head)"}
_BOOKKEEPING = ".num_batches_tracked"

Shapes = dict[str, tuple[int, ...]]


# ----------------------------------------------------------------------------------------------------
# recognition


@dataclass(frozen=True)
class Recognition:
    """What a state dict is (see the module docstring for the layouts).

    Attributes:
        family: "skd" | "mmseg" | "cirkd" | "imagenet" (a backbone file) | "unknown".
        layout: how its keys are named ("mmseg", "cirkd", "skd-official", "skd", "skd-safetensors",
            "mmcv-v1c", "deep-stem", "timm-deep", "torchvision", "unknown").
        architecture: "pspnet" | "deeplabv3" | "backbone" | "unknown".
        backbone: "resnet" | "mobilenetv2" | "unknown".
        stem: a key of :data:`STEMS`, or None.
        block: "basic" | "bottleneck" | None; blocks: blocks per stage; depth: 18/34/50/101/152 or None.
        width: channel multiplier relative to the nominal model (1.0 for published files).
        num_classes: the classifier's out channels (an ImageNet fc's for backbone files), or None.
        aux: whether an auxiliary head is present.
        prefix: the prefix of the backbone keys in the file ("backbone.", "pretrained.", "").
        model_name: the registered model the file loads into strictly (verified), or None.
        model_kwargs: options that model needs for this file (``{"aux": False}`` without aux head).
        reason: why ``model_name`` is None ("" otherwise).
        metadata_name: the model name the file's own metadata gives, if any.
        avg_down: timm ``resnet*d`` downsampling (average pool before the 1x1 conv).
    """

    family: str
    layout: str
    architecture: str
    backbone: str = "unknown"
    stem: str | None = None
    block: str | None = None
    blocks: tuple[int, ...] | None = None
    depth: int | None = None
    width: float = 1.0
    num_classes: int | None = None
    aux: bool = False
    prefix: str = ""
    model_name: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    reason: str = ""
    metadata_name: str | None = None
    avg_down: bool = False
    shapes: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def backbone_words(self) -> str:
        """e.g. ``ResNetV1c-101-d8``, ``ResNet-101 (deep stem 64/64/128)``, ``MobileNetV2``."""
        scale = "" if self.width == 1.0 else f" x{self.width:g}"
        if self.backbone == "mobilenetv2":
            return f"MobileNetV2{scale}"
        if self.backbone != "resnet":
            return "unknown backbone"
        depth = str(self.depth) if self.depth else f"[{','.join(map(str, self.blocks or ()))}]"
        if self.family == "mmseg":
            return f"ResNetV1c-{depth}-d8{scale}"
        stem = {"deep32": "deep stem 32/32/64", "deep64": "deep stem 64/64/128", "7x7": "7x7 stem"}.get(
            self.stem or "", "unknown stem"
        )
        if self.layout == "mmcv-v1c":
            return f"ResNetV1c-{depth}{scale} ({stem})"
        return f"ResNet-{depth}{scale} ({stem}{', avg-down' if self.avg_down else ''})"

    def describe(self) -> str:
        """One line, e.g. ``mmseg PSPNet ResNetV1c-101-d8, 19 classes, aux head: registered as mmseg_psp_r101``."""
        if self.family == "unknown":
            return f"an unrecognised state dict: {self.reason}"
        if self.architecture == "backbone":
            fc = f", {self.num_classes}-class fc" if self.num_classes else ", no fc"
            return f"{self.source_words()}{fc}: a backbone file (initialises students), not a teacher"
        head = "aux head" if self.aux else "no aux head"
        layout = {"skd-official": " in the official InPlace-ABN layout", "skd-safetensors": " in skd safetensors"}.get(
            self.layout, ""
        )
        what = f"{_FAMILY_WORDS[self.family]} {_ARCH_WORDS[self.architecture]} {self.backbone_words}{layout}"
        fits = f"registered as {self.model_name}" if self.model_name else f"no registered model fits ({self.reason})"
        if self.model_name and self.model_kwargs:
            fits += " with " + ", ".join(f"{k}={v}" for k, v in sorted(self.model_kwargs.items()))
        classes = f"{self.num_classes} classes" if self.num_classes else "class count unknown"
        return f"{what}, {classes}, {head}: {fits}"

    def source_words(self) -> str:
        """Short words for a backbone source, e.g. ``open-mmlab ImageNet ResNetV1c-18 (deep stem 32/32/64)``."""
        if self.architecture != "backbone":
            return f"the backbone of {self.holds()}"
        source = {
            "mmcv-v1c": "open-mmlab ImageNet",
            "deep-stem": "CSAIL / CIRKD deep-stem ImageNet",
            "timm-deep": "timm ImageNet",
            "torchvision": "torchvision / timm ImageNet",
        }.get(self.layout, "ImageNet")
        return f"{source} {self.backbone_words}"

    def holds(self) -> str:
        """The architecture words of :meth:`describe`, e.g. ``an mmseg PSPNet ResNetV1c-101-d8``."""
        if self.family == "unknown":
            return "an unrecognised state dict"
        if self.architecture == "backbone":
            return f"an ImageNet backbone ({self.backbone_words}), not a segmentation model"
        words = f"{_FAMILY_WORDS[self.family]} {_ARCH_WORDS[self.architecture]} {self.backbone_words}"
        # "an mmseg", "an SKD" (read letter by letter), "a CIRKD"
        return ("an " if words.startswith(("mmseg", "SKD")) else "a ") + words

    def to_dict(self) -> dict:
        """JSON-able fields plus ``description``."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "shapes"}
        d["blocks"] = list(self.blocks) if self.blocks else None
        d["model_kwargs"] = dict(self.model_kwargs)
        d["description"] = self.describe()
        return d


def _shapes(sd: Mapping[str, Any]) -> Shapes:
    out = {str(k): tuple(int(s) for s in (v if isinstance(v, tuple) else v.shape)) for k, v in sd.items()}
    if out and all(k.startswith("module.") for k in out):  # DataParallel / DDP wrappers
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _blocks(s: Shapes, prefix: str) -> tuple[int, ...] | None:
    counts = []
    for n in range(1, 5):
        p = f"{prefix}layer{n}."
        idx = {int(h) for k in s if k.startswith(p) and (h := k[len(p) :].split(".", 1)[0]).isdigit()}
        if not idx:
            return None
        counts.append(max(idx) + 1)
    return tuple(counts)


def _resnet_fields(s: Shapes, prefix: str, stem_style: str) -> dict:
    """stem, block, blocks, depth, width, avg_down of a ResNet whose keys start with ``prefix``."""
    blocks = _blocks(s, prefix)
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in s else "basic"
    stem = {"v1c": "deep32", "timm": "deep32", "csail": "deep64", "torchvision": "7x7"}[stem_style]
    planes = s.get(f"{prefix}layer1.0.conv1.weight", (64,))[0]
    width = round(planes / 64, 4)
    avg_down = len(s.get(f"{prefix}layer2.0.downsample.1.weight", ())) == 4
    depth = DEPTHS.get((block, blocks)) if blocks else None
    return {
        "backbone": "resnet",
        "stem": stem,
        "block": block,
        "blocks": blocks,
        "depth": depth,
        "width": width,
        "prefix": prefix,
        "avg_down": avg_down,
    }


def _stem_style(s: Shapes, prefix: str) -> str | None:
    if f"{prefix}stem.0.weight" in s and f"{prefix}stem.6.weight" in s:
        return "v1c"
    if f"{prefix}conv1.0.weight" in s and f"{prefix}conv1.6.weight" in s:
        return "timm"
    conv1 = s.get(f"{prefix}conv1.weight")
    if conv1 is not None and len(conv1) == 4 and conv1[-1] == 7:
        return "torchvision"
    if conv1 is not None and f"{prefix}conv3.weight" in s and f"{prefix}bn3.weight" in s:
        return "csail"
    return None


def _mbv2_fields(s: Shapes, prefix: str) -> dict:
    first = s.get(f"{prefix}features.0.0.weight", (32,))[0]
    return {"backbone": "mobilenetv2", "stem": "mbv2", "width": round(first / 32, 4), "prefix": prefix}


def _classes(s: Shapes, key: str) -> int | None:
    shape = s.get(key)
    return int(shape[0]) if shape else None


def _segmentation(s: Shapes) -> Recognition | None:
    """The family layouts with a head, or None."""
    if "decode_head.conv_seg.weight" in s:
        arch = "pspnet" if "decode_head.psp_modules.0.1.conv.weight" in s else "deeplabv3"
        if arch == "deeplabv3" and "decode_head.image_pool.1.conv.weight" not in s:
            arch = "unknown"
        style = _stem_style(s, "backbone.")
        fields = _resnet_fields(s, "backbone.", style) if style else {}
        aux = "auxiliary_head.conv_seg.weight" in s
        return Recognition(
            "mmseg", "mmseg", arch, num_classes=_classes(s, "decode_head.conv_seg.weight"), aux=aux, **fields
        )
    if "head.block.4.weight" in s and "head.aspp.b0.0.weight" in s:
        if "pretrained.net.features.0.0.weight" in s:
            fields = _mbv2_fields(s, "pretrained.net.")
        else:
            style = _stem_style(s, "pretrained.")
            fields = _resnet_fields(s, "pretrained.", style) if style else {}
        aux = "auxlayer.block.4.weight" in s
        return Recognition(
            "cirkd", "cirkd", "deeplabv3", num_classes=_classes(s, "head.block.4.weight"), aux=aux, **fields
        )
    if _stem_style(s, "pretrained.") and any(k.startswith("head.") for k in s):
        # CIRKD's other heads (PSPNet, DeepLabV3+, ...): its backbone, no registered model
        return Recognition(
            "cirkd",
            "cirkd",
            "unknown",
            aux=any(k.startswith("auxlayer.") for k in s),
            **_resnet_fields(s, "pretrained.", _stem_style(s, "pretrained.")),
        )
    if "head.1.weight" in s and "head.0.stages.0.1.weight" in s and _stem_style(s, "") == "csail":
        fields = _resnet_fields(s, "", "csail")
        return Recognition(
            "skd", "skd-official", "pspnet", num_classes=_classes(s, "head.1.weight"), aux="dsn.3.weight" in s, **fields
        )
    if "head.weight" in s and ("pspmodule.stages.0.1.weight" in s or "aspp.b0.0.weight" in s):
        arch = "pspnet" if "pspmodule.stages.0.1.weight" in s else "deeplabv3"
        style = _stem_style(s, "")
        if "features.0.0.weight" in s:
            fields = _mbv2_fields(s, "")
        else:
            fields = _resnet_fields(s, "", style) if style else {}
        return Recognition(
            "skd",
            "skd",
            arch,
            num_classes=_classes(s, "head.weight"),
            aux=any(k.startswith("dsn.") for k in s),
            **fields,
        )
    return None


def _backbone_only(s: Shapes) -> Recognition | None:
    for prefix in ("", "backbone.", "pretrained.", "pretrained.net."):
        if prefix and not all(k.startswith(prefix) for k in s):
            continue
        style = _stem_style(s, prefix)
        if style is not None and _blocks(s, prefix):
            layout = {"v1c": "mmcv-v1c", "timm": "timm-deep", "csail": "deep-stem", "torchvision": "torchvision"}[style]
            fc = _classes(s, f"{prefix}fc.weight")
            return Recognition("imagenet", layout, "backbone", num_classes=fc, **_resnet_fields(s, prefix, style))
        if f"{prefix}features.0.0.weight" in s and f"{prefix}features.1.conv.0.weight" in s:
            return Recognition("imagenet", "skd", "backbone", **_mbv2_fields(s, prefix))
    return None


def recognize_state_dict(
    sd: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *, verify: bool = True
) -> Recognition:
    """Recognise a state dict (values: tensors, or anything with a ``shape``: meta tensors work).

    Args:
        sd: the state dict as :func:`pipeline.weights.read_state_dict` returns it.
        metadata: that reader's metadata (``model_name`` of skd's own files).
        verify: find the registered model and check every key and shape against it (built on the
            meta device); without it ``model_name`` stays None.
    """
    s = _shapes(sd)
    meta = dict(metadata or {})
    rec = _segmentation(s) or _backbone_only(s)
    if rec is None:
        shown = ", ".join(sorted(s)[:4]) + (", ..." if len(s) > 4 else "")
        return Recognition("unknown", "unknown", "unknown", reason=f"no known layout has these keys ({shown})")
    if meta.get("model_name") and rec.family == "skd":
        rec = _replace(rec, metadata_name=meta["model_name"])
        if meta.get("format") == "skd-weights":
            rec = _replace(rec, layout="skd-safetensors")
    if rec.family == "mmseg" or rec.family == "cirkd":
        rec = _replace(rec, metadata_name=meta.get("model_name"))
    rec = _replace(rec, shapes=s)
    if not verify or rec.architecture == "backbone":
        return rec
    return _verify(rec, s)


def _replace(rec: Recognition, **changes: Any) -> Recognition:
    return Recognition(**{**{k: getattr(rec, k) for k in rec.__dataclass_fields__}, **changes})


def recognize_file(path: str | os.PathLike) -> tuple[Recognition, dict[str, Tensor], dict[str, str]]:
    """Read a checkpoint safely and recognise it: ``(recognition, state dict, metadata)``."""
    sd, meta, _ = read_state_dict(path)
    return recognize_state_dict(sd, meta), sd, meta


# ----------------------------------------------------------------------------------------------------
# the registered model of a recognition


def derived_name(rec: Recognition) -> str | None:
    """The registry name that follows from the recognised fields (not yet verified)."""
    mini = "_mini" if rec.width != 1.0 else ""
    if rec.architecture == "unknown":
        return None
    if rec.family == "mmseg" and rec.architecture in ("pspnet", "deeplabv3") and rec.depth:
        return f"mmseg_{'psp' if rec.architecture == 'pspnet' else 'deeplabv3'}_r{rec.depth}{mini}"
    if rec.family == "cirkd":
        if rec.backbone == "mobilenetv2":
            return f"cirkd_deeplabv3_mbv2{mini}"
        return f"cirkd_deeplabv3_r{rec.depth}{mini}" if rec.depth else None
    if rec.family != "skd":
        return None
    if rec.backbone == "mobilenetv2":
        return f"mbv2{mini}"
    if rec.architecture == "deeplabv3" and rec.depth:
        return f"deeplabv3_r{rec.depth}{mini}"
    if rec.architecture == "pspnet" and rec.blocks == (1, 1, 1, 1):
        return "psp_tiny"
    return f"psp{rec.depth}{mini}" if rec.architecture == "pspnet" and rec.depth else None


@functools.lru_cache(maxsize=32)
def _model_shapes_cached(name: str, num_classes: int, kwargs: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **dict(kwargs))
    return tuple(_shapes(model.state_dict()).items())


def model_shapes(name: str, num_classes: int = 19, **kwargs: Any) -> Shapes:
    """Key -> shape of a registered model, built on the meta device (cached)."""
    return dict(_model_shapes_cached(name, int(num_classes), tuple(sorted(kwargs.items()))))


def converted_shapes(rec: Recognition, s: Shapes) -> Shapes:
    """The file's shapes under the names the model uses (official SKD renaming, no ``fc``)."""
    if rec.layout != "skd-official":
        return dict(s)
    return {official_key(k): v for k, v in s.items() if official_key(k) is not None}


def compare(model: Shapes, file: Shapes) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing, unexpected, mis-shaped) keys, ignoring ``num_batches_tracked`` counters."""
    model = {k: v for k, v in model.items() if not k.endswith(_BOOKKEEPING)}
    file = {k: v for k, v in file.items() if not k.endswith(_BOOKKEEPING)}
    missing = [k for k in model if k not in file]
    unexpected = [k for k in file if k not in model]
    mismatched = [(k, file[k], model[k]) for k in model if k in file and file[k] != model[k]]
    return missing, unexpected, mismatched


def _misfit_words(missing, unexpected, mismatched) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:2])}{', ...' if len(unexpected) > 2 else ''})"
        )
    if mismatched:
        k, a, b = mismatched[0]
        parts.append(
            f"{len(mismatched)} mis-shaped ({k}: file {a} vs model {b}{', ...' if len(mismatched) > 1 else ''})"
        )
    return ", ".join(parts) or "fits"


def _fit(name: str, rec: Recognition, file: Shapes, kwargs: dict) -> tuple[list, list, list] | None:
    """The misfit of ``name`` (None when the model cannot be built on the meta device)."""
    try:
        shapes = model_shapes(name, rec.num_classes or 19, **kwargs)
    except (SkdError, TypeError, ValueError):
        return None
    return compare(shapes, file)


def _verify(rec: Recognition, s: Shapes) -> Recognition:
    file = converted_shapes(rec, s)
    registered = {e.name for e in list_models()}
    names = [n for n in (rec.metadata_name, derived_name(rec)) if n and n in registered]
    if not names and rec.architecture == "unknown":
        return _replace(rec, reason="skd has no model with this head")
    if not names:
        return _replace(rec, reason=f"no registered model is named for it (expected {derived_name(rec) or 'none'})")
    diff = None
    for name in dict.fromkeys(names):
        for kwargs in ({}, {"aux": False}) if not rec.aux else ({},):
            diff = _fit(name, rec, file, kwargs)
            if diff is not None and not any(diff):
                return _replace(rec, model_name=name, model_kwargs=kwargs)
    why = _misfit_words(*diff) if diff is not None else "it cannot be built"
    return _replace(rec, reason=f"{names[-1]} does not fit: {why}")


# ----------------------------------------------------------------------------------------------------
# --teacher against the file


def check_fits(rec: Recognition, model_name: str, *, path: str | os.PathLike | None = None) -> None:
    """Raise when ``--teacher model_name`` cannot load the recognised file (one line, naming what it holds).

    Custom ``package.module:factory`` teachers are not checked here (the strict load names the misfit).

    Raises:
        WeightsError: e.g. ``--teacher psp101 does not fit this file: it holds an mmseg PSPNet
            ResNetV1c-101-d8 (use --teacher mmseg_psp_r101, or omit --teacher)``.
    """
    if ":" in model_name or model_name == rec.model_name:
        return
    where = f"{path}" if path is not None else "this file"
    if rec.architecture not in ("backbone", "unknown") and rec.num_classes:
        file = converted_shapes(rec, rec.shapes)
        for kwargs in (rec.model_kwargs, {}):
            try:
                shapes = model_shapes(model_name, rec.num_classes, **kwargs)
            except ModelError:
                if kwargs:
                    continue  # a model without that option: judged on its own keys
                raise
            if not any(compare(shapes, file)):
                return
    if rec.model_name:
        hint = f"use --teacher {rec.model_name}, or omit --teacher"
    elif rec.architecture == "backbone":
        hint = "give a segmentation checkpoint to --weights; backbone files initialise students"
    else:
        hint = f"no registered model fits it: {rec.reason}"
    raise WeightsError(f"--teacher {model_name} does not fit {where}: it holds {rec.holds()} ({hint})")


def resolve_teacher(
    weights: str | os.PathLike | None, teacher: str | None, num_classes: int
) -> tuple[str, dict, Recognition | None]:
    """The model ``skdcache build`` builds: ``(name, factory options, recognition of --weights)``.

    Without ``--teacher`` the file's recognised model is used; with one, it must fit the file.

    Raises:
        ModelError: neither ``--weights`` nor ``--teacher``.
        WeightsError: a file no registered model fits (without ``--teacher``), a ``--teacher`` that
            does not fit, or a class count other than the dataset's.
    """
    if weights is None:
        return _resolve(None, None, teacher, num_classes)
    rec, _, _ = recognize_file(weights)
    return _resolve(rec, weights, teacher, num_classes)


def load_teacher(
    weights: str | os.PathLike | None, teacher: str | None, num_classes: int, **create_kwargs: Any
) -> tuple[Teacher, str, Recognition | None]:
    """:func:`resolve_teacher`, then :func:`~pipeline.teachers.create_teacher`, reading ``weights`` once.

    Returns ``(teacher, the name it was built under, recognition of --weights or None)``;
    ``create_kwargs`` go to ``create_teacher`` (``random_weights``, ``seed``, ``weights_format``, ``device``).

    Raises:
        ModelError, WeightsError: as :func:`resolve_teacher` and ``create_teacher``.
    """
    file = read_state_dict(weights) if weights is not None else None
    rec = recognize_state_dict(file.state_dict, file.metadata) if file is not None else None
    name, model_kwargs, rec = _resolve(rec, weights, teacher, num_classes)
    built = create_teacher(
        name, num_classes=num_classes, weights=weights, state_dict=file, **create_kwargs, **model_kwargs
    )
    return built, name, rec


def _resolve(
    rec: Recognition | None, weights: str | os.PathLike | None, teacher: str | None, num_classes: int
) -> tuple[str, dict, Recognition | None]:
    if rec is None:  # no --weights: --random-weights with a --teacher
        if teacher is None:
            raise ModelError("give --weights FILE (its model is recognised), or --teacher NAME with --random-weights")
        return teacher, {}, None
    if teacher is not None:
        check_fits(rec, teacher, path=weights)
    elif rec.model_name is None:
        raise WeightsError(
            f"cannot tell which model {weights} is for: it holds {rec.holds()} ({rec.reason}); "
            "give --teacher NAME (skdcache teachers lists them)"
        )
    name = teacher or rec.model_name
    assert name is not None
    if rec.architecture not in ("backbone", "unknown") and rec.num_classes and rec.num_classes != num_classes:
        raise WeightsError(
            f"{weights} holds a {rec.num_classes}-class teacher and the dataset has {num_classes} classes; "
            "the teacher must predict the dataset's classes, in its train-id order"
        )
    return name, (dict(rec.model_kwargs) if name == rec.model_name else {}), rec


# ----------------------------------------------------------------------------------------------------
# student initialisation from backbone files


def _stem_names(rec: Recognition) -> tuple[str, ...]:
    if rec.stem == "deep32":
        return _STEM_NAMES["v1c"] if f"{rec.prefix}stem.0.weight" in rec.shapes else _STEM_NAMES["timm"]
    return _STEM_NAMES["csail"] if rec.stem == "deep64" else _STEM_NAMES["torchvision"]


def _backbone_words(rec: Recognition) -> str:
    return rec.backbone_words if rec.backbone != "unknown" else "no backbone skd knows"


def _refuse_backbone(source: Recognition, target: Recognition, name: str) -> str | None:
    """Why ``source``'s backbone cannot initialise ``target`` (None when it can)."""
    if source.backbone == "unknown" or target.backbone == "unknown":
        return f"the file holds {source.holds()}; {name} has {_backbone_words(target)}"
    if source.backbone != target.backbone:
        return f"the file holds a {source.backbone_words} backbone; {name} has a {target.backbone_words}"
    if source.stem != target.stem:
        want = _BACKBONE_FILES.get(target.stem or "", "a file with the model's stem")
        return (
            f"the file's backbone has a {STEMS[source.stem or 'mbv2'][1]}, {name} a {STEMS[target.stem or 'mbv2'][1]}; "
            f"use {want}"
        )
    if source.avg_down:
        return "the file's ResNet downsamples with average pooling (timm resnet*d); the model uses strided 1x1 convs"
    if (source.block, source.blocks, source.width) != (target.block, target.blocks, target.width):
        return f"the file holds a {source.backbone_words} backbone; {name} has a {target.backbone_words}"
    return None


def _map(source: Recognition, target: Recognition) -> tuple[dict[str, str], list[str]]:
    """(file key -> model key, ignored file keys) for two recognitions with compatible backbones."""
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    if source.backbone == "mobilenetv2":
        body = ("features.",)
        stems: dict[str, str] = {}
    else:
        body = ("layer1.", "layer2.", "layer3.", "layer4.")
        stems = {s: t for s, t in zip(_stem_names(source), _stem_names(target), strict=True)}
    for key in source.shapes:
        rest = key[len(source.prefix) :] if key.startswith(source.prefix) else None
        if rest is not None and rest.startswith(body):
            mapping[key] = target.prefix + rest
            continue
        module, _, leaf = (rest or "").rpartition(".")
        if rest is not None and module in stems:
            mapping[key] = f"{target.prefix}{stems[module]}.{leaf}"
        else:
            ignored.append(key)
    return mapping, ignored


def _mapping_for(source: Recognition, target_shapes: Shapes, name: str) -> tuple[dict[str, str], list[str]]:
    target = recognize_state_dict(target_shapes, verify=False)
    why = _refuse_backbone(source, target, name)
    if why is not None:
        raise WeightsError(f"cannot initialise the backbone of {name} from this file: {why}")
    mapping, ignored = _map(source, target)
    mapping = {k: v for k, v in mapping.items() if v in target_shapes or not k.endswith(_BOOKKEEPING)}
    bad = [(k, v) for k, v in mapping.items() if v not in target_shapes or source.shapes[k] != target_shapes[v]]
    if bad:
        k, v = bad[0]
        got = target_shapes.get(v, "no such key")
        raise WeightsError(
            f"cannot initialise the backbone of {name} from this file: {k} {source.shapes[k]} -> {v} {got} "
            f"({len(bad)} such) — is it another width or variant of {source.backbone_words}?"
        )
    return mapping, ignored


def backbone_mapping(rec: Recognition, target_model_name: str, num_classes: int = 19) -> dict[str, str]:
    """File key -> model key of the backbone tensors ``rec``'s file gives ``target_model_name``.

    Works for ImageNet backbone files and for the backbone of any recognised segmentation
    checkpoint; ``fc.*`` and heads are not mapped. The stem is translated between naming styles of
    the same stem (``stem.{0,1,3,4,6,7}`` <-> timm's ``conv1.{0,1,3,4,6}, bn1``; CSAIL's
    ``conv1..bn3`` <-> CIRKD's ``pretrained.conv1..bn3``), never between different stems.

    Raises:
        WeightsError: one line when the stem, depth or width does not match the model's.
    """
    return _mapping_for(rec, model_shapes(target_model_name, num_classes), target_model_name)[0]


@dataclass
class BackboneReport:
    """What :func:`load_backbone` loaded and what stayed random."""

    path: str
    source: str  # the file's recognition, one line
    loaded: list[str]  # model keys set from the file (num_batches_tracked counters not counted)
    stayed_random: list[str]  # model keys left at their initialisation
    ignored: list[str]  # file keys not used (fc.*, heads)

    def random_modules(self) -> dict[str, int]:
        """Top-level module -> number of tensors that stayed random, e.g. ``{"decode_head": 12}``."""
        return dict(Counter(k.split(".", 1)[0] for k in self.stayed_random))

    def summary(self) -> str:
        """One line: ``backbone from X (…): loaded 62 tensors; stayed random: decode_head (14), …; ignored: fc.weight, fc.bias``."""
        rand = ", ".join(f"{m} ({n})" for m, n in self.random_modules().items()) or "nothing"
        ign = ", ".join(self.ignored[:4]) + (f", ... ({len(self.ignored)} in all)" if len(self.ignored) > 4 else "")
        return (
            f"backbone from {self.path} ({self.source}): loaded {len(self.loaded)} tensors; stayed random: {rand}"
            + (f"; ignored: {ign}" if self.ignored else "")
        )

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "source": self.source,
            "loaded": len(self.loaded),
            "stayed_random": self.random_modules(),
            "ignored": list(self.ignored),
        }


def _abn_to_bn(sd: Mapping[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
    # InPlace-ABN stores w' with |w'| + eps = the BN weight (weights.convert_official_state_dict)
    out = {}
    for k in keys:
        v = sd[k]
        if k.endswith(".weight") and k[: -len("weight")] + "running_var" in sd:
            v = v.abs() + ABN_EPS
        out[k] = v
    return out


def load_backbone(model: nn.Module, path: str | os.PathLike) -> BackboneReport:
    """Initialise ``model``'s backbone from a backbone file or a segmentation checkpoint.

    Every backbone tensor of the model must come from the file (a partial backbone is refused);
    BatchNorm counters missing from pre-0.4.1 files are set to 0.

    Raises:
        WeightsError: an unreadable file, or one whose backbone does not fit (one line).
    """
    sd, meta, _ = read_state_dict(path)
    source = recognize_state_dict(sd, meta, verify=False)
    name = getattr(model, "model_name", None) or type(model).__name__
    target_shapes = _shapes(model.state_dict())
    try:
        mapping, ignored = _mapping_for(source, target_shapes, name)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    tensors = _abn_to_bn(sd, list(mapping)) if source.layout == "skd-official" else {k: sd[k] for k in mapping}
    new = {mapping[k]: v for k, v in tensors.items()}
    for k in target_shapes:
        base = k[: -len("num_batches_tracked")]
        if k.endswith(_BOOKKEEPING) and k not in new and base + "running_var" in new:
            new[k] = torch.zeros((), dtype=torch.long)
    left = [k for k in _backbone_body(target_shapes) if k not in new]
    if left:
        raise WeightsError(
            f"{path}: cannot initialise the backbone of {name}: the file lacks {len(left)} of its tensors "
            f"({', '.join(left[:2])}{', ...' if len(left) > 2 else ''})"
        )
    model.load_state_dict(new, strict=False)
    loaded = [k for k in new if not k.endswith(_BOOKKEEPING)]
    random = [k for k in target_shapes if k not in new and not k.endswith(_BOOKKEEPING)]
    return BackboneReport(str(path), source.source_words(), loaded, random, sorted(ignored))


def _backbone_body(shapes: Shapes) -> list[str]:
    """A model's backbone keys (without BatchNorm counters): what a backbone file must provide."""
    prefix = recognize_state_dict(shapes, verify=False).prefix
    heads = (
        "fc.",
        "decode_head.",
        "auxiliary_head.",
        "head.",
        "auxlayer.",
        "dsn.",
        "aspp.",
        "pspmodule.",
        "bottleneck.",
    )
    return [
        k
        for k in shapes
        if k.startswith(prefix) and not k[len(prefix) :].startswith(heads) and not k.endswith(_BOOKKEEPING)
    ]


# ----------------------------------------------------------------------------------------------------
# skdcache weights FILE

_FORMATS = {
    "zip": "torch zip (torch >= 1.6)",
    "torch-legacy": "torch legacy (torch < 1.6)",
    "safetensors": "safetensors",
}


def _backbone_targets(rec: Recognition) -> list[str]:
    """Registered models whose whole backbone this file initialises (checked on the meta device)."""
    fits = []
    for name in _candidate_names(rec):
        try:
            shapes = model_shapes(name)
            mapping, _ = _mapping_for(rec, shapes, name)
        except (SkdError, TypeError, ValueError):
            continue
        if set(_backbone_body(shapes)) <= set(mapping.values()):
            fits.append(name)
    return fits


def _candidate_names(rec: Recognition) -> list[str]:
    """Registered names that may fit a backbone file, by their naming pattern (each is verified after)."""
    family = {"deep32": ("mmseg_",), "deep64": ("cirkd_", ""), "mbv2": ("cirkd_", "")}.get(rec.stem or "", ())
    token = "mbv2" if rec.backbone == "mobilenetv2" else f"{rec.depth}"
    names = []
    for entry in list_models():
        n = entry.name
        small = n.endswith("_mini") or n.endswith("_tiny")
        fam_ok = any(n.startswith(f) for f in family if f) or ("" in family and not n.startswith(("mmseg_", "cirkd_")))
        if fam_ok and small == (rec.width != 1.0) and re.search(rf"(?:^psp|_r|_|^){token}(?:_|$)", n):
            names.append(n)
    return names


def _cheap_candidates(rec: Recognition) -> bool:
    # building every registered model costs seconds: only for files with a known backbone
    return rec.backbone != "unknown" and (rec.backbone == "mobilenetv2" or rec.depth is not None)


def describe_weights_file(path: str | os.PathLike, *, targets: bool = True) -> dict:
    """What ``skdcache weights FILE`` prints: format, size, recognition, and how the file loads.

    Args:
        targets: for backbone files, list the registered models whose backbone the file
            initialises (builds candidate models on the meta device: about a second).

    Raises:
        WeightsError: the file cannot be read safely (what :func:`read_state_dict` refuses).
    """
    p = Path(path)
    sd, meta, _ = read_state_dict(p)
    rec = recognize_state_dict(sd, meta)
    non_finite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    out: dict[str, Any] = {
        "path": str(p),
        "format": _FORMATS.get(sniff(p), sniff(p)),
        "file_bytes": p.stat().st_size,
        "keys": len(sd),
        "tensor_bytes": sum(v.numel() * v.element_size() for v in sd.values()),
        "dtypes": dict(Counter(str(v.dtype).replace("torch.", "") for v in sd.values())),
        "skipped": meta.get("skipped", ""),
        "metadata": {k: v for k, v in meta.items() if k != "skipped"},
        "non_finite": non_finite,
        "recognition": rec.to_dict(),
        "description": rec.describe(),
    }
    if rec.model_name:
        missing, unexpected, mismatched = compare(
            model_shapes(rec.model_name, rec.num_classes or 19, **rec.model_kwargs), converted_shapes(rec, rec.shapes)
        )
        out["loads"] = {
            "model": rec.model_name,
            "num_classes": rec.num_classes,
            "options": dict(rec.model_kwargs),
            "missing": len(missing),
            "unexpected": len(unexpected),
            "mismatched": len(mismatched),
            "how": "strict, after the official InPlace-ABN conversion" if rec.layout == "skd-official" else "strict",
        }
    elif rec.architecture == "backbone" and targets and _cheap_candidates(rec):
        out["initialises"] = _backbone_targets(rec)
    return out


def weights_lines(info: dict) -> list[str]:
    """The human-readable lines of ``skdcache weights`` for :func:`describe_weights_file`'s dict."""
    lines = [
        f"{info['path']}: {info['format']}, {info['keys']} tensors, {info['tensor_bytes'] / 1e6:.1f} MB "
        f"({', '.join(f'{n} {d}' for d, n in sorted(info['dtypes'].items()))})",
        f"holds: {info['description']}",
    ]
    if info["skipped"]:
        lines.append(f"pickle: {info['skipped']}")
    if info["non_finite"]:
        lines.append(
            f"WARNING: {len(info['non_finite'])} tensors hold NaN or inf ({', '.join(info['non_finite'][:3])})"
        )
    loads = info.get("loads")
    if loads:
        opts = "".join(f", {k}={v}" for k, v in loads["options"].items())
        lines.append(
            f"loads into {loads['model']} (num_classes={loads['num_classes']}{opts}) {loads['how']}: "
            f"{loads['missing']} missing, {loads['unexpected']} unexpected, {loads['mismatched']} mis-shaped"
        )
    elif "initialises" in info:
        fits = ", ".join(info["initialises"]) or "no registered model"
        lines.append(f"initialises the backbone of: {fits}")
    return lines
