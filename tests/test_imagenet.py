"""ImageNet streamed from tensorflow-datasets: augmentation, streams, train.

No ImageNet here: the fixture writes only the metadata of a prepared
``imagenet2012`` (so `data.find_source` finds it like a real copy) and
`tfds.testing.mock_data` serves a few random JPEGs (5-50 px sides) for any
split, in a fixed order.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

from sb_keras import data
from sb_keras import imagenet
from sb_keras.training import train

N = 6  # mocked examples per split


def write_metadata(folder, num_examples=N):
    """A tfds data dir in which imagenet2012 looks prepared (no records)."""
    builder = tfds.builder(imagenet.TFDS_NAME, data_dir=str(folder))
    builder.info.set_splits(
        splits_lib.SplitDict(
            [
                splits_lib.SplitInfo(
                    name=split,
                    shard_lengths=[num_examples],
                    num_bytes=0,
                    filename_template=None,
                )
                for split in ("train", "validation")
            ]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    return str(folder)


@pytest.fixture
def imagenet_dir(tmp_path):
    folder = write_metadata(tmp_path / "tfds")
    with tfds.testing.mock_data(
        num_examples=N, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=folder
    ):
        yield folder


def raw_examples(folder, split):
    """The mocked (JPEG bytes, label) pairs, in stream order."""
    ds = tfds.load(
        imagenet.TFDS_NAME,
        split=split,
        data_dir=folder,
        as_supervised=True,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return list(ds.as_numpy_iterator())


def by_label(batches):
    """{label: image} over a list of (images, labels) batches."""
    return {int(y): x for xs, ys in batches for x, y in zip(xs, ys)}


def test_streams_shapes_dtypes_and_full_training_batches(imagenet_dir):
    assert data.find_source("imagenet", "train", imagenet_dir) == (
        "tfds",
        imagenet_dir,
    )
    streams = imagenet.load_streams(4, imagenet_dir, epochs=2, test_limit=5)
    assert streams[2:] == (1, N, 5)  # steps from the split info: 6 // 4
    train_batches = list(streams.train.as_numpy_iterator())
    assert len(train_batches) == 2  # one full batch per epoch, 2 dropped
    for x, y in train_batches:
        assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32
        assert y.shape == (4,) and y.dtype == np.int64
        assert 0 <= x.min() and x.max() <= 255 and x.max() > 1
    val = list(streams.validation.as_numpy_iterator())
    assert [x.shape for x, _ in val] == [(4, 224, 224, 3), (1, 224, 224, 3)]
    assert all(x.dtype == np.float32 and y.dtype == np.int64 for x, y in val)
    with pytest.raises(ValueError, match="larger than the 3 training images"):
        imagenet.load_streams(4, imagenet_dir, limit=3)


def test_crops_change_every_epoch_and_repeat_for_the_same_seed(imagenet_dir):
    def stream(**kw):
        ds, _, _ = imagenet.train_dataset(
            N, imagenet_dir, image_size=48, deterministic=True, **kw
        )
        return list(ds.as_numpy_iterator())

    run = stream(seed=3, epochs=2)
    again = stream(seed=3, epochs=2)
    for (x1, y1), (x2, y2) in zip(run, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # Same images (aligned by their distinct labels), other crops.
    first, second = by_label(run[:1]), by_label(run[1:])
    assert len(first) == N and first.keys() == second.keys()
    assert all(not np.allclose(first[k], second[k]) for k in first)
    other_seed = by_label(stream(seed=4, epochs=1))
    assert all(not np.allclose(first[k], other_seed[k]) for k in first)
    # Each epoch is reshuffled too.
    assert sorted(run[0][1]) == sorted(run[1][1])
    assert list(run[0][1]) != list(run[1][1])


def test_crop_windows_follow_the_area_and_aspect_ranges():
    windows = np.array(
        [
            [int(v) for v in imagenet.sample_crop_window((300, 400, 3), [7, s])]
            for s in range(200)
        ]
    )
    top, left, h, w = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 300).all() and (left + w <= 400).all()
    area = h * w / (300 * 400)
    aspect = w / h
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert area.min() < 0.2 and area.max() > 0.8  # the range is used
    assert len({tuple(row) for row in windows}) > 150


def test_train_transform_is_a_resized_window_maybe_flipped():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    image = np.kron(small, np.ones((8, 8, 1), np.uint8))  # 120x160, smooth
    jpeg = tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False)
    decoded = tf.io.decode_jpeg(jpeg, channels=3)
    flips = set()
    for s in range(12):
        seed = tf.constant([5, s], tf.int64)
        out = imagenet.train_transform(jpeg, seed, image_size=32).numpy()
        np.testing.assert_array_equal(
            out, imagenet.train_transform(jpeg, seed, image_size=32).numpy()
        )
        crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
        top, left, h, w = (
            int(v) for v in imagenet.sample_crop_window(tf.shape(decoded), crop_seed)
        )
        crop = decoded[top : top + h, left : left + w]
        expected = tf.image.resize(crop, (32, 32), antialias=True).numpy()
        flipped = not np.allclose(out, expected, atol=1e-3)
        if flipped:
            np.testing.assert_allclose(out, expected[:, ::-1], atol=1e-3)
        flips.add(flipped)
    assert flips == {True, False}


@pytest.mark.parametrize("shape", [(256, 300, 3), (335, 256, 3)])
def test_eval_on_a_256_short_side_is_the_numpy_center_crop(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    top = round((shape[0] - 224) / 2)  # half to even (55.5 -> 56), as torchvision
    left = round((shape[1] - 224) / 2)
    expected = image[top : top + 224, left : left + 224].astype(np.float32)
    out = imagenet.eval_transform(image).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-3)


@pytest.mark.parametrize(
    "shape, image_size, resized, offsets",
    [
        ((300, 400, 3), 224, (256, 341), (16, 58)),  # 58.5 rounds to even
        ((512, 686, 3), 224, (256, 343), (16, 60)),  # 59.5 too
        ((500, 375, 3), 224, (341, 256), (58, 16)),
        ((90, 120, 3), 64, (73, 97), (4, 16)),  # 73 = 64 * 8 // 7
    ],
)
def test_eval_is_a_center_crop_of_the_shorter_side_resize(
    shape, image_size, resized, offsets
):
    image = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    big = tf.image.resize(image, resized, antialias=True).numpy()
    top, left = offsets
    expected = big[top : top + image_size, left : left + image_size]
    out = imagenet.eval_transform(image, image_size).numpy()
    assert out.shape == (image_size, image_size, 3)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_validation_stream_is_the_first_images_transformed(imagenet_dir):
    ds, n = imagenet.eval_dataset(3, imagenet_dir, limit=4, image_size=40)
    assert n == 4
    xs, ys = zip(*ds.as_numpy_iterator())
    raw = raw_examples(imagenet_dir, "validation")[:4]
    np.testing.assert_array_equal(np.concatenate(ys), [y for _, y in raw])
    expected = [
        imagenet.eval_transform(tf.io.decode_jpeg(b, channels=3), 40) for b, _ in raw
    ]
    np.testing.assert_allclose(np.concatenate(xs), np.stack(expected), atol=1e-4)


def test_train_resnet18_end_to_end_on_the_stream(imagenet_dir, tmp_path):
    metrics = train(
        model="resnet18_imagenet",
        dataset="imagenet",
        data_dir=imagenet_dir,
        image_size=64,
        limit=4,
        test_limit=3,
        epochs=1,
        batch_size=2,
        output=str(tmp_path / "run"),
        strategy="none",
        verbose=0,
        tensorboard=False,
    )
    assert metrics["train_images"] == 4 and metrics["test_images"] == 3
    assert len(metrics["history"]["loss"]) == 1
    assert np.isfinite(metrics["history"]["loss"][0])
    model = keras.models.load_model(str(tmp_path / "run" / "model.keras"))
    assert model.input_shape == (None, 64, 64, 3)
    assert model.output_shape == (None, 1000)


def test_image_size_is_for_imagenet_only(tmp_path):
    with pytest.raises(ValueError, match="image_size=64, dataset='cifar10'"):
        train(dataset="cifar10", image_size=64, output=str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_imagenet_needs_a_tfds_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "_tfds_prepared", lambda name, data_dir: False)
    with pytest.raises(data.DataNotFoundError, match="Prepare imagenet2012"):
        imagenet.load_streams(2, str(tmp_path))
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 8, 8, 3), "uint8"), y=[0, 1])
    with pytest.raises(ValueError, match="not read from .npz files"):
        imagenet.load_streams(2, str(tmp_path))


def test_load_arrays_refuses_imagenet_with_the_streaming_hint():
    with pytest.raises(ValueError, match="load_streams.*Received: dataset='imagenet'"):
        data.load_arrays("imagenet", "test")
