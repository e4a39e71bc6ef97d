"""Graph pieces the export layouts emit so that LiteRT's XNNPACK runs them.

* `shortcut`: the option-A shortcut (``x[:, ::s, ::s]`` + channel zero
  padding) as a 1x1 stride-``s`` depthwise convolution with unit weights
  and a ``PAD``. The strided slice the layer otherwise becomes
  (``STRIDED_SLICE``) is not delegated to XNNPACK and splits every ResNet
  file into three delegate partitions; the depthwise conv and ``PAD`` are
  delegated (one partition). Exact in float and in int8 (a unit weight is
  127 steps of 1/127).
* `channel_affine`: a per-channel ``x * scale + shift`` (an inference
  BatchNorm) as a 1x1 depthwise convolution with a bias. After a shared
  kernel this keeps the kernel shared: the TFLite converter folds a
  ``MUL``/``ADD`` (or a BatchNorm) into the preceding convolution's
  constant kernel, making one copy of the shared kernel per user.
* `decompose_here`: the rule of the ``"mixed"`` layout (decompose a layer
  only where it saves many weights per output position).
"""

import keras
import numpy as np
from keras import ops

# "mixed" layout: decompose a layer when it saves at least this many weights
# per output position (ResNet56-S16U1: 472 in stage 3, 30 in stage 2, 1.8 in
# stage 1; measured in bench/deploy_layouts.py).
MIXED_MIN_SAVING = 100


@keras.saving.register_keras_serializable(package="sb_keras.export")
class ChannelPad(keras.layers.Layer):
    """Zero-pads the channels (last axis): ``before`` and ``after``."""

    def __init__(self, before, after, **kwargs):
        super().__init__(**kwargs)
        self.before, self.after = int(before), int(after)

    def call(self, inputs):
        return ops.pad(inputs, [[0, 0], [0, 0], [0, 0], [self.before, self.after]])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + self.before + self.after)

    def get_config(self):
        config = super().get_config()
        config.update({"before": self.before, "after": self.after})
        return config


@keras.saving.register_keras_serializable(package="sb_keras.export")
class ChannelBias(keras.layers.Layer):
    """``x + bias`` per channel; the converter fuses it into the conv bias."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)

    def build(self, input_shape):
        self.bias = self.add_weight(
            shape=(self.channels,), initializer="zeros", name="bias"
        )

    def call(self, inputs):
        return inputs + ops.cast(self.bias, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels})
        return config


def channel_bias(x, shift, name):
    """``x + shift`` per channel (a bias the converter fuses)."""
    layer = ChannelBias(x.shape[-1], name=name)
    y = layer(x)
    layer.set_weights([np.asarray(shift, np.float32)])
    return y


def _depthwise(x, scale, shift, strides, name):
    channels = x.shape[-1]
    layer = keras.layers.DepthwiseConv2D(
        1, strides=strides, use_bias=shift is not None, name=name
    )
    y = layer(x)
    weights = [np.asarray(scale, np.float32).reshape(1, 1, channels, 1)]
    if shift is not None:
        weights.append(np.asarray(shift, np.float32).reshape(channels))
    layer.set_weights(weights)
    return y


def shortcut(layer, x):
    """`ZeroPadShortcut` ``layer`` applied to ``x`` with delegated ops."""
    before, after = layer._pads(x.shape[-1])
    y = x
    if layer.strides != 1:
        ones = np.ones(x.shape[-1])
        y = _depthwise(x, ones, None, layer.strides, f"{layer.name}_subsample")
    if before or after:
        y = ChannelPad(before, after, name=f"{layer.name}_pad")(y)
    return y


def channel_affine(x, scale, shift, name):
    """``x * scale + shift`` per channel, as a 1x1 depthwise conv."""
    return _depthwise(x, scale, shift, 1, name)


def decompose_here(node, folded_weights, decomposed_weights, threshold):
    """True if decomposing saves ``threshold`` weights per output position."""
    shape = node.outputs[0].shape
    positions = 1
    for d in shape[1:-1]:
        if d is None:
            return True  # unknown size: keep the bytes small
        positions *= int(d)
    return (folded_weights - decomposed_weights) >= threshold * positions
