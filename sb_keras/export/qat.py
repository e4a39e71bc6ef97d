"""Quantization-aware training for Keras 3 models, without tfmot.

tensorflow-model-optimization cannot quantize Keras 3 models (its
``quantize_model`` accepts only tf_keras models, tfmot#1119) and Keras's own
``model.quantize`` skips convolutions. This module rebuilds a *folded*
model (BatchNorm already in the conv kernels, `sb_keras.export.fold_model`)
with TensorFlow fake-quant ops that the TFLite converter turns into int8
kernels:

* conv kernels: symmetric, narrow-range, per output channel
  (``tf.quantization.fake_quant_with_min_max_vars_per_channel``), the int8
  scheme of TFLite's conv kernels;
* dense kernels: symmetric, narrow-range, per tensor;
* activations: asymmetric, per tensor, with min/max tracked by an
  exponential moving average while training
  (``tf.quantization.fake_quant_with_min_max_vars``). One sits after every
  op whose output TFLite stores in int8 (after the ReLU when a conv feeds a
  ReLU, which TFLite fuses; after each residual ``Add``; on the input).

Converting the result with ``quantize="int8"`` needs no representative
dataset: the ranges come from the fake-quant ops.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.export import graph
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut


def _per_channel(kernel, axis_size):
    """Symmetric narrow-range int8 fake quant over the last axis."""
    m = ops.maximum(ops.max(ops.abs(ops.reshape(kernel, (-1, axis_size))), 0), 1e-8)
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        kernel, -m, m, num_bits=8, narrow_range=True
    )


@sb_export("sb_keras.export.FakeQuant")
class FakeQuant(keras.layers.Layer):
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

    def call(self, inputs, training=None):
        lo, hi = self.range_min, self.range_max
        if training:
            x = ops.stop_gradient(inputs)
            b_lo = ops.minimum(ops.min(x), 0.0)
            b_hi = ops.maximum(ops.max(x), 0.0)
            m = self.momentum * self.initialized
            lo = m * self.range_min + (1.0 - m) * b_lo
            hi = m * self.range_max + (1.0 - m) * b_hi
            self.range_min.assign(lo)
            self.range_max.assign(hi)
            self.initialized.assign(1.0)
        hi = ops.maximum(hi, lo + 1e-6)
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, lo, hi, num_bits=8, narrow_range=False
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


@sb_export("sb_keras.export.QuantConv2D")
class QuantConv2D(keras.layers.Conv2D):
    """`Conv2D` whose kernel is fake-quantized per output channel."""

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, _per_channel(kernel, kernel.shape[-1]))


@sb_export("sb_keras.export.QuantDepthwiseConv2D")
class QuantDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`DepthwiseConv2D` whose kernel is fake-quantized per channel."""

    def call(self, inputs):
        kh, kw, c, mult = self.kernel.shape
        flat = ops.reshape(self.kernel, (kh, kw, 1, c * mult))
        kernel = ops.reshape(_per_channel(flat, c * mult), (kh, kw, c, mult))
        y = ops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
        )
        if self.use_bias:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y


@sb_export("sb_keras.export.QuantDense")
class QuantDense(keras.layers.Dense):
    """`Dense` whose kernel is fake-quantized per tensor (symmetric)."""

    def call(self, inputs, training=None):
        m = ops.maximum(ops.max(ops.abs(self.kernel)), 1e-8)
        kernel = tf.quantization.fake_quant_with_min_max_vars(
            self.kernel, -m, m, num_bits=8, narrow_range=True
        )
        y = ops.matmul(inputs, kernel)
        if self.use_bias:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y


@sb_export("sb_keras.export.QuantSharedConv2D")
class QuantSharedConv2D(SharedConv2D):
    """`SharedConv2D` whose shared kernel is fake-quantized per channel."""

    def call(self, inputs):
        x, kernel = inputs
        kernel = _per_channel(ops.cast(kernel, self.compute_dtype), kernel.shape[-1])
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding)


QUANT_LAYERS = (
    FakeQuant,
    QuantConv2D,
    QuantDepthwiseConv2D,
    QuantDense,
    QuantSharedConv2D,
)
_REPLACE = {
    keras.layers.Conv2D: QuantConv2D,
    keras.layers.DepthwiseConv2D: QuantDepthwiseConv2D,
    keras.layers.Dense: QuantDense,
}
# Outputs that keep their input's quantization in TFLite.
_PASSTHROUGH = (
    keras.layers.ZeroPadding2D,
    keras.layers.Dropout,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.MaxPooling2D,
    ZeroPadShortcut,
    FilterBasis,
)
_FUSED_ACTIVATIONS = (keras.layers.ReLU,)


