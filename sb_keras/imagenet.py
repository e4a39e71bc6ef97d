"""ImageNet (ILSVRC-2012) streamed from tensorflow-datasets, never in memory.

The data is the tensorflow-datasets copy of ``imagenet2012`` (prepared once
from the manually downloaded archives; tfds stores every image as a JPEG),
found like every dataset of `sb_keras.data`: ``data_dir``, then
``$SB_KERAS_DATA_DIR``, then the tfds default folder (`data.find_source`).
Our ``"test"`` split is tfds's ``validation`` split (50,000 labelled images).

Augmentation, as the ResNet ImageNet recipe Kang & Kim follow (He et al.;
torchvision's ``RandomResizedCrop`` and ``RandomHorizontalFlip``):

* training: a random crop of 8 %-100 % of the image area with aspect ratio
  in [3/4, 4/3] (`tf.image.stateless_sample_distorted_bounding_box`; only
  the crop window is decoded), resized to 224x224, flipped with
  probability 1/2;
* evaluation: the shorter side resized to 256, then the central 224x224.

Both yield float32 pixels in [0, 255]: the models normalize themselves (see
`sb_keras.layers.PixelNormalization`). Resizing is bilinear with
antialiasing, like PIL's, which torchvision uses.

Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
ConvNets* (arXiv 2006.05066), ImageNet experiments.
"""

import typing

from sb_keras import data

TFDS_NAME = "imagenet2012"
TFDS_SPLITS = {"train": "train", "test": "validation"}
IMAGE_SIZE = 224
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
SHUFFLE_BUFFER = 10_000


class Streams(typing.NamedTuple):
    """What `load_streams` returns (a tuple: it unpacks in this order)."""

    train: typing.Any  # tf.data.Dataset of full batches, all epochs
    validation: typing.Any  # tf.data.Dataset, the last batch may be partial
    steps_per_epoch: int
    num_train: int
    num_validation: int


def resize_size(image_size=IMAGE_SIZE):
    """The shorter side before the evaluation center crop (256 for 224)."""
    return image_size * 8 // 7


def sample_crop_window(image_shape, seed):
    """A random crop window ``(top, left, height, width)`` (int32 tensors).

    Area 8 %-100 % of the image, aspect ratio (width / height) in
    [3/4, 4/3]; after 10 failed attempts, the whole image. A stateless
    function of ``seed`` (shape ``[2]``).
    """
    import tensorflow as tf

    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(image_shape, tf.int32),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[0], begin[1], size[0], size[1]


def _resize(image, size):
    import tensorflow as tf

    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def train_transform(image_bytes, seed, image_size=IMAGE_SIZE):
    """Random resized crop + horizontal flip of one JPEG: float32 [s, s, 3].

    Args:
        image_bytes: a scalar string tensor holding a JPEG.
        seed: int tensor of shape ``[2]``; the crop and the flip are
            stateless functions of it.
        image_size: the side of the output.
    """
    import tensorflow as tf

    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    top, left, height, width = sample_crop_window(
        tf.image.extract_jpeg_shape(image_bytes), crop_seed
    )
    image = tf.image.decode_and_crop_jpeg(
        image_bytes, tf.stack([top, left, height, width]), channels=3
    )
    image = _resize(image, (image_size, image_size))
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_transform(image, image_size=IMAGE_SIZE):
    """Shorter side to ``resize_size(image_size)``, central square crop.

    As torchvision's ``Resize(256)`` + ``CenterCrop(224)``: the longer side
    becomes ``floor(256 * long / short)``, the crop offset
    ``round((side - 224) / 2)`` (half to even).

    Args:
        image: uint8 (or float) ``[H, W, 3]``, decoded.
        image_size: the side of the output.

    Returns:
        float32 ``[image_size, image_size, 3]`` in [0, 255].

    Example:

    >>> import numpy as np
    >>> eval_transform(np.zeros((300, 400, 3), "uint8")).shape
    TensorShape([224, 224, 3])
    """
    import tensorflow as tf

    shape = tf.shape(image, out_type=tf.int64)
    h, w = shape[0], shape[1]
    target = tf.constant(resize_size(image_size), tf.int64)
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, target, target * h // short)
    new_w = tf.where(h <= w, target * w // short, target)
    image = _resize(image, tf.cast(tf.stack([new_h, new_w]), tf.int32))

    def offset(side):
        return tf.cast(tf.round(tf.cast(side - image_size, tf.float32) / 2), tf.int32)

    top, left = offset(new_h), offset(new_w)
    image = image[top : top + image_size, left : left + image_size]
    return tf.ensure_shape(image, (image_size, image_size, 3))


def _builder(split, data_dir):
    kind, where = data.find_source("imagenet", split, data_dir)
    if kind != "tfds":
        raise ValueError(
            "ImageNet is streamed from a tensorflow-datasets copy of "
            f"{TFDS_NAME}, not read from .npz files. Received: {where}"
        )
    import tensorflow_datasets as tfds

    return tfds.builder(TFDS_NAME, data_dir=where)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )


