"""Datasets: CIFAR-10/100 (and ImageNet via tfds) as arrays or tf.data.

Where the data comes from, in order:

1. ``data_dir`` (a ``--data-dir`` flag): a folder with ``train.npz`` and
   ``test.npz`` (arrays ``x`` uint8 ``[N, H, W, 3]`` and ``y`` ``[N]``), the
   layout of the project's offline CIFAR-10 copy; or a tensorflow-datasets
   data directory in which the dataset is prepared.
2. The environment variable ``SB_KERAS_DATA_DIR``: a folder holding one
   such folder per dataset (``$SB_KERAS_DATA_DIR/cifar10/test.npz``) or the
   ``.npz`` files themselves.
3. tensorflow-datasets: the prepared copy in its default data directory, or
   a download when the machine can reach the dataset's host.

The models of sb_keras normalize pixels themselves (see
`sb_keras.layers.PixelNormalization`), so the pipelines here yield float32
pixels in ``[0, 255]``, augmented as in the paper for training: 4-pixel zero
padding, a random 32x32 crop and a random horizontal flip.

`make_train_dataset` is the training stream of `sb_keras.training`: each
epoch's shuffle and augmentation are stateless functions of ``(seed,
epoch)``, so a run resumed at epoch ``e`` sees the batches an uninterrupted
run sees there.

ImageNet does not fit in memory: `sb_keras.imagenet` streams it from the
tensorflow-datasets copy found here, with the ImageNet augmentation.
"""

import os
import socket

import numpy as np

ENV_VAR = "SB_KERAS_DATA_DIR"
DATASETS = {
    "cifar10": {"classes": 10, "shape": (32, 32, 3), "tfds": "cifar10"},
    "cifar100": {"classes": 100, "shape": (32, 32, 3), "tfds": "cifar100"},
    "imagenet": {
        "classes": 1000,
        "shape": (224, 224, 3),
        "tfds": "imagenet2012",
    },
}
SPLITS = ("train", "test")
_TFDS_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}


class DataNotFoundError(FileNotFoundError):
    """No source has the requested dataset; the message says where we looked."""


def check_dataset(name):
    if name not in DATASETS:
        raise ValueError(
            f"`dataset` must be one of {sorted(DATASETS)}. Received: dataset={name!r}"
        )
    return DATASETS[name]


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")


def _npz_in(folder, dataset, split):
    """The ``{split}.npz`` for ``dataset`` in ``folder``, or None."""
    for candidate in (
        os.path.join(folder, f"{split}.npz"),
        os.path.join(folder, dataset, f"{split}.npz"),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_npz(path):
    with np.load(path, allow_pickle=False) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise ValueError(
                f"{path} must hold arrays 'x' and 'y'; missing {sorted(missing)}. "
                f"Received: arrays {sorted(f.files)}"
            )
        x, y = f["x"], f["y"]
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
        raise ValueError(
            f"{path}: expected x [N, H, W, 3] and y [N]. "
            f"Received: x {x.shape}, y {y.shape}"
        )
    return x, y.reshape(-1)


def check_arrays(x, y, dataset, source="arrays"):
    """Checks images and labels before they are used; returns them typed.

    Images must be pixels: uint8, or integers in ``[0, 255]`` (converted
    exactly). Floats are refused, even in ``[0, 255]``, because images
    scaled to ``[0, 1]`` or normalized would otherwise be truncated to
    nonsense pixels; so are NaN and out-of-range values. Labels must be
    integers in ``[0, classes)`` of ``dataset``.

    Args:
        x: images ``[N, H, W, 3]``.
        y: labels ``[N]``.
        dataset: a name of `DATASETS` (its number of classes).
        source: where the arrays come from (for the messages).

    Returns:
        ``(x uint8, y int64)``.

    Raises:
        ValueError: naming the source and the problem.
    """
    classes = check_dataset(dataset)["classes"]
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    if np.issubdtype(x.dtype, np.floating):
        if np.isnan(x).any():
            found = "NaN values"
        else:
            found = f"values in [{x.min():g}, {x.max():g}]" if x.size else "none"
        raise ValueError(
            f"{source}: images must be uint8 pixels in [0, 255]; found float "
            f"{found}. Store the raw pixels, not scaled or normalized images. "
            f"Received: x.dtype={x.dtype}"
        )
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(
                f"{source}: images must be uint8 pixels. Received: x.dtype={x.dtype}"
            )
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"{source}: images must be pixels in [0, 255]. Received: "
                f"x.dtype={x.dtype} with values in [{x.min()}, {x.max()}]"
            )
        x = x.astype(np.uint8)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be integers in [0, {classes}) for "
            f"dataset={dataset!r}. Received: y.dtype={y.dtype}"
        )
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(
            f"{source}: labels must be in [0, {classes}) for dataset={dataset!r}. "
            f"Received: labels in [{y.min()}, {y.max()}]"
        )
    return x, y.astype(np.int64)


