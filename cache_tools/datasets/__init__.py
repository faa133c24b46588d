"""Dataset readers shared by both stages (torch-free: numpy, pillow, cityscapesscripts).

``open_dataset(root, splits, kind="auto")`` picks the layout: a ``leftImg8bit/`` folder means
Cityscapes, a ``classes.txt`` means the generic folder layout. ``write_sample_dataset`` writes a small
procedural Cityscapes-layout dataset for the demo and the tests (``num_extra=N`` adds an unlabelled
``train_extra`` split).

Splits may hold images without labels (Cityscapes ``train_extra``, a folder-layout split without
``masks/{split}``); ``splits="train,train_extra"`` gives one dataset over both. ``ImageRecord.has_label``,
``SegDataset.labelled`` and ``SegDataset.unlabelled_splits`` say which images have labels; ``load``
returns ``None`` as the label of an unlabelled image and ``read_label`` refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import DatasetError
from .base import IGNORE_INDEX, ImageRecord, SegDataset, check_id, fingerprint, normalize_splits
from .cityscapes import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_PALETTE,
    ID_TO_TRAIN_ID,
    CityscapesDataset,
    labelids_to_trainids,
)
from .folder import FolderDataset
from .sample import SAMPLE_CLASS_IDS, SAMPLE_TRAIN_IDS, render_scene, write_sample_dataset

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "ImageRecord",
    "SegDataset",
    "CityscapesDataset",
    "FolderDataset",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_PALETTE",
    "ID_TO_TRAIN_ID",
    "SAMPLE_CLASS_IDS",
    "SAMPLE_TRAIN_IDS",
    "check_id",
    "fingerprint",
    "labelids_to_trainids",
    "open_dataset",
    "render_scene",
    "write_sample_dataset",
]

#: Layout names accepted by ``open_dataset(kind=...)``.
KINDS = ("auto", "cityscapes", "folder")


def open_dataset(root: str | Path, splits: str | Iterable[str] = ("train",), kind: str = "auto") -> SegDataset:
    """Open the dataset at ``root`` for ``splits`` ('train,val' or a sequence).

    ``kind="auto"``: ``leftImg8bit/`` present -> Cityscapes; ``classes.txt`` present -> folder.
    """
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of: {', '.join(KINDS)}")
    root = Path(root).expanduser()
    split_t = normalize_splits(splits)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    if kind == "auto":
        if (root / "leftImg8bit").is_dir():
            kind = "cityscapes"
        elif (root / "classes.txt").is_file():
            kind = "folder"
        else:
            raise DatasetError(
                f"cannot tell the layout of {root}: expected Cityscapes (leftImg8bit/{{split}}/{{city}}/"
                "*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_labelIds.png) or the folder layout "
                "(classes.txt + images/{split}/**/*.png|jpg + masks/{split}/**/*.png)"
            )
    if kind == "cityscapes":
        return CityscapesDataset(root, split_t)
    return FolderDataset(root, split_t)
