"""Torch-free dataset base: records, image/label decoding, id resolution, fingerprints.

A dataset is an ordered list of :class:`ImageRecord` (sorted by id). The id of an image is its path
relative to the layout's image folder, without the layout's suffix, with posix separators (for
example ``train/aachen/aachen_000000_000019``). Ids are what a cache stores, so they must be stable
across machines and must never be trusted: :meth:`SegDataset.resolve_id` accepts only ids that
are in this dataset's index and that cannot name anything outside the root.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import DatasetError
from ..schema import DatasetStamp, ids_digest

__all__ = [
    "IGNORE_INDEX",
    "ImageRecord",
    "SegDataset",
    "check_id",
    "fingerprint",
    "normalize_splits",
]

#: Label value of pixels that carry no class (every layout, every model).
IGNORE_INDEX = 255


def fingerprint(data: bytes) -> str:
    """sha256 hex digest of ``data`` (the image file bytes; what a cache stores as ``images/sha256``)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset (and its label file, when the layout has one)."""

    id: str
    split: str
    image_path: Path
    label_path: Path | None


def _id_problem(image_id: object) -> str | None:
    """Why ``image_id`` is not a safe relative id, or None when it is."""
    if not isinstance(image_id, str):
        return f"must be a string, got {type(image_id).__name__}"
    if not image_id:
        return "is empty"
    if "\x00" in image_id:
        return "contains a NUL character"
    if "\\" in image_id:
        return "contains a backslash (ids use '/' separators)"
    if any(c in image_id for c in "\n\r"):
        return "contains a line break"
    if image_id.startswith("/") or (len(image_id) >= 2 and image_id[1] == ":"):
        return "is an absolute path"
    parts = image_id.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' path component"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def check_id(image_id: object) -> str:
    """Return ``image_id`` if it is a safe relative id, else raise :class:`DatasetError`."""
    problem = _id_problem(image_id)
    if problem is not None:
        raise DatasetError(f"image id {image_id!r} {problem}; ids are relative paths like 'train/city/name'")
    return image_id  # type: ignore[return-value]


def normalize_splits(splits: str | Iterable[str]) -> tuple[str, ...]:
    """'train,val' / ['train', 'val'] -> ('train', 'val'), duplicates dropped, order kept."""
    if isinstance(splits, str):
        items = [s.strip() for s in splits.split(",")]
    else:
        items = [str(s).strip() for s in splits]
    out: list[str] = []
    for s in items:
        if not s:
            continue
        if _id_problem(s) is not None or "/" in s:
            raise DatasetError(f"invalid split name {s!r}; use a plain folder name like 'train' or 'val'")
        if s not in out:
            out.append(s)
    if not out:
        raise DatasetError("no split given; pass at least one split name, e.g. 'train'")
    return tuple(out)


def available_splits(folder: Path) -> list[str]:
    """Sub-folder names of ``folder`` (sorted), i.e. the splits a layout offers."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def check_splits(splits: Sequence[str], folder: Path) -> None:
    """Raise a DatasetError naming the first requested split that is not a sub-folder of ``folder``."""
    avail = available_splits(folder)
    for s in splits:
        if s not in avail:
            listed = ", ".join(avail) if avail else "none"
            raise DatasetError(f"split {s!r} not found under {folder}; available: {listed}")


def decode_image(data: bytes, where: object) -> np.ndarray:
    """Decode image file bytes to (H, W, 3) uint8 RGB; DatasetError when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.array(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {where}: {_reason(e)}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DatasetError(f"cannot read image {where}: decoded to shape {arr.shape}, expected (H, W, 3)")
    return arr


def read_index_png(path: Path, what: str, *, allow_wide: bool = False) -> tuple[np.ndarray, str]:
    """Read a single-channel label file as its stored values (palette PNGs give the indices).

    Returns ``(array, mode)``; ``array`` is uint8, or int32 for 16/32-bit images when ``allow_wide``.
    RGB(A) files are returned with their mode so the caller can explain what it needs instead.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
                return np.empty((0, 0), np.uint8), mode
            if mode == "1" or mode in ("L", "P"):
                arr = np.array(im, dtype=np.uint8)
            elif mode.startswith("I"):
                arr = np.asarray(im).astype(np.int64)
                if not allow_wide:
                    if arr.size and (arr.min() < 0 or arr.max() > 255):
                        bad = np.unique(arr[(arr < 0) | (arr > 255)])
                        raise DatasetError(
                            f"{what} {path} has values {_fmt_values(bad)} outside 0..255; "
                            "store label values as an 8-bit index PNG"
                        )
                    arr = arr.astype(np.uint8)
                else:
                    arr = arr.astype(np.int32)
            else:
                raise DatasetError(f"{what} {path} has unsupported image mode {mode!r}; use an 8-bit PNG")
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read {what} {path}: {_reason(e)}") from None
    if arr.ndim != 2:
        raise DatasetError(f"{what} {path} decoded to shape {arr.shape}; expected a single-channel image")
    return arr, mode


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def _fmt_values(values: np.ndarray, limit: int = 10) -> str:
    vals = [int(v) for v in np.asarray(values).ravel()[:limit]]
    more = "" if np.asarray(values).size <= limit else ", ..."
    return "[" + ", ".join(str(v) for v in vals) + more + "]"