def find_source(dataset, split="train", data_dir=None):
    """Where ``dataset``/``split`` will be read from, without reading it.

    Returns:
        ``("npz", path)`` or ``("tfds", data_dir_or_None)``.

    Raises:
        DataNotFoundError: with the places searched, when nothing has it.
    """
    info = check_dataset(dataset)
    _check_split(split)
    tried = []
    for origin, folder in (("data_dir", data_dir), (ENV_VAR, os.environ.get(ENV_VAR))):
        if not folder:
            continue
        if not os.path.isdir(folder):
            raise DataNotFoundError(
                f"The {origin} folder does not exist. Received: {origin}={folder!r}"
            )
        path = _npz_in(folder, dataset, split)
        if path:
            return ("npz", path)
        if _tfds_prepared(info["tfds"], folder):
            return ("tfds", folder)
        tried.append(
            f"{origin}={folder!r} (no {split}.npz, no {dataset}/{split}.npz, "
            "no prepared tensorflow-datasets copy)"
        )
    if _tfds_prepared(info["tfds"], None):
        return ("tfds", None)
    host = _TFDS_HOSTS.get(dataset)
    if host and _reachable(host):
        return ("tfds", None)
    tried.append(
        "tensorflow-datasets (not prepared, and its download host is not reachable)"
    )
    if dataset == "imagenet":
        hint = (
            f"Prepare {info['tfds']} with tensorflow-datasets (it needs the "
            "manually downloaded ILSVRC-2012 archives) and pass its data "
            f"directory as --data-dir or set {ENV_VAR}."
        )
    else:
        hint = (
            f"Pass --data-dir (a folder with {split}.npz holding x and y) or "
            f"set {ENV_VAR}."
        )
    raise DataNotFoundError(
        f"Could not find the {dataset} {split} split. Looked in: "
        + "; ".join(tried)
        + ". "
        + hint
    )


