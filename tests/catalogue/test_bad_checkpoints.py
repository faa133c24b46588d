"""Bad-input catalogue: checkpoint files that are not what they claim, given to every command that reads one.

Each file goes to ``skdcache build --weights``, ``skdstudent train --pretrained`` and ``skdstudent
eval --checkpoint`` (in-process). Every run must exit 1 with one ``error:`` line naming what the file
is (not), without a traceback and without torch's advice to load it unsafely; a hostile pickle must
not run (its ``touch PWNED`` leaves no file); the bad file and the user's files stay byte-identical
and nothing is written where the command would have written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.cli import main as skdcache
from pipeline.registry import create_model
from pipeline.weights import save_weights
from student.cli import main as skdstudent
from tests.cli import assert_one_line_error, run_cli


class SystemCall:
    """Unpickled, it would run ``touch PWNED`` through os.system."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


class PopenCall:
    """Unpickled, it would run ``touch PWNED`` through subprocess.Popen."""

    def __reduce__(self):
        return (subprocess.Popen, (["touch", "PWNED"],))


class EvalCall:
    """Unpickled, it would create PWNED through builtins.eval."""

    def __reduce__(self):
        return (eval, ("open('PWNED', 'w').close()",))


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("psp_tiny", num_classes=19).state_dict()


