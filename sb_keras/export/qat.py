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

The QAT model is float32 by default, also for a ``mixed_bfloat16`` source
model (see `quantize_aware_model`'s ``dtype``).

In inference (``training=False``: ``predict``, ``evaluate``, ``model(x)``)
the layers compute what the int8 file computes with LiteRT's default CPU
kernels, bit for bit (`sb_keras.export.integer`); in training they are the
differentiable float simulation.
"""

import keras
import numpy as np

from sb_keras.export import graph
from sb_keras.export import rewrites
from sb_keras.export.qat_layers import FakeQuant
from sb_keras.export.qat_layers import QuantAdd
from sb_keras.export.qat_layers import QuantConv2D
from sb_keras.export.qat_layers import QuantDense
from sb_keras.export.qat_layers import QuantDepthwiseConv2D
from sb_keras.export.qat_layers import QuantGlobalAveragePooling2D
from sb_keras.export.qat_layers import QuantSharedConv2D
from sb_keras.export.qat_layers import _Link
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut
from sb_keras.models import backbone

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
    rewrites.ChannelPad,
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


def _output_fake_quant(tensor, users_of):
    """The `FakeQuant` that rounds a tensor (directly or after a fused ReLU).

    ``users_of(tensor)`` lists the nodes that take ``tensor`` as input.
    """
    for _ in range(2):
        users = users_of(tensor)
        if len(users) != 1:
            return None
        op = users[0].operation
        if isinstance(op, FakeQuant):
            return op
        if not _is_fusable_activation(op):
            return None
        tensor = users[0].outputs[0]
    return None


def _graph_users(tensor):
    """The nodes that take ``tensor`` as input, from its producer's graph."""
    op = tensor._keras_history.operation
    return [
        node
        for node in op._outbound_nodes
        if any(t is tensor for t in node.input_tensors)
    ]


def link_layer(layer, users_of=_graph_users):
    """Links one quantized layer to the `FakeQuant` ranges around it.

    Returns:
        True when the layer has a complete link (input and output ranges);
        False when it is not linkable (shared layer, no fake quant around).
    """
    if not isinstance(layer, _INTEGER) or len(layer._inbound_nodes) != 1:
        return False
    node = layer._inbound_nodes[0]
    sources = [_input_fake_quant(t) for t in node.input_tensors]
    output = _output_fake_quant(node.outputs[0], users_of)
    layer._input_ranges = [_Link(f) for f in sources if f is not None]
    complete = output is not None and None not in sources
    layer._output_range = _Link(output) if complete else None
    return complete


def link_ranges(model):
    """Links every quantized layer of a QAT model to its int8 grids.

    Each layer learns which `FakeQuant` ranges its inputs and its output
    carry; with them its bias is rounded to TFLite's int32 grid and its
    inference computes like the int8 kernels. `quantize_aware_model` calls
    it. The links are Python references, not saved in ``.keras`` files: a
    loaded QAT model links each layer from its graph at its first call (see
    `link_layer`), so it computes the int8 path right after
    ``keras.models.load_model``. Calling this drops the model's compiled
    ``predict``/``evaluate``/``fit`` functions so that they see the links.

    Args:
        model: a model from `quantize_aware_model` (or loaded from one).

    Returns:
        The number of layers with complete links.
    """
    uses = graph.consumers(model)
    linked = sum(
        link_layer(layer, lambda t: uses.get(id(t), [])) for layer in model.layers
    )
    for name in ("predict_function", "test_function", "train_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    return linked


def quantize_aware_model(model, momentum=0.99, name=None, dtype=None):
    """A copy of a folded model with int8 fake quantization everywhere.

    The copy is built in float32 whatever the dtype policy of ``model`` or
    the global policy: the int8 simulation is float32 by nature (between
    layers it carries int8 values ``(q - z) * s``, which bfloat16's 8
    significant bits cannot all hold), so the QAT model of a
    ``mixed_bfloat16`` model computes what its int8 file computes, output
    for output, as in float32. The weights copy over unchanged (a mixed
    policy keeps its variables in float32).

    Args:
        model: a functional model without BatchNorm after its convs, i.e.
            the result of `sb_keras.export.fold_model` (``"folded"`` or
            ``"decomposed"``). It may be trained or not; any dtype policy.
        momentum: EMA momentum of the activation ranges.
        name: name of the new model.
        dtype: the dtype policy of every layer of the copy. None (default)
            means `"float32"`, the exact simulation of the int8 file. A mixed
            policy (`"mixed_bfloat16"`, `"mixed_float16"`) trains faster
            where the hardware has it; the fake quant still runs in float32
            inside each layer, but the values between layers pass through the
            compute dtype (exact in float16, up to one int8 step off on a few
            outputs in bfloat16).

    Returns:
        A functional `keras.Model` with the same weights, to be calibrated
        (`calibrate`) and fine-tuned with ``fit``, then converted with
        ``sb_keras.export.convert(qat_model, quantize="int8")``.

    Raises:
        UnsupportedLayerError: a BatchNorm is left (fold first) or a layer
            is unknown.
        ValueError: ``dtype`` is not a floating-point dtype policy.

    Example:

    >>> import sb_keras
    >>> folded = sb_keras.export.fold_model(sb_keras.ResNet(depth=8))
    >>> qat = sb_keras.export.quantize_aware_model(folded)
    >>> any(isinstance(l, sb_keras.export.QuantConv2D) for l in qat.layers)
    True
    """
    policy = _check_dtype(dtype)
    with backbone.policy_scope(policy):
        return _quantize_aware_model(model, momentum, name, policy)


def _check_dtype(dtype):
    """The `keras.DTypePolicy` of QAT's ``dtype`` (None: float32)."""
    if dtype is None:
        return keras.dtype_policies.get("float32")
    try:
        return backbone.check_dtype(dtype)
    except ValueError:
        raise ValueError(
            "`dtype` must be None (float32, the exact int8 simulation) or a "
            "floating-point Keras dtype policy such as 'float32' or "
            f"'mixed_bfloat16'. Received: dtype={dtype!r}"
        ) from None


def _quantize_aware_model(model, momentum, name, policy):
    """`quantize_aware_model` under the global ``policy`` (set by caller)."""
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
        return FakeQuant(
            momentum=momentum, name=f"fake_quant_{counter[0]}", dtype=policy
        )(x)

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
                dtype=policy,
            )
            out = new(*args)
            new.set_weights(layer.get_weights())
        elif isinstance(layer, SharedConv2D):
            out = QuantSharedConv2D(
                strides=layer.strides,
                padding=layer.padding,
                data_format=layer.data_format,
                dilation_rate=layer.dilation_rate,
                name=layer.name,
                dtype=policy,
            )(*args)
        elif isinstance(layer, PixelNormalization):
            # An exact per-channel affine map: a 1x1 depthwise conv quantizes
            # to int8 where a float MUL/ADD with constants would not.
            # Fixed, as in the float model: trained, its weights (about
            # 1/(255 std), fed raw pixels) take steps far larger than theirs.
            new = QuantDepthwiseConv2D(
                1, use_bias=True, trainable=False, name=layer.name, dtype=policy
            )
            out = new(*args)
            scale = np.array([1.0 / (255.0 * s) for s in layer.std], np.float32)
            offset = np.array(
                [-m / s for m, s in zip(layer.mean, layer.std)], np.float32
            )
            new.set_weights([scale.reshape(1, 1, -1, 1), offset])
        elif type(layer) in _REPLACE:
            new = _REPLACE[type(layer)].from_config(
                {**layer.get_config(), "dtype": policy}
            )
            out = new(*args, **kwargs)
            if layer.weights:
                new.set_weights(layer.get_weights())
        elif isinstance(layer, (ZeroPadShortcut, rewrites.ChannelPad)) or (
            graph.is_keras_builtin(layer) and not isinstance(layer, keras.Model)
        ):
            out = graph.call_copy(layer, args, kwargs, dtype=policy)
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
                    cache[id(value)] = FakeQuant(
                        momentum=momentum, name=name, dtype=policy
                    )(value)
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
