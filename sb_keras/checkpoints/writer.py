"""Writes ``torch.save`` files without torch (legacy or zip serialization)."""

import collections
import contextlib
import os
import struct
import tempfile
import zipfile

import numpy as np

from sb_keras.checkpoints.reader import _LEGACY_MAGIC
from sb_keras.checkpoints.reader import _LEGACY_PROTOCOL
from sb_keras.checkpoints.unpickler import _DTYPE_STORAGES


def write_checkpoint(obj, path, format="legacy"):
    """Writes nested dicts/lists of arrays and scalars as a ``torch.save`` file.

    Args:
        obj: dicts (``OrderedDict`` kept as such), lists, tuples, str, int,
            float, bool, None and NumPy arrays (saved as CPU tensors; one
            array object used twice becomes one shared storage).
        path: the output file.
        format: ``"legacy"`` or ``"zip"``.
    """
    if format not in ("legacy", "zip"):
        raise ValueError(
            f"`format` must be 'legacy' or 'zip'. Received: format={format!r}"
        )
    writer = _TorchPickler(zip_format=format == "zip")
    data = writer.dump(obj)
    with _atomic_file(path) as f:
        if format == "zip":
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr("archive/data.pkl", data)
                archive.writestr("archive/byteorder", "little")
                for key, array in writer.storages:
                    archive.writestr(f"archive/data/{key}", _le_bytes(array))
                archive.writestr("archive/version", "3\n")
            return
        f.write(_TorchPickler.dumps_plain(_LEGACY_MAGIC))
        f.write(_TorchPickler.dumps_plain(_LEGACY_PROTOCOL))
        f.write(
            _TorchPickler.dumps_plain(
                {
                    "protocol_version": _LEGACY_PROTOCOL,
                    "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4},
                }
            )
        )
        f.write(data)
        f.write(_TorchPickler.dumps_plain([key for key, _ in writer.storages]))
        for _, array in writer.storages:
            f.write(struct.pack("<q", array.size))
            f.write(_le_bytes(array))


@contextlib.contextmanager
def _atomic_file(path):
    """A binary file that replaces ``path`` only once completely written.

    The data goes to a temporary file in the same folder, is flushed and
    fsynced, and is renamed over ``path``: a crash leaves the previous file
    (or none), never a partial one.
    """
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".part", dir=os.path.dirname(path)
    )
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _le_bytes(array):
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


class _TorchPickler:
    """Emits protocol-2 pickle opcodes for the few types a state dict holds.

    ``pickle.Pickler`` cannot name ``torch._utils._rebuild_tensor_v2``
    without importing torch, so the opcodes are written directly.
    """

    def __init__(self, zip_format):
        self.zip_format = zip_format
        self.storages = []  # [(key, array)] in first-use order
        self._keys = {}

    @classmethod
    def dumps_plain(cls, obj):
        return cls(zip_format=False).dump(obj)

    def dump(self, obj):
        self.out = bytearray(b"\x80\x02")
        self._save(obj)
        self.out += b"."
        return bytes(self.out)

    def _global(self, module, name):
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def _save(self, obj):
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, (int, np.integer)):
            obj = int(obj)
            if -(2**31) <= obj < 2**31:
                out += b"J" + struct.pack("<i", obj)
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(obj, (float, np.floating)):
            out += b"G" + struct.pack(">d", float(obj))
        elif isinstance(obj, str):
            raw = obj.encode("utf-8")
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(obj, np.ndarray):
            self._save_tensor(obj)
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self._global("collections", "OrderedDict")
                out += b")R"
            else:
                out += b"}"
            out += b"("
            for k, v in obj.items():
                self._save(k)
                self._save(v)
            out += b"u"
        elif isinstance(obj, list):
            out += b"]("
            for v in obj:
                self._save(v)
            out += b"e"
        elif isinstance(obj, tuple):
            out += b"("
            for v in obj:
                self._save(v)
            out += b"t"
        else:
            raise TypeError(
                "write_checkpoint saves dicts, lists, tuples, scalars and NumPy "
                f"arrays. Received: {type(obj).__name__}"
            )

    def _save_tensor(self, array):
        array = np.asarray(array)
        storage_type = _DTYPE_STORAGES.get(array.dtype.newbyteorder("="))
        if storage_type is None:
            raise TypeError(
                f"No torch storage type for arrays of dtype {array.dtype}. "
                f"Received: dtype={array.dtype}"
            )
        key = self._keys.get(id(array))
        if key is None:
            key = str(len(self.storages))
            self._keys[id(array)] = key
            self.storages.append((key, np.ascontiguousarray(array)))
        shape = tuple(int(d) for d in array.shape)
        stride = tuple(
            int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))
        )
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # args
        self.out += b"("  # persistent id
        for item in ("storage",):
            self._save(item)
        self._global("torch", storage_type)
        self._save(key)
        self._save("cpu")
        self._save(int(array.size))
        if not self.zip_format:
            self._save(None)  # view_metadata
        self.out += b"tQ"
        self._save(0)
        self._save(shape)
        self._save(stride)
        self._save(False)
        self._global("collections", "OrderedDict")
        self.out += b")R"
        self.out += b"tR"