def _options(deterministic):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = bool(deterministic)
    return options


def train_dataset(
    batch_size,
    data_dir=None,
    seed=0,
    epochs=1,
    initial_epoch=0,
    limit=None,
    image_size=IMAGE_SIZE,
    deterministic=False,
    shuffle_buffer=SHUFFLE_BUFFER,
):
    """The training stream of epochs ``initial_epoch .. epochs-1``.

    Returns ``(dataset, steps_per_epoch, num_train)``; see `load_streams`.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("epochs", epochs, 1),
        ("initial_epoch", initial_epoch, 0),
        ("image_size", image_size, 1),
        ("shuffle_buffer", shuffle_buffer, 1),
    ):
        _check_int(name, value, low)
    if limit is not None:
        _check_int("limit", limit, 1)
    builder = _builder("train", data_dir)
    n = builder.info.splits[TFDS_SPLITS["train"]].num_examples
    n = min(n, limit) if limit else n
    if n < batch_size:
        raise ValueError(
            f"`batch_size` is larger than the {n} training images. "
            f"Received: batch_size={batch_size}"
        )
    options = _options(deterministic)
    first_seed = int(data.epoch_seed(seed, initial_epoch))
    source = builder.as_dataset(
        split=TFDS_SPLITS["train"],
        as_supervised=True,
        # With a limit, the same first `limit` images in every epoch.
        shuffle_files=limit is None,
        decoders={"image": tfds.decode.SkipDecoding()},  # decode the crop only
        read_config=tfds.ReadConfig(
            shuffle_seed=first_seed,
            shuffle_reshuffle_each_iteration=True,
            options=options,
        ),
    )
    if limit:
        source = source.take(limit)
    # Reshuffled at each pass (epoch) from one integer seed: a tensor seed
    # breaks `Dataset.shuffle` when TensorFlow's global seed is 0.
    source = source.shuffle(
        min(shuffle_buffer, n), seed=first_seed, reshuffle_each_iteration=True
    )

    # The pipeline functions are plain TF ops: AutoGraph would only cost time.
    @tf.autograph.experimental.do_not_convert
    def one_epoch(epoch):
        s = data.epoch_seed(seed, epoch)

        @tf.autograph.experimental.do_not_convert
        def load(i, example):
            image = train_transform(example[0], tf.stack([s, i]), image_size)
            return image, tf.cast(example[1], tf.int64)

        ds = source.enumerate().map(
            load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
        )
        return ds.batch(batch_size, drop_remainder=True)

    ds = tf.data.Dataset.range(initial_epoch, max(epochs, initial_epoch))
    ds = ds.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE).with_options(options)
    return ds, n // batch_size, n


def eval_dataset(batch_size, data_dir=None, limit=None, image_size=IMAGE_SIZE):
    """The validation split, in file order: ``(dataset, num_validation)``.

    The first ``limit`` images (tfds shuffled the split when preparing it),
    `eval_transform`-ed, in batches of ``batch_size`` (the last may be
    partial).
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _check_int("batch_size", batch_size, 1)
    _check_int("image_size", image_size, 1)
    if limit is not None:
        _check_int("test_limit", limit, 1)
    builder = _builder("test", data_dir)
    n = builder.info.splits[TFDS_SPLITS["test"]].num_examples
    options = _options(True)
    ds = builder.as_dataset(
        split=TFDS_SPLITS["test"],
        as_supervised=True,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(options=options),
    )
    if limit:
        ds, n = ds.take(limit), min(n, limit)

    @tf.autograph.experimental.do_not_convert
    def load(image_bytes, label):
        image = tf.io.decode_jpeg(image_bytes, channels=3)
        return eval_transform(image, image_size), tf.cast(label, tf.int64)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(options), n