def _tfds_prepared(name, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return False
    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # unknown builder, broken install, ...
        return False


def _reachable(host, port=443, timeout=3.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_arrays(dataset="cifar10", split="train", data_dir=None, limit=None):
    """The whole split as NumPy arrays ``(x uint8 [N,H,W,3], y int64 [N])``.

    For datasets that fit in memory (CIFAR); stream ImageNet with
    `sb_keras.imagenet.load_streams`. The arrays are checked (`check_arrays`:
    uint8 pixels, labels in ``[0, classes)``) before anything uses them.

    Example:

    >>> x, y = load_arrays("cifar10", "test", data_dir="path/to/cifar10")
    ... # doctest: +SKIP
    """
    if dataset == "imagenet":
        raise ValueError(
            "ImageNet does not fit in memory as one array; stream it with "
            "`sb_keras.imagenet.load_streams` (what `sb-keras train --dataset "
            "imagenet` uses). Received: dataset='imagenet'"
        )
    kind, where = find_source(dataset, split, data_dir)
    if kind == "npz":
        x, y = _read_npz(where)
    else:
        import tensorflow_datasets as tfds

        ds = tfds.load(
            DATASETS[dataset]["tfds"],
            split=split,
            data_dir=where,
            as_supervised=True,
            batch_size=-1,
        )
        x, y = tfds.as_numpy(ds)
    x, y = check_arrays(x, y, dataset, source=where if kind == "npz" else dataset)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def augment(image, seed=None):
    """Pad 4 (zeros) + random crop back to size + random horizontal flip."""
    import tensorflow as tf

    h, w = image.shape[0], image.shape[1]
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    if seed is None:
        image = tf.image.random_crop(image, (h, w, image.shape[-1]))
        return tf.image.random_flip_left_right(image)
    image = tf.image.stateless_random_crop(image, (h, w, image.shape[-1]), seed)
    return tf.image.stateless_random_flip_left_right(image, seed + 1)


def make_dataset(
    x,
    y,
    batch_size,
    training=False,
    seed=None,
    deterministic=False,
    drop_remainder=None,
):
    """A ``tf.data`` pipeline over arrays: shuffle, augment, batch, prefetch.

    Args:
        x: uint8 images ``[N, H, W, 3]``.
        y: integer labels ``[N]``.
        batch_size: global batch size.
        training: shuffle every epoch and augment (pad 4, crop, flip).
        seed: seed of the shuffle and of the (stateless) augmentation.
        deterministic: keep element order fixed in parallel maps.
        drop_remainder: drop the last partial batch. Defaults to ``training``.

    Returns:
        A dataset of ``(float32 pixels in [0, 255], int64 labels)``.
    """
    import tensorflow as tf

    if drop_remainder is None:
        drop_remainder = training
    options = tf.data.Options()
    options.deterministic = bool(deterministic)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        if seed is None:
            ds = ds.map(
                lambda img, lab: (augment(img), lab),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        else:
            ds = ds.enumerate().map(
                lambda i, el: (
                    augment(el[0], tf.stack([tf.constant(seed, tf.int64), i])),
                    el[1],
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
    ds = ds.map(
        lambda img, lab: (tf.cast(img, tf.float32), lab),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def epoch_seed(seed, epoch):
    """The seed of one epoch's shuffle and augmentation (a pure function).

    A run resumed at epoch ``e`` therefore sees exactly the batches an
    uninterrupted run sees at epoch ``e``, whatever happened before.
    """
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    epoch = tf.cast(epoch, tf.int64)
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**31 - 1)


def make_train_dataset(x, y, batch_size, seed=0, epochs=1, initial_epoch=0):
    """A deterministic training stream: epochs ``initial_epoch .. epochs-1``.

    Every epoch is shuffled and augmented (pad 4, random crop, flip) with
    seeds that depend only on ``(seed, epoch)`` (`epoch_seed`), so the data
    of epoch ``e`` does not depend on how many epochs this process has
    already iterated: a run restarted from a checkpoint at epoch ``e`` sees
    the same batches as a run that never stopped. Batches are full
    (``len(x) // batch_size`` per epoch); pass that number as
    ``steps_per_epoch`` to ``fit``.

    Args:
        x: uint8 images ``[N, H, W, 3]``.
        y: integer labels ``[N]``.
        batch_size: global batch size.
        seed: integer seed of the run.
        epochs: the last epoch (exclusive), as ``fit(epochs=...)``.
        initial_epoch: the first epoch to produce.

    Returns:
        A ``tf.data.Dataset`` of ``(float32 pixels [B, H, W, 3], int64 [B])``.

    Example:

    >>> import numpy as np
    >>> x = np.zeros((8, 32, 32, 3), "uint8"); y = np.arange(8)
    >>> ds = make_train_dataset(x, y, batch_size=4, seed=1, epochs=2)
    >>> [tuple(b[0].shape) for b in ds]
    [(4, 32, 32, 3), (4, 32, 32, 3), (4, 32, 32, 3), (4, 32, 32, 3)]

    Reference: the augmentation of Kang & Kim (arXiv 2006.05066), as He et
    al.'s CIFAR ResNets.
    """
    import tensorflow as tf

    for arg, value, low in (
        ("batch_size", batch_size, 1),
        ("epochs", epochs, 1),
        ("initial_epoch", initial_epoch, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"`{arg}` must be an integer >= {low}. Received: {arg}={value!r}"
            )
    if len(x) < batch_size:
        raise ValueError(
            f"`batch_size` is larger than the {len(x)} training images. "
            f"Received: batch_size={batch_size}"
        )
    n = len(x)
    images = tf.constant(x)
    labels = tf.constant(np.asarray(y, np.int64))

    def one_epoch(epoch):
        s = epoch_seed(seed, epoch)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([s, tf.constant(0, tf.int64)])
        )

        def load(i, index):
            image = augment(tf.gather(images, index), tf.stack([s, i]))
            return tf.cast(image, tf.float32), tf.gather(labels, index)

        ds = tf.data.Dataset.from_tensor_slices(order).enumerate()
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=True)

    epochs_ds = tf.data.Dataset.range(initial_epoch, max(epochs, initial_epoch))
    ds = epochs_ds.flat_map(one_epoch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
