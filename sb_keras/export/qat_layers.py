"""The quantization-aware layers: fake quant in training, int8 in inference.

Used by `sb_keras.export.quantize_aware_model` (`sb_keras.export.qat`),
which rebuilds a folded model with them and links every layer to the
`FakeQuant` ranges of its input and output (`link_ranges`).

* `FakeQuant`: per-tensor int8 fake quantization of activations with
  moving-average ranges.
* `QuantConv2D`, `QuantDepthwiseConv2D`, `QuantDense`: kernels fake-quantized
  (per channel, per tensor for dense), biases on TFLite's int32 grid; in
  inference, the int8 arithmetic of LiteRT's default CPU kernels
  (`sb_keras.export.integer`).
* `QuantAdd`, `QuantGlobalAveragePooling2D`: float in training, the int8
  ``ADD`` / ``MEAN`` in inference.
* `QuantSharedConv2D`: a shared (decomposed-layout) kernel, fake-quantized.

Under any dtype policy (``mixed_float16``, ``mixed_bfloat16``) the layers
take float32 inputs (Keras does not cast them down), compute in float32,
where the fake-quant ops and the integer arithmetic are defined, reading
their float32 variables without Keras's autocast, and cast the result back
to the layer's compute dtype. The int8 values between layers then pass
through that dtype: float16 holds every ``(q - z) * s`` closely enough to
keep its code (error below 0.13 of a step), bfloat16 (8 significant bits)
not always (up to half a step for the largest codes), so the integer path
is exact under float32 and ``mixed_float16`` policies only. That is why
`quantize_aware_model` builds its layers in float32 by default whatever the
policy of the source model (its ``dtype`` argument keeps a mixed one).
"""

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from keras.src.backend import AutocastScope

from sb_keras.api_export import sb_export
from sb_keras.export import integer
from sb_keras.layers import SharedConv2D


def _float32(fn):
    """Runs a ``call(self, inputs, ...)`` in float32, returns compute dtype.

    The inputs are cast to float32 and the variables are read without
    autocast (their float32 values); the outputs are cast to the layer's
    compute dtype. A no-op under a float32 policy.
    """

    @functools.wraps(fn)
    def call(self, inputs, *args, **kwargs):
        with AutocastScope(None):
            inputs = keras.tree.map_structure(_to_float32, inputs)
            outputs = fn(self, inputs, *args, **kwargs)
        return keras.tree.map_structure(
            lambda y: ops.cast(y, self.compute_dtype), outputs
        )

    return call


class _Float32Inputs:
    """Mixin: Keras casts the layer's float inputs to float32, not lower."""

    @property
    def input_dtype(self):
        return "float32"


def _to_float32(x):
    if isinstance(x, keras.Variable):
        x = x.value
    return ops.cast(x, "float32")


def _per_channel(kernel, axis_size):
    """Symmetric narrow-range int8 fake quant over the last axis.

    Returns the fake-quantized kernel and the per-channel scales
    (``max |w| / 127``, TFLite's int8 conv weight scheme).
    """
    m = ops.maximum(ops.max(ops.abs(ops.reshape(kernel, (-1, axis_size))), 0), 1e-8)
    kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        kernel, -m, m, num_bits=8, narrow_range=True
    )
    return kernel, integer.div32(m, 127.0)  # not m / 127: see integer.mul32


class _Link:
    """A non-tracked reference to the `FakeQuant` before or after a layer.

    A plain object (not a layer attribute Keras would track as a sublayer)
    so that the quantized layer can read that tensor's int8 grid. Set by
    `link_ranges`.
    """

    def __init__(self, fake_quant):
        self.fake_quant = fake_quant

    def grid(self):
        return integer.grid(self.fake_quant)


_SIMULATE = [False]


@contextlib.contextmanager
def simulated():
    """Inference uses the fake-quant simulation, not the integer path.

    `convert` traces the model inside it: the converter must see the
    fake-quant ops (the integer path is float64 arithmetic it would keep).
    """
    previous, _SIMULATE[0] = _SIMULATE[0], True
    try:
        yield
    finally:
        _SIMULATE[0] = previous


def _links(layer):
    """The layer's input `_Link` list, linking it from its graph if needed.

    A QAT model loaded from a file has no links (they are Python
    references); its layers link themselves at their first call once their
    node is in the graph (`sb_keras.export.qat.link_layer`).
    """
    if not hasattr(layer, "_input_ranges") and len(layer._inbound_nodes) == 1:
        from sb_keras.export.qat import link_layer

        link_layer(layer)
    return getattr(layer, "_input_ranges", None)


