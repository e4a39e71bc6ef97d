"""Conversion of a Keras model to a ``.tflite`` flatbuffer (builtin ops only).

Uses ``tf.lite.TFLiteConverter.from_keras_model`` (the converter the LiteRT
documentation names for TensorFlow models) restricted to the builtin op
sets, then reads the flatbuffer back and refuses any Flex (``SELECT_TF_OPS``)
or custom op. Files are written atomically: a failed conversion never leaves
a half-written file behind.
"""

import contextlib
import os
import sys
import tempfile
import warnings

import numpy as np

from sb_keras.export import graph

QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")
RANGE_METHODS = ("minmax", "batch_mean")
# Memory for the float activations kept while recomputing the ranges.
_RANGE_MEMORY_BYTES = 256 * 2**20


class NonBuiltinOpError(ValueError):
    """The converted model needs Flex or custom ops."""


@contextlib.contextmanager
def quiet():
    """Silences the converter's prints and C++ logs (file descriptors 1, 2).

    The TFLite converter prints the SavedModel signature ("Captures: ...
    TensorSpec" lines, hundreds for a ResNet), and its C++ calibrator and
    absl log to the process's stderr regardless of
    ``TF_CPP_MIN_LOG_LEVEL``. Both descriptors go to a temporary file for
    the duration; if the block raises, what was captured is written back to
    stderr so that no diagnostic is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    failed = False
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*preserve_all_tensors.*")
        warnings.filterwarnings("ignore", message=".*Statistics for quantized.*")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace")[-20000:])


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
    """Writes bytes to ``path`` atomically (`sb_keras.io_utils.write_bytes`)."""
    from sb_keras import io_utils

    io_utils.write_bytes(path, content)


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
    if not np.isfinite(array).all():
        raise ValueError(
            "`representative_data` must be finite; it holds "
            f"{int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} "
            "infinite values. Received: representative_data with non-finite values"
        )
    return array


def has_fake_quant(model):
    """True when ``model`` is a quantization-aware model of `sb_keras.export`."""
    from sb_keras.export.qat_layers import QUANT_LAYERS

    return any(isinstance(layer, QUANT_LAYERS) for layer in model.layers)


def op_names(content):
    """Names of the operators a ``.tflite`` flatbuffer runs (sorted, unique).

    Reads the operators of every subgraph and their opcode indices, not the
    operator-code table (which may list codes no operator uses, e.g. the
    QUANTIZE/DEQUANTIZE of a quantization-aware model's float graph).
    """
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.Model.GetRootAsModel(content, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    used = set()
    for s in range(m.SubgraphsLength()):
        sub = m.Subgraphs(s)
        for i in range(sub.OperatorsLength()):
            used.add(sub.Operators(i).OpcodeIndex())
    out = set()
    for i in sorted(used):
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


def _interpreter_all_tensors(content):
    """A float interpreter that keeps every intermediate tensor readable."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the deprecated TF copy has the same interface
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(
        model_content=bytes(content), experimental_preserve_all_tensors=True
    )


def activation_ranges(content, data, method="minmax", batch_size=32):
    """Per-tensor ``(min, max)`` of a float flatbuffer's tensors on ``data``.

    Every intermediate tensor is read after the whole graph ran, with all
    tensors preserved (no buffer reuse and no in-place ops), so each tensor
    holds its own values.

    Args:
        content: a float ``.tflite`` flatbuffer.
        data: the calibration images ``(N, H, W, C)``.
        method: `"minmax"` (min and max over all images, the TFLite
            calibrator's statistic) or `"batch_mean"` (the mean over batches
            of ``batch_size`` images of the batch min and max, the statistic
            of the moving-average ranges of quantization-aware training;
            less sensitive to a few outlying activations).
        batch_size: images per batch of `"batch_mean"`.

    Returns:
        ``{tensor index: (min, max)}`` for the float tensors of subgraph 0.
    """
    if method not in RANGE_METHODS:
        raise ValueError(
            f"`method` must be one of {RANGE_METHODS}. Received: method={method!r}"
        )
    data = np.asarray(data, np.float32)
    it = _interpreter_all_tensors(content)
    inp = it.get_input_details()[0]
    it.allocate_tensors()
    floats = [
        d
        for d in it.get_tensor_details()
        if d["dtype"] == np.float32 and len(d["shape"]) > 0 and d["shape"][0] == 1
    ]
    per_image = int(sum(np.prod(d["shape"]) for d in floats)) * 4
    chunk = int(max(1, min(len(data), _RANGE_MEMORY_BYTES // max(per_image, 1))))
    lows = {d["index"]: [] for d in floats}
    highs = {d["index"]: [] for d in floats}
    current = None
    for start in range(0, len(data), chunk):
        batch = data[start : start + chunk]
        if current != len(batch):
            it.resize_tensor_input(inp["index"], [len(batch), *batch.shape[1:]])
            it.allocate_tensors()
            current = len(batch)
        it.set_tensor(inp["index"], batch)
        it.invoke()
        for d in floats:
            try:
                v = it.get_tensor(d["index"])
            except ValueError:
                continue
            if v.ndim == 0 or v.shape[0] != len(batch):
                continue
            flat = v.reshape(len(batch), -1)
            lows[d["index"]].append(flat.min(1))
            highs[d["index"]].append(flat.max(1))
    out = {}
    for index, lo in lows.items():
        if not lo:
            continue
        lo, hi = np.concatenate(lo), np.concatenate(highs[index])
        if method == "minmax":
            out[index] = (float(lo.min()), float(hi.max()))
        else:
            n = max(1, len(lo) // batch_size)
            groups = np.array_split(np.arange(len(lo)), n)
            out[index] = (
                float(np.mean([lo[g].min() for g in groups])),
                float(np.mean([hi[g].max() for g in groups])),
            )
    return out


def recalibrate(calibrated, data, method="minmax", batch_size=32):
    """A calibrated flatbuffer with its activation ranges measured anew.

    The TFLite calibrator logs each op's inputs and outputs while the float
    interpreter runs, and that interpreter computes some ops in place (an
    ``ADD`` writes into the buffer of its input): the range logged for a
    convolution that feeds a residual ``ADD`` becomes the union of its own
    range and the sum's, so its int8 step is up to several times too coarse
    (measured on MobileNetV2: 2.4x). Here every range is measured with all
    tensors preserved (`activation_ranges`) and written back.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    ranges = activation_ranges(calibrated, data, method, batch_size)
    for index, tensor in enumerate(model.subgraphs[0].tensors):
        q = tensor.quantization
        if q is None or q.min is None or len(q.min) != 1 or index not in ranges:
            continue
        lo, hi = ranges[index]
        q.min, q.max = [min(lo, 0.0)], [max(hi, 0.0)]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@contextlib.contextmanager
def _measured_ranges(data, method, batch_size):
    """Makes the converter's calibration step use `recalibrate`."""
    try:
        from tensorflow.lite.python.optimize import calibrator
    except ImportError:
        calibrator = None
    original = getattr(getattr(calibrator, "Calibrator", None), "calibrate", None)
    if original is None:
        warnings.warn(
            "This TensorFlow has no tflite Calibrator.calibrate to hook; the "
            "activation ranges are the converter's own.",
            stacklevel=3,
        )
        yield
        return

    def calibrate(self, dataset_gen):
        return recalibrate(original(self, dataset_gen), data, method, batch_size)

    calibrator.Calibrator.calibrate = calibrate
    try:
        yield
    finally:
        calibrator.Calibrator.calibrate = original


def convert(
    model,
    output_path=None,
    quantize="none",
    representative_data=None,
    int8_io=False,
    calibration_steps=None,
    per_channel=True,
    strip_names=False,
    activation_range="minmax",
    range_batch_size=32,
    bias_correction=False,
    bias_correction_images=128,
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
        activation_range: how full-integer calibration sets each activation
            range from ``representative_data``: `"minmax"` (the min and max
            over all images, TFLite's statistic) or `"batch_mean"` (the mean
            over batches of ``range_batch_size`` images of the batch min and
            max: narrower ranges, finer steps, a few outliers clipped). Both
            are measured by `recalibrate`, which repairs the TFLite
            calibrator's ranges of convolutions feeding an in-place ``ADD``.
        range_batch_size: images per batch of `"batch_mean"`.
        bias_correction: with `"int8"`, first correct the biases for the
            mean shift of the int8 weights on the first
            ``bias_correction_images`` of ``representative_data``
            (`sb_keras.export.correct_bias`, same ``per_channel``).
        bias_correction_images: images used by the bias correction.

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
    if activation_range not in RANGE_METHODS:
        raise ValueError(
            f"`activation_range` must be one of {RANGE_METHODS}. "
            f"Received: activation_range={activation_range!r}"
        )
    path = None if output_path is None else check_output_path(output_path)
    qat = has_fake_quant(model)
    if qat:
        from sb_keras.export import qat_layers
        from sb_keras.export.qat import link_ranges

        link_ranges(model)  # a loaded QAT model has lost them
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
    if bias_correction:
        if quantize != "int8" or qat:
            raise ValueError(
                "`bias_correction` applies to post-training full-integer "
                "quantization (quantize='int8', a model without fake quant). "
                f"Received: bias_correction=True with quantize={quantize!r}"
            )
        from sb_keras.export.bias_correction import correct_bias

        model = correct_bias(
            model, data[: int(bias_correction_images)], per_channel=per_channel
        )
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
    calibrating = quantize == "int8" and not qat
    ranges = (
        _measured_ranges(data, activation_range, range_batch_size)
        if calibrating
        else contextlib.nullcontext()
    )
    if qat:
        ranges = qat_layers.simulated()
    try:
        with ranges, quiet():
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
