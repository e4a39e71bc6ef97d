"""The authors' checkpoints: torch-free reading, conversion, writing, safety.

Reference numbers come from ``../shared/pretrained/net_rl2/README.md``
(measured with the authors' own PyTorch code) and its
``reference_logits.npz``; the images are the exact CIFAR-10 test pixels of
``../shared/datasets/cifar10/lossless_subset.npz``.
"""

import os
import pickle
import re

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras import checkpoints as ck
from tests.conftest import shared_path

PRETRAINED = shared_path("pretrained", "net_rl2")
# file -> (reference key, ResNet args, unique params, top-1 on the 1000 exact
# images, top-1 on the JPEG test.npz) from the README of the checkpoints.
RELEASED = {
    "CIFAR10_ResNet56_S16U1_7.46err.pth.pth": (
        "CIFAR10_ResNet56_S16U1_7.46err",
        {"depth": 56, "shared_rank": 16, "unique_rank": 1, "sharing": "single"},
        270_842,
        925,
        81.50,
    ),
    "CIFAR10_ResNet32_Double_S16U1_6.93err.pth": (
        "CIFAR10_ResNet32_Double_S16U1_6.93err",
        {"depth": 32, "shared_rank": 16, "unique_rank": 1, "sharing": "double"},
        245_642,
        929,
        80.86,
    ),
}
STORED_ACC = {
    "CIFAR10_ResNet56_S16U1_7.46err.pth.pth": 92.54,
    "CIFAR10_ResNet32_Double_S16U1_6.93err.pth": 93.07,
}


def _released(filename):
    path = os.path.join(PRETRAINED, filename)
    if not os.path.isfile(path):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    return path


def _exact_test_images():
    path = shared_path("datasets", "cifar10", "lossless_subset.npz")
    ref = os.path.join(PRETRAINED, "reference_logits.npz")
    if not (os.path.isfile(path) and os.path.isfile(ref)):
        pytest.skip("the exact CIFAR-10 test images are not beside this checkout")
    with np.load(path) as f:
        x, y = f["x_test"], f["y_test"].astype(np.int64)
    with np.load(ref) as f:
        reference = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(reference["y"], y)
    return x, y, reference


# ---------------------------------------------------------------------------
# The released checkpoints
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_released_checkpoint_reads_without_torch(filename):
    ckpt = ck.read_checkpoint(_released(filename))
    assert sorted(ckpt) == ["acc", "epoch", "net_state_dict", "optimizer_state_dict"]
    assert float(ckpt["acc"]) == pytest.approx(STORED_ACC[filename], abs=1e-4)
    assert isinstance(ckpt["epoch"], int)
    sd = ckpt["net_state_dict"]
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["conv1.weight"].dtype == np.float32
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    # The optimizer's momentum buffers are read too (one per parameter).
    state = ckpt["optimizer_state_dict"]["state"]
    assert len(state) == len(ckpt["optimizer_state_dict"]["param_groups"][0]["params"])


@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_released_checkpoint_architecture_and_params(filename):
    _, args, params, _, _ = RELEASED[filename]
    sd = ck.read_state_dict(_released(filename))
    config = ck.infer_architecture(sd)
    assert config == {
        **args,
        "share": True,
        "num_classes": 10,
        "preprocessing": "imagenet",
        "orthogonality_include_unique": True,
    }
    # The README's unique parameter count (BN statistics excluded).
    model = _converted(filename)
    assert sb_keras.count_params(model) == params
    assert model.get_layer("preprocessing").mean == (0.485, 0.456, 0.406)
    assert model.get_layer("preprocessing").std == (0.229, 0.224, 0.225)


def _infer(model, x):
    """Inference-mode logits, eagerly (no tracing: fast for a few images)."""
    return np.asarray(model(np.asarray(x, "float32"), training=False))


_MODELS = {}
_LOGITS = {}


def _converted(filename):
    """The converted released checkpoint (built once per session)."""
    if filename not in _MODELS:
        _MODELS[filename] = sb_keras.load_authors_checkpoint(_released(filename))
    return _MODELS[filename]


