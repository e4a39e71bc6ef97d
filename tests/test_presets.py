"""Presets: the authors' checkpoints through a seeded cache, and users' own.

Tests never download: the cache is seeded from ``../shared/pretrained/net_rl2``
(the files ``keras.utils.get_file`` would fetch) and any network access
fails the test. Reference logits and top-1 come from that folder's README
(measured with the authors' own PyTorch code).
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras import presets
from tests.conftest import shared_path
from tests.test_export import randomize_batchnorm

NET_RL2 = shared_path("pretrained", "net_rl2")
# preset -> (reference key, unique params, correct of the 1000 exact images)
LOCAL = {
    "resnet56_s16u1_cifar10": ("CIFAR10_ResNet56_S16U1_7.46err", 270_842, 925),
    "resnet32_s16u1_double_cifar10": (
        "CIFAR10_ResNet32_Double_S16U1_6.93err",
        245_642,
        929,
    ),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", refuse)


def seed_cache(root, preset, source=None):
    """Places the authors' file where `keras.utils.get_file` looks for it."""
    file = presets.PRESETS[preset]["file"]
    source = source or os.path.join(NET_RL2, file)
    if not os.path.isfile(source):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    folder = os.path.join(root, "sb_keras", "net_rl2")
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(source, os.path.join(folder, file))
    return os.path.join(folder, file)


def exact_images():
    path = shared_path("datasets", "cifar10", "lossless_subset.npz")
    if not os.path.isfile(path):
        pytest.skip("the exact CIFAR-10 test images are not beside this checkout")
    with np.load(path) as f:
        x, y = f["x_test"].astype("float32"), f["y_test"].astype(np.int64)
    with np.load(os.path.join(NET_RL2, "reference_logits.npz")) as f:
        reference = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(reference["y"], y)
    return x, y, reference


def test_six_presets_name_registered_architectures():
    names = sb_keras.list_presets()
    assert len(names) == 6 and names == sb_keras.ResNet.list_presets()
    assert sb_keras.MobileNetV2.list_presets() == []
    files = {presets.PRESETS[n]["file"] for n in names}
    assert len(files) == 6
    for name in names:
        entry = presets.PRESETS[name]
        # The preset name is the registry name of its architecture + dataset.
        model_name = name.removesuffix("_cifar10")
        info = sb_keras.model_info(model_name)
        for key, value in entry["architecture"].items():
            assert info[key] == value, (name, key)
        assert entry["file"].startswith("CIFAR10_")
        assert f"{entry['stated_test_error']:.2f}err" in entry["file"]
    known = [n for n in names if presets.PRESETS[n]["sha256"]]
    assert sorted(known) == sorted(LOCAL)


@pytest.mark.parametrize(
    "preset",
    [
        "resnet32_s16u1_double_cifar10",
        pytest.param("resnet56_s16u1_cifar10", marks=pytest.mark.slow),
    ],
)
def test_from_preset_reproduces_the_reference_logits(preset, tmp_path):
    key, params, correct = LOCAL[preset]
    seeded = seed_cache(tmp_path, preset)
    x, y, reference = exact_images()
    model = sb_keras.from_preset(preset, cache_dir=tmp_path)
    assert type(model) is sb_keras.ResNet
    logits = model.predict(x, batch_size=250, verbose=0)
    assert np.abs(logits - reference[key]).max() <= 1e-4
    assert int((logits.argmax(1) == y).sum()) == correct

    folder = tmp_path / "sb_keras" / "presets" / preset
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "metadata.json",
        "model.weights.h5",
    ]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["parameter_count"] == params == sb_keras.count_params(model)
    assert meta["source"]["sha256"] == presets.PRESETS[preset]["sha256"]
    assert meta["source"]["commit"] == presets.AUTHORS_COMMIT
    assert meta["top1_exact_test_1000"]["value"] == correct / 1000
    assert "license" in meta

    # Offline from the converted cache alone, through the class.
    os.remove(seeded)
    again = sb_keras.ResNet.from_preset(preset, cache_dir=tmp_path)
    np.testing.assert_allclose(again.predict(x[:8], verbose=0), logits[:8], atol=1e-6)

    # A changed file of the preset directory is refused by its hash.
    weights = folder / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        sb_keras.from_preset(str(folder))


def test_corrupted_cached_checkpoint_is_refused(tmp_path):
    preset = "resnet32_s16u1_double_cifar10"
    path = seed_cache(tmp_path, preset)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match="does not match its sha256"):
        sb_keras.from_preset(preset, cache_dir=tmp_path)
    assert not (tmp_path / "sb_keras" / "presets" / preset).exists()


def test_unpublished_hash_is_recorded_at_first_download(tmp_path, monkeypatch):
    # A stand-in download: the ResNet-56 S16U1 file served for the preset
    # whose hash the references do not give (its architecture differs).
    preset = "resnet56_s16u1_double_cifar10"
    assert presets.PRESETS[preset]["sha256"] is None
    source = os.path.join(NET_RL2, presets.PRESETS["resnet56_s16u1_cifar10"]["file"])
    if not os.path.isfile(source):
        pytest.skip("the authors' checkpoints are not beside this checkout")

    def fake_get_file(fname, origin, file_hash, cache_subdir, cache_dir, **kwargs):
        assert origin == presets.ORIGIN + fname and file_hash is None
        return seed_cache(cache_dir, preset, source)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    with pytest.warns(UserWarning, match="recorded"):
        with pytest.raises(ValueError, match="another architecture"):
            sb_keras.from_preset(preset, cache_dir=tmp_path)
    cached = tmp_path / "sb_keras" / "net_rl2" / presets.PRESETS[preset]["file"]
    recorded = (cached.parent / (cached.name + ".sha256")).read_text().strip()
    assert recorded == presets.sha256_of(source)
    cached.write_bytes(cached.read_bytes()[:-1])  # truncated later
    with pytest.raises(ValueError, match="recorded at the first download"):
        sb_keras.from_preset(preset, cache_dir=tmp_path)


def test_save_to_preset_round_trip(tmp_path):
    model = randomize_batchnorm(sb_keras.ResNet(depth=14, share=True, num_classes=7))
    folder = tmp_path / "mine"
    model.save_to_preset(folder, metadata={"note": "fine-tuned"})
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["note"] == "fine-tuned" and meta["class_name"] == "ResNet"
    assert meta["parameter_count"] == sb_keras.count_params(model)
    restored = sb_keras.from_preset(str(folder))
    assert type(restored) is sb_keras.ResNet
    assert restored.get_config() == model.get_config()
    x = np.random.RandomState(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert type(sb_keras.ResNet.from_preset(folder, load_weights=False)) is (
        sb_keras.ResNet
    )
    with pytest.raises(ValueError, match="not a MobileNetV2"):
        sb_keras.MobileNetV2.from_preset(folder)
    # A file where the directory should be, and unknown names.
    with pytest.raises(ValueError, match="preset_dir="):
        sb_keras.save_to_preset(model, folder / "config.json")
    with pytest.raises(ValueError, match="Received: preset='resnet57_cifar10'"):
        sb_keras.from_preset("resnet57_cifar10", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Received: preset=3"):
        sb_keras.from_preset(3)
