"""Conversion of a Keras model to a ``.tflite`` flatbuffer (builtin ops only).

Uses ``tf.lite.TFLiteConverter.from_keras_model`` (the converter the LiteRT
documentation names for TensorFlow models) restricted to the builtin op
sets, then reads the flatbuffer back and refuses any Flex (``SELECT_TF_OPS``)
or custom op. Files are written atomically: a failed conversion never leaves
a half-written file behind.
"""

import os
import tempfile

import numpy as np

from sb_keras.export import graph

QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")


class NonBuiltinOpError(ValueError):
    """The converted model needs Flex or custom ops."""


def check_output_path(path):
    """Fails early if ``path`` cannot be written; returns its absolute form."""
    path = os.fspath(path)
    if not path.endswith(".tflite"):
        raise ValueError(
            f"The output file must end in '.tflite'. Received: output_path={path!r}"
        )
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ValueError(
            f"The output path is a directory. Received: output_path={path!r}"
        )
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(
            "The output folder does not exist or is not writable. "
            f"Received: output_path={path!r}"
        )
    return os.path.abspath(path)


def write_atomic(path, content):
    """Writes bytes to ``path`` via a temporary file in the same folder."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(suffix=".tflite.part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_representative_data(model, data):
    """Validates calibration images against the model's input; returns them."""
    expected = tuple(model.inputs[0].shape[1:])
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(
            "`representative_data` must be an array of images. Received: "
            f"representative_data of type {type(data).__name__}"
        ) from None
    ok = array.ndim == len(expected) + 1 and len(array) > 0
    ok = ok and all(e is None or e == a for e, a in zip(expected, array.shape[1:]))
    if not ok:
        raise ValueError(
            "`representative_data` must have shape "
            f"(N, {', '.join(map(str, expected))}) "
            f"with N >= 1, the model's input. Received: "
            f"representative_data.shape={array.shape}"
        )
    return array


def has_fake_quant(model):
    """True when ``model`` is a quantization-aware model of `sb_keras.export`."""
    from sb_keras.export import qat

    return any(isinstance(layer, qat.QUANT_LAYERS) for layer in model.layers)


def op_names(content):
    """Names of the operators a ``.tflite`` flatbuffer uses (sorted, unique)."""
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.Model.GetRootAsModel(content, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    out = set()
    for i in range(m.OperatorCodesLength()):
        code = m.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, str(builtin))
        if name == "CUSTOM":
            custom = code.CustomCode()
            name = "CUSTOM:" + (custom.decode() if custom else "?")
        out.add(name)
    return sorted(out)


def check_builtin_ops(content):
    """Raises `NonBuiltinOpError` if the flatbuffer has a Flex/custom op."""
    bad = [n for n in op_names(content) if n.startswith("CUSTOM")]
    if bad:
        raise NonBuiltinOpError(
            f"The model needs ops outside the TFLite builtins: {bad}. "
            "Replace the layers that produce them."
        )


def _strip_names(content):
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    flatbuffer_utils.strip_strings(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def convert(
    model,
    output_path=None,
    quantize="none",
    representative_data=None,
    int8_io=False,
    calibration_steps=None,
    per_channel=True,
    strip_names=False,
):
    """Converts a Keras model to ``.tflite`` with builtin ops only.

    Args:
        model: a Keras model, usually the result of
            `sb_keras.export.fold_model` or `quantize_aware_model`.
        output_path: where to write the file (``.tflite``); None returns the
            bytes only. The folder is checked before converting and the file
            is written atomically.
        quantize: `"none"` (float32), `"float16"` (float16 weights),
            `"dynamic"` (int8 weights, float activations) or `"int8"`
            (full-integer: int8 weights and activations).
        representative_data: calibration images ``(N, H, W, C)`` as the
            model takes them (raw pixels for sb_keras models); required for
            `"int8"` unless the model is quantization-aware.
        int8_io: with `"int8"`, make the input and output tensors int8 too
            (otherwise float32 with quantize/dequantize ops at the ends).
        calibration_steps: how many images of ``representative_data`` to
            use (default: all).
        per_channel: int8 weights with one scale per output channel (the
            TFLite default). `False` uses one scale per tensor: each conv
            then carries 2 numbers instead of 3 per output channel, which
            matters for small decomposed models (ResNet56-S16U1), at some
            accuracy cost.
        strip_names: drop tensor names and signature definitions from the
            flatbuffer (``flatbuffer_utils.strip_strings``); smaller file,
            inputs and outputs are then reached by index only.

    Returns:
        The flatbuffer bytes.

    Raises:
        ValueError: a bad argument, an unwritable path, representative data
            of the wrong shape.
        NonBuiltinOpError: the model would need Flex or custom ops.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.export.fold_model(sb_keras.ResNet(depth=8))
    >>> content = sb_keras.export.convert(model, quantize="float16")
    >>> "CONV_2D" in sb_keras.export.op_names(content)
    True
    """
    import tensorflow as tf

    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {QUANTIZE_MODES}. "
            f"Received: quantize={quantize!r}"
        )
    if int8_io and quantize != "int8":
        raise ValueError(
            "`int8_io` needs full-integer quantization (quantize='int8'). "
            f"Received: int8_io={int8_io!r} with quantize={quantize!r}"
        )
    path = None if output_path is None else check_output_path(output_path)
    qat = has_fake_quant(model)
    data = None
    if quantize == "int8" and not qat:
        if representative_data is None:
            raise ValueError(
                "Full-integer quantization needs `representative_data` (real "
                "images) unless the model is quantization-aware. Received: "
                "representative_data=None"
            )
    if representative_data is not None:
        data = check_representative_data(model, representative_data)
        if calibration_steps is not None:
            data = data[: int(calibration_steps)]
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, graph.keras.Model):
            raise graph.UnsupportedLayerError(
                "Nested models are not supported; fold the model first. "
                f"Received: layer={layer.name!r}"
            )

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if not qat:
            ops_set = tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            converter.target_spec.supported_ops = [ops_set]

            def representative():
                for i in range(len(data)):
                    yield [data[i : i + 1]]

            converter.representative_dataset = representative
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    if not per_channel:
        converter._experimental_disable_per_channel = True
    try:
        content = converter.convert()
    except Exception as e:  # the converter raises ConverterError and others
        if "flex" in str(e).lower() or "not supported" in str(e).lower():
            raise NonBuiltinOpError(
                "The model needs ops outside the TFLite builtins. Converter "
                f"said: {str(e).strip().splitlines()[-1][:500]}"
            ) from e
        raise
    check_builtin_ops(content)
    if strip_names:
        content = _strip_names(content)
    if path is not None:
        write_atomic(path, content)
    return content
