"""Generic folder layout (CamVid / VOC style data converted to index masks).

::

    ROOT/classes.txt                 one class name per line (line order = class index;
                                     blank lines and '#' comments are skipped)
    ROOT/palette.txt                 optional, "r g b" per class, same order
    ROOT/images/{split}/**/*.png|jpg|jpeg
    ROOT/masks/{split}/**/*.png      same relative path and stem as the image

A mask pixel holds the class index; 255 is ignore. Palette ("P") PNGs are read as their indices
(like VOC's ``SegmentationClass``), grayscale ("L") PNGs as their values. RGB masks are refused.

A split without a ``masks/{split}/`` folder (or a root without ``masks/``) is an unlabelled split:
its images are read without labels. When ``masks/{split}/`` exists, every image needs its mask.
Folder links are followed. Image files that would be skipped are errors instead: another image
format (.bmp, .tif, .webp...), a folder named like an image, a broken link.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import (
    IGNORE_INDEX,
    ImageRecord,
    SegDataset,
    _fmt_values,
    check_entry,
    check_splits,
    has_file,
    is_label_folder,
    looks_like_image,
    read_index_png,
    relative_id,
    walk_files,
)

__all__ = ["FolderDataset", "read_classes", "read_palette", "default_palette", "IMAGE_EXTENSIONS"]

CLASSES_FILE = "classes.txt"
PALETTE_FILE = "palette.txt"
IMAGE_DIR = "images"
MASK_DIR = "masks"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _content_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append((n, line))
    return out


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt`` (one per line, order = index)."""
    names: list[str] = []
    for n, line in _content_lines(path):
        if line in names:
            raise DatasetError(f"{path} line {n}: class {line!r} is listed twice; class names must be unique")
        names.append(line)
    if not names:
        raise DatasetError(f"{path} lists no classes; write one class name per line (line order = class index)")
    if len(names) >= IGNORE_INDEX:
        raise DatasetError(
            f"{path} lists {len(names)} classes; at most {IGNORE_INDEX} fit in 8-bit masks with 255 = ignore"
        )
    return tuple(names)


def read_palette(path: Path, num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours from ``palette.txt`` ("r g b" per class, same order as classes.txt)."""
    rows: list[list[int]] = []
    for n, line in _content_lines(path):
        parts = [p for p in re.split(r"[\s,]+", line) if p]
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
            raise DatasetError(f"{path} line {n}: expected 'r g b' with values 0..255, got {line!r}")
        rows.append(vals)
    if len(rows) != num_classes:
        raise DatasetError(
            f"{path} has {len(rows)} colours but classes.txt lists {num_classes} classes; "
            "give one 'r g b' line per class or delete palette.txt"
        )
    return np.array(rows, dtype=np.uint8).reshape(num_classes, 3)


def default_palette(num_classes: int) -> np.ndarray:
    """The deterministic PASCAL VOC colour map (bit-interleaved), first ``num_classes`` entries."""
    idx = np.arange(num_classes, dtype=np.int64)
    pal = np.zeros((num_classes, 3), dtype=np.int64)
    c = idx.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return pal.astype(np.uint8)


class FolderDataset(SegDataset):
    """Images and index masks in ``images/{split}`` and ``masks/{split}``. Name ``"folder"``."""

    name = "folder"

    def __init__(self, root: str | Path, splits: tuple[str, ...] = ("train",)) -> None:
        self.root = Path(root).expanduser()
        self.splits = tuple(splits)
        self.ignore_index = IGNORE_INDEX
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")
        classes = self.root / CLASSES_FILE
        if not check_entry(classes).is_file():
            raise DatasetError(f"no {CLASSES_FILE} under {self.root}; the folder layout needs one class name per line")
        self.class_names = read_classes(classes)
        pal = check_entry(self.root / PALETTE_FILE)
        self.palette = read_palette(pal, self.num_classes) if pal.exists() else default_palette(self.num_classes)
        self.palette.flags.writeable = False
        img_dir = self.root / IMAGE_DIR
        if not img_dir.is_dir():
            raise DatasetError(
                f"no {IMAGE_DIR}/ folder under {self.root} (expected {IMAGE_DIR}/{{split}}/**/*.png|jpg "
                f"and {MASK_DIR}/{{split}}/**/*.png)"
            )
        check_splits(self.splits, img_dir)
        is_label_folder(self.root / MASK_DIR)  # a file named masks is an error, not "no labels"
        records: list[ImageRecord] = []
        for split in self.splits:
            records.extend(self._scan_split(img_dir, self.root / MASK_DIR, split))
        self._set_records(records)

    def _scan_split(self, img_dir: Path, mask_dir: Path, split: str) -> list[ImageRecord]:
        split_dir = img_dir / split
        images = self._split_images(split_dir)
        labelled = is_label_folder(mask_dir / split)
        out: list[ImageRecord] = []
        missing: list[Path] = []
        for p in images:
            rel_id = relative_id(p.with_suffix(""), img_dir, "")
            mask = None
            if labelled:
                mask = mask_dir / p.relative_to(img_dir).with_suffix(".png")
                if not has_file(mask):
                    missing.append(mask)
            out.append(ImageRecord(id=rel_id, split=split, image_path=p, label_path=mask))
        if missing:
            raise DatasetError(
                f"{len(missing)} of {len(images)} images in split {split!r} have no mask, e.g. {missing[0]} "
                f"(expected {MASK_DIR}/{{split}}/<same path>.png for every image; "
                f"or remove {MASK_DIR}/{split}/ to use the split without labels)"
            )
        return out

    @staticmethod
    def _split_images(split_dir: Path) -> list[Path]:
        """The .png/.jpg/.jpeg files below ``split_dir``; other image files are an error, not skipped."""
        images: list[Path] = []
        for p in walk_files(split_dir):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(check_entry(p))
            elif looks_like_image(p):
                raise DatasetError(
                    f"{p} is a {p.suffix} image; the folder layout reads {', '.join(IMAGE_EXTENSIONS)}: "
                    "convert it to PNG or move it out"
                )
        if not images:
            raise DatasetError(f"no images found under {split_dir} (expected {IMAGE_DIR}/{{split}}/**/*.png|jpg|jpeg)")
        return images

    def _convert_label(self, path: Path) -> np.ndarray:
        arr, mode = read_index_png(path, "mask")
        if arr.size == 0 and mode not in ("L", "P", "1"):
            raise DatasetError(
                f"mask {path} is a {mode} image; index masks are required (pixel value = class index, "
                "255 = ignore) as a palette 'P' or grayscale 'L' PNG"
            )
        bad = (arr >= self.num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(
                f"mask {path} has values {_fmt_values(np.unique(arr[bad]))} but classes.txt lists "
                f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore)"
            )
        return arr