def _integer_grids(layer, training):
    """``(input grids, output grid)`` for the integer path, or None."""
    inputs = _links(layer)
    output = getattr(layer, "_output_range", None)
    if training or _SIMULATE[0] or not inputs or output is None:
        return None
    return [link.grid() for link in inputs], output.grid()


def _linear(layer, x, kernel, w_scale, training, apply):
    """A conv / depthwise conv / dense with its bias and activation.

    ``kernel`` is the fake-quantized kernel, ``w_scale`` its int8 scales
    (per output channel, or one) and ``apply(x, kernel)`` the layer's linear
    op. Training (or `simulated`): the float simulation, bias on the int32
    grid. Inference: the op in float64 on integer codes (exact) and the int8
    requantization of the kernels. The weight codes are read from the
    fake-quantized kernel because the converter stores the codes of the
    fake-quant op's output, whose float32 rounding decides the rare near-ties.

    ``apply`` takes a ``data_format`` keyword when the layer has one: the
    integer path runs channels_last (TensorFlow's float64 CPU convolutions
    are NHWC only), transposing a channels_first input and output.
    """
    first = getattr(layer, "data_format", None) == "channels_first"
    grids = _integer_grids(layer, training)
    if grids is None:
        y = apply(x, kernel)
        if layer.use_bias:
            bias = _quantize_bias(layer, _to_float32(layer.bias), w_scale)
            y = y + (ops.reshape(bias, (-1, 1, 1)) if first else bias)
    else:
        [(sx, _)], (sy, zy) = grids
        channels = int(np.prod(w_scale.shape))
        codes = integer.to_int(ops.reshape(kernel, (-1, channels)), w_scale)
        x_int = integer.to_int(x, sx)
        kernel_int = ops.reshape(codes, kernel.shape)
        if first:
            x_int = ops.transpose(x_int, (0, 2, 3, 1))
            acc = apply(x_int, kernel_int, data_format="channels_last")
        else:
            acc = apply(x_int, kernel_int)
        if layer.use_bias:
            acc = acc + integer.int_bias(_to_float32(layer.bias), sx, w_scale)
        q = integer.requantize(acc, sx, w_scale, sy, zy)
        y = integer.from_int(q, sy, zy)
        if first:
            y = ops.transpose(y, (0, 3, 1, 2))
    return layer.activation(y) if layer.activation is not None else y


def _quantize_bias(layer, bias, weight_scale):
    """The bias on TFLite's int32 grid (``input_scale * weight_scale``).

    TFLite stores a conv/dense bias as int32 with that scale; rounding it the
    same way here keeps the float simulation and the int8 kernels in step
    (otherwise the bias rounding shifts some outputs by one step, which then
    spreads through the network). Straight-through gradient.
    """
    refs = _links(layer)
    if not refs:
        return bias
    sx, _ = refs[0].grid()
    codes = integer.int_bias(bias, sx, weight_scale)
    q = ops.cast(codes, "float32") * integer.bias_scale(sx, weight_scale)
    return bias + ops.stop_gradient(ops.cast(q, bias.dtype) - bias)


@sb_export("sb_keras.export.FakeQuant")
class FakeQuant(_Float32Inputs, keras.layers.Layer):
    """Per-tensor int8 fake quantization of activations with EMA ranges.

    In training the range ``[min, max]`` (always containing 0) follows an
    exponential moving average of the batch ranges (the first batch sets
    it); in inference the stored range is used.

    Args:
        momentum: EMA momentum of the range. Defaults to `0.99`.

    Example:

    >>> import numpy as np
    >>> fq = FakeQuant()
    >>> y = fq(np.linspace(-1, 1, 11).astype("float32"), training=True)
    >>> float(np.abs(np.asarray(y) - np.linspace(-1, 1, 11)).max()) < 0.01
    True
    """

    def __init__(self, momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.supports_masking = True

    def build(self, input_shape):
        self.range_min = self.add_weight(
            name="range_min", shape=(), initializer="zeros", trainable=False
        )
        self.range_max = self.add_weight(
            name="range_max", shape=(), initializer="zeros", trainable=False
        )
        self.initialized = self.add_weight(
            name="initialized", shape=(), initializer="zeros", trainable=False
        )

    @_float32
    def call(self, inputs, training=None):
        lo, hi = _to_float32(self.range_min), _to_float32(self.range_max)
        if training:
            x = ops.stop_gradient(inputs)
            b_lo = ops.minimum(ops.min(x), 0.0)
            b_hi = ops.maximum(ops.max(x), 0.0)
            m = self.momentum * _to_float32(self.initialized)
            lo = m * lo + (1.0 - m) * b_lo
            hi = m * hi + (1.0 - m) * b_hi
            self.range_min.assign(lo)
            self.range_max.assign(hi)
            self.initialized.assign(1.0)
        hi = ops.maximum(hi, lo + 1e-6)
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, lo, hi, num_bits=8, narrow_range=False
        )

    def scale(self):
        """The quantization step of the current range."""
        hi = ops.maximum(self.range_max, self.range_min + 1e-6)
        return (hi - self.range_min) / 255.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