def load_streams(
    batch_size,
    data_dir=None,
    seed=0,
    epochs=1,
    initial_epoch=0,
    limit=None,
    test_limit=None,
    image_size=IMAGE_SIZE,
    deterministic=False,
    shuffle_buffer=SHUFFLE_BUFFER,
):
    """ImageNet training and validation streams for ``fit``.

    Nothing is read but the tfds metadata: the number of training images
    (hence ``steps_per_epoch``) comes from the builder's split info.

    Each epoch reads the files in a new shuffled order and passes the
    examples through a ``shuffle_buffer``-long shuffle, both reshuffled at
    every epoch from one seed, ``epoch_seed(seed, initial_epoch)``
    (`sb_keras.data.epoch_seed`; the buffer also uses TensorFlow's global
    seed, which `sb_keras.training.train` sets from ``seed``), then augments
    them with `train_transform` seeded by ``(epoch_seed(seed, epoch),
    position in the epoch)``. With ``deterministic=True`` (ordered parallel
    reads and maps) the stream is a function of ``(seed, initial_epoch)``
    and the prepared files. A run resumed at epoch ``e`` therefore starts at
    the right epoch with epoch ``e``'s crop seeds, but its examples come in
    another order than in epoch ``e`` of an uninterrupted run: unlike
    `sb_keras.data.make_train_dataset`, no batch-for-batch replay. By
    default (``deterministic=False``) parallel reads and maps may reorder
    examples, for throughput.

    Args:
        batch_size: global batch size, for training and validation.
        data_dir: a tfds data directory with ``imagenet2012`` prepared (else
            ``$SB_KERAS_DATA_DIR``, then tfds's default).
        seed: integer seed of the run.
        epochs: the last epoch (exclusive), as ``fit(epochs=...)``.
        initial_epoch: the first epoch to produce.
        limit: only the first ``limit`` training images (read unshuffled,
            shuffled within), for smoke tests.
        test_limit: only the first ``test_limit`` validation images.
        image_size: the side of the crops (224; smaller for quick tests).
        deterministic: keep the order of parallel reads and maps.
        shuffle_buffer: examples in the training shuffle buffer (encoded
            JPEGs: 10,000 hold about 1 GB).

    Returns:
        `Streams` ``(train, validation, steps_per_epoch, num_train,
        num_validation)``: datasets of ``(float32 [B, s, s, 3] in [0, 255],
        int64 [B])``; training batches are full (``drop_remainder``).

    Raises:
        sb_keras.data.DataNotFoundError: ``imagenet2012`` is not prepared.
        ValueError: a bad argument, or more batch than images.

    Example:

    >>> streams = load_streams(256, data_dir="~/tensorflow_datasets",
    ...                        epochs=90)  # doctest: +SKIP
    >>> model.fit(streams.train, epochs=90,
    ...           steps_per_epoch=streams.steps_per_epoch,
    ...           validation_data=streams.validation)  # doctest: +SKIP
    """
    train, steps, n_train = train_dataset(
        batch_size,
        data_dir,
        seed=seed,
        epochs=epochs,
        initial_epoch=initial_epoch,
        limit=limit,
        image_size=image_size,
        deterministic=deterministic,
        shuffle_buffer=shuffle_buffer,
    )
    validation, n_val = eval_dataset(batch_size, data_dir, test_limit, image_size)
    return Streams(train, validation, steps, n_train, n_val)
