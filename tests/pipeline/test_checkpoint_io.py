"""The restricted checkpoint reader: exact tensors from both torch serialisations, inert placeholders
for every other class, published layouts (mmsegmentation, CIRKD), hostile pickles refused unexecuted,
and files that are not checkpoints named for what they are."""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from cache_tools.errors import WeightsError
from pipeline.checkpoint_io import Skipped, is_hostile, load_torch_file, restricted_load, sniff
from pipeline.registry import create_model
from pipeline.weights import load_weights, read_state_dict

# ---------------------------------------------------------------------------------------------- stand-ins


class ConfigDict(dict):
    """Stands for mmengine's ConfigDict: the pickle names mmengine.config.config.ConfigDict."""


class HistoryBuffer:
    """Stands for mmengine's HistoryBuffer (numpy arrays inside)."""

    def __init__(self):
        self._log_history = np.arange(4.0)
        self._count_history = np.ones(4)
        self.max_length = 1000000


class Hostile:
    """Pickles as ``os.system("touch PWNED")``: run if unpickled, it leaves a file behind."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


class Evaluating:
    """Pickles as ``builtins.eval(...)`` creating the same file."""

    def __reduce__(self):
        return (eval, ("open('PWNED', 'w').close()",))


STANDINS = {
    "mmengine.config.config": {"ConfigDict": ConfigDict},
    "mmengine.logging.history_buffer": {"HistoryBuffer": HistoryBuffer},
}


@contextlib.contextmanager
def as_mmengine():
    """Let pickle name the stand-ins as mmengine's classes while saving; nothing of it stays behind."""
    saved = {}
    for module, classes in STANDINS.items():
        for name, cls in classes.items():
            saved[cls] = (cls.__module__, cls.__qualname__)
            cls.__module__, cls.__qualname__ = module, name
    fakes = {}
    for module, classes in STANDINS.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            fakes.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        for name, cls in classes.items():
            setattr(fakes[module], name, cls)
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name in fakes:
            sys.modules.pop(name, None)
        for cls, (module, qualname) in saved.items():
            cls.__module__, cls.__qualname__ = module, qualname


def save(obj, path, legacy: bool):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides, storage offset and bytes."""
    if (a.dtype, a.shape, a.stride(), a.storage_offset()) != (b.dtype, b.shape, b.stride(), b.storage_offset()):
        return False
    raw_a, raw_b = (torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()) for t in (a, b))
    return torch.equal(raw_a, raw_b)


def tricky_state_dict() -> collections.OrderedDict:
    """Dtypes, a transposed view, a slice at an offset, a shared storage, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict(
        w=torch.randn(3, 5, generator=g),
        half=torch.randn(7, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).bfloat16(),
        f64=torch.randn(3, generator=g).double(),
        i64=torch.arange(12).view(3, 4).t(),
        i8=torch.tensor([-3, 0, 5], dtype=torch.int8),
        u16=torch.tensor([1, 65535], dtype=torch.uint16),
        mask=torch.tensor([True, False, True]),
        cplx=torch.randn(2, dtype=torch.complex64, generator=g),
        base=base,
        row=base[2],  # shares base's storage, offset 12
        col=base[:, 1],  # stride 6
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        count=torch.tensor(7, dtype=torch.long),
    )
    sd._metadata = {"": {"version": 1}}  # what nn.Module.state_dict() attaches
    return sd


