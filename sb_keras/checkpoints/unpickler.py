"""The restricted unpickler of torch files and the records it builds.

A ``torch.save`` pickle describes tensors as calls of
``torch._utils._rebuild_tensor_v2`` on storage references (persistent
ids). `_RestrictedUnpickler` resolves only those globals, to stand-ins
that *record* the call (`_Tensor` on a `_Storage`) without running
anything; the file reader (`sb_keras.checkpoints.reader`) then fills the
storages with the file's bytes and materializes each tensor as a NumPy
array, refusing views that would expand their storage beyond
`MAX_EXPANDED_ELEMENTS`.
"""

import collections
import math
import pickle

import numpy as np

# Elements a tensor may have beyond those of its storage (stride-0 or
# overlapping views): 2**24 float32 values are 64 MiB.
MAX_EXPANDED_ELEMENTS = 2**24

# torch storage class -> NumPy dtype (little endian; byte order fixed later).
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",  # widened to float32 after reading
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_DTYPE_STORAGES = {
    np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if k != "BFloat16Storage"
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle asks for something a state dict never needs."""


class _Sealed:
    """Refuses the pickle ``BUILD`` opcode, which could rewrite attributes."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError(
            f"Refusing a pickle that modifies a {type(self).__name__.strip('_')} "
            "after building it; torch never writes that. Received: "
            f"state={str(state)[:80]}"
        )


class _Storage(_Sealed):
    """A torch storage of the file: its dtype, size, and (later) its data."""

    __slots__ = ("key", "storage_type", "dtype", "numel", "location", "data", "problem")

    def __init__(self, key, storage_type, numel, location):
        self.key = key
        self.storage_type = storage_type
        self.dtype = np.dtype(_STORAGE_DTYPES[storage_type])
        self.numel = numel
        self.location = location
        self.data = None  # 1-D array once read
        self.problem = None  # why the data could not be read

    def set_bytes(self, raw, byteorder):
        need = self.numel * self.dtype.itemsize
        if len(raw) < need:
            self.problem = (
                f"its storage {self.key!r} needs {need} bytes but the file "
                f"holds only {len(raw)} (the file is truncated)"
            )
            return
        dtype = self.dtype.newbyteorder("<" if byteorder == "little" else ">")
        data = np.frombuffer(raw, dtype=dtype, count=self.numel)
        data = data.astype(self.dtype.newbyteorder("="))
        if self.storage_type == "BFloat16Storage":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        self.data = data


class _StorageView(_Sealed):
    """A legacy view into another storage (``view_metadata`` of old files)."""

    __slots__ = ("root", "offset", "numel", "key")

    def __init__(self, root, offset, numel):
        self.root, self.offset, self.numel = root, offset, numel
        self.key = root.key

    @property
    def problem(self):
        return self.root.problem

    @property
    def data(self):
        if self.root.data is None:
            return None
        return self.root.data[self.offset : self.offset + self.numel]


class _Tensor(_Sealed):
    """A tensor of the pickle, materialized once its storage has been read."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride

    def check_expansion(self, name):
        """Refuses a view with more elements than its storage, beyond the bound."""
        numel = math.prod(self.shape)
        stored = self.storage.numel
        if numel > stored and numel > MAX_EXPANDED_ELEMENTS:
            raise CheckpointError(
                f"Tensor {name!r} of shape {self.shape} (stride {self.stride}) "
                f"has {numel} elements but its storage {self.storage.key!r} holds "
                f"{stored}: a stride-0 or overlapping view may expand its "
                f"storage to at most MAX_EXPANDED_ELEMENTS={MAX_EXPANDED_ELEMENTS} "
                "elements."
            )
        return numel

    def to_numpy(self, name):
        storage = self.storage
        if storage.data is None:
            raise CheckpointError(
                f"Cannot read tensor {name!r} of shape {self.shape}: "
                f"{storage.problem or 'its storage is missing'}."
            )
        data = storage.data
        if 0 in self.shape:
            return np.zeros(self.shape, dtype=data.dtype)
        self.check_expansion(name)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if last >= len(data):
            raise CheckpointError(
                f"Tensor {name!r} of shape {self.shape} (stride {self.stride}, "
                f"offset {self.offset}) does not fit in its storage "
                f"{storage.key!r} of {len(data)} elements."
            )
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.shape,
            strides=[s * itemsize for s in self.stride],
            writeable=False,
        )
        return np.array(view)


def _int_tuple(value, what):
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(
            f"A tensor's {what} must be a tuple of non-negative integers. "
            f"Received: {what}={value!r}"
        )
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Stand-in of ``torch._utils._rebuild_tensor(_v2)``: records, runs nothing."""
    if not isinstance(storage, (_Storage, _StorageView)):
        raise CheckpointError(
            f"A tensor must be built on a storage. Received: storage={storage!r}"
        )
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(
            f"A tensor's size and stride must have the same length. "
            f"Received: size={size}, stride={stride}"
        )
    _int_tuple((storage_offset,), "storage_offset")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    """Stand-in of ``torch._utils._rebuild_parameter``: the data itself."""
    return data


class _StorageType(_Sealed):
    """Stand-in of a ``torch.*Storage`` class: a name, never called."""

    __slots__ = ("storage_type",)

    def __init__(self, name):
        self.storage_type = name

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"The storage type torch.{self.storage_type} may only appear in a "
            "storage reference, not be called."
        )


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a tensor state dict.

    Every other global (``os.system``, ``builtins.eval``, a torch module
    class, ...) raises `UnsafeCheckpointError` when the pickle *names* it,
    before anything could call it. Storage references (persistent ids)
    become `_Storage` records; nothing is read from them here.
    """

    def __init__(self, file, storages, path):
        super().__init__(file)
        self.storages = storages
        self.path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"Refusing to load {self.path!r}: its pickle references the "
                f"global {module}.{name}, which a tensor state dict never "
                "needs (nothing from the file was run). Received: "
                f"global={module}.{name}"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"Refusing to load {self.path!r}: unknown persistent id. "
                f"Received: persistent_id={pid!r}"
            )
        _, storage_type, key, location, numel = pid[:5]
        name = getattr(storage_type, "storage_type", None)
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(
                f"{self.path!r}: a storage reference must name a torch storage "
                f"type. Received: storage_type={storage_type!r}"
            )
        key = str(key)
        _int_tuple((numel,), "storage size")
        storage = self.storages.get(key)
        if storage is None:
            storage = _Storage(key, name, numel, location)
            self.storages[key] = storage
        elif (storage.storage_type, storage.numel) != (name, numel):
            raise CheckpointError(
                f"{self.path!r}: storage {key!r} is referenced as "
                f"{storage.storage_type}[{storage.numel}] and as {name}[{numel}]."
            )
        if view is not None:
            view_key, offset, view_numel = view
            _int_tuple((offset, view_numel), "storage view")
            if offset + view_numel > storage.numel:
                raise CheckpointError(
                    f"{self.path!r}: storage view {view_key!r} "
                    f"[{offset}:{offset + view_numel}] exceeds storage {key!r} "
                    f"of {storage.numel} elements."
                )
            return _StorageView(storage, offset, view_numel)
        return storage


def _unpickle(file, storages, path):
    try:
        return _RestrictedUnpickler(file, storages, path).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"Cannot read {path!r}: its pickle is truncated or corrupt ({e})."
        ) from e
