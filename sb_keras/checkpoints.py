"""The authors' PyTorch checkpoints in sb_keras, read without torch.

Kang & Kim released CIFAR-10 checkpoints of their shared-basis ResNets
(``ssregibility/Net_RL2``). This module reads such files with Python's
`pickle` and NumPy only and places every tensor in the matching
`sb_keras.ResNet`:

* `read_checkpoint` / `read_state_dict`: a *restricted* reader of both
  serializations of ``torch.save`` (the legacy one, a sequence of pickles
  followed by the raw storages, and the zip archive of torch >= 1.6). The
  unpickler accepts only the globals a state dict needs (tensor rebuild
  functions, storage types, ``OrderedDict``) and refuses anything else
  before it can run, so loading a file never executes code from it.
* `infer_architecture`, `convert_state_dict`, `load_authors_checkpoint`:
  depth, ranks and sharing mode are inferred from the tensor names and
  shapes; every kernel is transposed from PyTorch's ``(out, in, kh, kw)`` to
  Keras' ``(kh, kw, in, out)``, coefficient rows keep the authors' order
  ([unique, shared]) and BN statistics are copied.
* `authors_state_dict`, `save_authors_state_dict`: the inverse, writing a
  model's weights in the authors' key layout as a torch-format file (legacy
  or zip) that ``torch.load`` and this reader both accept.

The converted model keeps the authors' preprocessing: it takes RGB pixels
in ``[0, 255]`` and normalizes them inside the model with the ImageNet
statistics their CIFAR-10 code used (``/255``, mean ``(0.485, 0.456,
0.406)``, std ``(0.229, 0.224, 0.225)``; method §3.5), so predictions need
no extra knowledge.

Example:

>>> import sb_keras
>>> model = sb_keras.load_authors_checkpoint(
...     "CIFAR10_ResNet32_Double_S16U1_6.93err.pth")  # doctest: +SKIP
>>> model.name  # doctest: +SKIP
'resnet32_s16u1_double'

Reference: Woochul Kang and Daeyeon Kim, *Learning Deeply Shared Filter
Bases for Efficient ConvNets* (arXiv 2006.05066); official code and
checkpoints ``ssregibility/Net_RL2``.
"""

import collections
import io
import os
import pickle
import re
import struct
import zipfile

import numpy as np

# First pickle of a legacy torch file, and the protocol version after it.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

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


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


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


def _read_legacy(file, path):
    storages = {}
    magic = _unpickle(file, storages, path)
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path!r} is not a PyTorch checkpoint (wrong magic number)."
        )
    protocol = _unpickle(file, storages, path)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(
            f"{path!r}: unsupported legacy protocol. "
            f"Received: protocol_version={protocol!r}"
        )
    sys_info = _unpickle(file, storages, path)
    byteorder = "little"
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        byteorder = "big"
    result = _unpickle(file, storages, path)
    try:
        keys = _unpickle(file, storages, path)
    except CheckpointError:
        keys = []  # truncated before the storage list: every storage is missing
    if not isinstance(keys, list):
        raise CheckpointError(f"{path!r}: corrupt storage list. Received: {keys!r}")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(
                f"{path!r}: the storage list names {key!r}, which no tensor uses."
            )
        head = file.read(8)
        if len(head) < 8:
            storage.problem = (
                f"its storage {storage.key!r} is cut off (the file is truncated)"
            )
            continue
        numel = int.from_bytes(head, byteorder, signed=True)
        if numel != storage.numel:
            raise CheckpointError(
                f"{path!r}: storage {storage.key!r} has {numel} elements in the "
                f"data section but {storage.numel} in the pickle."
            )
        storage.set_bytes(file.read(numel * storage.dtype.itemsize), byteorder)
    for storage in storages.values():
        if storage.data is None and storage.problem is None:
            storage.problem = (
                f"its storage {storage.key!r} is missing (the file is truncated)"
            )
    return result


