"""CIFAR-100 from a local folder of .npz files (generated arrays), into DenseNet."""

import keras
import numpy as np

import sb_keras
from sb_keras import data


def _write(folder, split, n, seed):
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    y = rng.randint(0, 100, n).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{split}.npz", x=x, y=y)
    return x, y


def test_cifar100_npz_folder_feeds_a_cifar100_model(tmp_path):
    assert data.DATASETS["cifar100"]["classes"] == 100
    x_train, y_train = _write(tmp_path / "cifar100", "train", 16, 0)
    x_test, y_test = _write(tmp_path, "test", 8, 1)  # flat layout too
    x, y = data.load_arrays("cifar100", "train", data_dir=str(tmp_path))
    np.testing.assert_array_equal(x, x_train)
    np.testing.assert_array_equal(y, y_train)
    xt, yt = data.load_arrays("cifar100", "test", data_dir=str(tmp_path), limit=5)
    np.testing.assert_array_equal(xt, x_test[:5])
    np.testing.assert_array_equal(yt, y_test[:5])
    model = sb_keras.DenseNet(
        blocks=(1, 1), growth_rate=4, share=True, shared_rank=4, unique_rank=1
    )
    assert model.output.shape[-1] == 100
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x.astype("float32"), y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
