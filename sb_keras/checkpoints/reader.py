"""A restricted reader of ``torch.save`` files: pickle and NumPy, no torch.

Both serializations are read: the legacy one (a sequence of pickles followed
by the raw storages; the authors' files) and the zip archive of
torch >= 1.6. The unpickler resolves only the globals a tensor state dict
needs and refuses every other one before anything could call it.

A checkpoint is untrusted input, so what the reader allocates and how long
it works are bounded by the file itself:

* a storage's data is read only when the file holds all of its bytes (a
  size in the pickle is checked against the bytes left before reading);
* a zip entry is decompressed at most to its declared storage size, and an
  entry that would expand more than `MAX_COMPRESSION_RATIO` times its
  compressed size (beyond `COMPRESSION_SLACK_BYTES`) is refused before it
  is decompressed (torch stores its entries uncompressed);
* a tensor may have more elements than its storage holds (stride 0 or
  overlapping strides, as ``expand`` makes) only up to
  `MAX_EXPANDED_ELEMENTS`;
* the unpickled object is walked with recursion bounded by `MAX_DEPTH`
  levels, each shared object converted once, and cycles are refused;
* all tensors together may hold at most `MAX_COPIES` times the elements of
  the storages (many tensors may view one storage).
"""

import io
import os
import zipfile

import numpy as np

from sb_keras.checkpoints.unpickler import MAX_EXPANDED_ELEMENTS  # noqa: F401
from sb_keras.checkpoints.unpickler import CheckpointError
from sb_keras.checkpoints.unpickler import UnsafeCheckpointError  # noqa: F401
from sb_keras.checkpoints.unpickler import _Tensor
from sb_keras.checkpoints.unpickler import _unpickle

# First pickle of a legacy torch file, and the protocol version after it.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# A zip entry may decompress to at most this many times its compressed size
# plus the slack (small entries of zeros compress very well).
MAX_COMPRESSION_RATIO = 64
COMPRESSION_SLACK_BYTES = 2**20
# Nesting levels of the saved object (a state dict in a dict has 3).
MAX_DEPTH = 64
# The tensors of a file may hold at most this many times the elements of its
# storages (views share a storage; the authors' files: 1.8 times).
MAX_COPIES = 16


def _read_legacy(file, path):
    size = os.fstat(file.fileno()).st_size
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
        need = numel * storage.dtype.itemsize
        left = size - file.tell()
        if need > left:  # never ask read() for more than the file holds
            storage.problem = (
                f"its storage {storage.key!r} needs {need} bytes but the file "
                f"holds only {left} more (the file is truncated)"
            )
            break
        storage.set_bytes(file.read(need), byteorder)
    for storage in storages.values():
        if storage.data is None and storage.problem is None:
            storage.problem = (
                f"its storage {storage.key!r} is missing (the file is truncated)"
            )
    return result, storages


def _read_zip(path):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"Cannot read {path!r}: the zip archive is truncated or corrupt ({e})."
        ) from e
    with archive:
        names = set(archive.namelist())
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path!r} is a zip file but not a PyTorch checkpoint: expected "
                f"one '<name>/data.pkl'. Received: entries {archive.namelist()[:8]}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        storages = {}
        try:
            if prefix + "byteorder" in names:
                raw = _read_entry(archive, prefix + "byteorder", 16, path)
                byteorder = raw.decode(errors="replace").strip()
                if byteorder not in ("little", "big"):
                    raise CheckpointError(
                        f"{path!r}: unknown byte order. Received: byteorder="
                        f"{byteorder[:16]!r}"
                    )
            pickle_info = archive.getinfo(pickles[0])
            payload = _read_entry(archive, pickles[0], pickle_info.file_size, path)
            result = _unpickle(io.BytesIO(payload), storages, path)
            for key, storage in storages.items():
                record = f"{prefix}data/{key}"
                if record not in names:
                    storage.problem = f"its storage record {record!r} is missing"
                    continue
                need = storage.numel * storage.dtype.itemsize
                storage.set_bytes(_read_entry(archive, record, need, path), byteorder)
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"Cannot read {path!r}: the zip archive is truncated or corrupt ({e})."
            ) from e
    return result, storages


def _read_entry(archive, name, limit, path):
    """The bytes of one zip entry, at most ``limit`` of them.

    The entry is refused before decompression when its header announces
    more than ``limit`` bytes (the storage size the pickle declared) or a
    compression ratio above `MAX_COMPRESSION_RATIO`; reading stops at
    ``limit`` bytes whatever the header says, so a lying header cannot
    expand it further.
    """
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise CheckpointError(
            f"{path!r}: zip entry {name!r} expands to {info.file_size} bytes, "
            f"more than the {limit} its tensor storage declares."
        )
    bound = MAX_COMPRESSION_RATIO * info.compress_size + COMPRESSION_SLACK_BYTES
    if info.file_size > bound:
        raise CheckpointError(
            f"{path!r}: zip entry {name!r} expands from {info.compress_size} to "
            f"{info.file_size} bytes, more than MAX_COMPRESSION_RATIO="
            f"{MAX_COMPRESSION_RATIO} times (a zip bomb?); torch stores its "
            "entries uncompressed."
        )
    with archive.open(info) as entry:
        return entry.read(min(limit, bound))


def _materialize(obj, name, depth, done, active, budget):
    """The unpickled object with every tensor as a NumPy array.

    Recursion is bounded by `MAX_DEPTH`; an object referenced several
    times (the pickle memo) is converted once and stays shared, so a
    pickle of lists of references to lists cannot make the walk
    exponential; a cycle is refused. ``budget`` (a one-element list) is
    the number of tensor elements left to materialize (`MAX_COPIES`).
    """
    if isinstance(obj, _Tensor):
        if id(obj) not in done:
            numel = obj.check_expansion(name)
            if numel > budget[0]:
                raise CheckpointError(
                    f"Tensor {name!r} of shape {obj.shape} exceeds what the "
                    f"file's storages allow: its tensors may hold at most "
                    f"MAX_COPIES={MAX_COPIES} times their stored elements "
                    "(many tensors viewing one storage)."
                )
            budget[0] -= numel
            done[id(obj)] = obj.to_numpy(name)
        return done[id(obj)]
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in done:
        return done[id(obj)]
    where = name[:200] or "the top level"
    if id(obj) in active:
        raise CheckpointError(
            f"The checkpoint's object contains itself at {where!r}; a state "
            "dict has no cycles."
        )
    if depth >= MAX_DEPTH:
        raise CheckpointError(
            f"The checkpoint's object is nested deeper than MAX_DEPTH="
            f"{MAX_DEPTH} levels at {where!r}; a state dict is nested a few "
            "levels deep."
        )
    active.add(id(obj))
    args = (depth + 1, done, active, budget)
    if isinstance(obj, dict):
        out = {
            k: _materialize(v, f"{name}/{k}" if name else str(k), *args)
            for k, v in obj.items()
        }
    else:
        out = [_materialize(v, f"{name}[{i}]", *args) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            out = tuple(out)
    active.discard(id(obj))
    done[id(obj)] = out
    return out


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
            result, storages = _read_zip(path)
        elif head[:2] == b"\x80\x02":
            f.seek(0)
            result, storages = _read_legacy(f, path)
        else:
            raise CheckpointError(
                f"{path!r} is neither a zip nor a legacy PyTorch checkpoint "
                f"(first bytes {head!r})."
            )
    stored = sum(storage.numel for storage in storages.values())
    budget = [MAX_COPIES * stored + MAX_EXPANDED_ELEMENTS]
    return _materialize(result, "", 0, {}, set(), budget)


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