# ---------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("legacy", [False, True])
def test_tensors_come_out_bit_identical(tmp_path, legacy):
    sd = tricky_state_dict()
    if legacy:
        del sd["u16"]  # the legacy writer has no storage type for uint16
    path = save(sd, tmp_path / "sd.pth", legacy)
    for loaded in (restricted_load(path), load_torch_file(path)):
        got = loaded.obj
        assert list(got) == list(sd) and loaded.container == ("legacy" if legacy else "zip")
        for k, v in sd.items():
            assert same_bits(got[k], v), k
        assert got["row"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
        assert got._metadata == {"": {"version": 1}} and not loaded.skipped and not loaded.note()
    assert restricted_load(path).reader == "restricted" and load_torch_file(path).reader == "weights_only"


def test_parameters_and_module_state_dicts(tmp_path):
    m = create_model("psp_tiny").eval()
    path = save({"params": list(m.parameters()), "sd": m.state_dict()}, tmp_path / "p.pth", legacy=False)
    got = restricted_load(path).obj
    assert all(type(t) is torch.Tensor for t in got["params"])  # plain tensors, requires_grad ignored
    assert all(torch.equal(a, b.detach()) for a, b in zip(got["params"], m.parameters(), strict=True))
    assert all(torch.equal(got["sd"][k], v) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------------------------- placeholders


def test_other_classes_become_inert_placeholders_and_nothing_is_imported(tmp_path):
    ns = argparse.Namespace(lr=0.1, weights=torch.ones(2))
    dd = collections.defaultdict(list, {"a": [torch.zeros(1)]})
    obj = {"w": torch.arange(3.0), "args": ns, "dd": dd, "np": np.arange(5), "cfg_dtype": np.dtype("float32")}
    path = save(obj, tmp_path / "objs.pth", legacy=False)
    loaded = load_torch_file(path)
    assert loaded.reader == "restricted" and torch.equal(loaded.obj["w"], torch.arange(3.0))
    assert isinstance(loaded.obj["args"], Skipped) and loaded.obj["args"].skd_name == "argparse.Namespace"
    assert isinstance(loaded.obj["dd"], Skipped) and loaded.obj["dd"].skd_name == "collections.defaultdict"
    assert {"argparse.Namespace", "collections.defaultdict", "numpy.dtype"} <= set(loaded.skipped)
    assert any(n.endswith("multiarray._reconstruct") for n in loaded.skipped)
    assert loaded.dropped_tensors == 2  # the Namespace's and the defaultdict's
    assert "2 tensors inside them dropped" in loaded.note() and "not imported, not executed" in loaded.note()


def test_every_pickle_opcode_that_builds_objects_is_absorbed():
    """NEWOBJ, NEWOBJ_EX, INST, OBJ, REDUCE, BUILD, SETITEMS and APPENDS on classes of a module that
    does not exist: nothing is imported, each object is a placeholder."""
    mod = "skd_never_imported.sub"
    streams = [
        # protocol 0: INST (with args), then BUILD
        f"(i{mod}\nThing\n(dp0\nVa\np1\nI1\nsb.".encode(),
        # protocol 1: OBJ with MARK, class as GLOBAL
        f"(c{mod}\nThing\nK\x01o.".encode(),
        # protocol 2: NEWOBJ + BUILD + SETITEMS + APPENDS onto the object
        b"\x80\x02c" + mod.encode() + b"\nThing\n)\x81}X\x01\x00\x00\x00aK\x01sb(X\x01\x00\x00\x00kK\x02u(K\x03K\x04e.",
        # protocol 4: STACK_GLOBAL + NEWOBJ_EX with keyword arguments, then a call of the object itself
        b"\x80\x04\x8c" + bytes([len(mod)]) + mod.encode() + b"\x8c\x05Thing\x93)}\x8c\x01x\x88s\x92)R.",
    ]
    for data in streams:
        assert pickletools_ok(data)
        path = io.BytesIO(data)
        loaded = _restricted_bytes(path)
        assert isinstance(loaded, Skipped) and loaded.skd_name == f"{mod}.Thing"
    assert "skd_never_imported" not in sys.modules


def pickletools_ok(data: bytes) -> bool:
    import pickletools

    pickletools.dis(data, out=io.StringIO())  # the hand-written streams are well-formed
    return True


def _restricted_bytes(f: io.BytesIO):
    from collections import Counter

    from pipeline.checkpoint_io import _unpickle

    return _unpickle(f, None, Counter()).obj


# ---------------------------------------------------------------------------------------------- published layouts


def mmseg_checkpoint(sd: dict) -> dict:
    """mmsegmentation's layout: meta with mmengine objects and numpy arrays, the weights under state_dict."""
    return {
        "meta": {
            "mmengine_version": "0.10.3",
            "cfg": ConfigDict(model=ConfigDict(type="EncoderDecoder"), crop_size=(512, 1024)),
            "dataset_meta": {"classes": ("road", "sidewalk"), "palette": [[128, 64, 128], [244, 35, 232]]},
            "seed": np.int64(0),
            "iter": 80000,
        },
        "state_dict": sd,
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"iter": 80000}},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 1e-4}]},
    }


