"""Small helpers shared by the layers."""


def check_positive_int(name, value, allow_zero=False):
    """Validates an integer argument and returns it."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {kind} integer. Received: {name}={value!r}")
    return value


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
    return not (first is None or isinstance(first, int))


def conv_output_shape(x_shape, kernel_size, strides, padding, filters):
    """Output shape ``(N, H', W', filters)`` of a 2-D convolution."""
    spatial = []
    for size in x_shape[1:3]:
        if size is None:
            spatial.append(None)
        elif padding == "same":
            spatial.append(-(-size // strides))
        else:
            spatial.append((size - kernel_size) // strides + 1)
    return (x_shape[0], *spatial, filters)
