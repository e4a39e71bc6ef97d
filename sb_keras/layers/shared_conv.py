"""A convolution whose whole kernel is shared, and the option-A shortcut."""

import keras
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import conv_output_shape
from sb_keras.layers.common import split_kernel_inputs


@sb_export("sb_keras.layers.SharedConv2D")
class SharedConv2D(keras.layers.Layer):
    """A plain convolution whose kernel is a shared tensor input.

    The authors' ResNet-50/101 "Shared" and MobileNetV2 "Shared" models share
    a *whole* kernel (no decomposition) among the non-first blocks of a
    stage. The kernel is owned by a `FilterBasis` (with ``rank`` equal to the
    output channels) and this layer convolves with it: call it on
    ``[x, kernel]``. The layer itself has no weights.

    Args:
        strides: convolution strides. Defaults to `1`.
        padding: `"same"` or `"valid"`. Defaults to `"same"`.

    Example:

    >>> import keras, sb_keras
    >>> x = keras.Input((8, 8, 16))
    >>> k = sb_keras.layers.FilterBasis(rank=16, in_channels=16)(x)
    >>> y = sb_keras.layers.SharedConv2D()([x, k])
    >>> tuple(y.shape)
    (None, 8, 8, 16)
    """

    def __init__(self, strides=1, padding="same", **kwargs):
        super().__init__(**kwargs)
        self.strides = check_positive_int("strides", strides)
        if padding not in ("same", "valid"):
            raise ValueError(
                f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}"
            )
        self.padding = padding

    def build(self, input_shape):
        x_shape, kernels = split_kernel_inputs(input_shape)
        if len(kernels) != 1:
            raise ValueError(
                "SharedConv2D must be called on [x, kernel]. "
                f"Received: input_shape={input_shape}"
            )
        # A grouped kernel (k, k, C / groups, F) convolves C channels.
        if not kernels[0][2] or x_shape[-1] % kernels[0][2]:
            raise ValueError(
                f"The kernel expects {kernels[0][2]} input channels (per group) "
                f"but the input has {x_shape[-1]}. "
                f"Received: input_shape={input_shape}"
            )
        self.kernel_shape = tuple(kernels[0])

    def call(self, inputs):
        x, (kernel,) = split_kernel_inputs(inputs)
        kernel = ops.cast(kernel, self.compute_dtype)
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding)

    def compute_output_shape(self, input_shape):
        x_shape, (k_shape,) = split_kernel_inputs(input_shape)
        return conv_output_shape(
            x_shape, k_shape[0], self.strides, self.padding, k_shape[-1]
        )

    def get_config(self):
        config = super().get_config()
        config.update({"strides": self.strides, "padding": self.padding})
        return config


@sb_export("sb_keras.layers.ZeroPadShortcut")
class ZeroPadShortcut(keras.layers.Layer):
    """The parameter-free "option A" shortcut of the CIFAR ResNets.

    Subsamples ``x[:, ::strides, ::strides, :]`` and zero-pads the channels
    on *both* sides to ``out_channels`` (He et al. 2016; the layout of the
    authors' CIFAR-10 code, which pads ``planes // 4`` channels before and
    after).

    Args:
        out_channels: channels of the output.
        strides: spatial subsampling. Defaults to `2`.
    """

    def __init__(self, out_channels, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.strides = check_positive_int("strides", strides)

    def _pads(self, channels):
        extra = self.out_channels - channels
        if extra < 0:
            raise ValueError(
                f"`out_channels` must be at least the {channels} input "
                f"channels. Received: out_channels={self.out_channels}"
            )
        return extra // 2, extra - extra // 2

    def build(self, input_shape):
        self._pads(input_shape[-1])

    def call(self, inputs):
        s = self.strides
        x = inputs[:, ::s, ::s, :]
        before, after = self._pads(inputs.shape[-1])
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, after]])

    def compute_output_shape(self, input_shape):
        s = self.strides
        spatial = [None if d is None else -(-d // s) for d in input_shape[1:3]]
        return (input_shape[0], *spatial, self.out_channels)

    def get_config(self):
        config = super().get_config()
        config.update({"out_channels": self.out_channels, "strides": self.strides})
        return config
