"""A convolution whose whole kernel is shared, and the option-A shortcut."""

import keras
from keras import ops
from keras.layers import InputSpec

from sb_keras.api_export import sb_export
from sb_keras.layers.common import channel_axis
from sb_keras.layers.common import check_int_tuple
from sb_keras.layers.common import check_padding
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import check_strides_dilation
from sb_keras.layers.common import conv_output_shape
from sb_keras.layers.common import image_input_spec
from sb_keras.layers.common import split_kernel_inputs
from sb_keras.layers.common import standardize_data_format
from sb_keras.layers.common import to_channels_last


@sb_export("sb_keras.layers.SharedConv2D")
class SharedConv2D(keras.layers.Layer):
    """A plain convolution whose kernel is a shared tensor input.

    The authors' ResNet-50/101 "Shared" and MobileNetV2 "Shared" models share
    a *whole* kernel (no decomposition) among the non-first blocks of a
    stage. The kernel is owned by a `FilterBasis` (with ``rank`` equal to the
    output channels) and this layer convolves with it: call it on
    ``[x, kernel]``. The kernel is in Keras's ``(kh, kw, in, out)`` layout.

    The arguments are those of ``keras.layers.Conv2D`` that apply to a
    convolution that does not own its kernel. ``kernel_regularizer`` and
    ``kernel_constraint`` are not supported here (the kernel belongs to the
    `FilterBasis`: give them to it) and raise a ``ValueError``.

    Args:
        strides: convolution strides, an int or a tuple of two. Defaults
            to `1`.
        padding: `"same"` or `"valid"` (case-insensitive). Defaults to
            `"same"`.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            ``keras.config.image_data_format()``.
        dilation_rate: an int or a tuple of two. Defaults to `1`.
        activation: applied to the output. Defaults to None.
        use_bias: add a bias owned by this layer. Defaults to `False` (a
            BatchNorm follows in the models, and the layer then has no
            weights).
        bias_initializer: initializer of the bias. Defaults to `"zeros"`.
        bias_regularizer: regularizer of the bias. Defaults to None.
        bias_constraint: constraint of the bias. Defaults to None.

    Example:

    >>> import keras, sb_keras
    >>> x = keras.Input((8, 8, 16))
    >>> k = sb_keras.layers.FilterBasis(rank=16, in_channels=16)(x)
    >>> y = sb_keras.layers.SharedConv2D()([x, k])
    >>> tuple(y.shape)
    (None, 8, 8, 16)
    """

    def __init__(
        self,
        strides=1,
        padding="same",
        data_format=None,
        dilation_rate=1,
        activation=None,
        use_bias=False,
        bias_initializer="zeros",
        bias_regularizer=None,
        bias_constraint=None,
        kernel_regularizer=None,
        kernel_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("kernel_regularizer", kernel_regularizer),
            ("kernel_constraint", kernel_constraint),
        ):
            if value is not None:
                raise ValueError(
                    f"SharedConv2D does not own its kernel, so `{name}` is not "
                    "supported: give it to the FilterBasis that owns the "
                    f"kernel. Received: {name}={value!r}"
                )
        self.strides = check_int_tuple("strides", strides)
        self.padding = check_padding(padding)
        self.data_format = standardize_data_format(data_format)
        self.dilation_rate = check_int_tuple("dilation_rate", dilation_rate)
        check_strides_dilation(self.strides, self.dilation_rate)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = [image_input_spec(self.data_format), InputSpec(ndim=4)]

    def build(self, input_shape):
        x_shape, kernels = split_kernel_inputs(input_shape)
        if len(kernels) != 1 or len(x_shape) != 4 or len(kernels[0]) != 4:
            raise ValueError(
                "SharedConv2D must be called on [x, kernel], a rank-4 image "
                "and a (kh, kw, in, out) kernel. "
                f"Received: input_shape={input_shape}"
            )
        # A grouped kernel (k, k, C / groups, F) convolves C channels.
        channels = x_shape[channel_axis(self.data_format)]
        if not kernels[0][2] or channels % kernels[0][2]:
            raise ValueError(
                f"The kernel expects {kernels[0][2]} input channels (per group) "
                f"but the input has {channels}. "
                f"Received: input_shape={input_shape}"
            )
        self.kernel_shape = tuple(kernels[0])
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.kernel_shape[-1],),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.input_spec = [
            image_input_spec(self.data_format, channels),
            InputSpec(shape=self.kernel_shape),
        ]

    def convolution_op(self, inputs, kernel):
        return ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )

    def call(self, inputs):
        x, (kernel,) = split_kernel_inputs(inputs)
        y = self.convolution_op(x, ops.cast(kernel, self.compute_dtype))
        return self._finish(y)

    def _finish(self, y):
        """Bias and activation."""
        if self.bias is not None:
            bias = ops.cast(self.bias, self.compute_dtype)
            if self.data_format == "channels_first":
                bias = ops.reshape(bias, (-1, 1, 1))
            y = y + bias
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        x_shape, kernels = split_kernel_inputs(input_shape)
        if not kernels and getattr(self, "kernel_shape", None) is not None:
            kernels = [self.kernel_shape]  # built: the image's shape suffices
        if len(kernels) != 1:
            raise ValueError(
                "SharedConv2D takes [x, kernel]: before it is built, its output "
                "shape needs the kernel's shape too. "
                f"Received: input_shape={input_shape}"
            )
        (k_shape,) = kernels
        return conv_output_shape(
            x_shape,
            tuple(k_shape[:2]),
            self.strides,
            self.padding,
            k_shape[-1],
            self.data_format,
            self.dilation_rate,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
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
        strides: spatial subsampling, an int or a tuple of two. Defaults to
            `2`.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            ``keras.config.image_data_format()``.
    """

    def __init__(self, out_channels, strides=2, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.strides = check_int_tuple("strides", strides)
        self.data_format = standardize_data_format(data_format)
        self.input_spec = image_input_spec(self.data_format)

    def _pads(self, channels):
        extra = self.out_channels - channels
        if extra < 0:
            raise ValueError(
                f"`out_channels` must be at least the {channels} input "
                f"channels. Received: out_channels={self.out_channels}"
            )
        return extra // 2, extra - extra // 2

    def build(self, input_shape):
        channels = input_shape[channel_axis(self.data_format)]
        if channels is None:
            raise ValueError(
                "ZeroPadShortcut needs a known number of input channels. "
                f"Received: input_shape={input_shape}"
            )
        self._pads(channels)
        self.input_spec = image_input_spec(self.data_format, channels)

    def call(self, inputs):
        sh, sw = self.strides
        axis = channel_axis(self.data_format)
        before, after = self._pads(inputs.shape[axis])
        if self.data_format == "channels_last":
            x = inputs[:, ::sh, ::sw, :]
            pads = [[0, 0], [0, 0], [0, 0], [before, after]]
        else:
            x = inputs[:, :, ::sh, ::sw]
            pads = [[0, 0], [before, after], [0, 0], [0, 0]]
        return ops.pad(x, pads)

    def compute_output_shape(self, input_shape):
        n, h, w, _ = to_channels_last(input_shape, self.data_format)
        spatial = [
            None if d is None else -(-d // s) for d, s in zip((h, w), self.strides)
        ]
        if self.data_format == "channels_last":
            return (n, *spatial, self.out_channels)
        return (n, self.out_channels, *spatial)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "out_channels": self.out_channels,
                "strides": self.strides,
                "data_format": self.data_format,
            }
        )
        return config