def quantize_aware_model(model, momentum=0.99, name=None):
    """A copy of a folded model with int8 fake quantization everywhere.

    Args:
        model: a functional model without BatchNorm after its convs, i.e.
            the result of `sb_keras.export.fold_model` (``"folded"`` or
            ``"decomposed"``). It may be trained or not.
        momentum: EMA momentum of the activation ranges.
        name: name of the new model.

    Returns:
        A functional `keras.Model` with the same weights, to be calibrated
        (`calibrate`) and fine-tuned with ``fit``, then converted with
        ``sb_keras.export.convert(qat_model, quantize="int8")``.

    Raises:
        UnsupportedLayerError: a BatchNorm is left (fold first) or a layer
            is unknown.

    Example:

    >>> import sb_keras
    >>> folded = sb_keras.export.fold_model(sb_keras.ResNet(depth=8))
    >>> qat = sb_keras.export.quantize_aware_model(folded)
    >>> any(isinstance(l, sb_keras.export.QuantConv2D) for l in qat.layers)
    True
    """
    uses = graph.consumers(model)
    outputs = {id(t) for t in model.outputs}

    def needs_quant(node):
        layer = node.operation
        if isinstance(layer, _PASSTHROUGH):
            return False
        out = node.outputs[0]
        users = uses.get(id(out), [])
        if id(out) not in outputs and len(users) == 1:
            user = users[0].operation
            if isinstance(user, _FUSED_ACTIVATIONS) and isinstance(
                layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, SharedConv2D)
            ):
                return False  # the ReLU after it carries the range
        return True

    counter = [0]

    def fq(x):
        counter[0] += 1
        return FakeQuant(momentum=momentum, name=f"fake_quant_{counter[0]}")(x)

    def handler(node, args, kwargs):
        layer = node.operation
        if isinstance(layer, keras.layers.BatchNormalization):
            raise graph.UnsupportedLayerError(
                "Fold BatchNorm into the convolutions before QAT "
                "(sb_keras.export.fold_model). Received: layer="
                f"{layer.name!r}"
            )
        kwargs = {k: v for k, v in kwargs.items() if k != "training"}
        if isinstance(layer, FilterBasis):
            new = FilterBasis(
                rank=layer.rank,
                in_channels=layer.in_channels,
                kernel_size=layer.kernel_size,
                num_bases=layer.num_bases,
                orthogonality=0.0,
                name=layer.name,
            )
            out = new(*args)
            new.set_weights(layer.get_weights())
        elif isinstance(layer, SharedConv2D):
            out = QuantSharedConv2D(
                strides=layer.strides, padding=layer.padding, name=layer.name
            )(*args)
        elif isinstance(layer, PixelNormalization):
            # An exact per-channel affine map: a 1x1 depthwise conv quantizes
            # to int8 where a float MUL/ADD with constants would not.
            new = QuantDepthwiseConv2D(1, use_bias=True, name=layer.name)
            out = new(*args)
            scale = np.array([1.0 / (255.0 * s) for s in layer.std], np.float32)
            offset = np.array(
                [-m / s for m, s in zip(layer.mean, layer.std)], np.float32
            )
            new.set_weights([scale.reshape(1, 1, -1, 1), offset])
        elif type(layer) in _REPLACE:
            new = _REPLACE[type(layer)].from_config(layer.get_config())
            out = new(*args, **kwargs)
            new.set_weights(layer.get_weights())
        elif isinstance(layer, ZeroPadShortcut) or (
            graph.is_keras_builtin(layer) and not isinstance(layer, keras.Model)
        ):
            out = graph.call_copy(layer, args, kwargs)
        else:
            raise graph.UnsupportedLayerError(
                f"QAT does not know layer {layer.name!r}. Received: layer="
                f"{type(layer).__module__}.{type(layer).__name__}"
            )
        return fq(out) if needs_quant(node) else out

    def input_handler(node, args, kwargs):
        return handler(node, args, kwargs)

    # Quantize the inputs as well: wrap the rebuild so inputs get a FakeQuant.
    def first_handler(node, args, kwargs):
        args = [_quantize_inputs(a, quantized) for a in args]
        return input_handler(node, args, kwargs)

    quantized = {}

    def _quantize_inputs(value, cache):
        if isinstance(value, (list, tuple)):
            return type(value)(_quantize_inputs(v, cache) for v in value)
        if value is not None and getattr(value, "_keras_history", None) is not None:
            op = value._keras_history.operation
            if isinstance(op, keras.layers.InputLayer):
                if id(value) not in cache:
                    cache[id(value)] = FakeQuant(momentum=momentum, name="input_quant")(
                        value
                    )
                return cache[id(value)]
        return value

    return graph.rebuild(model, first_handler, name=name or f"{model.name}_qat")


def calibrate(qat_model, images, batch_size=32, steps=None):
    """Sets the activation ranges from real images (training-mode passes).

    Runs ``qat_model(batch, training=True)`` over ``images`` so that every
    `FakeQuant` range starts from data; weights are not changed.

    Args:
        qat_model: a model from `quantize_aware_model`.
        images: ``(N, H, W, C)`` images as the model takes them.
        batch_size: images per pass.
        steps: number of batches (default: all).
    """
    images = np.asarray(images, np.float32)
    n = len(images) // batch_size or 1
    steps = n if steps is None else min(int(steps), n)
    for i in range(steps):
        qat_model(images[i * batch_size : (i + 1) * batch_size], training=True)
    return qat_model


def output_quant_step(qat_model):
    """The quantization step of the model output (its last `FakeQuant`)."""
    last = [layer for layer in qat_model.layers if isinstance(layer, FakeQuant)][-1]
    lo, hi = float(last.range_min), float(last.range_max)
    return (hi - lo) / 255.0
