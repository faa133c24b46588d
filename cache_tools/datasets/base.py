"""Torch-free dataset base: records, image/label decoding, id resolution, fingerprints.

A dataset is an ordered list of :class:`ImageRecord` (sorted by id). The id of an image is its path
relative to the layout's image folder, without the layout's suffix, with posix separators (for
example ``train/aachen/aachen_000000_000019``). Ids are what a cache stores, so they must be stable
across machines and must never be trusted: :meth:`SegDataset.resolve_id` accepts only ids that
are in this dataset's index and that cannot name anything outside the root.

Unlabelled images: a record whose ``label_path`` is None has no label (``record.has_label`` is
False). A layout decides per split whether it is labelled (see the layouts); within a labelled split
every image must have its label, since a missing one is more likely a mistake than a choice. For an
unlabelled record :meth:`SegDataset.load` returns ``None`` as the label and
:meth:`SegDataset.read_label` raises :class:`DatasetError`; :attr:`SegDataset.labelled` and
:attr:`SegDataset.unlabelled_splits` say which entries have labels.

Images are read exactly or refused (never converted into something else): RGB as is; grayscale
``L``, 1-bit and palette ``P`` images exactly as RGB (grey replicated, palette looked up); images
with an alpha channel (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent entry) only when every
pixel is opaque. 16-bit and floating-point images, CMYK and other colour spaces, transparent pixels
and multi-frame files are refused with the conversion to make. Symbolic links inside a dataset are
followed (datasets are often assembled from links); a broken link is an error.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
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
    """One image of a dataset and its label file (None: an unlabelled image)."""

    id: str
    split: str
    image_path: Path
    label_path: Path | None

    @property
    def has_label(self) -> bool:
        """Whether this image has a label file."""
        return self.label_path is not None


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


#: Colour spaces that would need a colour profile (or a guess) to become RGB: refused.
_OTHER_COLOUR_SPACES = ("CMYK", "YCbCr", "LAB", "HSV")
#: Modes with an alpha channel: read as RGB only when every pixel is opaque.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _mode_problem(im: Image.Image) -> str | None:
    """Why an opened (not yet loaded) image cannot be read exactly as 8-bit RGB, or None."""
    mode = im.mode
    frames = getattr(im, "n_frames", 1)
    # an MPO (a camera JPEG with previews or a depth map) has one primary image, its first frame
    if isinstance(frames, int) and frames > 1 and im.format != "MPO":
        return f"has {frames} frames (an animation or a multi-page file); save the frame you mean as one image"
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        kind = {"I": "32-bit integer", "F": "floating-point"}.get(mode, "16-bit grayscale")
        return (
            f"is a {kind} image (mode {mode}); convert it to 8-bit RGB first, scaling its values to 0..255 "
            "(skd does not guess the range)"
        )
    rawmodes = [str(t.args[0] if isinstance(t.args, tuple) else t.args) for t in (im.tile or [])]
    if any(r.endswith((";16B", ";16L", ";16N")) for r in rawmodes):  # 16 bits per channel (PNG, TIFF)
        return "is a 16-bit-per-channel image, which Pillow would cut to 8 bits; convert it to 8-bit RGB"
    if mode in _OTHER_COLOUR_SPACES:
        return f"is a {mode} image; convert it to RGB with a colour-managed tool (skd does not guess colour profiles)"
    if mode not in ("RGB", "L", "1", "P", *_ALPHA_MODES):
        return f"has the unsupported image mode {mode!r}; save it as an 8-bit RGB PNG or JPEG"
    return None


def _as_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """The exact RGB of a loaded RGB/L/1/P/alpha image, or (image, problem) when pixels are transparent."""
    if im.mode == "RGB":
        return im, None
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            return im, (
                f"has transparent pixels (mode {im.mode}); flatten it onto the background you mean and save it "
                "as RGB (skd does not guess a background)"
            )
        return rgba.convert("RGB"), None
    return im.convert("RGB"), None  # L, 1 and P: grey replicated / palette looked up, exactly


#: File name endings of common image formats, to refuse image files a layout would otherwise skip.
_IMAGE_LIKE = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_IMAGE_LIKE += (".pnm", ".jp2", ".j2k", ".tga", ".exr", ".avif", ".heic", ".heif", ".dng")


def looks_like_image(path: Path) -> bool:
    """Whether ``path``'s name ends like an image file's."""
    return path.suffix.lower() in _IMAGE_LIKE


def _entry_state(path: Path) -> tuple[bool, str | None]:
    """(a regular file is there, why the entry cannot be read as a file or None); one ``stat``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False, ("is a broken symbolic link; fix the link or remove it" if os.path.islink(path) else None)
    except OSError as e:
        return False, f"cannot be read ({_reason(e)})"
    if stat.S_ISREG(mode):
        return True, None
    if stat.S_ISDIR(mode):
        return False, "is a folder where a file is expected; rename it or move it out of the dataset"
    return False, "is not a regular file; replace it with the image file or remove it"


def check_entry(path: Path) -> Path:
    """Return ``path`` when it is a readable file entry or absent, else raise :class:`DatasetError` naming it."""
    has_file(path)
    return path


def has_file(path: Path) -> bool:
    """True when ``path`` is a file, False when nothing is there; DatasetError when it is something else."""
    found, problem = _entry_state(path)
    if problem is not None:
        raise DatasetError(f"{path} {problem}")
    return found