class SegDataset:
    """A semantic segmentation dataset on local disk. Torch-free; subclasses define the layout.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`_convert_label`.
    """

    name: str = "base"
    root: Path
    splits: tuple[str, ...]
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: np.ndarray
    records: list[ImageRecord]

    # ---------------------------------------------------------------------------------- index

    def _set_records(self, records: Iterable[ImageRecord]) -> None:
        recs = sorted(records, key=lambda r: r.id)
        index: dict[str, int] = {}
        for i, r in enumerate(recs):
            check_id(r.id)
            if r.id in index:
                other = recs[index[r.id]].image_path
                raise DatasetError(f"two images share the id {r.id!r}: {other} and {r.image_path}; keep one of them")
            index[r.id] = i
        self.records = recs
        self._index = index

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, splits={self.splits!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def ids_digest(self) -> str:
        """sha256 over the newline-joined ids (``cache_tools.schema.ids_digest``)."""
        return ids_digest(self.ids)

    def index_of(self, image_id: str) -> int:
        """Position of ``image_id`` in :attr:`records`; DatasetError when it is not in this dataset."""
        try:
            return self._index[image_id]
        except (KeyError, TypeError):
            raise DatasetError(
                f"image id {image_id!r} is not in the {self.name} dataset at {self.root} "
                f"(splits: {', '.join(self.splits)}); check --dataset and --splits"
            ) from None

    def resolve_id(self, image_id: str) -> ImageRecord:
        """The record of an untrusted id (e.g. read from a cache).

        Rejects non-strings, empty ids, NUL, backslashes, line breaks, absolute paths, '.'/'..'
        components and anything whose path would leave the root, then requires the id to be in the
        index. Raises :class:`DatasetError`.
        """
        check_id(image_id)
        root = os.path.normpath(os.path.abspath(self.root))
        joined = os.path.normpath(os.path.join(root, *image_id.split("/")))
        if os.path.commonpath([root, joined]) != root:
            raise DatasetError(f"image id {image_id!r} points outside the dataset root {self.root}")
        rec = self.records[self.index_of(image_id)]
        for p in (rec.image_path, rec.label_path):
            if p is None:
                continue
            ap = os.path.normpath(os.path.abspath(p))
            if os.path.commonpath([root, ap]) != root:
                raise DatasetError(f"image id {image_id!r} resolves to {p}, outside the dataset root")
        return rec

    def _record(self, i: int | str) -> ImageRecord:
        if isinstance(i, str):
            return self.resolve_id(i)
        n = len(self.records)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not -n <= int(i) < n:
            raise DatasetError(f"image index {i!r} out of range for {n} images")
        return self.records[int(i)]

    # ---------------------------------------------------------------------------------- reading

    def read_image_bytes(self, i: int | str) -> bytes:
        """The image file's bytes (record index or id)."""
        rec = self._record(i)
        try:
            return rec.image_path.read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read image {rec.image_path}: {_reason(e)}") from None

    def read_image(self, i: int | str) -> tuple[np.ndarray, str]:
        """(H, W, 3) uint8 RGB and the sha256 of the file bytes (read once, hashed and decoded)."""
        rec = self._record(i)
        data = self.read_image_bytes(i)
        return decode_image(data, rec.image_path), fingerprint(data)

    def read_label(self, i: int | str) -> np.ndarray:
        """(H, W) uint8 train ids, ignore = 255."""
        rec = self._record(i)
        if rec.label_path is None:
            raise DatasetError(f"image {rec.id!r} has no label file in the {self.name} dataset at {self.root}")
        label = self._convert_label(rec.label_path)
        if label.dtype != np.uint8 or label.ndim != 2:  # pragma: no cover - subclass contract
            raise AssertionError("_convert_label must return a 2-D uint8 array")
        return label

    def load(self, i: int | str) -> tuple[np.ndarray, np.ndarray | None, str]:
        """(image, label or None, sha256); the label is checked to have the image's size."""
        rec = self._record(i)
        image, sha = self.read_image(i)
        if rec.label_path is None:
            return image, None, sha
        label = self.read_label(i)
        if label.shape != image.shape[:2]:
            (h, w), (lh, lw) = image.shape[:2], label.shape
            raise DatasetError(
                f"image and label sizes differ for id {rec.id!r}: {h}x{w} vs {lh}x{lw} "
                f"({rec.image_path} vs {rec.label_path}); labels must match their image pixel for pixel"
            )
        return image, label, sha

    def _convert_label(self, path: Path) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def stamp(self) -> DatasetStamp:
        """The :class:`cache_tools.schema.DatasetStamp` that describes this dataset in a cache."""
        return DatasetStamp(
            name=self.name,
            splits=tuple(self.splits),
            num_images=len(self),
            ids_sha256=self.ids_digest(),
            class_names=tuple(self.class_names),
            ignore_index=self.ignore_index,
        )


def relative_id(path: Path, base: Path, suffix: str) -> str:
    """Posix relative path of ``path`` under ``base`` with ``suffix`` removed from the name."""
    parts = list(PurePosixPath(*path.relative_to(base).parts).parts)
    if suffix and parts[-1].endswith(suffix):
        parts[-1] = parts[-1][: -len(suffix)]
    return "/".join(parts)