@sb_export("sb_keras.export.QuantConv2D")
class QuantConv2D(_Float32Inputs, keras.layers.Conv2D):
    """`Conv2D` whose kernel is fake-quantized per output channel.

    Built by `quantize_aware_model`, which links it to the `FakeQuant` of
    its input and of its output (`link_ranges`): with them the bias is
    rounded to TFLite's int32 grid and inference runs the int8 arithmetic.
    The links are not serialized; a reloaded layer links itself at its first
    call (`sb_keras.export.qat.link_layer`).
    """

    @_float32
    def call(self, inputs, training=None):
        kernel = _to_float32(self.kernel)
        kernel, w_scale = _per_channel(kernel, kernel.shape[-1])
        return _linear(self, inputs, kernel, w_scale, training, self._conv)

    def _conv(self, inputs, kernel, data_format=None):
        return ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=data_format or self.data_format,
        )


@sb_export("sb_keras.export.QuantDepthwiseConv2D")
class QuantDepthwiseConv2D(_Float32Inputs, keras.layers.DepthwiseConv2D):
    """`DepthwiseConv2D` whose kernel is fake-quantized per channel."""

    def _depthwise(self, inputs, kernel, data_format=None):
        return ops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=data_format or self.data_format,
            dilation_rate=self.dilation_rate,
        )

    @_float32
    def call(self, inputs, training=None):
        kh, kw, c, mult = self.kernel.shape
        flat = ops.reshape(_to_float32(self.kernel), (kh, kw, 1, c * mult))
        flat, w_scale = _per_channel(flat, c * mult)
        kernel = ops.reshape(flat, (kh, kw, c, mult))
        return _linear(self, inputs, kernel, w_scale, training, self._depthwise)


@sb_export("sb_keras.export.QuantDense")
class QuantDense(_Float32Inputs, keras.layers.Dense):
    """`Dense` whose kernel is fake-quantized per tensor (symmetric)."""

    @_float32
    def call(self, inputs, training=None):
        kernel = _to_float32(self.kernel)
        m = ops.maximum(ops.max(ops.abs(kernel)), 1e-8)
        kernel = tf.quantization.fake_quant_with_min_max_vars(
            kernel, -m, m, num_bits=8, narrow_range=True
        )
        w_scale = integer.div32(m, 127.0)
        return _linear(self, inputs, kernel, w_scale, training, ops.matmul)


@sb_export("sb_keras.export.QuantSharedConv2D")
class QuantSharedConv2D(_Float32Inputs, SharedConv2D):
    """`SharedConv2D` whose shared kernel is fake-quantized per channel."""

    @_float32
    def call(self, inputs):
        x, kernel = inputs
        kernel, _ = _per_channel(kernel, kernel.shape[-1])
        return self._finish(self.convolution_op(x, kernel))


@sb_export("sb_keras.export.QuantAdd")
class QuantAdd(_Float32Inputs, keras.layers.Add):
    """`Add` of two tensors that, in inference, adds like the int8 kernel.

    Training adds in float (the fake quant after it rounds); inference
    applies XNNPACK's fixed-point ``ADD`` to the int8 codes of its inputs
    (`sb_keras.export.integer.add`).
    """

    @_float32
    def call(self, inputs, training=None):
        grids = _integer_grids(self, training)
        if grids is None or len(inputs) != 2 or len(grids[0]) != 2:
            return super().call(inputs)
        (ga, gb), go = grids
        return integer.add(inputs[0], inputs[1], ga, gb, go)


@sb_export("sb_keras.export.QuantGlobalAveragePooling2D")
class QuantGlobalAveragePooling2D(_Float32Inputs, keras.layers.GlobalAveragePooling2D):
    """Global average pooling that, in inference, averages like int8 ``MEAN``."""

    @_float32
    def call(self, inputs, training=None):
        grids = _integer_grids(self, training)
        if grids is None:
            return super().call(inputs)
        [gi], go = grids
        axes = [1, 2] if self.data_format == "channels_last" else [2, 3]
        return integer.mean(inputs, axes, self.keepdims, gi, go)


QUANT_LAYERS = (
    FakeQuant,
    QuantConv2D,
    QuantDepthwiseConv2D,
    QuantDense,
    QuantSharedConv2D,
    QuantAdd,
    QuantGlobalAveragePooling2D,
)