@pytest.mark.parametrize("legacy", [False, True])
def test_mmseg_layout_reads_without_mmengine(tmp_path, legacy):
    src = create_model("psp_tiny").eval()
    sd = {f"decode_head.{k}": v for k, v in src.state_dict().items()}
    with as_mmengine():
        path = save(mmseg_checkpoint(sd), tmp_path / "pspnet_r101-d8_512x1024_80k_cityscapes.pth", legacy)
    assert not any(m.startswith("mmengine") for m in sys.modules)
    got, meta, source = read_state_dict(path)
    assert source == "torch" and list(got) == list(sd)
    assert all(same_bits(got[k], v) for k, v in sd.items())
    note = meta["skipped"]
    assert note.startswith("skipped ") and "mmengine.config.config.ConfigDict" in note
    assert "mmengine.logging.history_buffer.HistoryBuffer" in note and "multiarray.scalar" in note
    assert not any(m.startswith("mmengine") for m in sys.modules)
    # and into a model: the state dict under 'state_dict', prefix-free keys
    with as_mmengine():
        save(mmseg_checkpoint(src.state_dict()), path, legacy)
    dst = create_model("psp_tiny")
    report = load_weights(dst, path)
    assert report.ok and "ConfigDict" in report.summary()
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values(), strict=True))


@pytest.mark.parametrize("legacy", [False, True])
def test_cirkd_layout_raw_state_dict_with_module_prefix(tmp_path, legacy):
    sd = {
        "pretrained.conv1.weight": torch.randn(64, 3, 3, 3),
        "pretrained.bn1.running_var": torch.rand(64),
        "pretrained.bn1.num_batches_tracked": torch.tensor(5),
        "head.aspp.b0.0.weight": torch.randn(8, 16, 1, 1),
        "auxlayer.block.4.bias": torch.randn(19),
    }
    path = save({"module." + k: v for k, v in sd.items()}, tmp_path / "deeplabv3_resnet101_citys.pth", legacy)
    got, meta, _ = read_state_dict(path)
    assert list(got) == list(sd) and all(same_bits(got[k], v) for k, v in sd.items())
    assert "skipped" not in meta


# ---------------------------------------------------------------------------------------------- hostile pickles


def _hostile_files(tmp_path):
    yield save({"state_dict": {"w": torch.ones(1)}, "x": Hostile()}, tmp_path / "zip.pth", legacy=False)
    yield save({"x": Hostile()}, tmp_path / "legacy.pth", legacy=True)
    for proto in (0, 2, 5):
        raw = tmp_path / f"raw{proto}.pkl"
        raw.write_bytes(pickle.dumps(Hostile(), protocol=proto))
        yield raw


def test_hostile_pickles_are_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = list(_hostile_files(tmp_path))
    for path in files:
        for read in (load_torch_file, read_state_dict):
            with pytest.raises(WeightsError) as info:
                read(path)
            msg = str(info.value)
            assert msg.startswith(f"checkpoint {path} is refused: its pickle names posix.system"), msg
            assert "NOT executed" in msg and "weights_only" not in msg and "\n" not in msg
    evil = save({"x": Evaluating()}, tmp_path / "eval.pth", legacy=False)
    with pytest.raises(WeightsError, match=r"names builtins\.eval, which can run code"):
        read_state_dict(evil)
    assert not (tmp_path / "PWNED").exists()


def test_hostility_rule():
    assert is_hostile("posix", "system") and is_hostile("builtins", "eval") and is_hostile("subprocess", "Popen")
    assert is_hostile("torch", "load") and is_hostile("os.path", "join") and is_hostile("importlib", "import_module")
    assert not is_hostile("builtins", "set") and not is_hostile("collections", "defaultdict")
    assert not is_hostile("mmengine.config.config", "ConfigDict") and not is_hostile("numpy", "dtype")
    assert not is_hostile("types", "SimpleNamespace") and not is_hostile("osm", "x")


# ---------------------------------------------------------------------------------------------- not checkpoints