def is_label_folder(path: Path) -> bool:
    """True when the label folder ``path`` exists, False when it does not; DatasetError when it is a file."""
    if path.is_dir():
        return True
    if path.exists() or path.is_symlink():
        raise DatasetError(f"{path} should be the folder of this split's labels but is not a folder; remove or fix it")
    return False


def list_dir(folder: Path) -> list[Path]:
    """Sorted entries of ``folder`` that are not hidden; DatasetError when it cannot be listed or holds a broken link."""
    try:
        with os.scandir(folder) as it:
            entries = [(e.name, e.is_symlink()) for e in it if not e.name.startswith(".")]
    except OSError as e:
        raise DatasetError(f"cannot list {folder}: {_reason(e)}") from None
    for name, link in entries:
        if link and not os.path.exists(folder / name):
            check_entry(folder / name)  # raises: a broken link
    return sorted(folder / name for name, _ in entries)


def walk_files(top: Path) -> list[Path]:
    """Every non-hidden entry below ``top`` that is not a folder (sorted), following folder links.

    Folder links are followed like real folders (a dataset assembled from links reads the same);
    a link back to a folder above is an error instead of an endless walk.
    """
    out: list[Path] = []
    seen: set[str] = set()

    def visit(folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            raise DatasetError(f"{folder} links back to a folder already listed; remove the link loop")
        seen.add(real)
        for p in list_dir(folder):
            if p.is_dir():
                if looks_like_image(p):
                    check_entry(p)
                visit(p)
            else:
                out.append(p)
        seen.discard(real)

    visit(top)
    return sorted(out)


def decode_image(data: bytes, where: object) -> np.ndarray:
    """Decode image file bytes to (H, W, 3) uint8 RGB, exactly; DatasetError when that is not possible.

    RGB is read as is; L, 1-bit and palette images become RGB exactly; alpha images only when fully
    opaque. 16-bit, 32-bit and float images, CMYK/YCbCr/LAB/HSV, transparent pixels and multi-frame
    files are refused with the conversion to make (never converted into something else).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            problem = _mode_problem(im)
            if problem is None:
                im.load()
                rgb, problem = _as_rgb(im)
            if problem is not None:
                raise DatasetError(f"image {where} {problem}")
            arr = np.array(rgb, dtype=np.uint8)
    except DatasetError:
        raise
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
            frames = getattr(im, "n_frames", 1)
            if isinstance(frames, int) and frames > 1:
                raise DatasetError(f"{what} {path} has {frames} frames; save the label as a single-image PNG")
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

    @property
    def labelled(self) -> np.ndarray:
        """(N,) bool, per record: whether it has a label (a new array; the caller may keep it)."""
        return np.fromiter((r.label_path is not None for r in self.records), dtype=bool, count=len(self.records))

    @property
    def num_labelled(self) -> int:
        """How many records have a label."""
        return sum(r.label_path is not None for r in self.records)

    @property
    def unlabelled_splits(self) -> tuple[str, ...]:
        """The requested splits that hold images without labels (in request order)."""
        return tuple(s for s in self.splits if any(r.split == s and r.label_path is None for r in self.records))

    def has_label(self, i: int | str) -> bool:
        """Whether record ``i`` (index or id) has a label."""
        return self._record(i).label_path is not None

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

    def image_size(self, i: int | str) -> tuple[int, int]:
        """(H, W) from the image's header, refusing what :meth:`read_image` would refuse from the header.

        Cheap (nothing is decoded): a build can check every image before it writes anything. Corrupt
        pixel data and transparent pixels are only found by :meth:`read_image`.
        """
        rec = self._record(i)
        try:
            with Image.open(rec.image_path) as im:
                problem = _mode_problem(im)
                w, h = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot read image {rec.image_path}: {_reason(e)}") from None
        if problem is not None:
            raise DatasetError(f"image {rec.image_path} {problem}")
        return int(h), int(w)

    def read_image(self, i: int | str) -> tuple[np.ndarray, str]:
        """(H, W, 3) uint8 RGB and the sha256 of the file bytes (read once, hashed and decoded)."""
        rec = self._record(i)
        data = self.read_image_bytes(i)
        return decode_image(data, rec.image_path), fingerprint(data)

    def read_label(self, i: int | str) -> np.ndarray:
        """(H, W) uint8 train ids, ignore = 255; DatasetError for an unlabelled image (see :meth:`has_label`)."""
        rec = self._record(i)
        if rec.label_path is None:
            raise DatasetError(
                f"image {rec.id!r} has no label: split {rec.split!r} of the {self.name} dataset at {self.root} "
                "holds images without labels; use a labelled split here"
            )
        label = self._convert_label(rec.label_path)
        if label.dtype != np.uint8 or label.ndim != 2:  # pragma: no cover - subclass contract
            raise AssertionError("_convert_label must return a 2-D uint8 array")
        return label

    def load(self, i: int | str) -> tuple[np.ndarray, np.ndarray | None, str]:
        """(image, label, sha256); the label is checked to have the image's size.

        The label is None for an unlabelled image (:attr:`ImageRecord.has_label` is False), never
        an all-ignore stand-in: a caller that needs labels must check for it.
        """
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
