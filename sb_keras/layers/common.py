"""Small helpers shared by the layers: argument checks in Conv2D's manner."""

import numbers

import keras
from keras.src.backend.config import standardize_data_format
from keras.src.ops.operation_utils import compute_conv_output_shape

__all__ = ["standardize_data_format"]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name, value, allow_zero=False):
    """Validates an integer argument (NumPy integers too) and returns an int."""
    low = 0 if allow_zero else 1
    if not _is_int(value) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {kind} integer. Received: {name}={value!r}")
    return int(value)


def check_int_tuple(name, value, n=2):
    """An int or ``n`` ints (NumPy integers too), as a tuple of positive ints.

    The conventions of ``keras.layers.Conv2D``'s ``kernel_size``, ``strides``
    and ``dilation_rate``.
    """
    values = (value,) * n if _is_int(value) else value
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if len(values) != n or not all(_is_int(v) and v >= 1 for v in values):
        raise ValueError(
            f"`{name}` must be a positive integer or a tuple of {n} positive "
            f"integers. Received: {name}={value!r}"
        )
    return tuple(int(v) for v in values)


def check_padding(padding):
    """``"same"`` or ``"valid"``, case-insensitive, as Conv2D."""
    value = padding.lower() if isinstance(padding, str) else padding
    if value not in ("same", "valid"):
        raise ValueError(
            f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}"
        )
    return value


def check_strides_dilation(strides, dilation_rate):
    """Conv2D's rule: strides > 1 and dilation_rate > 1 do not mix."""
    if max(strides) > 1 and max(dilation_rate) > 1:
        raise ValueError(
            "`strides > 1` is not supported together with `dilation_rate > 1` "
            f"(as in keras.layers.Conv2D). Received: strides={strides}, "
            f"dilation_rate={dilation_rate}"
        )


def channel_axis(data_format):
    """The channel axis of a 4-D tensor in ``data_format``."""
    return -1 if data_format == "channels_last" else 1


def image_input_spec(data_format, channels=None):
    """An ``InputSpec`` of a rank-4 image, with its channel count if known."""
    axes = None if channels is None else {channel_axis(data_format): int(channels)}
    return keras.layers.InputSpec(ndim=4, axes=axes)


def to_channels_last(shape, data_format):
    """A 4-D shape in ``data_format``, reordered as ``(N, H, W, C)``."""
    shape = tuple(shape)
    if data_format == "channels_last":
        return shape
    return (shape[0], shape[2], shape[3], shape[1])


def split_kernel_inputs(inputs):
    """Splits ``x`` or ``[x, *kernels]`` into ``(x, [kernels])``.

    Works on tensors and on shapes (a shape is a tuple of ints or None, a
    list of shapes is a list of such tuples).
    """
    if isinstance(inputs, (list, tuple)) and inputs and _is_nested(inputs):
        return inputs[0], list(inputs[1:])
    return inputs, []


def _is_nested(inputs):
    first = inputs[0]
    return not (first is None or _is_int(first))


def conv_output_shape(
    x_shape,
    kernel_size,
    strides,
    padding,
    filters,
    data_format="channels_last",
    dilation_rate=1,
):
    """Output shape of a 2-D convolution, Keras's own computation.

    Raises Keras's ``ValueError`` for a non-positive output size (a
    ``valid`` kernel larger than the input).
    """
    x_shape = tuple(x_shape)
    if len(x_shape) != 4:
        raise ValueError(
            f"Expected a rank-4 input shape. Received: input_shape={x_shape}"
        )
    kernel_size = check_int_tuple("kernel_size", kernel_size)
    return compute_conv_output_shape(
        x_shape,
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        data_format=data_format,
        dilation_rate=dilation_rate,
    )


def float32_value(variable):
    """The float32 value of a variable, never autocast to a mixed policy.

    Inside a layer with a mixed policy, reading a float variable gives it in
    the compute dtype (Keras's autocast); the penalty and fake quantization
    need the float32 value itself.
    """
    from keras import ops
    from keras.src.backend import AutocastScope

    with AutocastScope(None):
        return ops.cast(variable.value, "float32")


def image_shape(height, width, channels, data_format=None):
    """An image shape in ``data_format`` (the global one by default)."""
    if standardize_data_format(data_format) == "channels_last":
        return (height, width, channels)
    return (channels, height, width)


def height_width_channels(shape, data_format=None):
    """``(height, width, channels)`` of a rank-3 image shape in ``data_format``.

    ``data_format`` defaults to the global one; the shape must have 3 entries.
    """
    shape = tuple(shape)
    if standardize_data_format(data_format) == "channels_last":
        return shape
    return (shape[1], shape[2], shape[0])
