"""Matching parts of a functional Keras graph (used by `keras_resnet`).

Each ``match_*`` takes the tensor a layer produced, checks the layer and
returns what lies before it, or raises `Mismatch` saying what was found.
"""

import keras
import numpy as np


class Mismatch(Exception):
    """A part of the graph that is not the expected layout (``str``: what)."""


def describe(op):
    """``"Conv2D 'conv2d_3'"``: the class and name of an operation."""
    return f"{type(op).__name__} {getattr(op, 'name', op)!r}"


def producer(tensor):
    """``(operation, input tensors)`` that made ``tensor`` (None for none)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, []
    op = history.operation
    node = op._inbound_nodes[history.node_index]
    return op, list(node.input_tensors)


def single_input(op, inputs):
    """The one input of ``op``, or a mismatch."""
    if len(inputs) != 1:
        raise Mismatch(f"{describe(op)} with {len(inputs)} inputs")
    return inputs[0]


def match_relu(tensor, where):
    op, inputs = producer(tensor)
    ok = isinstance(op, keras.layers.ReLU) and (
        op.max_value is None and not op.negative_slope and not op.threshold
    )
    ok = ok or (
        isinstance(op, keras.layers.Activation)
        and getattr(op.activation, "__name__", "") == "relu"
    )
    if not ok:
        raise Mismatch(f"{where}: expected a ReLU, found {describe(op)}")
    return single_input(op, inputs)


def match_bn(tensor, where):
    op, inputs = producer(tensor)
    if not isinstance(op, keras.layers.BatchNormalization):
        raise Mismatch(f"{where}: expected a BatchNormalization, found {describe(op)}")
    if op.axis not in (-1, 3):
        raise Mismatch(f"{describe(op)} normalizes axis {op.axis}, not the channels")
    return op, single_input(op, inputs)


def match_conv(tensor, kernel, where):
    """Matches a bias-free Conv2D with a ``kernel`` x ``kernel`` window.

    Returns:
        ``(layer, input, stride)``; a strided conv's input is taken from
        before its ``ZeroPadding2D(kernel // 2)``.
    """
    op, inputs = producer(tensor)
    if not isinstance(op, keras.layers.Conv2D):
        raise Mismatch(f"{where}: expected a Conv2D, found {describe(op)}")
    x = single_input(op, inputs)
    problems = []
    if tuple(op.kernel_size) != (kernel, kernel):
        problems.append(f"kernel_size={tuple(op.kernel_size)}, not {kernel}x{kernel}")
    if op.use_bias:
        problems.append("use_bias=True")
    if getattr(op.activation, "__name__", "") != "linear":
        problems.append(f"activation={op.activation.__name__!r}")
    if tuple(op.dilation_rate) != (1, 1) or op.groups != 1:
        problems.append(f"dilation_rate={op.dilation_rate}, groups={op.groups}")
    if op.data_format != "channels_last":
        problems.append(f"data_format={op.data_format!r}")
    stride = tuple(op.strides)
    if stride[0] != stride[1]:
        problems.append(f"strides={stride}")
    elif kernel == 1 or (stride[0] == 1 and op.padding == "same"):
        pass
    elif op.padding != "valid":
        problems.append(
            f"padding={op.padding!r} at stride {stride[0]} (TensorFlow pads "
            f"asymmetrically; sb_keras.ResNet uses ZeroPadding2D({kernel // 2}) "
            "then padding='valid')"
        )
    else:
        pad_op, pad_inputs = producer(x)
        want = ((kernel // 2,) * 2,) * 2
        if not isinstance(pad_op, keras.layers.ZeroPadding2D) or (
            tuple(map(tuple, pad_op.padding)) != want
        ):
            problems.append(
                f"padding='valid' without a "
                f"ZeroPadding2D({kernel // 2}) before it (found {describe(pad_op)})"
            )
        else:
            x = single_input(pad_op, pad_inputs)
    if problems:
        raise Mismatch(f"{where}: {describe(op)} has {', '.join(problems)}")
    return op, x, stride[0]


def weight_free_function(start, end, where):
    """``end`` as a sub-model of ``start`` without weights, or a mismatch."""
    try:
        sub = keras.Model(start, end)
    except Exception as error:  # noqa: BLE001 (any graph that is not one)
        raise Mismatch(
            f"{where}: not a function of its input alone ({error})"
        ) from None
    if sub.trainable_weights:
        raise Mismatch(
            f"{where}: has trainable weights ({sub.trainable_weights[0].path})"
        )
    return sub


def same_function(sub, reference, shape, low=-1.0, high=1.0):
    x = np.random.RandomState(0).uniform(low, high, (2, *shape)).astype("float32")
    try:
        got = np.asarray(sub(x, training=False))
    except Exception:  # noqa: BLE001 (it does not even apply)
        return False
    want = np.asarray(reference(x))
    return got.shape == want.shape and np.allclose(got, want, atol=1e-5, rtol=1e-5)


def spatial_size(tensor, default=8):
    return tuple(default if d is None else d for d in tensor.shape[1:3])