def _torch_file(path: Path, obj, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cut(path: Path, legacy: bool) -> Path:
    data = _torch_file(path, _state_dict(), legacy).read_bytes()
    return _write(path, data[: len(data) // 2])


def _crc_damaged(path: Path) -> Path:
    _torch_file(path, _state_dict())
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(f"{path.stem}/data/0").header_offset
    data = bytearray(path.read_bytes())
    header = data[offset : offset + 30]  # the local header's name and (alignment) extra lengths
    start = offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    data[start + 8] ^= 0x40  # one flipped bit in the first tensor's bytes
    return _write(path, bytes(data))


def _zip_without_pickle(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weights/readme.txt", "the weights are elsewhere")
    return path


def _torchscript_like(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:  # the members torch.jit.save writes
        for name in ("data.pkl", "constants.pkl", "code/__torch__.py", "version"):
            zf.writestr(f"{path.stem}/{name}", "")
    return path


def _tar(path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("storages")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"\x80\x02K\x00"))
    return _write(path, buf.getvalue())


def _cut_safetensors(path: Path) -> Path:
    save_weights(create_model("psp_tiny", num_classes=19), path)
    return _write(path, path.read_bytes()[:200])


HOSTILE = ("NOT executed", "which can run code or commands")
#: name -> (make the file in a folder, fragments every command's error line must hold)
CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "empty": (lambda d: _write(d / "empty.pth", b""), ("empty file (0 bytes)",)),
    "text": (lambda d: _write(d / "notes.pth", b"teacher: psp101\n"), ("looks like text ('teacher: psp101')",)),
    "truncated-zip": (lambda d: _cut(d / "cut.pth", False), ("truncated or damaged torch archive",)),
    "truncated-legacy": (lambda d: _cut(d / "cut_legacy.pth", True), ("truncated legacy torch file",)),
    "crc-damaged": (
        lambda d: _crc_damaged(d / "crc.pth"),
        ("damaged torch archive", "does not match its CRC-32 checksum"),
    ),
    "zip-without-data-pkl": (
        lambda d: _zip_without_pickle(d / "weights.zip"),
        ("a zip archive without data.pkl: not a torch checkpoint",),
    ),
    "torchscript": (lambda d: _torchscript_like(d / "scripted.pt"), ("a TorchScript archive (torch.jit.save)",)),
    "random-bytes": (lambda d: _write(d / "noise.pth", bytes(range(256)) * 8), ("unknown binary data",)),
    "gzip": (lambda d: _write(d / "w.pth.gz", gzip.compress(b"\x80\x02}q\x00.")), ("gzip-compressed data",)),
    "tar": (lambda d: _tar(d / "old.tar"), ("a tar archive",)),
    "plain-pickle": (
        lambda d: _write(d / "w.pkl", pickle.dumps({"w": [0.5]})),
        ("a plain Python pickle, not a torch checkpoint",),
    ),
    "hostile-zip": (lambda d: _torch_file(d / "evil.pth", {"w": torch.ones(1), "x": SystemCall()}), HOSTILE),
    "hostile-legacy": (lambda d: _torch_file(d / "evil_old.pth", {"x": SystemCall()}, legacy=True), HOSTILE),
    "hostile-raw-pickle": (lambda d: _write(d / "evil.pkl", pickle.dumps(SystemCall(), protocol=4)), HOSTILE),
    "hostile-protocol-0": (lambda d: _write(d / "evil0.pth", pickle.dumps(SystemCall(), protocol=0)), HOSTILE),
    "hostile-popen": (lambda d: _torch_file(d / "popen.pth", PopenCall()), ("names subprocess.Popen", *HOSTILE)),
    "hostile-eval": (lambda d: _torch_file(d / "eval.pth", EvalCall()), ("names builtins.eval", *HOSTILE)),
    "truncated-safetensors": (lambda d: _cut_safetensors(d / "w.safetensors"), ("truncated safetensors file",)),
    "missing": (lambda d: d / "nope.pth", ("does not exist",)),
    "directory": (lambda d: (d / "ckpt.pth").mkdir() or d / "ckpt.pth", ("is not a file",)),
}
#: cases whose file is a readable torch file that is no state dict: eval says it is no training checkpoint
NO_STATE_DICT: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "pickled-module": (
        lambda d: _torch_file(d / "model.pth", torch.nn.Linear(2, 2)),
        ("holds no state dict: it holds a pickled torch.nn.modules.linear.Linear object",),
    ),
    "ints-not-tensors": (
        lambda d: _torch_file(d / "ints.pth", {"model": {"a": 1}}),
        ("holds no state dict: 1 entries are not named tensors",),
    ),
}


def _argv(command: str, ckpt: Path, data: Path, out: Path) -> tuple[Callable, list[str]]:
    if command == "build":
        return skdcache, [
            "build",
            "--teacher",
            "psp_tiny",
            "--weights",
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(out),
        ]
    if command == "pretrained":
        train = ["train", "--data", str(data), "--out", str(out), "--student", "psp_tiny", "--iters", "1"]
        return skdstudent, [*train, "--batch-size", "2", "--crop", "64x64", "--workers", "0", "--eval-split", "none",
                            "--losses", "none", "--pretrained", str(ckpt)]  # fmt: skip
    return skdstudent, ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu"]


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _check(command: str, case: Callable[[Path], Path], fragments, sample_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a hostile pickle that ran would leave ./PWNED here
    ckpt = case(tmp_path)
    out = tmp_path / "out"
    if command == "pretrained":  # a run folder holding the user's own file
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    before = _files(tmp_path)
    main, argv = _argv(command, ckpt, sample_root, out / "cache.zarr" if command == "build" else out)
    code, _, err = run_cli(main, argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert "weights_only" not in err and "Re-running" not in err and "unpickl" not in err.replace("never unpickled", "")
    assert not (tmp_path / "PWNED").exists()
    assert _files(tmp_path) == before  # the checkpoint and the user's files are untouched, nothing added
    assert command == "pretrained" or not out.exists()


@pytest.mark.parametrize("command", ["build", "pretrained", "eval"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_checkpoint_file(command, name, sample_root, tmp_path, monkeypatch, capsys):
    case, fragments = CASES[name]
    _check(command, case, fragments, sample_root, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("command", ["build", "pretrained", "eval"])
@pytest.mark.parametrize("name", sorted(NO_STATE_DICT))
def test_torch_file_without_a_state_dict(command, name, sample_root, tmp_path, monkeypatch, capsys):
    case, fragments = NO_STATE_DICT[name]
    if command == "eval":
        fragments = ("is not an skd training checkpoint",)
    _check(command, case, fragments, sample_root, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(
    ("teacher", "fragments"),
    [
        ("os:system", ("'os', a Python standard-library module, not a model package",)),
        ("builtins:exec", ("'builtins', a Python standard-library module",)),
        ("torch:zeros", ("its factory torch:zeros(num_classes=...) failed with TypeError", "return an nn.Module")),
    ],
)
def test_teacher_import_path_that_is_not_a_model_factory(teacher, fragments, sample_root, tmp_path, capsys):
    out = tmp_path / "cache.zarr"
    argv = ["build", "--teacher", teacher, "--random-weights", "--data", str(sample_root), "--out", str(out)]
    code, _, err = run_cli(skdcache, argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