def _read_zip(path):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"Cannot read {path!r}: the zip archive is truncated or corrupt ({e})."
        ) from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path!r} is a zip file but not a PyTorch checkpoint: expected "
                f"one '<name>/data.pkl'. Received: entries {archive.namelist()[:8]}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in archive.namelist():
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages = {}
        try:
            result = _unpickle(io.BytesIO(archive.read(pickles[0])), storages, path)
            for key, storage in storages.items():
                record = f"{prefix}data/{key}"
                if record not in archive.namelist():
                    storage.problem = f"its storage record {record!r} is missing"
                    continue
                storage.set_bytes(archive.read(record), byteorder)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(
                f"Cannot read {path!r}: the zip archive is truncated or corrupt ({e})."
            ) from e
    return result


def _materialize(obj, name):
    if isinstance(obj, _Tensor):
        return obj.to_numpy(name)
    if isinstance(obj, dict):
        return {
            k: _materialize(v, f"{name}/{k}" if name else str(k))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        items = [_materialize(v, f"{name}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def read_checkpoint(path):
    """Reads a ``torch.save`` file without torch and without running its code.

    Both serializations are understood: the legacy one (a sequence of
    pickles followed by the raw storages; the authors' files, whose storages
    are tagged ``cuda:0``) and the zip archive of torch >= 1.6. The pickle is
    read by a restricted unpickler that only resolves tensor rebuild
    functions, storage types and ``collections.OrderedDict``.

    Args:
        path: the checkpoint file.

    Returns:
        The saved object with every tensor as a NumPy array (CPU, C order)
        and every ``OrderedDict`` as a ``dict``.

    Raises:
        UnsafeCheckpointError: the pickle names any other global.
        CheckpointError: the file is truncated or corrupt; the message names
            the tensor whose data is missing and its shape.

    Example:

    >>> ckpt = read_checkpoint("CIFAR10_ResNet56_S16U1_7.46err.pth.pth")
    ... # doctest: +SKIP
    >>> sorted(ckpt)  # doctest: +SKIP
    ['acc', 'epoch', 'net_state_dict', 'optimizer_state_dict']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at path={path!r}")
    with open(path, "rb") as f:
        head = f.read(4)
        if head == _ZIP_MAGIC:
            result = _read_zip(path)
        elif head[:2] == b"\x80\x02":
            f.seek(0)
            result = _read_legacy(f, path)
        else:
            raise CheckpointError(
                f"{path!r} is neither a zip nor a legacy PyTorch checkpoint "
                f"(first bytes {head!r})."
            )
    return _materialize(result, "")


_STATE_DICT_KEYS = ("net_state_dict", "state_dict", "model_state_dict", "model")


def read_state_dict(path):
    """The network state dict of a checkpoint, as ``{name: np.ndarray}``.

    Takes the entry ``net_state_dict`` (the authors' files), ``state_dict``,
    ``model_state_dict`` or ``model`` of a training checkpoint, or the file's
    top-level dict when it is itself a state dict. See `read_checkpoint`.

    Example:

    >>> sd = read_state_dict("CIFAR10_ResNet56_S16U1_7.46err.pth.pth")
    ... # doctest: +SKIP
    >>> sd["conv1.weight"].shape  # doctest: +SKIP
    (16, 3, 3, 3)
    """
    obj = read_checkpoint(path)
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(v, np.ndarray) for v in obj.values()
    ):
        keys = list(obj)[:8] if isinstance(obj, dict) else "-"
        raise CheckpointError(
            f"{os.fspath(path)!r} holds no state dict (a dict of tensors, or a "
            f"dict with one of {_STATE_DICT_KEYS}). Received: "
            f"{type(obj).__name__} with keys {keys}"
        )
    return obj


# ---------------------------------------------------------------------------
# The authors' key layout
# ---------------------------------------------------------------------------

_BN = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
)


def _to_keras(array):
    """PyTorch ``(out, in, kh, kw)`` -> Keras ``(kh, kw, in, out)``; Linear too."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    return np.transpose(array)


def _to_torch(array):
    if array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    return np.ascontiguousarray(np.transpose(array))


def _bn_entries(prefix, bn):
    return [(f"{prefix}.{t}", getattr(bn, k)) for t, k in _BN]


def _layout(model):
    """``[(authors' key, keras variable)]`` of a CIFAR `sb_keras.ResNet`.

    A shared basis appears once at the model level (``shared_basis_{g}``
    or ``shared_basis_{g}_{1,2}``) and again in every block that uses it,
    all mapped to the one Keras variable.
    """
    from sb_keras.layers import BasisConv2D

    entries = [("conv1.weight", model.get_layer("stem_conv").kernel)]
    entries += _bn_entries("bn1", model.get_layer("stem_bn"))
    n = (model.depth - 2) // 6
    double = model.sharing == "double"
    for g in range(1, 4):
        bases = []
        if model.share and n > 1 and model.shared_rank:
            bases = model.get_layer(f"stage{g}_basis").bases
            names = [f"_{g}_{j + 1}" for j in range(2)] if double else [f"_{g}"]
            entries += [(f"shared_basis{s}.weight", b) for s, b in zip(names, bases)]
        for i in range(n):
            block = f"stage{g}_block{i + 1}"
            prefix = f"layer{g}.{i}"
            if bases and i > 0:
                names = ["_1", "_2"] if double else [""]
                entries += [
                    (f"{prefix}.shared_basis{s}.weight", b)
                    for s, b in zip(names, bases)
                ]
            for j in (1, 2):
                layer = model.get_layer(f"{block}_conv{j}")
                if isinstance(layer, BasisConv2D):
                    if layer.unique_kernel is not None:
                        entries.append(
                            (f"{prefix}.basis_conv{j}.weight", layer.unique_kernel)
                        )
                    entries += _bn_entries(f"{prefix}.basis_bn{j}", layer.basis_bn)
                    entries.append(
                        (f"{prefix}.coeff_conv{j}.weight", layer.coefficients)
                    )
                    entries += _bn_entries(f"{prefix}.bn{j}", layer.bn)
                else:
                    entries.append((f"{prefix}.conv{j}.weight", layer.kernel))
                    entries += _bn_entries(
                        f"{prefix}.bn{j}", model.get_layer(f"{block}_bn{j}")
                    )
    head = model.get_layer("predictions")
    entries += [("fc.weight", head.kernel), ("fc.bias", head.bias)]
    return entries


def _check_cifar_resnet(model):
    from sb_keras.models import ResNet

    if not (
        isinstance(model, ResNet)
        and model.stem == "cifar"
        and model.depth not in (18, 34, 50, 101, 152)
        and model.include_top
    ):
        raise ValueError(
            "The authors' key layout covers the CIFAR ResNets (depth 6n+2, "
            "with the classifier). Received: model="
            f"{getattr(model, 'name', model)!r}"
        )


# ---------------------------------------------------------------------------
# Checkpoint -> model
# ---------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
_MODEL_BASIS = re.compile(r"^shared_basis_\d+(_\d+)?\.weight$")


def _shape_of(state_dict, key):
    if key not in state_dict:
        raise CheckpointError(
            f"The state dict has no {key!r}, which every authors' CIFAR ResNet "
            f"has. Received: {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]}"
        )
    return tuple(state_dict[key].shape)


def infer_architecture(state_dict):
    """The `sb_keras.ResNet` arguments of an authors' CIFAR-10 state dict.

    Depth comes from the number of blocks ``layer{g}.{i}``, the sharing mode
    from the names of the model-level bases (``shared_basis_{g}`` single,
    ``shared_basis_{g}_{1,2}`` double; none: the authors' "NonShared"
    ablation, or the plain ResNet when no block is decomposed), the ranks
    from the shapes of stage 1 (``S_g = s * 2**(g-1)``, ``u_g = u *
    2**(g-1)``).

    Args:
        state_dict: ``{name: array}`` as returned by `read_state_dict`.

    Returns:
        A dict of `sb_keras.ResNet` constructor arguments.

    Example:

    >>> infer_architecture(read_state_dict("CIFAR10_ResNet56_S16U1_7.46err.pth.pth"))
    ... # doctest: +SKIP
    {'depth': 56, 'num_classes': 10, 'share': True, 'shared_rank': 16,
     'unique_rank': 1, 'sharing': 'single', 'preprocessing': 'imagenet',
     'orthogonality_include_unique': True}
    """
    blocks = collections.defaultdict(set)
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    stem = _shape_of(state_dict, "conv1.weight")
    if sorted(blocks) != [1, 2, 3] or stem[:2] != (16, 3):
        raise CheckpointError(
            "Not an authors' CIFAR ResNet: expected a 16-channel stem "
            "'conv1.weight' of shape (16, 3, 3, 3) and stages layer1..layer3. "
            f"Received: conv1.weight {stem}, stages {sorted(blocks)}"
        )
    counts = {g: len(ids) for g, ids in blocks.items()}
    for g, ids in blocks.items():
        if ids != set(range(len(ids))):
            raise CheckpointError(
                f"Stage layer{g} has non-consecutive blocks. Received: {sorted(ids)}"
            )
    if len(set(counts.values())) != 1:
        raise CheckpointError(
            "A CIFAR ResNet has the same number of blocks in every stage. "
            f"Received: blocks per stage {counts}"
        )
    n = counts[1]
    num_classes = _shape_of(state_dict, "fc.weight")[0]
    config = {"depth": 6 * n + 2, "num_classes": num_classes}
    decomposed = n > 1 and any(
        k.startswith("layer1.1.coeff_conv1.") for k in state_dict
    )
    if not decomposed:
        return {**config, "share": False, "preprocessing": "imagenet"}
    if "shared_basis_1_1.weight" in state_dict:
        sharing, s = "double", _shape_of(state_dict, "shared_basis_1_1.weight")[0]
    elif "shared_basis_1.weight" in state_dict:
        sharing, s = "single", _shape_of(state_dict, "shared_basis_1.weight")[0]
    else:
        sharing, s = "single", 0
    u = 0
    if "layer1.1.basis_conv1.weight" in state_dict:
        u = _shape_of(state_dict, "layer1.1.basis_conv1.weight")[0]
    if s + u == 0:
        raise CheckpointError(
            "The decomposed blocks have neither a shared nor a unique basis. "
            "Received: no 'shared_basis_1*' and no 'layer1.1.basis_conv1.weight'"
        )
    return {
        **config,
        "share": True,
        "shared_rank": s,
        "unique_rank": u,
        "sharing": sharing,
        "preprocessing": "imagenet",
        # The authors' CIFAR-10 training also decorrelates the unique filters
        # from the shared ones (method section 2); fine-tuning keeps it.
        "orthogonality_include_unique": s > 0 and u > 0,
    }


def convert_state_dict(state_dict, strict=True, name=None):
    """Builds the `sb_keras.ResNet` of an authors' state dict, weights placed.

    Args:
        state_dict: ``{name: array}`` in the authors' layout (see
            `read_state_dict`).
        strict: refuse keys the model has no place for (``num_batches_tracked``
            is always ignored).
        name: model name; defaults to the registry-style name
            (``resnet56_s16u1``).

    Returns:
        The model, in inference mode equal to the authors' network in
        ``eval()`` mode. It takes RGB pixels in ``[0, 255]``.

    Raises:
        CheckpointError: a key is missing, a shape does not fit (the message
            names the key and both shapes), a per-block copy of a shared
            basis differs from the stage's basis, or (``strict``) a key is
            left over.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True, sharing="single")
    >>> clone = convert_state_dict(authors_state_dict(model))
    >>> clone.name
    'resnet20_s16u1'
    """
    from sb_keras.models import ResNet

    config = infer_architecture(state_dict)
    model = ResNet(**config, name=name)
    placed = {}
    used = set()
    for key, variable in _layout(model):
        if key not in state_dict:
            raise CheckpointError(
                f"The checkpoint has no {key!r}, which {model.name} needs with "
                f"shape {_torch_shape(variable)} (Keras variable "
                f"{variable.path} {tuple(variable.shape)})."
            )
        value = np.asarray(state_dict[key])
        expected = _torch_shape(variable)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, but "
                f"{model.name} needs {expected} there (Keras variable "
                f"{variable.path} {tuple(variable.shape)})."
            )
        value = _to_keras(value.astype(np.float32))
        used.add(key)
        if id(variable) in placed:
            first_key, first = placed[id(variable)]
            if not np.array_equal(first, value):
                raise CheckpointError(
                    f"Checkpoint tensor {key!r} differs from {first_key!r}; in the "
                    "authors' model both are the one shared basis of the stage."
                )
            continue
        variable.assign(value)
        placed[id(variable)] = (key, value)
    missing = [v.path for v in model.weights if id(v) not in placed]
    if missing:  # a layout bug, not a user error
        raise RuntimeError(f"Variables left unassigned: {missing}")
    # Without decomposed blocks (depth 8 or a plain ResNet), the bases the
    # authors' model allocates at the top level are unused: ignore them.
    extra = sorted(
        k
        for k in state_dict
        if k not in used
        and not k.endswith("num_batches_tracked")
        and not (not model.share and _MODEL_BASIS.match(k))
    )
    if strict and extra:
        raise CheckpointError(
            f"The checkpoint has tensors {model.name} has no place for "
            f"(pass strict=False to ignore them). Received: {extra[:10]}"
        )
    return model


def _torch_shape(variable):
    """Keras ``(kh, kw, in, out)`` -> PyTorch ``(out, in, kh, kw)``."""
    keras_shape = tuple(variable.shape)
    if len(keras_shape) == 4:
        h, w, i, o = keras_shape
        return (o, i, h, w)
    return tuple(reversed(keras_shape))


def load_authors_checkpoint(path, strict=True, name=None):
    """Reads an authors' CIFAR-10 checkpoint into the matching `sb_keras.ResNet`.

    The file is read without torch and without running code from it (see
    `read_checkpoint`); the architecture (depth, ranks, single or double
    sharing) is inferred from the tensor names and shapes (see
    `infer_architecture`). The model keeps the authors' preprocessing: it
    takes RGB pixels in ``[0, 255]`` and normalizes them with the ImageNet
    mean and std inside the model.

    Args:
        path: a ``.pth`` file of ``ssregibility/Net_RL2`` (legacy or zip).
        strict: refuse tensors the model has no place for.
        name: model name (default: registry-style, e.g. ``resnet56_s16u1``).

    Returns:
        The `sb_keras.ResNet`, ready for ``predict``, ``fit`` or ``save``.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.load_authors_checkpoint(
    ...     "CIFAR10_ResNet56_S16U1_7.46err.pth.pth")  # doctest: +SKIP
    >>> logits = model.predict(uint8_images)  # doctest: +SKIP
    """
    return convert_state_dict(read_state_dict(path), strict=strict, name=name)


# ---------------------------------------------------------------------------
# Model -> checkpoint (the authors' layout, torch format, written without torch)
# ---------------------------------------------------------------------------


def authors_state_dict(model):
    """A CIFAR `sb_keras.ResNet`'s weights in the authors' key layout.

    Kernels are transposed to PyTorch's ``(out, in, kh, kw)``, the shared
    bases appear once per stage and once per using block (one array object,
    as one tensor in the authors' model) and every BN gets a
    ``num_batches_tracked`` of 0.

    Returns:
        A ``dict`` of NumPy arrays, in the authors' key order per stage.
    """
    _check_cifar_resnet(model)
    state = {}
    arrays = {}
    for key, variable in _layout(model):
        if id(variable) not in arrays:
            value = np.asarray(variable.numpy(), dtype=np.float32)
            arrays[id(variable)] = _to_torch(value)
        state[key] = arrays[id(variable)]
        if key.endswith(".running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = np.array(
                0, dtype=np.int64
            )
    return state


def save_authors_state_dict(model, path, format="legacy", extra=None):
    """Writes a model as an authors' checkpoint (torch format, without torch).

    The file holds ``{"net_state_dict": authors_state_dict(model), **extra}``,
    as the authors' training script saves it, and loads with
    ``torch.load(path)`` as well as with `load_authors_checkpoint`.

    Args:
        model: a CIFAR `sb_keras.ResNet`.
        path: the output file.
        format: ``"legacy"`` (the authors' files) or ``"zip"`` (torch >= 1.6).
        extra: more top-level entries (ints, floats, strings, arrays).

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True)
    >>> save_authors_state_dict(model, "resnet20.pth")  # doctest: +SKIP
    """
    obj = {"net_state_dict": collections.OrderedDict(authors_state_dict(model))}
    obj.update(extra or {})
    write_checkpoint(obj, path, format=format)


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
    if format == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", data)
            archive.writestr("archive/byteorder", "little")
            for key, array in writer.storages:
                archive.writestr(f"archive/data/{key}", _le_bytes(array))
            archive.writestr("archive/version", "3\n")
        return
    with open(path, "wb") as f:
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
