"""cache_tools.datasets: sample generator, Cityscapes and folder layouts, id safety, error messages."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image

from cache_tools.datasets import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_PALETTE,
    SAMPLE_CLASS_IDS,
    SAMPLE_TRAIN_IDS,
    CityscapesDataset,
    FolderDataset,
    ImageRecord,
    fingerprint,
    open_dataset,
    render_scene,
    write_sample_dataset,
)
from cache_tools.datasets.base import decode_image
from cache_tools.errors import DatasetError, SkdError

REPO = Path(__file__).resolve().parents[2]
SIZE = (64, 128)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "cs"
    write_sample_dataset(root, num_train=4, num_val=2, size=SIZE, seed=0)
    return root


@pytest.fixture
def sample_copy(sample, tmp_path) -> Path:
    dst = tmp_path / "cs"
    shutil.copytree(sample, dst)
    return dst


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    assert isinstance(e.value, SkdError) and isinstance(e.value, ValueError)
    return msg


def _write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------------------
# package hygiene


def test_import_does_not_pull_torch():
    code = "import cache_tools.datasets, sys; assert 'torch' not in sys.modules, 'torch imported'"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------
# sample generator


def test_sample_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa = write_sample_dataset(a, num_train=3, num_val=1, size=SIZE, seed=7)
    write_sample_dataset(b, num_train=3, num_val=1, size=SIZE, seed=7)
    write_sample_dataset(c, num_train=3, num_val=1, size=SIZE, seed=8)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    pngs = [k for k in fa if k.endswith(".png")]
    assert len(pngs) == 8
    assert all(fa[k] != fc[k] for k in pngs if "leftImg8bit" in k)
    assert sa == {"root": str(a.absolute()), "splits": {"train": 3, "val": 1}, "size": [64, 128], "seed": 7}


def test_sample_adding_images_keeps_earlier_ones(tmp_path):
    write_sample_dataset(tmp_path / "a", num_train=2, num_val=1, size=SIZE, seed=3)
    write_sample_dataset(tmp_path / "b", num_train=4, num_val=2, size=SIZE, seed=3)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    shared = [k for k in fa if k.endswith(".png")]
    assert shared and all(fa[k] == fb[k] for k in shared)


@pytest.mark.parametrize("size", [(64, 128), (128, 256), (37, 61), (256, 512)])
def test_render_scene_sizes_and_classes(size):
    img, lab = render_scene(size, seed=1)
    assert img.shape == (*size, 3) and img.dtype == np.uint8
    assert lab.shape == size and lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) <= set(SAMPLE_CLASS_IDS)
    # a street scene: road, sky and buildings are always there
    assert {7, 11, 23} <= set(np.unique(lab).tolist())
    assert img.std() > 10


def test_render_scene_covers_classes_and_void():
    seen: set[int] = set()
    for s in range(12):
        seen |= set(np.unique(render_scene((128, 256), seed=s)[1]).tolist())
    assert seen == set(SAMPLE_CLASS_IDS)
    assert set(SAMPLE_TRAIN_IDS) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13}


def test_render_scene_rng_only():
    state = np.random.get_state()
    a = render_scene((64, 128), seed=5)
    b = render_scene((64, 128), seed=np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert all(np.array_equal(x, y) for x, y in zip(state[1:], np.random.get_state()[1:], strict=True))


def test_sample_refuses_foreign_nonempty_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError) as e:
        write_sample_dataset(tmp_path, num_train=1, num_val=1, size=SIZE)
    assert "not empty" in _one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_sample_rewrites_itself_but_never_user_files(tmp_path):
    root = tmp_path / "s"
    write_sample_dataset(root, num_train=4, num_val=2, size=SIZE)
    user = root / "leftImg8bit" / "README.txt"
    user.write_text("keep me")
    write_sample_dataset(root, num_train=2, num_val=0, size=SIZE, seed=1)
    assert user.read_text() == "keep me"
    assert not (root / "leftImg8bit" / "val").exists()
    ds = open_dataset(root, ("train",))
    assert len(ds) == 2
    with pytest.raises(DatasetError, match="split 'val' not found"):
        open_dataset(root, ("val",))


def test_sample_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="at least 8x8"):
        write_sample_dataset(tmp_path / "x", size=(4, 4))
    with pytest.raises(DatasetError, match="non-negative"):
        write_sample_dataset(tmp_path / "x", seed=-1)
    with pytest.raises(DatasetError, match="at least one"):
        write_sample_dataset(tmp_path / "x", num_train=0, num_val=0)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# Cityscapes layout


def test_cityscapes_index(sample):
    ds = open_dataset(sample, ("train", "val"))
    assert isinstance(ds, CityscapesDataset) and ds.name == "cityscapes"
    assert len(ds) == 6 and ds.splits == ("train", "val")
    assert ds.ids == sorted(ds.ids)
    assert "train/synthtown/synthtown_000000_000019" in ds.ids
    assert "train/procville/procville_000001_000019" in ds.ids
    assert "val/valburg/valburg_000001_000019" in ds.ids
    rec = ds.records[ds.index_of("val/valburg/valburg_000000_000019")]
    assert isinstance(rec, ImageRecord) and rec.split == "val"
    assert rec.image_path == sample / "leftImg8bit/val/valburg/valburg_000000_000019_leftImg8bit.png"
    assert rec.label_path == sample / "gtFine/val/valburg/valburg_000000_000019_gtFine_labelIds.png"
    assert ds.num_classes == 19 and ds.class_names == CITYSCAPES_CLASS_NAMES
    assert ds.class_names[0] == "road" and ds.class_names[18] == "bicycle"
    assert ds.palette.shape == (19, 3) and ds.palette.dtype == np.uint8
    assert tuple(ds.palette[0]) == (128, 64, 128) and tuple(ds.palette[10]) == (70, 130, 180)
    assert ds.ignore_index == 255
    # default split is train; a comma string works too
    assert len(open_dataset(sample)) == 4
    assert open_dataset(sample, "val,train").splits == ("val", "train")
    st = ds.stamp()
    assert st.num_images == 6 and st.name == "cityscapes" and st.num_classes == 19


def test_cityscapes_read_and_fingerprint(sample):
    ds = open_dataset(sample, ("train",))
    table = {lab_.id: lab_.trainId for lab_ in cs_labels}
    to_train = np.vectorize(lambda v: table[int(v)] if table[int(v)] not in (-1, 255) else 255)
    for i in range(len(ds)):
        img, lab, sha = ds.load(i)
        rec = ds.records[i]
        assert img.shape == (*SIZE, 3) and img.dtype == np.uint8
        assert lab is not None and lab.shape == SIZE and lab.dtype == np.uint8
        assert sha == hashlib.sha256(rec.image_path.read_bytes()).hexdigest() == fingerprint(ds.read_image_bytes(i))
        assert np.array_equal(img, np.asarray(Image.open(rec.image_path).convert("RGB")))
        raw = np.asarray(Image.open(rec.label_path))
        # through the official table, by hand: road (7) -> 0, car (26) -> 13, unlabeled (0) -> 255
        expect = to_train(raw)
        assert np.array_equal(lab, expect.astype(np.uint8))
        assert set(np.unique(lab).tolist()) <= {*SAMPLE_TRAIN_IDS, 255}
    # by id as well as by index
    _, sha2 = ds.read_image(ds.ids[1])
    assert sha2 == ds.load(1)[2]


def test_cityscapes_label_mapping_uses_the_table(sample_copy):
    ds = open_dataset(sample_copy)
    rec = ds.records[0]
    ids = np.array([[7, 8, 0, 1], [26, 33, 23, 24], [11, 4, 21, 22]], np.uint8)
    img = np.zeros((3, 4, 3), np.uint8)
    _write_png(rec.image_path, img)
    _write_png(rec.label_path, ids, "L")
    _, lab, _ = ds.load(0)
    assert lab.tolist() == [[0, 1, 255, 255], [13, 18, 10, 11], [2, 255, 8, 9]]
    # every id of the table maps as the table says
    full = np.array([[lab_.id for lab_ in cs_labels if lab_.id >= 0]], np.uint8)
    _write_png(rec.label_path, full, "L")
    got = ds.read_label(0)[0].tolist()
    want = [lab_.trainId if lab_.trainId not in (-1, 255) else 255 for lab_ in cs_labels if lab_.id >= 0]
    assert got == want


def test_cityscapes_label_id_not_in_table(sample_copy):
    ds = open_dataset(sample_copy)
    rec = ds.records[0]
    lab = np.asarray(Image.open(rec.label_path)).copy()
    lab[0, :3] = [40, 41, 40]
    _write_png(rec.label_path, lab, "L")
    with pytest.raises(DatasetError) as e:
        ds.read_label(0)
    msg = _one_line(e)
    assert "[40, 41]" in msg and "not in the Cityscapes label table (0..33, -1)" in msg
    assert str(rec.label_path) in msg
    lab[0, :3] = 255  # a labelTrainIds file by mistake
    _write_png(rec.label_path, lab, "L")
    with pytest.raises(DatasetError, match="labelTrainIds"):
        ds.load(0)


def test_cityscapes_rgb_label_refused(sample_copy):
    ds = open_dataset(sample_copy)
    _write_png(ds.records[0].label_path, np.zeros((*SIZE, 3), np.uint8))
    with pytest.raises(DatasetError, match="RGB image"):
        ds.read_label(0)


def test_cityscapes_size_mismatch(sample_copy):
    ds = open_dataset(sample_copy)
    rec = ds.records[2]
    _write_png(rec.label_path, np.full((32, 64), 7, np.uint8), "L")
    with pytest.raises(DatasetError) as e:
        ds.load(2)
    msg = _one_line(e)
    assert f"image and label sizes differ for id '{rec.id}': 64x128 vs 32x64" in msg


def test_unreadable_image(sample_copy):
    ds = open_dataset(sample_copy)
    ds.records[1].image_path.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError) as e:
        ds.read_image(1)
    assert _one_line(e).startswith(f"cannot read image {ds.records[1].image_path}: ")


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "nope")
    assert _one_line(e) == f"dataset root {tmp_path / 'nope'} does not exist"
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path)
    msg = _one_line(e)
    assert "leftImg8bit" in msg and "classes.txt" in msg
    with pytest.raises(DatasetError, match="unknown dataset kind 'voc'"):
        open_dataset(tmp_path, kind="voc")
    with pytest.raises(DatasetError, match="does not exist"):
        CityscapesDataset(tmp_path / "nope")


def test_no_images_and_bad_split(tmp_path, sample_copy):
    (tmp_path / "empty" / "leftImg8bit" / "train" / "city").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "empty")
    msg = _one_line(e)
    assert msg.startswith(f"no images found under {tmp_path / 'empty' / 'leftImg8bit' / 'train'}")
    assert "(expected leftImg8bit/{split}/{city}/*_leftImg8bit.png)" in msg
    with pytest.raises(DatasetError) as e:
        open_dataset(sample_copy, ("tarin",))
    msg = _one_line(e)
    assert "split 'tarin' not found" in msg and msg.endswith("available: train, val")
    with pytest.raises(DatasetError, match="invalid split name"):
        open_dataset(sample_copy, ("../train",))


def test_missing_label_file_is_an_error(sample_copy):
    lab = sample_copy / "gtFine/val/valburg/valburg_000001_000019_gtFine_labelIds.png"
    lab.unlink()
    open_dataset(sample_copy, ("train",))  # other splits are unaffected
    with pytest.raises(DatasetError) as e:
        open_dataset(sample_copy, ("val",))
    msg = _one_line(e)
    assert "1 of 2 images in split 'val' have no label file" in msg and str(lab) in msg


# ------------------------------------------------------------------------------------------------
# id safety


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "train/../../../etc/passwd",
        "train/./synthtown/synthtown_000000_000019",
        "train\\synthtown\\synthtown_000000_000019",
        "train/synthtown/x\x00",
        "C:/Windows/system32",
        "",
        "train//synthtown",
        "train/synthtown/\nx",
        None,
        7,
    ],
)
def test_resolve_id_rejects_unsafe(sample, bad):
    ds = open_dataset(sample)
    with pytest.raises(DatasetError) as e:
        ds.resolve_id(bad)  # type: ignore[arg-type]
    _one_line(e)


def test_resolve_id_only_indexed(sample):
    ds = open_dataset(sample, ("train",))
    good = "train/synthtown/synthtown_000000_000019"
    assert ds.resolve_id(good) is ds.records[ds.index_of(good)]
    for missing in ("train/synthtown/synthtown_000099_000019", "val/valburg/valburg_000000_000019"):
        with pytest.raises(DatasetError) as e:
            ds.resolve_id(missing)
        assert repr(missing) in _one_line(e)
    with pytest.raises(DatasetError, match="not in the cityscapes dataset"):
        ds.index_of("nope")
    with pytest.raises(DatasetError, match="out of range"):
        ds.read_image(99)


# ------------------------------------------------------------------------------------------------
# folder layout


def _voc_like(root: Path, classes=("background", "cat", "dog"), palette: bool = False) -> None:
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("# VOC-ish\n" + "\n".join(classes) + "\n\n")
    if palette:
        (root / "palette.txt").write_text("0 0 0\n128 0 0\n# comment\n0,128,0\n")
    rng = np.random.default_rng(0)
    pal_img = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253
    for split, name, ext in (("train", "a/0001", ".png"), ("train", "0002", ".jpg"), ("val", "0003", ".jpeg")):
        img = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
        p = root / "images" / split / (name + ext)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        mask = np.zeros((20, 30), np.uint8)
        mask[5:10, 5:15] = 1
        mask[12:, :] = 2
        mask[0, :] = 255  # VOC-style ignore border
        m = Image.fromarray(mask, "P")
        m.putpalette(pal_img)
        mp = root / "masks" / split / (name + ".png")
        mp.parent.mkdir(parents=True, exist_ok=True)
        m.save(mp)


def test_folder_layout_palette_masks(tmp_path):
    root = tmp_path / "voc"
    _voc_like(root, palette=True)
    ds = open_dataset(root, ("train", "val"))
    assert isinstance(ds, FolderDataset) and ds.name == "folder"
    assert ds.class_names == ("background", "cat", "dog") and ds.num_classes == 3
    assert ds.ids == ["train/0002", "train/a/0001", "val/0003"]
    assert ds.palette.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    img, lab, sha = ds.load("train/a/0001")
    assert img.shape == (20, 30, 3) and lab.shape == (20, 30)
    assert lab[7, 7] == 1 and lab[15, 3] == 2 and lab[0, 0] == 255 and lab[3, 3] == 0
    assert sha == hashlib.sha256((root / "images/train/a/0001.png").read_bytes()).hexdigest()
    assert ds.records[0].label_path == root / "masks/train/0002.png"
    with pytest.raises(DatasetError):
        ds.resolve_id("train/a/../a/0001")


def test_folder_default_palette_and_L_masks(tmp_path):
    root = tmp_path / "camvid"
    _voc_like(root, classes=("sky", "building", "road", "car"))
    ds = open_dataset(root, "train", kind="folder")
    assert ds.palette.shape == (4, 3) and ds.palette.dtype == np.uint8
    assert ds.palette.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(c) for c in ds.palette.tolist()}) == 4
    m = np.full((20, 30), 3, np.uint8)
    _write_png(root / "masks/train/0002.png", m, "L")
    assert (ds.read_label("train/0002") == 3).all()


def test_folder_mask_errors(tmp_path):
    root = tmp_path / "voc"
    _voc_like(root)
    ds = open_dataset(root)
    _write_png(root / "masks/train/0002.png", np.full((20, 30), 5, np.uint8), "L")
    with pytest.raises(DatasetError) as e:
        ds.read_label("train/0002")
    msg = _one_line(e)
    assert "has values [5]" in msg and "3 classes" in msg
    _write_png(root / "masks/train/0002.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DatasetError) as e:
        ds.load("train/0002")
    assert "index masks are required" in _one_line(e)
    (root / "masks/train/0002.png").unlink()
    with pytest.raises(DatasetError, match="have no mask"):
        open_dataset(root)


def test_folder_config_errors(tmp_path):
    root = tmp_path / "voc"
    _voc_like(root)
    (root / "palette.txt").write_text("0 0 0\n1 2\n")
    with pytest.raises(DatasetError, match="line 2: expected 'r g b'"):
        open_dataset(root)
    (root / "palette.txt").write_text("0 0 0\n")
    with pytest.raises(DatasetError, match=r"1 colours but classes\.txt lists 3"):
        open_dataset(root)
    (root / "palette.txt").unlink()
    (root / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match="listed twice"):
        open_dataset(root)
    (root / "classes.txt").write_text("# nothing\n")
    with pytest.raises(DatasetError, match="lists no classes"):
        open_dataset(root)
    (root / "classes.txt").write_text("a\nb\nc\n")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "images/train/0002.png")
    with pytest.raises(DatasetError, match="share the id 'train/0002'"):
        open_dataset(root)
    with pytest.raises(DatasetError, match="no images found under"):
        (root / "images" / "empty").mkdir()
        open_dataset(root, "empty")


def test_palette_export_matches_cityscapes_table():
    by_train = {lab.trainId: lab.color for lab in cs_labels if 0 <= lab.trainId < 255}
    assert [tuple(c) for c in CITYSCAPES_PALETTE.tolist()] == [by_train[t] for t in range(19)]


def test_arrays_are_writable(sample, tmp_path):
    img, lab, _ = open_dataset(sample).load(0)
    assert img.flags.writeable and lab is not None and lab.flags.writeable
    root = tmp_path / "voc"
    _voc_like(root)
    img, lab, _ = open_dataset(root).load(0)
    assert img.flags.writeable and lab is not None and lab.flags.writeable


# ------------------------------------------------------------------------------------------------
# image modes: read exactly as RGB, or refused with the conversion to make


def _png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_rgb48(h: int, w: int) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    raw = b"".join(b"\x00" + bytes(range(w * 6)) for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


_GREY = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)


def _exact_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    grey3 = np.repeat(_GREY[..., None], 3, axis=2)
    rgba = np.dstack([grey3, np.full_like(_GREY, 255)])
    pal = Image.fromarray(_GREY).convert("P")
    bits = _GREY > 100
    return {
        "L": (_png_bytes(Image.fromarray(_GREY)), grey3),
        "P": (_png_bytes(pal), np.array(pal.convert("RGB"))),
        "1": (_png_bytes(Image.fromarray(bits)), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, 2)),
        "RGBA opaque": (_png_bytes(Image.fromarray(rgba)), grey3),
        "LA opaque": (_png_bytes(Image.fromarray(rgba).convert("LA")), grey3),
    }


@pytest.mark.parametrize("mode", ["L", "P", "1", "RGBA opaque", "LA opaque"])
def test_decode_exact_modes(mode):
    data, expected = _exact_cases()[mode]
    arr = decode_image(data, "x.png")
    assert arr.dtype == np.uint8 and arr.shape == (12, 16, 3)
    assert np.array_equal(arr, expected)


def _refused_cases() -> dict[str, tuple[bytes, str]]:
    transparent = Image.fromarray(_GREY).convert("P")
    transparent.info["transparency"] = 5
    frames = [Image.fromarray(_GREY).convert("P"), Image.fromarray(255 - _GREY).convert("P")]
    anim = io.BytesIO()
    frames[0].save(anim, format="PNG", save_all=True, append_images=frames[1:])
    return {
        "I;16": (_png_bytes(Image.fromarray(_GREY.astype(np.uint16) * 257)), "16-bit grayscale image (mode I;16)"),
        "I": (_png_bytes(Image.fromarray(_GREY.astype(np.int32)), "TIFF"), "32-bit integer image (mode I)"),
        "F": (_png_bytes(Image.fromarray(_GREY.astype(np.float32)), "TIFF"), "floating-point image (mode F)"),
        "RGB48": (_png_rgb48(4, 5), "16-bit-per-channel image"),
        "CMYK": (_png_bytes(Image.new("CMYK", (16, 12)), "JPEG"), "CMYK image; convert it to RGB"),
        "RGBA transparent": (_png_bytes(Image.fromarray(np.dstack([_GREY] * 4))), "transparent pixels (mode RGBA)"),
        "P transparent": (_png_bytes(transparent), "transparent pixels (mode P)"),
        "APNG": (anim.getvalue(), "has 2 frames"),
    }


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGB48", "CMYK", "RGBA transparent", "P transparent", "APNG"])
def test_decode_refuses_inexact_modes(mode):
    data, fragment = _refused_cases()[mode]
    with pytest.raises(DatasetError) as e:
        decode_image(data, "x.png")
    msg = _one_line(e)
    assert msg.startswith("image x.png ") and fragment in msg
    assert "convert" in msg or "flatten" in msg or "save" in msg


def test_16bit_image_refused_from_header_and_when_read(sample_copy):
    """Issue 9: a 16-bit image used to read as an all-white RGB image."""
    ds = open_dataset(sample_copy)
    path = ds.records[1].image_path
    wide = np.array(Image.open(path).convert("L")).astype(np.uint16) * 257
    Image.fromarray(wide).save(path)
    clipped = np.array(Image.open(path).convert("RGB"))[..., 0]  # what Pillow's conversion gives: clipped
    assert np.array_equal(clipped, np.minimum(wide, 255)) and (clipped == 255).mean() > 0.9
    for read in (ds.image_size, ds.read_image, ds.load):
        with pytest.raises(DatasetError) as e:
            read(1)
        msg = _one_line(e)
        assert str(path) in msg and "16-bit" in msg and "convert it to 8-bit RGB" in msg
    assert ds.image_size(0) == SIZE


def test_image_size_reads_the_header_only(sample_copy):
    ds = open_dataset(sample_copy)
    path = ds.records[0].image_path
    path.write_bytes(path.read_bytes()[:-200])  # truncated pixel data, intact header
    assert ds.image_size(0) == SIZE
    with pytest.raises(DatasetError) as e:
        ds.read_image(0)
    assert _one_line(e).startswith(f"cannot read image {path}: ")
    path.write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        ds.image_size(0)
    assert _one_line(e).startswith(f"cannot read image {path}: ")


def test_labels_wide_and_multiframe(sample_copy):
    ds = open_dataset(sample_copy)
    rec = ds.records[0]
    ids = np.array(Image.open(rec.label_path))
    expected = ds.read_label(0)
    Image.fromarray(ids.astype(np.uint16)).save(rec.label_path)  # 16-bit, same ids: read exactly
    assert Image.open(rec.label_path).mode == "I;16"
    assert np.array_equal(ds.read_label(0), expected)
    Image.fromarray(ids.astype(np.uint16) * 256).save(rec.label_path)  # ids scaled: refused
    with pytest.raises(DatasetError) as e:
        ds.read_label(0)
    assert "not in the Cityscapes label table" in _one_line(e)
    frames = [Image.fromarray(ids), Image.fromarray(ids)]
    frames[0].save(rec.label_path, save_all=True, append_images=frames[1:])
    with pytest.raises(DatasetError) as e:
        ds.read_label(0)
    assert "has 2 frames" in _one_line(e)


# ------------------------------------------------------------------------------------------------
# nothing skipped silently


def test_cityscapes_refuses_what_it_would_skip(sample_copy):
    city = sample_copy / "leftImg8bit/train/synthtown"
    cases = [
        (city / "synthtown_000009_000019_leftImg8bit.png", "dir", "is a folder where a file is expected"),
        (city / "synthtown_000008_000019_leftImg8bit.png", "link", "is a broken symbolic link"),
        (city / "synthtown_000007_000019.png", "file", "is not named *_leftImg8bit.png"),
        (city.parent / "loose_000000_000019_leftImg8bit.png", "file", "is not in a city folder"),
        (city / "more", "dir", "is a folder inside a city folder"),
    ]
    for path, kind, fragment in cases:
        if kind == "dir":
            path.mkdir()
        elif kind == "link":
            path.symlink_to(sample_copy / "nowhere.png")
        else:
            path.write_bytes(b"x")
        with pytest.raises(DatasetError) as e:
            open_dataset(sample_copy)
        msg = _one_line(e)
        assert str(path) in msg and fragment in msg, msg
        path.rmdir() if kind == "dir" else path.unlink()
    (city / "notes.txt").write_text("not an image: ignored")
    assert len(open_dataset(sample_copy)) == 4


def test_cityscapes_label_entries(sample_copy):
    ds = open_dataset(sample_copy)
    label = ds.records[0].label_path
    label.unlink()
    label.mkdir()
    with pytest.raises(DatasetError) as e:
        open_dataset(sample_copy)
    assert str(label) in _one_line(e) and "is a folder" in str(e.value)
    shutil.rmtree(sample_copy / "gtFine/train")
    (sample_copy / "gtFine/train").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        open_dataset(sample_copy)


def test_symlinked_city_is_followed(sample_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(sample_copy / "leftImg8bit/train/procville", outside)
    (sample_copy / "leftImg8bit/train/procville").symlink_to(outside, target_is_directory=True)
    ds = open_dataset(sample_copy)
    assert len(ds) == 4 and ds.read_image("train/procville/procville_000000_000019")[0].shape == (*SIZE, 3)


def test_folder_refuses_what_it_would_skip(tmp_path):
    root = tmp_path / "voc"
    _voc_like(root)
    bmp = root / "images/train/0004.bmp"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(bmp)
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    assert str(bmp) in _one_line(e) and "is a .bmp image" in str(e.value)
    bmp.unlink()
    d = root / "images/train/0005.png"
    d.mkdir()
    with pytest.raises(DatasetError, match="is a folder where a file is expected"):
        open_dataset(root)
    d.rmdir()
    (root / "images/train/a/loop").symlink_to(root / "images/train", target_is_directory=True)
    with pytest.raises(DatasetError, match="link loop"):
        open_dataset(root)
    (root / "images/train/a/loop").unlink()
    (root / "palette.txt").mkdir()
    with pytest.raises(DatasetError, match=r"palette\.txt is a folder where a file is expected"):
        open_dataset(root)
    (root / "palette.txt").rmdir()
    (root / "classes.txt").write_bytes("\ufeffbackground\ncat\ndog\n".encode())  # a BOM is not part of a name
    assert open_dataset(root).class_names == ("background", "cat", "dog")


# ------------------------------------------------------------------------------------------------
# unlabelled images (issue 13)


@pytest.fixture(scope="module")
def sample_extra(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extra") / "cs"
    write_sample_dataset(root, num_train=4, num_val=2, size=SIZE, seed=0, num_extra=3)
    return root


def test_sample_extra_split_is_deterministic_and_keeps_the_rest(sample, sample_extra, tmp_path):
    plain, extra = _files(sample), _files(sample_extra)
    assert {k for k in extra if "train_extra" in k} == {
        "leftImg8bit/train_extra/extraheim/extraheim_000000_000019_leftImg8bit.png",
        "leftImg8bit/train_extra/moreton/moreton_000000_000019_leftImg8bit.png",
        "leftImg8bit/train_extra/extraheim/extraheim_000001_000019_leftImg8bit.png",
    }
    assert not any(k.startswith("gtFine/train_extra") for k in extra)
    assert all(extra[k] == v for k, v in plain.items() if k.endswith(".png"))  # train and val unchanged
    again = tmp_path / "again"
    write_sample_dataset(again, num_train=4, num_val=2, size=SIZE, seed=0, num_extra=3)
    assert _files(again) == extra
    zero = tmp_path / "zero"
    write_sample_dataset(zero, num_train=4, num_val=2, size=SIZE, seed=0, num_extra=0)
    assert _files(zero) == plain
    write_sample_dataset(again, num_train=1, num_val=0, size=SIZE, seed=0)  # rewriting removes the extra split
    assert not (again / "leftImg8bit/train_extra").exists()
    for bad in (-1, 1.5, True):
        with pytest.raises(DatasetError, match="num_extra"):
            write_sample_dataset(tmp_path / "bad", num_extra=bad)
    assert not (tmp_path / "bad").exists()


def test_unlabelled_split_and_mixed_splits(sample_extra):
    extra = open_dataset(sample_extra, "train_extra")
    assert len(extra) == 3 and extra.num_labelled == 0 and extra.unlabelled_splits == ("train_extra",)
    assert not extra.labelled.any() and not any(r.has_label for r in extra.records)
    both = open_dataset(sample_extra, "train,train_extra")
    assert both.splits == ("train", "train_extra") and len(both) == 7
    assert both.labelled.tolist() == [r.split == "train" for r in both.records] and both.num_labelled == 4
    assert both.unlabelled_splits == ("train_extra",)
    i = both.ids.index("train_extra/moreton/moreton_000000_000019")
    assert not both.has_label(i) and not both.has_label(both.ids[i]) and both.has_label(0)
    image, label, sha = both.load(i)
    assert image.shape == (*SIZE, 3) and label is None
    assert sha == fingerprint(both.records[i].image_path.read_bytes())
    with pytest.raises(DatasetError) as e:
        both.read_label(i)
    msg = _one_line(e)
    assert "has no label" in msg and "'train_extra'" in msg and "use a labelled split" in msg
    assert both.stamp().num_images == 7


def test_train_extra_never_reads_coarse_labels(sample_extra, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(sample_extra, root)
    coarse = root / "gtCoarse/train_extra/moreton/moreton_000000_000019_gtCoarse_labelIds.png"
    _write_png(coarse, np.full(SIZE, 7, np.uint8), "L")
    assert open_dataset(root, "train_extra").num_labelled == 0


def test_cityscapes_label_folder_decides(sample_copy):
    for split in ("train", "val"):
        shutil.rmtree(sample_copy / "gtFine" / split)
    with pytest.raises(DatasetError, match="unpack gtFine"):  # the fine splits always need labels
        open_dataset(sample_copy, "train")
    shutil.copytree(sample_copy / "leftImg8bit/train", sample_copy / "leftImg8bit/crawl")
    assert open_dataset(sample_copy, "crawl").num_labelled == 0
    (sample_copy / "gtFine/crawl/synthtown").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        open_dataset(sample_copy, "crawl")
    msg = _one_line(e)
    assert "4 of 4 images in split 'crawl' have no label file" in msg and "remove" in msg and "gtFine/crawl/" in msg


def test_folder_split_without_masks_is_unlabelled(tmp_path):
    root = tmp_path / "voc"
    _voc_like(root)
    shutil.rmtree(root / "masks/val")
    ds = open_dataset(root, "train,val")
    assert ds.labelled.tolist() == [True, True, False] and ds.unlabelled_splits == ("val",)
    assert ds.load("val/0003")[1] is None
    shutil.rmtree(root / "masks")
    assert open_dataset(root, "train").num_labelled == 0
    (root / "masks").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        open_dataset(root, "train")
    (root / "masks").unlink()
    (root / "masks/train").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        open_dataset(root, "train")
    assert "2 of 2 images in split 'train' have no mask" in _one_line(e) and "or remove" in str(e.value)
