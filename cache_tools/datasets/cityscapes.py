"""Cityscapes layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

Labelled and unlabelled splits: ``train``, ``val`` and ``test`` need their ``gtFine`` labels (a
missing one is an error: gtFine is a separate download that is easy to forget). Any other split is
labelled when ``gtFine/{split}/`` exists (then every image needs its label) and unlabelled when it
does not, which is the case of ``train_extra`` (the ~20,000 extra images that have only coarse
labels): its images are read without labels, and ``gtCoarse`` is never read as fine labels.

Every entry of a split folder is accounted for: an image-like file outside a city folder, a city
entry that is a folder or not named ``*_leftImg8bit.png``, a folder named like an image and a broken
link are errors, not skipped.

Label ids are mapped to the 19 train ids through the label table of ``cityscapesscripts`` (the
official one, not a copy): a 256-entry lookup table is built once at import. Ids that are not in the
table are an error (a ``*_labelTrainIds.png`` passed by mistake shows up as id 255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

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
    list_dir,
    looks_like_image,
    read_index_png,
    relative_id,
)

__all__ = [
    "CityscapesDataset",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_PALETTE",
    "ID_TO_TRAIN_ID",
    "VALID_LABEL_IDS",
    "IMAGE_SUFFIX",
    "LABEL_SUFFIX",
    "FINE_SPLITS",
    "labelids_to_trainids",
]

IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
#: Splits that always have gtFine labels: a missing label folder or file there is an error.
FINE_SPLITS = ("train", "val", "test")


def _build_tables() -> tuple[np.ndarray, np.ndarray, tuple[str, ...], np.ndarray, tuple[int, ...]]:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    ids: list[int] = []
    by_train: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for lab in _CS_LABELS:
        ids.append(int(lab.id))
        train = int(lab.trainId)
        mapped = train if 0 <= train < 255 else IGNORE_INDEX
        if 0 <= lab.id < 256:
            valid[lab.id] = True
            lut[lab.id] = mapped
        if 0 <= train < 255 and train not in by_train:
            by_train[train] = (lab.name, tuple(int(c) for c in lab.color))
    n = max(by_train) + 1
    if sorted(by_train) != list(range(n)):  # pragma: no cover - the official table is contiguous
        raise RuntimeError("cityscapesscripts label table has non-contiguous train ids")
    names = tuple(by_train[t][0] for t in range(n))
    palette = np.array([by_train[t][1] for t in range(n)], dtype=np.uint8)
    return lut, valid, names, palette, tuple(sorted(set(ids)))


#: uint8 lookup table: Cityscapes label id -> train id (0..18) or 255.
ID_TO_TRAIN_ID, _VALID_U8, CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE, VALID_LABEL_IDS = _build_tables()
ID_TO_TRAIN_ID.flags.writeable = False
_VALID_U8.flags.writeable = False
CITYSCAPES_PALETTE.flags.writeable = False
_TRAIN_OF_ID = {int(lab.id): int(lab.trainId) for lab in _CS_LABELS}


def _table_span() -> str:
    nonneg = [i for i in VALID_LABEL_IDS if i >= 0]
    neg = [i for i in VALID_LABEL_IDS if i < 0]
    contiguous = nonneg == list(range(nonneg[0], nonneg[-1] + 1))
    span = f"{nonneg[0]}..{nonneg[-1]}" if contiguous else ", ".join(map(str, nonneg))
    return ", ".join([span, *map(str, neg)])


def labelids_to_trainids(ids: np.ndarray, where: object = "label") -> np.ndarray:
    """Map an array of Cityscapes label ids to uint8 train ids (ignore 255) via the official table."""
    ids = np.asarray(ids)
    if ids.dtype == np.uint8:
        bad = ~_VALID_U8[ids]
        if bad.any():
            _raise_bad(np.unique(ids[bad]), where)
        return ID_TO_TRAIN_ID[ids]
    a = ids.astype(np.int64)
    table_ids = np.array(VALID_LABEL_IDS, dtype=np.int64)
    bad = ~np.isin(a, table_ids)
    if bad.any():
        _raise_bad(np.unique(a[bad]), where)
    out = np.where((a >= 0) & (a < 256), ID_TO_TRAIN_ID[np.clip(a, 0, 255)], IGNORE_INDEX)
    for i in VALID_LABEL_IDS:  # negative ids (license plate) have their own train id, mapped here
        if i < 0:
            t = _TRAIN_OF_ID[i]
            out[a == i] = t if 0 <= t < 255 else IGNORE_INDEX
    return out.astype(np.uint8)


def _raise_bad(values: np.ndarray, where: object) -> None:
    hint = ""
    if 255 in values.tolist():
        hint = " (255 suggests a *_labelTrainIds.png; use the *_gtFine_labelIds.png files)"
    raise DatasetError(
        f"label {where} has ids {_fmt_values(values)} that are not in the Cityscapes label table "
        f"({_table_span()}){hint}"
    )


class CityscapesDataset(SegDataset):
    """Cityscapes (or anything in its layout, like the sample dataset). Name ``"cityscapes"``."""

    name = "cityscapes"

    def __init__(self, root: str | Path, splits: tuple[str, ...] = ("train",)) -> None:
        self.root = Path(root).expanduser()
        self.splits = tuple(splits)
        self.class_names = CITYSCAPES_CLASS_NAMES
        self.ignore_index = IGNORE_INDEX
        self.palette = CITYSCAPES_PALETTE
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")
        img_dir = self.root / IMAGE_DIR
        lab_dir = self.root / LABEL_DIR
        if not img_dir.is_dir():
            raise DatasetError(
                f"no {IMAGE_DIR}/ folder under {self.root} "
                f"(expected {IMAGE_DIR}/{{split}}/{{city}}/*{IMAGE_SUFFIX}); point --dataset at the Cityscapes root"
            )
        check_splits(self.splits, img_dir)
        is_label_folder(lab_dir)  # a file named gtFine is an error, not "no labels"
        records: list[ImageRecord] = []
        for split in self.splits:
            records.extend(self._scan_split(img_dir, lab_dir, split))
        self._set_records(records)

    def _scan_split(self, img_dir: Path, lab_dir: Path, split: str) -> list[ImageRecord]:
        images = self._split_images(img_dir / split, split)
        labelled = is_label_folder(lab_dir / split) or split in FINE_SPLITS
        out: list[ImageRecord] = []
        missing: list[Path] = []
        for p in images:
            rel_id = relative_id(p, img_dir, IMAGE_SUFFIX)
            label = None
            if labelled:
                label = lab_dir / split / p.parent.name / (p.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
                if not has_file(label):
                    missing.append(label)
            out.append(ImageRecord(id=rel_id, split=split, image_path=p, label_path=label))
        if missing:
            where = "" if split in FINE_SPLITS else f", or remove {LABEL_DIR}/{split}/ to use the split without labels"
            raise DatasetError(
                f"{len(missing)} of {len(images)} images in split {split!r} have no label file, e.g. "
                f"{missing[0]} (expected {LABEL_DIR}/{{split}}/{{city}}/*{LABEL_SUFFIX} next to "
                f"{IMAGE_DIR}/); unpack gtFine into {self.root}{where}"
            )
        return out

    def _split_images(self, split_dir: Path, split: str) -> list[Path]:
        """The ``*_leftImg8bit.png`` files of the city folders; anything image-like elsewhere is an error."""
        layout = f"{IMAGE_DIR}/{split}/{{city}}/*{IMAGE_SUFFIX}"
        images: list[Path] = []
        for city in list_dir(split_dir):
            if not city.is_dir():
                if looks_like_image(city):
                    raise DatasetError(f"{city} is not in a city folder; move it to {layout}")
                continue
            for p in list_dir(city):
                if p.name.endswith(IMAGE_SUFFIX):
                    images.append(check_entry(p))
                elif p.is_dir():
                    raise DatasetError(f"{p} is a folder inside a city folder; images go directly in {layout}")
                elif looks_like_image(p):
                    raise DatasetError(f"{p} is not named *{IMAGE_SUFFIX}; rename it or move it out of {split_dir}")
        if not images:
            raise DatasetError(
                f"no images found under {split_dir} (expected {IMAGE_DIR}/{{split}}/{{city}}/*{IMAGE_SUFFIX})"
            )
        return images

    def _convert_label(self, path: Path) -> np.ndarray:
        arr, mode = read_index_png(path, "label", allow_wide=True)
        if arr.size == 0 and mode not in ("L", "P", "1") and not mode.startswith("I"):
            raise DatasetError(
                f"label {path} is a {mode} image; Cityscapes labels must be the single-channel "
                f"*{LABEL_SUFFIX} files (not *_gtFine_color.png)"
            )
        return labelids_to_trainids(arr, path)