def _logits(filename, count):
    """Logits of the converted checkpoint on the first ``count`` exact images."""
    key = (filename, count)
    if key not in _LOGITS:
        x, _, _ = _exact_test_images()
        model = _converted(filename)
        batches = [x[i : i + 250] for i in range(0, count, 250)]
        _LOGITS[key] = np.concatenate(
            [_infer(model, b[: count - i * 250]) for i, b in enumerate(batches)]
        )
    return _LOGITS[key]


@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_released_checkpoint_logits_first_100(filename):
    x, _, reference = _exact_test_images()
    ref = reference[RELEASED[filename][0]][:100]
    logits = _logits(filename, 100)
    assert np.max(np.abs(logits - ref)) <= 1e-4
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(ref, -1))


@pytest.mark.slow
@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_released_checkpoint_logits_and_top1_on_1000_exact_images(filename):
    _, y, reference = _exact_test_images()
    ref_key, _, _, correct, _ = RELEASED[filename]
    ref = reference[ref_key]
    logits = _logits(filename, 1000)
    assert logits.shape == (1000, 10)
    assert np.max(np.abs(logits - ref)) <= 1e-4
    assert int(np.sum(np.argmax(logits, -1) == np.argmax(ref, -1))) == 1000
    assert int(np.sum(np.argmax(logits, -1) == y)) == correct


@pytest.mark.slow
@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_released_checkpoint_top1_on_jpeg_test_set(filename, cifar10_dir):
    from sb_keras.evaluate import evaluate

    result = evaluate(_released(filename), data_dir=cifar10_dir, batch_size=500)
    assert result["total"] == 10_000
    assert result["top1"] == pytest.approx(RELEASED[filename][4], abs=0.05)


# ---------------------------------------------------------------------------
# Round trip on configurations the converter was not shown
# ---------------------------------------------------------------------------


