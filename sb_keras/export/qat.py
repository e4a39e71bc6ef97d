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

In inference (``training=False``: ``predict``, ``evaluate``, ``model(x)``)
the layers compute what the int8 file computes with LiteRT's default CPU
kernels, bit for bit (`sb_keras.export.integer`); in training they are the
differentiable float simulation.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.export import graph
from sb_keras.export import integer
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut


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


def _integer_grids(layer, training):
    """``(input grids, output grid)`` for the integer path, or None."""
    inputs = getattr(layer, "_input_ranges", None)
    output = getattr(layer, "_output_range", None)
    if training or _SIMULATE[0] or not inputs or output is None:
        return None
    return [link.grid() for link in inputs], output.grid()


def _integer_linear(layer, x, w_int, w_scale, grids, apply):
    """Inference of a conv / depthwise conv / dense on the int8 grid.

    ``w_int`` are the int8 weight codes (read from the fake-quantized kernel:
    the TFLite converter stores the codes of the fake-quant op's output,
    whose float32 rounding decides the rare near-ties) and ``apply(x, w)``
    the layer's linear op, run in float64 on integer codes (exact).
    """
    [(sx, _)], (sy, zy) = grids
    acc = apply(integer.to_int(x, sx), w_int)
    if layer.use_bias:
        acc = acc + integer.int_bias(layer.bias, sx, w_scale)
    q = integer.requantize(acc, sx, w_scale, sy, zy)
    return ops.cast(integer.from_int(q, sy, zy), layer.compute_dtype)


def _quantize_bias(layer, bias, weight_scale):
    """The bias on TFLite's int32 grid (``input_scale * weight_scale``).

    TFLite stores a conv/dense bias as int32 with that scale; rounding it the
    same way here keeps the float simulation and the int8 kernels in step
    (otherwise the bias rounding shifts some outputs by one step, which then
    spreads through the network). Straight-through gradient.
    """
    refs = getattr(layer, "_input_ranges", None)
    if not refs:
        return bias
    sx, _ = refs[0].grid()
    codes = integer.int_bias(bias, sx, weight_scale)
    q = ops.cast(codes, "float32") * integer.bias_scale(sx, weight_scale)
    return bias + ops.stop_gradient(ops.cast(q, bias.dtype) - bias)


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

    def scale(self):
        """The quantization step of the current range."""
        hi = ops.maximum(self.range_max, self.range_min + 1e-6)
        return (hi - self.range_min) / 255.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


@sb_export("sb_keras.export.QuantConv2D")
class QuantConv2D(keras.layers.Conv2D):
    """`Conv2D` whose kernel is fake-quantized per output channel.

    Built by `quantize_aware_model`, which links it to the `FakeQuant` of
    its input and of its output (`link_ranges`): with them the bias is
    rounded to TFLite's int32 grid and inference runs the int8 arithmetic.
    The links are not serialized: call `link_ranges` on a reloaded model.
    """

    def call(self, inputs, training=None):
        kernel, w_scale = _per_channel(self.kernel, self.kernel.shape[-1])
        grids = _integer_grids(self, training)
        if grids is not None:
            w = integer.to_int(kernel, w_scale)
            y = _integer_linear(self, inputs, w, w_scale, grids, self.convolution_op)
            return self.activation(y) if self.activation is not None else y
        y = self.convolution_op(inputs, kernel)
        if self.use_bias:
            y = y + _quantize_bias(self, self.bias, w_scale)
        return self.activation(y) if self.activation is not None else y


