"""Starting a run from a saved model: fine-tuning and quantization-aware training.

``sb-keras train --init-from FILE`` (``TrainConfig.init_from``) starts from
the weights of a ``.keras`` file written by sb_keras (``train``,
``convert``, an earlier fine-tune or QAT run) or from an authors' PyTorch
checkpoint (``.pth``, read with `sb_keras.load_authors_checkpoint`); the
model's architecture and name come from the file. ``--qat``
(``TrainConfig.qat``) folds the model and trains its quantization-aware
twin (`sb_keras.export.quantize_aware_model`): the run's ``model.keras`` is
then a QAT model that ``sb-keras export --quantize int8`` converts without
calibration data, and that computes in inference what its int8 file
computes. QAT wants a tiny learning rate: 1e-5 keeps the authors' ResNet56
at its accuracy where 1e-3 wrecks it within two steps.
"""

import os

INIT_SUFFIXES = (".keras", ".pth", ".pt")


def check_init_from(path):
    """Checks that ``path`` names an existing model file of a known kind.

    Raises:
        ValueError: the suffix is not one of `INIT_SUFFIXES`.
        FileNotFoundError: there is no such file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            f"`init_from` must be a file path. Received: init_from={path!r}"
        )
    path = os.fspath(path)
    if not path.lower().endswith(INIT_SUFFIXES):
        raise ValueError(
            f"`init_from` must be a .keras file or an authors' .pth checkpoint. "
            f"Received: init_from={path!r}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such model file. Received: init_from={path!r}")
    return path


def load_model_file(path):
    """The model in a ``.keras`` file or an authors' checkpoint (uncompiled)."""
    from sb_keras import saving

    path = check_init_from(path)
    if path.lower().endswith(".keras"):
        return saving.load_model(path, compile=False)
    from sb_keras.checkpoints import load_authors_checkpoint

    return load_authors_checkpoint(path)


def _with_orthogonality(model, orthogonality):
    """``model`` rebuilt with the run's orthogonality lambda, same weights.

    Only sb_keras model classes carry the lambda in their config; folded and
    QAT models have no penalty and are returned as they are.
    """
    config = model.get_config()
    if not isinstance(config, dict) or "orthogonality" not in config:
        return model
    if config["orthogonality"] == float(orthogonality):
        return model
    new = type(model).from_config({**config, "orthogonality": float(orthogonality)})
    new.set_weights(model.get_weights())
    return new


def initial_model(config, num_classes, input_shape):
    """The model of ``config.init_from``, checked against the run.

    Args:
        config: a `TrainConfig` with ``init_from`` set.
        num_classes: classes of the run's dataset.
        input_shape: the run's image shape ``(H, W, C)``.

    Raises:
        ValueError: ``config.model`` names another model than the file's,
            ``model_args`` are given, or the file's model does not take the
            dataset's images or predict its classes.
    """
    model = load_model_file(config.init_from)
    if config.model is not None and config.model != model.name:
        raise ValueError(
            f"`model` conflicts with the model saved in init_from={config.init_from!r} "
            f"({model.name!r}); leave it out. Received: model={config.model!r}"
        )
    if config.model_args:
        raise ValueError(
            "`model_args` apply to a new model, not to one loaded with init_from. "
            f"Received: model_args={config.model_args!r}"
        )
    classes = model.output_shape[-1]
    if classes != num_classes:
        raise ValueError(
            f"The model in init_from={config.init_from!r} predicts {classes} "
            f"classes but dataset={config.dataset!r} has {num_classes}. "
            f"Received: dataset={config.dataset!r}"
        )
    expected = tuple(model.input_shape[1:])
    if any(e is not None and e != s for e, s in zip(expected, input_shape)):
        raise ValueError(
            f"The model in init_from={config.init_from!r} takes images of shape "
            f"{expected}, the dataset's are {tuple(input_shape)}. "
            f"Received: dataset={config.dataset!r}"
        )
    return _with_orthogonality(model, config.orthogonality)


def quantize_aware(model):
    """The quantization-aware twin of ``model`` (itself if it already is one).

    BatchNorm is folded into the convolutions first
    (`sb_keras.export.fold_model`); the activation ranges start at the first
    training batch (`sb_keras.export.FakeQuant`). The twin is float32 even
    for a ``mixed_bfloat16`` file, so that it stays the exact simulation of
    its int8 file.
    """
    from sb_keras import export
    from sb_keras.export.tflite import has_fake_quant

    if has_fake_quant(model):
        return model
    return export.quantize_aware_model(export.fold_model(model))