def _randomize(model, seed):
    """Random weights everywhere, including non-trivial BN statistics."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if "num_batches_tracked" in v.path:
            v.assign(rng.integers(0, 10**6, shape, dtype=np.int64))
            continue
        if "moving_variance" in v.path:
            value = rng.uniform(0.3, 2.0, shape)
        elif "gamma" in v.path:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.2, shape)
        v.assign(value.astype("float32"))


@pytest.mark.parametrize(
    "args, fmt",
    [
        ({"depth": 20, "shared_rank": 8, "unique_rank": 2, "sharing": "single"}, "zip"),
        (
            {"depth": 14, "shared_rank": 4, "unique_rank": 0, "sharing": "double"},
            "legacy",
        ),
        ({"depth": 14, "shared_rank": 0, "unique_rank": 3, "sharing": "single"}, "zip"),
    ],
    ids=["d20_s8u2_single_zip", "d14_s4u0_double_legacy", "d14_s0u3_single_zip"],
)
def test_round_trip_unseen_configurations(tmp_path, args, fmt):
    unique_penalty = args["shared_rank"] > 0 and args["unique_rank"] > 0
    model = sb_keras.ResNet(
        share=True,
        orthogonality_include_unique=unique_penalty,
        batchnorm="pytorch",  # as converted: num_batches_tracked round-trips too
        **args,
    )
    _randomize(model, seed=args["depth"] + args["shared_rank"])
    path = str(tmp_path / f"model.{fmt}.pth")
    ck.save_authors_state_dict(model, path, format=fmt, extra={"epoch": 7})
    with open(path, "rb") as f:
        assert f.read(4).startswith(b"PK" if fmt == "zip" else b"\x80\x02")

    assert ck.read_checkpoint(path)["epoch"] == 7
    restored = ck.load_authors_checkpoint(path)
    assert restored.get_config() == {**model.get_config(), "name": restored.name}
    for a, b in zip(model.weights, restored.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3))
    np.testing.assert_array_equal(_infer(restored, x), _infer(model, x))


def test_written_state_dict_has_authors_layout():
    model = sb_keras.ResNet(depth=14, share=True, shared_rank=4, unique_rank=1)
    sd = ck.authors_state_dict(model)
    # Double sharing: model-level bases and one copy per decomposed block.
    assert sd["shared_basis_2_1.weight"].shape == (8, 32, 3, 3)
    assert sd["layer2.1.shared_basis_2.weight"] is sd["shared_basis_2_2.weight"]
    assert "layer2.0.shared_basis_1.weight" not in sd
    assert sd["layer3.1.basis_conv1.weight"].shape == (4, 64, 3, 3)
    assert sd["layer3.1.coeff_conv1.weight"].shape == (64, 20, 1, 1)
    assert sd["fc.weight"].shape == (10, 64)
    # The unique response comes first: column 0..u-1 of the coefficients.
    layer = model.get_layer("stage3_block2_conv1")
    np.testing.assert_array_equal(
        sd["layer3.1.coeff_conv1.weight"][:, :4, 0, 0],
        np.asarray(layer.coefficients)[0, 0, :4, :].T,
    )


def test_plain_resnet_round_trip(tmp_path):
    model = sb_keras.ResNet(depth=8)
    _randomize(model, seed=3)
    path = str(tmp_path / "plain.pth")
    ck.save_authors_state_dict(model, path)
    restored = ck.load_authors_checkpoint(path)
    assert restored.share is False and restored.depth == 8
    # The authors' ResNet_Basis of depth 8 allocates bases no block uses.
    sd = ck.authors_state_dict(model)
    sd["shared_basis_1_1.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    assert ck.convert_state_dict(sd).depth == 8
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3))
    np.testing.assert_array_equal(_infer(restored, x), _infer(model, x))


def test_write_checkpoint_plain_objects_round_trip(tmp_path):
    shared = np.arange(6, dtype=np.float32).reshape(2, 3)
    obj = {
        "a": shared,
        "b": [shared, np.array(3, dtype=np.int64), -5, 2**40, 1.5, "s", None, True],
        "c": (np.zeros((0, 4), np.float16), np.array([True, False])),
        "d": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    }
    for fmt in ("legacy", "zip"):
        path = str(tmp_path / f"obj_{fmt}.pt")
        ck.write_checkpoint(obj, path, format=fmt)
        back = ck.read_checkpoint(path)
        np.testing.assert_array_equal(back["a"], shared)
        np.testing.assert_array_equal(back["b"][0], shared)
        assert back["b"][1:] == [3, -5, 2**40, 1.5, "s", None, True]
        assert back["c"][0].shape == (0, 4) and back["c"][0].dtype == np.float16
        np.testing.assert_array_equal(back["c"][1], [True, False])
        np.testing.assert_array_equal(back["d"], obj["d"])


def test_write_checkpoint_rejects_bad_format(tmp_path):
    with pytest.raises(ValueError, match="format='npz'"):
        ck.write_checkpoint({}, str(tmp_path / "x.pth"), format="npz")


def test_save_authors_state_dict_rejects_imagenet_models():
    model = sb_keras.ResNet(depth=18, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="CIFAR ResNets"):
        ck.authors_state_dict(model)


# ---------------------------------------------------------------------------
# Safety and errors
# ---------------------------------------------------------------------------

_PREAMBLE = b"".join(
    pickle.dumps(obj, protocol=2)
    for obj in (
        ck.reader._LEGACY_MAGIC,
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
    )
)


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _exploit_pickles(marker):
    command = f"touch {marker}"
    raw = command.encode()
    # ``os.system`` spelled as the module a hand-made pickle would use ...
    handmade = (
        b"\x80\x02cos\nsystem\nX" + len(raw).to_bytes(4, "little") + raw + b"\x85R."
    )
    # ... and as Python's pickler writes it (posix.system / nt.system).
    return [handmade, pickle.dumps({"w": _Exploit(command)}, protocol=2)]


@pytest.mark.parametrize("fmt", ["legacy", "zip", "bare"])
def test_foreign_global_is_refused_and_nothing_runs(tmp_path, fmt):
    import zipfile

    marker = tmp_path / "pwned"
    for i, payload in enumerate(_exploit_pickles(marker)):
        path = str(tmp_path / f"evil{i}.pth")
        if fmt == "zip":
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("archive/data.pkl", payload)
        elif fmt == "legacy":
            with open(path, "wb") as f:
                f.write(_PREAMBLE + payload)
        else:  # a plain pickle where the legacy magic number is expected
            with open(path, "wb") as f:
                f.write(payload)
        with pytest.raises(ck.UnsafeCheckpointError, match=r"global=\w+\.system"):
            ck.read_checkpoint(path)
        with pytest.raises(ck.UnsafeCheckpointError):
            sb_keras.load_authors_checkpoint(path)
        assert not marker.exists()
    # The payload is live: Python's own pickle would have run it.
    pickle.loads(_exploit_pickles(marker)[0])
    assert marker.exists()


def test_other_globals_are_refused(tmp_path):
    path = str(tmp_path / "module.pth")
    payload = b"\x80\x02ctorch.nn.modules.conv\nConv2d\n)R."
    with open(path, "wb") as f:
        f.write(_PREAMBLE + payload)
    with pytest.raises(
        ck.UnsafeCheckpointError, match=r"global=torch\.nn\.modules\.conv\.Conv2d"
    ):
        ck.read_checkpoint(path)


def _small_state(tmp_path, fmt="legacy"):
    path = str(tmp_path / f"small_{fmt}.pth")
    obj = {
        "net_state_dict": {
            "a.weight": np.ones((3, 4), np.float32),
            "b.weight": np.arange(5, dtype=np.float32),
        }
    }
    ck.write_checkpoint(obj, path, format=fmt)
    return path


def test_truncated_legacy_file_names_key_and_shape(tmp_path):
    path = _small_state(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    cut = str(tmp_path / "cut.pth")
    with open(cut, "wb") as f:
        f.write(data[:-4])  # the last storage loses one float
    with pytest.raises(
        ck.CheckpointError,
        match=r"'net_state_dict/b\.weight' of shape \(5,\).*truncated",
    ):
        ck.read_state_dict(cut)
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 3])  # cut inside the pickle
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.read_state_dict(cut)


def test_truncated_released_checkpoint(tmp_path):
    src = _released("CIFAR10_ResNet32_Double_S16U1_6.93err.pth")
    with open(src, "rb") as f:
        data = f.read()
    cut = str(tmp_path / "cut.pth")
    with open(cut, "wb") as f:
        f.write(data[:-1000])
    with pytest.raises(ck.CheckpointError, match=r"'[\w./]+' of shape \(.*truncated"):
        sb_keras.load_authors_checkpoint(cut)


def test_truncated_zip_file(tmp_path):
    path = _small_state(tmp_path, "zip")
    with open(path, "rb") as f:
        data = f.read()
    cut = str(tmp_path / "cut.pth")
    with open(cut, "wb") as f:
        f.write(data[:-30])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.read_state_dict(cut)


def test_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "x.pth")
    with open(path, "wb") as f:
        f.write(b"hello world")
    with pytest.raises(ck.CheckpointError, match="neither a zip nor a legacy"):
        ck.read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        ck.read_checkpoint(str(tmp_path / "nothing.pth"))


@pytest.fixture(scope="module")
def small_state_dict():
    model = sb_keras.ResNet(depth=14, share=True, sharing="single")
    return ck.authors_state_dict(model)


def test_missing_key_names_key_and_shape(small_state_dict):
    sd = dict(small_state_dict)
    del sd["layer2.1.coeff_conv2.weight"]
    with pytest.raises(
        ck.CheckpointError,
        match=r"no 'layer2\.1\.coeff_conv2\.weight'.*\(32, 34, 1, 1\)",
    ):
        ck.convert_state_dict(sd)
    del sd["conv1.weight"]
    with pytest.raises(ck.CheckpointError, match=r"no 'conv1\.weight'"):
        ck.infer_architecture(sd)


def test_wrong_shape_names_key_and_both_shapes(small_state_dict):
    sd = dict(small_state_dict)
    sd["layer3.1.basis_bn1.running_var"] = np.ones(67, np.float32)
    with pytest.raises(
        ck.CheckpointError,
        match=r"'layer3\.1\.basis_bn1\.running_var' has shape \(67,\).*\(68,\)",
    ):
        ck.convert_state_dict(sd)
    sd = dict(small_state_dict)
    sd["layer1.0.conv2.weight"] = np.ones((16, 16, 5, 5), np.float32)
    with pytest.raises(ck.CheckpointError, match=r"\(16, 16, 5, 5\).*\(16, 16, 3, 3\)"):
        ck.convert_state_dict(sd)


def test_inconsistent_basis_copy_and_extra_keys(small_state_dict):
    sd = dict(small_state_dict)
    sd["layer1.1.shared_basis.weight"] = sd["layer1.1.shared_basis.weight"] + 1.0
    with pytest.raises(ck.CheckpointError, match="layer1.1.shared_basis.weight"):
        ck.convert_state_dict(sd)
    sd = dict(small_state_dict)
    sd["layer9.extra"] = np.zeros(3, np.float32)
    sd["stray.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ck.CheckpointError):
        ck.convert_state_dict(sd)
    sd.pop("layer9.extra")
    with pytest.raises(ck.CheckpointError, match="stray.weight"):
        ck.convert_state_dict(sd)
    model = ck.convert_state_dict(sd, strict=False)
    assert model.name == "resnet14_s16u1"


def test_uneven_stages_are_refused(small_state_dict):
    sd = {k: v for k, v in small_state_dict.items() if not k.startswith("layer3.1.")}
    with pytest.raises(ck.CheckpointError, match="same number of blocks"):
        ck.infer_architecture(sd)


def test_converted_model_saves_and_reloads(tmp_path, small_state_dict):
    model = ck.convert_state_dict(small_state_dict)
    path = str(tmp_path / "converted.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3))
    np.testing.assert_allclose(_infer(restored, x), _infer(model, x), atol=1e-6)


def test_no_torch_import_anywhere():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pattern = re.compile(r"^\s*(import|from)\s+torch\b", re.MULTILINE)
    offenders = []
    for folder in ("sb_keras", "tests"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        if pattern.search(f.read()):
                            offenders.append(os.path.join(dirpath, name))
    assert not offenders


def _op_str(text):
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _op_ints(values):
    body = b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in values)
    return b"(" + body + b"t"


def _op_tensor(key, numel, size, stride, offset=0):
    """Opcodes of ``torch._utils._rebuild_tensor_v2`` as torch.save writes them."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"("
        + _op_str("storage")
        + b"ctorch\nFloatStorage\n"
        + _op_str(key)
        + _op_str("cuda:0")
        + b"J"
        + numel.to_bytes(4, "little")
        + b"tQ"
        + b"J"
        + offset.to_bytes(4, "little")
        + _op_ints(size)
        + _op_ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _handmade_zip(path, payload, storage):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/version", "3\n")
        z.writestr("ckpt/data.pkl", payload)
        z.writestr("ckpt/data/0", storage.astype("<f4").tobytes())


def test_handmade_zip_with_strided_views(tmp_path):
    """A zip checkpoint written opcode by opcode (not by our writer)."""
    storage = np.arange(12, dtype=np.float32)
    payload = (
        b"\x80\x02}("
        + _op_str("t")  # a transposed (2, 3) view: strides (1, 2)
        + _op_tensor("0", 12, (2, 3), (1, 2))
        + _op_str("s")  # a slice starting at element 5
        + _op_tensor("0", 12, (3,), (2,), offset=5)
        + b"u."
    )
    path = str(tmp_path / "handmade.pt")
    _handmade_zip(path, payload, storage)
    sd = ck.read_state_dict(path)
    np.testing.assert_array_equal(sd["t"], storage[:6].reshape(3, 2).T)
    np.testing.assert_array_equal(sd["s"], storage[5:11:2])
    payload = b"\x80\x02}(" + _op_str("big") + _op_tensor("0", 12, (4, 4), (4, 1))
    _handmade_zip(path, payload + b"u.", storage)
    with pytest.raises(ck.CheckpointError, match=r"'big' of shape \(4, 4\).*fit"):
        ck.read_state_dict(path)


def test_pickle_build_on_a_tensor_is_refused(tmp_path):
    storage = np.arange(4, dtype=np.float32)
    payload = (
        b"\x80\x02}("
        + _op_str("w")
        + _op_tensor("0", 4, (4,), (1,))
        + b"}("
        + _op_str("stride")
        + _op_ints([2**30])
        + b"ub"  # BUILD: rewrite the stride after the checks
        + b"u."
    )
    path = str(tmp_path / "build.pt")
    _handmade_zip(path, payload, storage)
    with pytest.raises(ck.UnsafeCheckpointError, match="modifies a Tensor"):
        ck.read_checkpoint(path)
