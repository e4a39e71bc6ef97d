"""One call from a saved model to a ``.tflite`` file (used by the CLI)."""

import os
import tempfile

import numpy as np

from sb_keras.export import folding
from sb_keras.export import tflite

LAYOUT_CHOICES = (*folding.LAYOUTS, "auto")


def load_float_model(source):
    """A Keras model from a ``.keras`` file, or an authors' checkpoint.

    Authors' ``.pth`` checkpoints go through
    ``sb_keras.checkpoints.load_authors_checkpoint`` when that module is
    installed; everything else through `sb_keras.saving.load_model`
    (checks the file first).
    """
    from sb_keras import saving

    if not isinstance(source, (str, os.PathLike)):
        return source  # already a model
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such model file. Received: model={path!r}")
    if path.endswith((".pth", ".pt", ".tar")):
        try:
            from sb_keras.checkpoints import load_authors_checkpoint
        except ImportError as e:
            raise ValueError(
                "Reading the authors' checkpoints needs sb_keras.checkpoints. "
                f"Received: model={path!r}"
            ) from e
        return load_authors_checkpoint(path)
    return saving.load_model(path)


def calibration_images(model, data_dir=None, dataset="cifar10", count=500, seed=0):
    """``count`` real training images (a seeded random subset) for PTQ."""
    from sb_keras import data

    x, _ = data.load_arrays(dataset, "train", data_dir=data_dir)
    rng = np.random.RandomState(seed)
    idx = rng.choice(len(x), size=min(count, len(x)), replace=False)
    return x[np.sort(idx)].astype(np.float32)


def choose_layout(model, latency_tolerance=1.25, runs=30):
    """Picks ``"folded"`` or ``"decomposed"`` by measured size and latency.

    Both float32 files are built and timed at batch 1 (1 thread); the
    smallest file whose latency is within ``latency_tolerance`` times the
    fastest wins.

    Returns:
        ``(layout, {layout: (size_bytes, latency_ms)})``.
    """
    from sb_keras import litert

    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in folding.LAYOUTS:
            path = os.path.join(tmp, f"{layout}.tflite")
            tflite.convert(folding.fold_model(model, layout), path)
            stats[layout] = (os.path.getsize(path), litert.latency_ms(path, 1, runs))
    fastest = min(lat for _, lat in stats.values())
    ok = [k for k, (_, lat) in stats.items() if lat <= latency_tolerance * fastest]
    return min(ok, key=lambda k: stats[k][0]), stats


def export_tflite(
    model,
    output_path,
    quantize="none",
    layout="folded",
    data_dir=None,
    dataset="cifar10",
    int8_io=False,
    calibration_count=500,
    per_channel=True,
    strip_names=False,
    activation_range="minmax",
    bias_correction=False,
):
    """Loads (if a path), folds and converts a model; returns the bytes.

    Args:
        model: a Keras model or a path (``.keras``, or an authors'
            checkpoint when `sb_keras.checkpoints` is available).
        output_path: the ``.tflite`` file to write.
        quantize: one of `sb_keras.export.QUANTIZE_MODES`.
        layout: `"folded"`, `"decomposed"` or `"auto"` (`choose_layout`).
        data_dir: folder of the real dataset (calibration images for int8).
        dataset: dataset name of `sb_keras.data`.
        int8_io: int8 input and output tensors (``quantize="int8"`` only).
        calibration_count: calibration images for full-integer int8.
        per_channel, strip_names, activation_range, bias_correction: see
            `sb_keras.export.convert`.

    Example:

    >>> export_tflite("model.keras", "model_int8.tflite", quantize="int8",
    ...               data_dir="cifar10")  # doctest: +SKIP
    """
    if layout not in LAYOUT_CHOICES:
        raise ValueError(
            f"`layout` must be one of {LAYOUT_CHOICES}. Received: layout={layout!r}"
        )
    if quantize not in tflite.QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {tflite.QUANTIZE_MODES}. "
            f"Received: quantize={quantize!r}"
        )
    tflite.check_output_path(output_path)
    model = load_float_model(model)
    if tflite.has_fake_quant(model):
        inference = model  # a QAT model is already folded
    else:
        if layout == "auto":
            layout, _ = choose_layout(model)
        inference = folding.fold_model(model, layout)
    rep = None
    if quantize == "int8" and not tflite.has_fake_quant(model):
        rep = calibration_images(model, data_dir, dataset, calibration_count)
    return tflite.convert(
        inference,
        output_path,
        quantize=quantize,
        representative_data=rep,
        int8_io=int8_io,
        per_channel=per_channel,
        strip_names=strip_names,
        activation_range=activation_range,
        bias_correction=bias_correction,
    )
