"""Broken ``.keras`` files fail fast, naming the file and the problem."""

import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import sb_keras
from sb_keras import saving


@pytest.fixture(scope="module")
def good_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.keras"
    sb_keras.ResNet(depth=8, share=False).save(str(path))
    return path


def _rewrite(source, target, change, compression=zipfile.ZIP_STORED):
    """Copies the archive ``source`` to ``target``, entries through ``change``."""
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w") as out:
        for info in z.infolist():
            data = change(info.filename, z.read(info.filename))
            out.writestr(info.filename, data, compress_type=compression)
    return str(target)


def _assert_fails_fast(path, match):
    start = time.perf_counter()
    with pytest.raises(saving.ModelFileError, match=match) as info:
        saving.load_model(path)
    assert time.perf_counter() - start < 5
    assert repr(str(path)) in str(info.value)
    return info.value


def test_good_file_loads(good_model_file):
    model = saving.load_model(good_model_file)
    x = np.zeros((1, 32, 32, 3), np.float32)
    assert model(x).shape == (1, 10)


def test_truncated_archive(good_model_file, tmp_path):
    path = tmp_path / "cut.keras"
    raw = good_model_file.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _assert_fails_fast(path, r"not a complete \.keras \(zip\) archive")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_truncated_inner_weights_file(good_model_file, tmp_path, compression):
    intact = _rewrite(
        good_model_file, tmp_path / "intact.keras", lambda n, d: d, compression
    )
    saving.validate_model_file(intact)
    path = _rewrite(
        good_model_file,
        tmp_path / "weights.keras",
        lambda name, data: data[: len(data) // 2] if name.endswith(".h5") else data,
        compression,
    )
    _assert_fails_fast(path, r"model\.weights\.h5 is truncated or corrupt")


@pytest.mark.parametrize(
    "config, match",
    [
        (b'{"class_name": "ResNet", "conf', r"config\.json is not valid JSON"),
        (b"\xff\xfe garbage", r"config\.json is not valid JSON"),
        (b"[1, 2, 3]", r"config\.json does not describe a Keras object"),
        (b"[" * 100_000 + b"]" * 100_000, r"config\.json is not valid JSON"),
    ],
)
def test_corrupt_config(good_model_file, tmp_path, config, match):
    path = _rewrite(
        good_model_file,
        tmp_path / "config.keras",
        lambda name, data: config if name == "config.json" else data,
    )
    _assert_fails_fast(path, match)


def test_damaged_entry_is_caught_by_its_crc(good_model_file, tmp_path):
    raw = bytearray(good_model_file.read_bytes())
    with zipfile.ZipFile(good_model_file) as z:
        info = z.getinfo("model.weights.h5")
    # Local header (30 bytes + name + extra), then the stored data: flip a
    # byte in the middle of the data.
    name_len, extra_len = np.frombuffer(
        raw[info.header_offset + 26 : info.header_offset + 30], "<u2"
    )
    data_start = info.header_offset + 30 + int(name_len) + int(extra_len)
    raw[data_start + info.compress_size // 2] ^= 0xFF
    path = tmp_path / "flipped.keras"
    path.write_bytes(bytes(raw))
    _assert_fails_fast(path, r"'model\.weights\.h5' is damaged \(CRC mismatch\)")


def test_zip_bomb_entry_is_refused_unread(good_model_file, tmp_path):
    path = str(tmp_path / "bomb.keras")
    with zipfile.ZipFile(good_model_file) as z, zipfile.ZipFile(path, "w") as out:
        for info in z.infolist():
            out.writestr(info, z.read(info.filename))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as out:
        with out.open("assets/zeros.bin", "w") as entry:
            for _ in range(128):
                entry.write(bytes(2**20))
    _assert_fails_fast(path, r"'assets/zeros\.bin' expands .* zip bomb")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.keras"):
        saving.load_model("nowhere.keras")


def test_not_a_zip(tmp_path):
    path = tmp_path / "text.keras"
    path.write_text("hello")
    _assert_fails_fast(path, r"not a complete \.keras \(zip\) archive")


def _cli(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(os.path.dirname(sys.executable), "sb-keras")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "sb_keras"]
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_evaluate_and_export_name_the_broken_file(good_model_file, tmp_path):
    """One line on stderr, exit status 2, no traceback, for both commands."""
    path = _rewrite(
        good_model_file,
        tmp_path / "broken.keras",
        lambda name, data: data[:10] if name.endswith(".h5") else data,
    )
    for args in (
        ("evaluate", path),
        ("export", path, str(tmp_path / "out.tflite")),
    ):
        result = _cli(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert f"sb-keras {args[0]}: error: Cannot load {path!r}" in line
        assert "model.weights.h5 is truncated or corrupt" in line
    assert not os.path.exists(tmp_path / "out.tflite")


def test_absurd_config_fails_fast_naming_file_and_argument(good_model_file, tmp_path):
    """A config asking for a 12002-layer ResNet is refused before building."""
    import json

    def absurd(name, data):
        if name != "config.json":
            return data
        config = json.loads(data)
        config["config"]["depth"] = 12002
        return json.dumps(config).encode()

    path = _rewrite(good_model_file, tmp_path / "absurd.keras", absurd)
    _assert_fails_fast(path, r"Received: depth=12002")
