"""Gradients written with TFLite builtin ops, for on-device training.

TensorFlow's own gradients of three ops of an ACDC ResNet have no TFLite
builtin: ``Conv2DBackpropFilter`` (the kernel gradient of a convolution),
``ReluGrad`` and ``StridedSliceGrad`` (the option-A shortcut's subsampling).
The converter keeps them as Flex ops, which need the Flex delegate (not in
the ``ai-edge-litert`` wheel). `builtin_gradients` swaps in equivalent
gradients made of builtin ops while a training function is traced:

* the kernel gradient of ``conv2d(x, w)`` is itself a convolution, of the
  padded input seen as ``C`` images of ``N`` channels with the output
  gradient as a ``(H', W', N, F)`` kernel dilated by the stride (CONV_2D);
* the ReLU gradient is a SELECT on ``y > 0``;
* the gradient of a static strided slice spreads the values with RESHAPE
  and PAD (zeros between the kept positions, then the border).

The input gradient of a convolution stays TensorFlow's
``Conv2DBackpropInput``, which the converter lowers to TRANSPOSE_CONV.

TensorFlow has no public way to override an op's gradient under
``tf.GradientTape`` (``gradient_override_map`` is ignored by the tape), so
the swap edits TensorFlow's private gradient registry for the duration of
the ``with`` block and restores it after; the replacement gradients are
mathematically equal to the originals (tested against them), so another
thread tracing meanwhile still gets correct gradients. Cases the rewrites
do not cover (NCHW, dilated or non-square-strided convolutions, dynamic
shapes, masked slices) fall back to TensorFlow's gradient, and the export
then fails its builtin-ops check with the op named.
"""

import contextlib

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

_REGISTRY = tf_ops._gradient_registry._registry


def _conv2d_grad(original):
    def grad(op, dy):
        if op.get_attr("data_format") not in (b"NHWC", "NHWC"):
            return original(op, dy)
        dilations = list(op.get_attr("dilations"))
        strides = list(op.get_attr("strides"))
        padding = op.get_attr("padding")
        padding = padding.decode() if isinstance(padding, bytes) else padding
        x, w = op.inputs
        if (
            dilations != [1, 1, 1, 1]
            or strides[1] != strides[2]
            or not x.shape.is_fully_defined()
            or not w.shape.is_fully_defined()
            or padding not in ("SAME", "VALID")
        ):
            return original(op, dy)
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x),
            filter=w,
            out_backprop=dy,
            strides=strides,
            padding=padding,
            data_format="NHWC",
        )
        return dx, kernel_gradient(x, dy, w.shape, strides[1], padding)

    return grad


def kernel_gradient(x, dy, kernel_shape, stride, padding):
    """``d loss / d w`` of ``conv2d(x, w)`` as one forward convolution.

    Args:
        x: the convolution's input ``(N, H, W, C)`` (static shape).
        dy: the output gradient ``(N, H', W', F)``.
        kernel_shape: ``(kh, kw, C, F)``.
        stride: the (square) stride.
        padding: `"SAME"` or `"VALID"` (TensorFlow's convention).

    Returns:
        The kernel gradient, shape ``kernel_shape``.
    """
    kh, kw = int(kernel_shape[0]), int(kernel_shape[1])
    _, h, w, _ = (int(d) for d in x.shape)
    _, ho, wo, _ = (int(d) for d in dy.shape)
    if padding == "SAME":
        pads = []
        for size, out, k in ((h, ho, kh), (w, wo, kw)):
            total = max((out - 1) * stride + k - size, 0)
            pads.append([total // 2, total - total // 2])
        x = tf.pad(x, [[0, 0], pads[0], pads[1], [0, 0]])
    # (C, Hp, Wp, N) images convolved with a (H', W', N, F) kernel dilated
    # by the stride: out[c, i, j, f] = sum x[n, i + s a, j + s b, c] dy[n, a, b, f].
    images = tf.transpose(x, (3, 1, 2, 0))
    kernel = tf.transpose(dy, (1, 2, 0, 3))
    g = tf.nn.conv2d(images, kernel, strides=1, padding="VALID", dilations=stride)
    g = g[:, :kh, :kw, :]
    return tf.transpose(g, (1, 2, 0, 3))


def _relu_grad(op, dy):
    y = op.outputs[0]
    return tf.where(y > 0, dy, tf.zeros_like(dy))


def _strided_slice_grad(original):
    def grad(op, dy):
        x = op.inputs[0]
        begin, end, strides = (tf.get_static_value(t) for t in op.inputs[1:4])
        masks = {
            k: op.get_attr(k)
            for k in (
                "begin_mask",
                "end_mask",
                "ellipsis_mask",
                "new_axis_mask",
                "shrink_axis_mask",
            )
        }
        if (
            begin is None
            or end is None
            or strides is None
            or not x.shape.is_fully_defined()
            or masks["ellipsis_mask"]
            or masks["new_axis_mask"]
            or masks["shrink_axis_mask"]
            or any(s <= 0 for s in strides)
        ):
            return original(op, dy)
        shape = [int(d) for d in x.shape]
        out = dy
        for axis, size in enumerate(shape):
            if axis >= len(begin):
                continue
            b = None if masks["begin_mask"] >> axis & 1 else int(begin[axis])
            e = None if masks["end_mask"] >> axis & 1 else int(end[axis])
            start, stop, step = slice(b, e, int(strides[axis])).indices(size)
            count = len(range(start, stop, step))
            if step > 1 and count:
                out = _dilate(out, axis, step)
                length = (count - 1) * step + 1
            else:
                length = count
            after = size - start - length
            pads = [[0, 0]] * len(shape)
            pads[axis] = [start, after]
            out = tf.pad(out, pads)
        return [out, None, None, None]

    return grad


def _dilate(t, axis, step):
    """Inserts ``step - 1`` zeros between entries along ``axis`` (static)."""
    shape = [int(d) for d in t.shape]
    n = shape[axis]
    t = tf.expand_dims(t, axis + 1)
    pads = [[0, 0]] * (len(shape) + 1)
    pads[axis + 1] = [0, step - 1]
    t = tf.pad(t, pads)
    shape[axis] = n * step
    t = tf.reshape(t, shape)
    return tf.slice(
        t, [0] * len(shape), shape[:axis] + [(n - 1) * step + 1] + shape[axis + 1 :]
    )


@contextlib.contextmanager
def builtin_gradients():
    """Uses builtin-op gradients for Conv2D, Relu and StridedSlice.

    Active only inside the ``with`` block (where a training function is
    traced); TensorFlow's registry is restored on exit.
    """
    names = ("Conv2D", "Relu", "StridedSlice")
    saved = {name: dict(_REGISTRY[name]) for name in names}
    replacements = {
        "Conv2D": _conv2d_grad(saved["Conv2D"]["type"]),
        "Relu": _relu_grad,
        "StridedSlice": _strided_slice_grad(saved["StridedSlice"]["type"]),
    }
    try:
        for name, fn in replacements.items():
            _REGISTRY[name]["type"] = fn
        yield
    finally:
        for name, entry in saved.items():
            _REGISTRY[name].update(entry)
