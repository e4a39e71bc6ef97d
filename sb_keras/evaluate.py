"""Top-1 accuracy of a model file on the CIFAR-10 test set.

`evaluate` takes a model or a file and dispatches on the file type through
`PREDICTORS` (suffix -> function returning a ``predict(x) -> logits``
callable): ``.keras`` files load with `sb_keras.saving.load_model`; ``.pth``
and ``.pt`` files are the authors' checkpoints, converted on the fly with
`sb_keras.checkpoints.load_authors_checkpoint`. Another format (``.tflite``)
needs one more entry in `PREDICTORS`.

The test images come from `sb_keras.data.load_arrays` (a ``--data-dir`` with
``test.npz``, ``$SB_KERAS_DATA_DIR``, or a prepared tensorflow-datasets
copy) as uint8 RGB pixels; sb_keras models normalize them themselves.

Example:

>>> from sb_keras.evaluate import evaluate
>>> evaluate("resnet56.keras", data_dir="cifar10")  # doctest: +SKIP
{'top1': 92.5, 'correct': 925, 'total': 1000}
"""

import os

import numpy as np


def _keras_model_predictor(model, batch_size):
    def predict(x):
        x = np.asarray(x, dtype="float32")
        if len(x) <= batch_size:  # one batch: run eagerly, skip the tracing
            return np.asarray(model(x, training=False))
        return model.predict(x, batch_size=batch_size, verbose=0)

    return predict


def _keras_file_predictor(path, batch_size):
    from sb_keras import saving  # checks the file, registers the sb_keras classes

    return _keras_model_predictor(saving.load_model(path), batch_size)


def _checkpoint_predictor(path, batch_size):
    from sb_keras.checkpoints import load_authors_checkpoint

    return _keras_model_predictor(load_authors_checkpoint(path), batch_size)


def _tflite_predictor(path, batch_size):
    from sb_keras import litert

    def predict(x):
        return litert.predict(path, x, batch_size=batch_size)

    return predict


# File suffix -> predictor(path, batch_size) returning predict(x uint8) -> logits.
PREDICTORS = {
    ".keras": _keras_file_predictor,
    ".pth": _checkpoint_predictor,
    ".pt": _checkpoint_predictor,
    ".tflite": _tflite_predictor,
}


def get_predictor(model, batch_size=200):
    """A ``predict(x_uint8) -> logits`` function for a model or a model file.

    Args:
        model: a `keras.Model` taking ``[0, 255]`` pixels, or a path whose
            suffix is a key of `PREDICTORS`.
        batch_size: images per inference batch.
    """
    if not isinstance(model, (str, os.PathLike)):
        return _keras_model_predictor(model, batch_size)
    path = os.fspath(model)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PREDICTORS:
        raise ValueError(
            f"Cannot evaluate a '{suffix}' file; supported: {sorted(PREDICTORS)}. "
            f"Received: model={path!r}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file at model={path!r}")
    return PREDICTORS[suffix](path, batch_size)


def top1(logits, labels):
    """``(correct, total)`` of the arg-max predictions."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(
            "`logits` must be [N, classes] with one row per label. Received: "
            f"logits shape {logits.shape}, labels shape {labels.shape}"
        )
    return int(np.sum(np.argmax(logits, axis=-1) == labels)), len(labels)


def _check_npy_path(path):
    """``path`` made absolute, if a ``.npy`` file can be written there."""
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise ValueError(
            f"The logits file must end in '.npy'. Received: logits_path={path!r}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or os.path.isdir(path):
        raise ValueError(
            "The logits file's folder does not exist (or the path is a folder). "
            f"Received: logits_path={path!r}"
        )
    return os.path.abspath(path)


def save_logits(path, logits):
    """Writes ``logits`` as a float32 ``.npy`` file, atomically."""
    from sb_keras import io_utils

    path = _check_npy_path(path)
    with io_utils.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(logits, np.float32))


def evaluate(
    model,
    dataset="cifar10",
    data_dir=None,
    limit=None,
    batch_size=200,
    split="test",
    logits_path=None,
):
    """Top-1 accuracy of a model or model file on a test split.

    Args:
        model: a `keras.Model` taking RGB pixels in ``[0, 255]``, a ``.keras``
            file or an authors' ``.pth`` checkpoint (see `PREDICTORS`).
        dataset: a dataset of `sb_keras.data` (``"cifar10"``).
        data_dir: a folder with ``test.npz`` or a tensorflow-datasets data
            directory; see `sb_keras.data.find_source`.
        limit: evaluate the first ``limit`` images only.
        batch_size: images per inference batch.
        split: ``"test"`` (default) or ``"train"``.
        logits_path: also write the outputs ``[N, classes]`` to this
            ``.npy`` file (`save_logits`).

    Returns:
        ``{"top1": percent, "correct": int, "total": int}``.

    Example:

    >>> evaluate("CIFAR10_ResNet32_Double_S16U1_6.93err.pth",
    ...          data_dir="datasets/cifar10")  # doctest: +SKIP
    {'top1': 80.86, 'correct': 8086, 'total': 10000}

    Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for
    Efficient ConvNets* (arXiv 2006.05066), CIFAR-10 top-1.
    """
    from sb_keras import data

    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
    ):
        raise ValueError(
            f"`limit` must be a positive integer. Received: limit={limit!r}"
        )
    classes = data.check_dataset(dataset)["classes"]
    if logits_path is not None:
        _check_npy_path(logits_path)
    predict = get_predictor(model, batch_size)
    x, y = data.load_arrays(dataset, split, data_dir=data_dir, limit=limit)
    outputs = np.asarray(predict(x[:1])).shape[-1]
    if outputs != classes:
        raise ValueError(
            f"The model predicts {outputs} classes but dataset={dataset!r} has "
            f"{classes}. Received: dataset={dataset!r}"
        )
    logits = predict(x)
    if logits_path is not None:
        save_logits(logits_path, logits)
    correct, total = top1(logits, y)
    return {"top1": 100.0 * correct / total, "correct": correct, "total": total}
