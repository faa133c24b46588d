"""Reading torch checkpoint files without running anything they name.

A checkpoint is untrusted: its pickle may name any Python callable (``posix.system``,
``builtins.eval``) and ask for it to be called. :func:`load_torch_file` reads it in two steps:

1. ``torch.load(weights_only=True)``, torch's own restricted unpickler, which accepts tensors and
   plain containers only;
2. when that refuses because the pickle names other classes (mmsegmentation files carry
   ``mmengine`` ``ConfigDict`` / ``HistoryBuffer`` objects and numpy arrays in their ``meta``), a
   restricted reader of our own (:class:`_Unpickler`). Its ``find_class`` resolves only the names
   needed to rebuild tensors and plain containers (:data:`_ALLOWED`); every other name becomes an
   inert placeholder type (a subclass of :class:`Skipped`) that records the name and absorbs calls,
   ``BUILD``/``__setstate__``, items and appends **without importing or executing anything**. Storages
   are read from the file by this module (``torch.frombuffer``-style views of bytes it read), never
   through torch's unpickling machinery. Both serialisations are read: the zip archive
   (``<dir>/data.pkl`` + ``<dir>/data/<key>``, torch >= 1.6) and the legacy stream of torch < 1.6
   (magic number, protocol, sys-info pickles, the main pickle, the storage keys, then each storage
   as an 8-byte element count and its little-endian bytes).

Tensors reachable through plain containers come out exactly (dtype, shape, stride, storage offset,
shared storages); tensors held inside skipped objects are dropped and counted. A pickle that names
something able to run code or commands (:func:`is_hostile`) is refused outright, saying what it
names and that it was not executed. Files that are not torch checkpoints (empty, text, a zip without
``data.pkl``, a truncated archive, a plain pickle) are named for what they are.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import sys
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from cache_tools.errors import WeightsError

__all__ = ["Loaded", "Skipped", "existing_file", "is_hostile", "load_torch_file", "restricted_load", "sniff"]


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or WeightsError in one line when nothing or a folder is there."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"checkpoint {p} does not exist" if not p.exists() else f"checkpoint {p} is not a file")
    return p


#: ``torch.save``'s legacy stream starts with this number, pickled with protocol 2.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}

#: Modules whose callables run code or commands, import, or touch files and sockets: a pickle naming
#: one of them is hostile (or broken) and refused whole, even though nothing it names is ever called.
HOSTILE_MODULES = frozenset((
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "importlib", "runpy", "shutil", "socket",
    "pty", "pickle", "_pickle", "cPickle", "marshal", "types", "ctypes", "code", "codeop", "webbrowser",
    "multiprocessing", "operator", "signal", "pdb", "bdb", "timeit", "tempfile", "io", "_io",
    "commands", "platform", "asyncio", "threading", "_thread", "pickletools", "zipimport", "pkgutil", "site",
    "inspect", "dill", "cloudpickle", "joblib", "urllib", "http", "ftplib", "smtplib", "telnetlib", "ssl", "glob",
    "builtins", "__builtin__", "torch.hub", "torch.jit", "torch.package", "torch.serialization",
    "torch.utils.cpp_extension",
))  # fmt: skip
#: Builtins that only build data; naming them is not hostile (those in _ALLOWED are even rebuilt).
#: ``getattr`` is here because Python 3.12 pickles enum members as ``getattr(EnumClass, name)``; a
#: pickle can do harm with it only through a module it names, and those are judged by their own names.
_HARMLESS_BUILTINS = frozenset((
    "object", "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex",
    "bool", "slice", "range", "getattr",
))  # fmt: skip
#: A file that reads as text is also tried as a protocol-0 pickle up to this size.
_TEXT_PICKLE_LIMIT = 1 << 20


def is_hostile(module: str, name: str) -> bool:
    """Whether naming ``module.name`` in a checkpoint marks it as hostile (code, commands, files)."""
    if module in ("builtins", "__builtin__"):
        return name not in _HARMLESS_BUILTINS
    if (module, name) in (("torch", "load"), ("types", "SimpleNamespace")):
        return name == "load"
    return any(module == m or module.startswith(m + ".") for m in HOSTILE_MODULES)


# ----------------------------------------------------------------------------------------------------
# placeholders


class _SkippedMeta(type):
    """Calling a placeholder type makes an inert instance: no ``__init__``, nothing imported."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Skipped:
        return cls.__new__(cls, *args, **kwargs)