@sb_export("sb_keras.export.QuantDepthwiseConv2D")
class QuantDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`DepthwiseConv2D` whose kernel is fake-quantized per channel."""

    def _depthwise(self, inputs, kernel):
        return ops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
        )

    def call(self, inputs, training=None):
        kh, kw, c, mult = self.kernel.shape
        flat = ops.reshape(self.kernel, (kh, kw, 1, c * mult))
        flat, w_scale = _per_channel(flat, c * mult)
        kernel = ops.reshape(flat, (kh, kw, c, mult))
        grids = _integer_grids(self, training)
        if grids is not None:
            w = ops.reshape(integer.to_int(flat, w_scale), (kh, kw, c, mult))
            y = _integer_linear(self, inputs, w, w_scale, grids, self._depthwise)
            return self.activation(y) if self.activation is not None else y
        y = self._depthwise(inputs, kernel)
        if self.use_bias:
            y = y + _quantize_bias(self, self.bias, w_scale)
        return self.activation(y) if self.activation is not None else y


@sb_export("sb_keras.export.QuantDense")
class QuantDense(keras.layers.Dense):
    """`Dense` whose kernel is fake-quantized per tensor (symmetric)."""

    def call(self, inputs, training=None):
        m = ops.maximum(ops.max(ops.abs(self.kernel)), 1e-8)
        kernel = tf.quantization.fake_quant_with_min_max_vars(
            self.kernel, -m, m, num_bits=8, narrow_range=True
        )
        w_scale = integer.div32(m, 127.0)
        grids = _integer_grids(self, training)
        if grids is not None:
            w = integer.to_int(kernel, w_scale)
            y = _integer_linear(self, inputs, w, w_scale, grids, ops.matmul)
            return self.activation(y) if self.activation is not None else y
        y = ops.matmul(inputs, kernel)
        if self.use_bias:
            y = y + _quantize_bias(self, self.bias, w_scale)
        return self.activation(y) if self.activation is not None else y


@sb_export("sb_keras.export.QuantSharedConv2D")
class QuantSharedConv2D(SharedConv2D):
    """`SharedConv2D` whose shared kernel is fake-quantized per channel."""

    def call(self, inputs):
        x, kernel = inputs
        kernel, _ = _per_channel(ops.cast(kernel, self.compute_dtype), kernel.shape[-1])
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding)


@sb_export("sb_keras.export.QuantAdd")
class QuantAdd(keras.layers.Add):
    """`Add` of two tensors that, in inference, adds like the int8 kernel.

    Training adds in float (the fake quant after it rounds); inference
    applies XNNPACK's fixed-point ``ADD`` to the int8 codes of its inputs
    (`sb_keras.export.integer.add`).
    """

    def call(self, inputs, training=None):
        grids = _integer_grids(self, training)
        if grids is None or len(inputs) != 2 or len(grids[0]) != 2:
            return super().call(inputs)
        (ga, gb), go = grids
        y = integer.add(inputs[0], inputs[1], ga, gb, go)
        return ops.cast(y, self.compute_dtype)


@sb_export("sb_keras.export.QuantGlobalAveragePooling2D")
class QuantGlobalAveragePooling2D(keras.layers.GlobalAveragePooling2D):
    """Global average pooling that, in inference, averages like int8 ``MEAN``."""

    def call(self, inputs, training=None):
        grids = _integer_grids(self, training)
        if grids is None:
            return super().call(inputs)
        [gi], go = grids
        axes = [1, 2] if self.data_format == "channels_last" else [2, 3]
        y = integer.mean(inputs, axes, self.keepdims, gi, go)
        return ops.cast(y, self.compute_dtype)


QUANT_LAYERS = (
    FakeQuant,
    QuantConv2D,
    QuantDepthwiseConv2D,
    QuantDense,
    QuantSharedConv2D,
    QuantAdd,
    QuantGlobalAveragePooling2D,
)
_REPLACE = {
    keras.layers.Conv2D: QuantConv2D,
    keras.layers.DepthwiseConv2D: QuantDepthwiseConv2D,
    keras.layers.Dense: QuantDense,
    keras.layers.Add: QuantAdd,
    keras.layers.GlobalAveragePooling2D: QuantGlobalAveragePooling2D,
}
# Layers with an integer inference path (their input and output grids are
# linked by `link_ranges`).
_INTEGER = (
    QuantConv2D,
    QuantDepthwiseConv2D,
    QuantDense,
    QuantAdd,
    QuantGlobalAveragePooling2D,
)
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
# Ops into which the TFLite converter fuses a following ReLU/ReLU6: their own
# output is never stored, only the activation's, so no fake quant may sit
# between them (a second rounding the int8 kernel does not do).
_FUSES_ACTIVATION = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Dense,
    keras.layers.Add,
    SharedConv2D,
)


def _is_fusable_activation(layer):
    """A ReLU or ReLU6 that TFLite fuses into the op before it."""
    if not isinstance(layer, keras.layers.ReLU):
        return False
    plain = not layer.negative_slope and not layer.threshold
    return plain and layer.max_value in (None, 6.0)


def _input_fake_quant(tensor):
    """The `FakeQuant` whose range a tensor carries (through pads, pools)."""
    while getattr(tensor, "_keras_history", None) is not None:
        op = tensor._keras_history.operation
        if isinstance(op, FakeQuant):
            return op
        if not isinstance(op, _PASSTHROUGH) or len(op._inbound_nodes) != 1:
            return None
        inputs = op._inbound_nodes[0].input_tensors
        if len(inputs) != 1:
            return None
        tensor = inputs[0]
    return None


def _output_fake_quant(tensor, uses):
    """The `FakeQuant` that rounds a tensor (directly or after a fused ReLU)."""
    for _ in range(2):
        users = uses.get(id(tensor), [])
        if len(users) != 1:
            return None
        op = users[0].operation
        if isinstance(op, FakeQuant):
            return op
        if not _is_fusable_activation(op):
            return None
        tensor = users[0].outputs[0]
    return None


def link_ranges(model):
    """Links every quantized layer of a QAT model to its int8 grids.

    Each layer learns which `FakeQuant` ranges its inputs and its output
    carry; with them its bias is rounded to TFLite's int32 grid and its
    inference computes like the int8 kernels. `quantize_aware_model` calls
    it; the links are Python references, not saved in ``.keras`` files, so
    call it again on a loaded QAT model (`convert` does).

    Args:
        model: a model from `quantize_aware_model` (or loaded from one).

    Returns:
        The number of layers with complete links.
    """
    uses = graph.consumers(model)
    linked = 0
    for layer in model.layers:
        if not isinstance(layer, _INTEGER) or len(layer._inbound_nodes) != 1:
            continue
        node = layer._inbound_nodes[0]
        sources = [_input_fake_quant(t) for t in node.input_tensors]
        output = _output_fake_quant(node.outputs[0], uses)
        layer._input_ranges = [_Link(f) for f in sources if f is not None]
        complete = output is not None and None not in sources
        layer._output_range = _Link(output) if complete else None
        linked += complete
    return linked


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
            linear = getattr(layer, "activation", None) in (
                None,
                keras.activations.linear,
            )
            fused = isinstance(layer, _FUSES_ACTIVATION) and linear
            if fused and _is_fusable_activation(user):
                return False  # fused in TFLite: the ReLU after it carries the range
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
            # Fixed, as in the float model: trained, its weights (about
            # 1/(255 std), fed raw pixels) take steps far larger than theirs.
            new = QuantDepthwiseConv2D(
                1, use_bias=True, trainable=False, name=layer.name
            )
            out = new(*args)
            scale = np.array([1.0 / (255.0 * s) for s in layer.std], np.float32)
            offset = np.array(
                [-m / s for m, s in zip(layer.mean, layer.std)], np.float32
            )
            new.set_weights([scale.reshape(1, 1, -1, 1), offset])
        elif type(layer) in _REPLACE:
            new = _REPLACE[type(layer)].from_config(layer.get_config())
            out = new(*args, **kwargs)
            if layer.weights:
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
                    name = "input_quant" + (f"_{len(cache)}" if cache else "")
                    cache[id(value)] = FakeQuant(momentum=momentum, name=name)(value)
                return cache[id(value)]
        return value

    qat = graph.rebuild(model, first_handler, name=name or f"{model.name}_qat")
    link_ranges(qat)
    return qat


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
