"""Hostile and broken torch files: bounded memory and time, clear errors.

Every file is built here, opcode by opcode, as an attacker would; each read
runs under `tracemalloc` (NumPy reports its buffers to it) and must stay far
below what the file asks for.
"""

import pickle
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from sb_keras import checkpoints as ck
from sb_keras.checkpoints import reader

# A hostile read may allocate at most this much (the files ask for GiBs).
_MEMORY_BOUND = 32 * 2**20


def _op_int(value):
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_str(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_ints(values):
    return b"(" + b"".join(_op_int(v) for v in values) + b"t"


def _op_tensor(key, numel, size, stride, offset=0, legacy=False):
    """``torch._utils._rebuild_tensor_v2`` opcodes, as torch.save writes them."""
    pid = (
        b"("
        + _op_str("storage")
        + b"ctorch\nFloatStorage\n"
        + _op_str(key)
        + _op_str("cpu")
        + _op_int(numel)
        + (b"N" if legacy else b"")
        + b"tQ"
    )
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + _op_int(offset)
        + _op_ints(size)
        + _op_ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _state(*items):
    """A pickled ``{name: opcodes}`` dict."""
    body = b"".join(_op_str(k) + v for k, v in items)
    return b"\x80\x02}(" + body + b"u."


def _zip(path, payload, entries=(), compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("ckpt/version", "3\n")
        z.writestr("ckpt/data.pkl", payload)
        for name, data in entries:
            z.writestr(f"ckpt/data/{name}", data)
    return str(path)


def _legacy(path, payload, storages):
    """A legacy file: preamble pickles, the payload, storage keys, raw data."""
    preamble = b"".join(
        pickle.dumps(obj, protocol=2)
        for obj in (
            reader._LEGACY_MAGIC,
            1001,
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
        )
    )
    body = preamble + payload + pickle.dumps([k for k, _, _ in storages], protocol=2)
    for _, numel, data in storages:
        body += struct.pack("<q", numel) + data
    path.write_bytes(body)
    return str(path)


def _bounded(fn, *args):
    """Runs ``fn``; returns (exception or result, peak bytes, seconds)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - the caller checks the type
            out = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, peak, time.perf_counter() - start


def _assert_refused(fn, path, match):
    out, peak, seconds = _bounded(fn, path)
    assert isinstance(out, ck.CheckpointError), repr(out)
    assert _re_search(match, str(out)), str(out)
    assert peak < _MEMORY_BOUND, peak
    assert seconds < 10, seconds
    return out


def _re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None


# ---------------------------------------------------------------------------
# Tensors that expand their storage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, stride",
    [
        ((2**29,), (0,)),  # 2 GiB of float32 from one stored element
        ((2**20, 2**20), (0, 0)),  # 4 TiB
        ((2**16, 2**16), (1, 1)),  # overlapping rows: 16 GiB from 128 Ki elements
    ],
)
def test_expanding_views_are_refused(tmp_path, size, stride):
    numel = 1 if set(stride) == {0} else 2**17
    payload = _state(("w", _op_tensor("0", numel, size, stride)))
    path = _zip(tmp_path / "x.pt", payload, [("0", b"\0" * (4 * numel))])
    assert len(payload) < 600
    _assert_refused(ck.read_state_dict, path, r"'w'.*MAX_EXPANDED_ELEMENTS")


def test_many_views_of_one_storage_are_bounded(tmp_path):
    """1000 tensors viewing one 256 KiB storage would be 256 MiB of copies."""
    numel = 2**16
    view = _op_tensor("0", numel, (numel,), (1,))
    payload = _state(*[(f"w{i}", view) for i in range(1000)])
    path = _zip(tmp_path / "x.pt", payload, [("0", bytes(4 * numel))])
    out, peak, seconds = _bounded(ck.read_state_dict, path)
    assert isinstance(out, ck.CheckpointError), repr(out)
    assert "MAX_COPIES=16" in str(out)
    stated = 4 * (reader.MAX_COPIES * numel + reader.MAX_EXPANDED_ELEMENTS)
    assert peak < stated + _MEMORY_BOUND and seconds < 20


def test_small_expanding_view_is_read(tmp_path):
    """``expand`` within the bound still reads, with torch's values."""
    storage = np.arange(3, dtype=np.float32)
    payload = _state(("w", _op_tensor("0", 3, (4, 3), (0, 1))))
    path = _zip(tmp_path / "x.pt", payload, [("0", storage.tobytes())])
    np.testing.assert_array_equal(
        ck.read_state_dict(path)["w"], np.broadcast_to(storage, (4, 3))
    )


# ---------------------------------------------------------------------------
# Sizes that the file does not hold
# ---------------------------------------------------------------------------


def test_legacy_storage_larger_than_the_file(tmp_path):
    numel = 2**40  # 4 TiB declared, a few bytes present
    payload = _state(("w", _op_tensor("0", numel, (numel,), (1,), legacy=True)))
    path = _legacy(tmp_path / "x.pth", payload, [("0", numel, b"\0" * 64)])
    _assert_refused(ck.read_state_dict, path, r"'w'.*truncated")


def test_zip_entry_larger_than_its_storage(tmp_path):
    """A 1 MiB entry where the pickle declares a 16-byte storage."""
    payload = _state(("w", _op_tensor("0", 4, (4,), (1,))))
    path = _zip(tmp_path / "x.pt", payload, [("0", b"\0" * 2**20)])
    _assert_refused(ck.read_state_dict, path, r"'ckpt/data/0'.*more than the 16")


def test_zip_bomb_is_refused_before_decompressing(tmp_path):
    """64 MiB of zeros deflated to 64 KiB, with a matching storage size."""
    numel = 2**24
    payload = _state(("w", _op_tensor("0", numel, (numel,), (1,))))
    path = str(tmp_path / "bomb.pt")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ckpt/data.pkl", payload)
        with z.open("ckpt/data/0", "w") as entry:
            for _ in range(64):
                entry.write(bytes(2**20))
    assert zipfile.ZipFile(path).getinfo("ckpt/data/0").compress_size < 2**20
    _assert_refused(ck.read_state_dict, path, r"MAX_COMPRESSION_RATIO")


def test_zip_entry_with_a_lying_size_is_read_only_to_its_storage(tmp_path):
    """A central directory claiming 16 bytes for a 64 MiB deflated entry."""
    payload = _state(("w", _op_tensor("0", 4, (4,), (1,))))
    path = tmp_path / "liar.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ckpt/data.pkl", payload)
        z.writestr("ckpt/data/0", bytes(64 * 2**20))
    raw = bytearray(path.read_bytes())
    name = b"ckpt/data/0"
    central = raw.index(name, raw.index(b"PK\x01\x02")) - 46
    assert raw[central : central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", raw, central + 24, 16)  # uncompressed size
    path.write_bytes(bytes(raw))
    out, peak, seconds = _bounded(ck.read_state_dict, str(path))
    assert peak < _MEMORY_BOUND and seconds < 10
    if isinstance(out, Exception):  # a CRC error is as good as the 16 bytes
        assert isinstance(out, ck.CheckpointError), repr(out)
    else:
        np.testing.assert_array_equal(out["w"], np.zeros(4, np.float32))


# ---------------------------------------------------------------------------
# Nesting
# ---------------------------------------------------------------------------


def test_deeply_nested_list_is_refused(tmp_path):
    depth = 200_000
    payload = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    path = _zip(tmp_path / "deep.pt", payload)
    _assert_refused(ck.read_checkpoint, path, r"nested deeper than MAX_DEPTH=64")


def test_list_that_contains_itself_is_refused(tmp_path):
    payload = b"\x80\x02]q\x00h\x00a."  # l = []; l.append(l)
    path = _zip(tmp_path / "cycle.pt", payload)
    _assert_refused(ck.read_checkpoint, path, r"contains itself")


def test_shared_references_are_converted_once(tmp_path):
    """40 levels of 10 references each: 10**40 paths, 41 objects."""
    payload = b"\x80\x02]q\x00"  # memo 0: the innermost list
    for level in range(1, 41):  # pop, new list of 10 x memo[level-1], memo it
        payload += b"0](" + (b"h" + bytes([level - 1])) * 10 + b"eq" + bytes([level])
    payload += b"."
    path = _zip(tmp_path / "laughs.pt", payload)
    out, peak, seconds = _bounded(ck.read_checkpoint, path)
    assert not isinstance(out, Exception), out
    assert seconds < 10 and peak < _MEMORY_BOUND
    assert len(out) == 10 and all(item is out[0] for item in out)


# ---------------------------------------------------------------------------
# Tensors of the wrong rank
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["fc.weight", "conv1.weight"])
def test_scalar_where_a_matrix_belongs_names_the_key(key):
    from sb_keras.models import ResNet

    state = ck.authors_state_dict(ResNet(depth=8))
    state[key] = np.array(1.0, np.float32)
    with pytest.raises(ck.CheckpointError, match=rf"'{key}'.*shape \(\)"):
        ck.convert_state_dict(state)