def _bad_files(tmp_path):
    sd = {"w": torch.randn(64, 64)}
    good_zip = save(sd, tmp_path / "good.pth", legacy=False)
    good_legacy = save(sd, tmp_path / "good_legacy.pth", legacy=True)
    cases = {
        "empty.pth": (b"", "empty file (0 bytes)"),
        "notes.pth": (b"these are my notes\nnot weights\n", "not a torch or safetensors checkpoint: looks like text"),
        "cut.pth": (good_zip.read_bytes()[:3000], "truncated or damaged torch archive"),
        "cut_legacy.pth": (good_legacy.read_bytes()[:3000], "truncated legacy torch file"),
        "noise.pth": (bytes(range(256)) * 4, "unknown binary data (starts with 00 01 02"),
        "gz.pth": (gzip.compress(good_zip.read_bytes()), "gzip-compressed data"),
        "plain.pkl": (pickle.dumps({"w": [1.0, 2.0]}), "a plain Python pickle, not a torch checkpoint"),
    }
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        yield tmp_path / name, fragment
    other_zip = tmp_path / "weights.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    yield other_zip, "a zip archive without data.pkl: not a torch checkpoint"
    crc = bytearray(good_zip.read_bytes())
    offset = zipfile.ZipFile(good_zip).getinfo("good/data/0").header_offset
    name_len, extra_len = (int.from_bytes(crc[offset + i : offset + i + 2], "little") for i in (26, 28))
    crc[offset + 30 + name_len + extra_len + 8] ^= 0x40  # one flipped bit in the first tensor's bytes
    (tmp_path / "crc.pth").write_bytes(bytes(crc))
    yield tmp_path / "crc.pth", "damaged torch archive"
    script = tmp_path / "script.pt"  # the members torch.jit.save writes
    with zipfile.ZipFile(script, "w") as zf:
        for name in ("data.pkl", "constants.pkl", "code/__torch__.py", "version"):
            zf.writestr(f"script/{name}", "")
    yield script, "a TorchScript archive (torch.jit.save), which holds code"


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    for path, fragment in _bad_files(tmp_path):
        with pytest.raises(WeightsError) as info:
            read_state_dict(path)
        msg = str(info.value)
        assert msg.startswith(f"cannot read checkpoint {path}: ") and fragment in msg, msg
        assert "\n" not in msg and "weights_only" not in msg and "Traceback" not in msg


def test_sniff_kinds(tmp_path):
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "b").write_text("hello")
    save({"w": torch.ones(1)}, tmp_path / "c", legacy=True)
    (tmp_path / "d").write_bytes(pickle.dumps([1], protocol=0))
    assert [sniff(tmp_path / n) for n in "abcd"] == ["empty", "text", "torch-legacy", "pickle"]


def test_a_pickled_whole_model_is_named(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    assert "holds a pickled torch.nn.modules.linear.Linear object" in str(info.value)
    assert "save model.state_dict()" in str(info.value)


# ---------------------------------------------------------------------------------------------- forged streams


class _StorageRef:
    """Pickled as a legacy persistent id with the numel a forger chooses."""

    def __init__(self, numel: int):
        self.numel = numel


def _legacy_stream(obj, storages: dict[str, bytes]) -> bytes:
    """A legacy torch stream written by hand: header pickles, the main pickle, keys, raw storages."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _StorageRef):
                return ("storage", torch.FloatStorage, "0", "cpu", o.numel, None)
            return None

    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    pickle.dump(sorted(storages), f, protocol=2)
    for data in storages.values():
        f.write((len(data) // 4).to_bytes(8, "little") + data)
    return f.getvalue()


class _Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def test_forged_sizes_are_refused_before_allocating(tmp_path):
    four = np.arange(4, dtype=np.float32).tobytes()
    good = tmp_path / "good.pth"
    good.write_bytes(_legacy_stream({"w": _Rebuild(_StorageRef(4), 0, (2, 2), (2, 1))}, {"0": four}))
    assert torch.equal(restricted_load(good).obj["w"], torch.arange(4.0).view(2, 2))
    forged = {
        "huge.pth": ({"w": _Rebuild(_StorageRef(1 << 40), 0, (4,), (1,))}, "more than the file holds"),
        "overrun.pth": ({"w": _Rebuild(_StorageRef(4), 2, (2, 2), (2, 1))}, "overruns its storage"),
        "negative.pth": ({"w": _Rebuild(_StorageRef(4), 0, (2, -2), (2, 1))}, "not a tuple of non-negative"),
    }
    for name, (obj, fragment) in forged.items():
        (tmp_path / name).write_bytes(_legacy_stream(obj, {"0": four}))
        with pytest.raises(WeightsError) as info:
            restricted_load(tmp_path / name)
        assert "damaged legacy torch file" in str(info.value) and fragment in str(info.value)
        with pytest.raises(WeightsError, match="damaged legacy torch file"):  # torch.load's own refusal
            read_state_dict(tmp_path / name)