class Skipped(metaclass=_SkippedMeta):
    """An object of a class the checkpoint names but that was neither imported nor called.

    ``skd_name`` is the dotted name from the pickle; ``args``, ``state`` and ``items`` keep what the
    pickle passed to it (so tensors inside can be counted), and nothing of it is ever executed.
    """

    skd_name = "?"
    _log: Counter = Counter()

    def __new__(cls, *args: Any, **kwargs: Any) -> Skipped:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = (args, kwargs), None, []
        cls._log[cls.skd_name] += 1
        return obj

    def __call__(self, *args: Any, **kwargs: Any) -> Skipped:
        # a placeholder used as a callable (a method of a skipped object): another placeholder
        return type(self).__new__(type(self), self, *args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values if isinstance(values, (list, tuple)) else [values])

    def __repr__(self) -> str:
        return f"<skipped {self.skd_name}>"


def _placeholder_type(full_name: str, log: Counter) -> type[Skipped]:
    short = full_name.rsplit(".", 1)[-1]
    return _SkippedMeta(f"Skipped_{short}", (Skipped,), {"skd_name": full_name, "_log": log})


# ----------------------------------------------------------------------------------------------------
# storages and tensor rebuilding


@dataclass
class _Storage:
    """Bytes of one storage: a 1-d uint8 tensor, filled now (zip) or after the pickle (legacy)."""

    buf: Tensor
    dtype: torch.dtype


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"tensor {what} {values!r} is not a tuple of non-negative integers")
    return tuple(values)


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> Tensor:
    """The tensor ``torch._utils._rebuild_tensor*`` would build, as a view of the storage's bytes."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"tensor dtype {dtype!r} is not a torch dtype")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    (offset,) = _check_ints((offset,), "storage offset")
    esize = torch.empty((), dtype=dtype).element_size()
    if len(size) != len(stride) or storage.buf.numel() % esize:
        raise pickle.UnpicklingError(f"tensor of size {size} / stride {stride} does not fit its storage")
    flat = storage.buf.view(dtype)
    extent = 0 if 0 in size else offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if extent > flat.numel():
        raise pickle.UnpicklingError(f"tensor of size {size} at offset {offset} overruns its storage")
    return flat.as_strided(size, stride, flat.storage_offset() + offset)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> Tensor:
    # v1 (storage, offset, size, stride) and v2 (+ requires_grad, backward_hooks[, metadata])
    return _view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_) -> Tensor:
    return _view(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_ignored) -> Any:
    # a Parameter comes back as its data: state dicts hold plain tensors, requires_grad is ignored
    return data


def _rebuild_from_type(func, new_type, args, state) -> Any:
    # a tensor subclass or a tensor with attributes: rebuilt as the plain tensor, attributes ignored
    if (func in _REBUILDERS or isinstance(func, _SkippedMeta)) and isinstance(args, tuple):
        return func(*args)
    raise pickle.UnpicklingError(f"_rebuild_from_type_v2 of {func!r}")


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _bytes_from_latin1(text: Any, encoding: Any = "latin1") -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1"); nothing else is accepted
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is accepted only for latin-1 bytes")
    return text.encode("latin1")


def _safe_builtin(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        if not all(isinstance(a, (list, tuple, set, frozenset, str, bytes, int, float)) for a in args):
            raise pickle.UnpicklingError(f"{kind.__name__} of unsupported contents")
        if kind is bytearray and any(isinstance(a, int) for a in args):  # bytearray(10**12) would allocate
            raise pickle.UnpicklingError("bytearray of a length is not accepted")
        return kind(*args)

    return build


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("_codecs", "encode"): _bytes_from_latin1,
    ("builtins", "set"): _safe_builtin(set),
    ("builtins", "frozenset"): _safe_builtin(frozenset),
    ("builtins", "bytearray"): _safe_builtin(bytearray),
    ("builtins", "complex"): _safe_builtin(complex),
}


@dataclass(frozen=True)
class _StorageType:
    """What ``find_class`` returns for ``torch.FloatStorage`` and friends: only a dtype."""

    dtype: torch.dtype


def _resolve_torch(module: str, name: str) -> Any:
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    # vars(), not getattr(): torch's module __getattr__ would import submodules for unknown names
    if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
        return vars(torch)[name]
    if module == "torch" and name == "Size":
        return _safe_builtin(torch.Size)
    return None


# ----------------------------------------------------------------------------------------------------
# the restricted unpickler


class _Unpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED` names; any other name becomes a :class:`Skipped` type."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple], _Storage] | None, log: Counter):
        super().__init__(file)
        self._load_storage = load_storage
        self.log = log
        self.named: set[str] = set()
        self._types: dict[str, type[Skipped]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = str(module), str(name)
        # protocol 2 spells Python 2 names (__builtin__.set, copy_reg): map them as pickle itself does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _ALLOWED.get((module, name))
        if found is None and module.startswith("torch"):
            found = _resolve_torch(module, name)
        if found is not None:
            return found
        full = f"{module}.{name}"
        self.named.add(full)
        if full not in self._types:
            self._types[full] = _placeholder_type(full, self.log)
        return self._types[full]

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None or not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("unexpected persistent id: not a torch storage")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) > 1:  # a pickled nn.Module class (legacy): its placeholder
            return pid[1]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}: not a torch storage")
        return self._load_storage(pid[1:])


def _storage_spec(data: tuple) -> tuple[torch.dtype, str, int, tuple | None]:
    """``(storage_type, key, location, numel[, view_metadata])`` -> (dtype, key, numel, view)."""
    if len(data) not in (4, 5) or not isinstance(data[0], _StorageType):
        raise pickle.UnpicklingError(f"malformed storage reference {data!r}")
    key, numel = data[1], data[3]
    if not isinstance(key, (str, int)) or not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"malformed storage reference {data!r}")
    view = data[4] if len(data) == 5 else None
    return data[0].dtype, str(key), numel, view


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class _Result:
    obj: Any
    unpickler: _Unpickler


def _unpickle(file: BinaryIO, load_storage, log: Counter) -> _Result:
    u = _Unpickler(file, load_storage, log)
    try:
        return _Result(u.load(), u)
    except RecursionError:
        raise _ReadError(pickle.UnpicklingError("the pickle nests too deeply"), u.named) from None
    except Exception as e:  # noqa: BLE001 - nothing runs here but this module's code: any error is bad data
        raise _ReadError(e, u.named) from None


class _ReadError(Exception):
    """A failed restricted read, with the names the pickle used before it failed."""

    def __init__(self, cause: BaseException, named: set[str]):
        super().__init__(str(cause))
        self.cause, self.named = cause, named


# ----------------------------------------------------------------------------------------------------
# the two containers


def _zip_prefix(zf: zipfile.ZipFile) -> str | None:
    names = zf.namelist()
    if names and "/" in names[0] and names[0].split("/", 1)[0] + "/data.pkl" in names:
        return names[0].split("/", 1)[0]
    return next((n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)


def _read_member(zf: zipfile.ZipFile, name: str, nbytes: int) -> Tensor:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise pickle.UnpicklingError(f"the archive has no {name}") from None
    if info.file_size != nbytes:
        raise pickle.UnpicklingError(f"{name} holds {info.file_size} bytes, the tensor needs {nbytes}")
    if nbytes > info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else 1032):
        # bounded work: deflate expands at most ~1032x, and stored bytes not at all
        raise pickle.UnpicklingError(f"{name} claims {nbytes} bytes, more than its compressed size allows")
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with zf.open(info) as f:
        got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
    if got != nbytes:
        raise pickle.UnpicklingError(f"{name} is truncated")
    return buf


def _byteswap(buf: Tensor, esize: int) -> Tensor:
    return buf if esize == 1 else buf.view(-1, esize).flip(1).reshape(-1).contiguous()


def _load_zip(zf: zipfile.ZipFile, prefix: str, log: Counter) -> _Result:
    storages: dict[str, _Storage] = {}
    order = zf.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in zf.namelist() else "little"
    if order not in ("little", "big"):
        raise _ReadError(pickle.UnpicklingError(f"unknown byte order {order[:20]!r}"), set())

    def load_storage(data: tuple) -> _Storage:
        dtype, key, numel, _ = _storage_spec(data)
        if key not in storages:
            buf = _read_member(zf, f"{prefix}/data/{key}", numel * _esize(dtype))
            if order != sys.byteorder:
                buf = _byteswap(buf, _esize(dtype))
            storages[key] = _Storage(buf, dtype)
        return storages[key]

    return _unpickle(io.BytesIO(zf.read(f"{prefix}/data.pkl")), load_storage, log)


def _load_legacy(f: BinaryIO, log: Counter, file_size: int) -> _Result:
    header = [_unpickle(f, None, log).obj for _ in range(3)]
    if header[0] != LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
        raise _ReadError(pickle.UnpicklingError("not a legacy torch stream (magic number or protocol differ)"), set())
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def load_storage(data: tuple) -> _Storage:
        dtype, key, numel, view = _storage_spec(data)
        if key not in roots:
            if numel * _esize(dtype) > file_size:  # bounded work: never allocate what the file cannot hold
                raise pickle.UnpicklingError(f"storage {key} claims {numel} elements, more than the file holds")
            roots[key] = _Storage(torch.empty(numel * _esize(dtype), dtype=torch.uint8), dtype)
        if view is None:
            return roots[key]
        if not isinstance(view, tuple) or len(view) != 3:
            raise pickle.UnpicklingError(f"malformed storage view {view!r}")
        view_key, (offset, view_numel) = view[0], _check_ints(view[1:], "storage view")  # old torch: a slice
        esize = _esize(dtype)
        views.setdefault(str(view_key), _Storage(roots[key].buf[offset * esize : (offset + view_numel) * esize], dtype))
        return views[str(view_key)]

    result = _unpickle(f, load_storage, log)
    keys = _unpickle(f, None, log).obj
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
        raise _ReadError(pickle.UnpicklingError("the storage list does not match the tensors"), result.unpickler.named)
    for key in map(str, keys):
        _fill_legacy_storage(f, roots[key], key)
    return result


def _fill_legacy_storage(f: BinaryIO, storage: _Storage, key: str) -> None:
    esize = _esize(storage.dtype)
    head = f.read(8)
    if len(head) < 8:
        raise EOFError(f"storage {key} is cut off")
    (count,) = struct.unpack("<q", head)
    if count * esize != storage.buf.numel():
        raise pickle.UnpicklingError(f"storage {key} holds {count} elements, its tensors need {storage.buf.numel()}")
    got = f.readinto(memoryview(storage.buf.numpy())) if count else 0
    if got != storage.buf.numel():
        raise EOFError(f"storage {key} is cut off")
    if sys.byteorder != "little":  # the legacy writer always stores little-endian bytes
        storage.buf.copy_(_byteswap(storage.buf, esize))


# ----------------------------------------------------------------------------------------------------
# the public readers


@dataclass(frozen=True)
class Loaded:
    """A torch checkpoint's content and how it was read.

    Attributes:
        obj: the unpickled object; objects of classes other than tensors and plain containers are
            :class:`Skipped` placeholders.
        reader: "weights_only" (``torch.load(weights_only=True)``) or "restricted" (this module's).
        container: "zip" or "legacy".
        skipped: class or function name -> how many objects of it were skipped.
        dropped_tensors: tensors found inside skipped objects (not in ``obj``'s plain containers).
    """

    obj: Any
    reader: str
    container: str
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_tensors: int = 0

    def note(self) -> str:
        """One phrase on what was skipped ("" when nothing was), e.g. ``skipped 3 objects of classes ...``."""
        if not self.skipped:
            return ""
        n = sum(self.skipped.values())
        names = sorted(self.skipped)
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        s = f"skipped {n} object{'s' if n != 1 else ''} of class{'es' if len(names) != 1 else ''} {shown}"
        if self.dropped_tensors:
            s += f"; {self.dropped_tensors} tensor{'s' if self.dropped_tensors != 1 else ''} inside them dropped"
        return s + " (not imported, not executed)"


def _count_dropped(obj: Any) -> int:
    """Tensors held only inside :class:`Skipped` objects (iterative: pickles may nest deeply or cycle)."""
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    dropped = 0
    while stack:
        item, inside = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Tensor):
            dropped += inside
        elif isinstance(item, Skipped):
            stack.extend((x, True) for x in (item.args, item.state, item.items))
        elif isinstance(item, dict):
            stack.extend((x, inside) for x in item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((x, inside) for x in item)
    return dropped


def sniff(path: str | os.PathLike) -> str:
    """What a file looks like from its first bytes.

    One of "empty", "zip", "torch-legacy", "tar", "pickle", "safetensors", "gzip", "hdf5", "text",
    "binary". A text file is tried as a protocol-0 pickle (safely, with the restricted reader).
    """
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(512)
    size = p.stat().st_size
    if not head:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head.startswith(_LEGACY_HEAD):
        return "torch-legacy"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    magic = {b"\x1f\x8b": "gzip", b"\x89H": "hdf5"}.get(head[:2])
    if magic:
        return magic
    if _looks_like_text(head):
        return "pickle" if size <= _TEXT_PICKLE_LIMIT and _is_text_pickle(p) else "text"
    return "binary"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut at the end of the sample
    return True


def _is_text_pickle(p: Path) -> bool:
    data = p.read_bytes()
    if not data.rstrip().endswith(b"."):
        return False
    try:
        _unpickle(io.BytesIO(data), None, Counter())
    except _ReadError as e:  # a broken pickle that named something is still judged by what it names
        return bool(e.named)
    return True


def _text_start(p: Path) -> str:
    with open(p, "rb") as f:
        line = f.read(200).decode("utf-8", "replace").strip().splitlines()
    first = line[0] if line else ""
    return first[:40] + ("..." if len(first) > 40 else "")


def _fail(p: Path, what: str) -> WeightsError:
    return WeightsError(f"cannot read checkpoint {p}: {what}")


def _hostile_error(p: Path, named: set[str]) -> WeightsError | None:
    bad = sorted(n for n in named if is_hostile(*n.rsplit(".", 1)))
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return WeightsError(
        f"checkpoint {p} is refused: its pickle names {shown}, which can run code or commands; it was NOT "
        "executed (skd never runs anything a checkpoint names) — use a checkpoint from a source you trust"
    )


def _open_zip(p: Path) -> tuple[zipfile.ZipFile, str]:
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError):
        with open(p, "rb") as f:
            first = f.read(64)
        torchy = b"/data.pkl" in first[30:64] or first[30:64].startswith(b"data.pkl")
        kind = "truncated or damaged torch archive" if torchy else "truncated or damaged zip archive"
        raise _fail(
            p, f"{kind}: its zip directory is missing or unreadable (was a download or copy cut off?)"
        ) from None
    prefix = _zip_prefix(zf)
    if prefix is None:
        zf.close()
        raise _fail(p, "a zip archive without data.pkl: not a torch checkpoint")
    names = set(zf.namelist())
    if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
        zf.close()
        raise _fail(
            p,
            "a TorchScript archive (torch.jit.save), which holds code; give a state dict saved with "
            "torch.save(model.state_dict()) or a .safetensors file",
        )
    return zf, prefix


def _check_zip(p: Path) -> None:
    """Refuse an archive that is not a torch checkpoint or whose bytes fail their CRC-32 checks.

    torch's reader does not check the checksums, so a damaged storage would load as wrong weights.
    """
    zf, _ = _open_zip(p)
    with zf:
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise _fail(p, f"damaged torch archive ({' '.join(str(e).split())[:160]})") from None
    if bad is not None:
        raise _fail(
            p, f"damaged torch archive: {bad} does not match its CRC-32 checksum (altered or damaged in transfer)"
        )


def _not_a_checkpoint(p: Path, kind: str) -> WeightsError:
    what = {
        "empty": "empty file (0 bytes)",
        "tar": "a tar archive (the torch < 0.4 format?), which skd does not read",
        "gzip": "gzip-compressed data: decompress it first",
        "hdf5": "an HDF5 file (Keras?), not a torch or safetensors checkpoint",
        "text": f"not a torch or safetensors checkpoint: looks like text ({_text_start(p)!r})",
    }.get(kind)
    if what is None:
        with open(p, "rb") as f:
            start = f.read(8).hex(" ")
        what = f"not a torch or safetensors checkpoint: unknown binary data (starts with {start})"
    return _fail(p, what)


def restricted_load(path: str | os.PathLike, kind: str | None = None) -> Loaded:
    """Read a torch checkpoint with the restricted reader only (see the module docstring).

    Raises:
        WeightsError: not a torch checkpoint, a damaged one, or one naming something hostile.
    """
    p = Path(path)
    kind = kind or sniff(p)
    log: Counter = Counter()
    try:
        if kind == "zip":
            zf, prefix = _open_zip(p)
            with zf:
                result = _load_zip(zf, prefix, log)
            container = "zip"
        elif kind == "torch-legacy":
            with open(p, "rb") as f:
                result = _load_legacy(f, log, p.stat().st_size)
            container = "legacy"
        elif kind == "pickle":
            with open(p, "rb") as f:
                result = _unpickle(f, None, log)
            raise _hostile_error(p, result.unpickler.named) or _fail(
                p, "a plain Python pickle, not a torch checkpoint (torch.save writes a zip archive)"
            )
        else:
            raise _not_a_checkpoint(p, kind)
    except _ReadError as e:
        raise _hostile_error(p, e.named) or _damaged(p, kind, e.cause) from None
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as e:
        raise _damaged(p, kind, e) from None
    hostile = _hostile_error(p, result.unpickler.named)
    if hostile is not None:
        raise hostile
    return Loaded(result.obj, "restricted", container, dict(log), _count_dropped(result.obj))


def _damaged(p: Path, kind: str, e: BaseException) -> WeightsError:
    what = " ".join(str(e).split()) or type(e).__name__
    if kind == "pickle":
        return _fail(p, f"a plain Python pickle, not a torch checkpoint, and a broken one ({what[:120]})")
    container = {"zip": "torch archive", "torch-legacy": "legacy torch file"}.get(kind, "file")
    cut = isinstance(e, EOFError) or any(w in what.lower() for w in ("truncated", "cut off", "ran out of input", "eof"))
    return _fail(p, f"{'truncated' if cut else 'damaged'} {container} ({what[:160]})")


def load_torch_file(path: str | os.PathLike) -> Loaded:
    """Read a torch checkpoint: ``torch.load(weights_only=True)``, else the restricted reader.

    The restricted reader is used only when torch's refuses the pickle (classes it does not allow);
    files that are not torch checkpoints are refused before either runs.

    Raises:
        WeightsError: one line saying what the file is (not), or what a refused pickle names.
    """
    p = Path(path)
    kind = sniff(p)
    if kind == "zip":
        _check_zip(p)  # the archive's own problems are named before torch sees it
    elif kind != "torch-legacy":
        return restricted_load(p, kind)  # raises: only zip and legacy files are torch checkpoints
    container = "zip" if kind == "zip" else "legacy"
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return restricted_load(p, kind)  # names classes torch does not allow: read without them
    except Exception as e:  # noqa: BLE001 - torch's errors for damaged files have no common type
        raise _damaged(p, kind, e) from None
    return Loaded(obj, "weights_only", container)
