"""Graph-building helpers of the MobileNetV2 family (functional API).

The layout follows the authors' code (``ssregibility/Net_RL2``,
``models/ilsvrc/mobilenetv2.py`` and ``models/cifar100/mobilenetv2.py``),
which deviates from torchvision: ReLU (not ReLU6) inside the inverted
residual blocks, a stem convolution with a bias, and a 1x1 expansion
convolution even in the first (``t = 1``) block. Initialization is
PyTorch's default (``U(+-1/sqrt(fan_in))``), as the authors do not
re-initialize MobileNetV2.
"""

import keras

from sb_keras.layers import SharedConv2D
from sb_keras.layers import initializers as sb_init

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
BN_EPSILON = 1e-5  # PyTorch's default


def torch_default_initializer():
    """PyTorch's default conv/linear weight init, ``U(+-1/sqrt(fan_in))``."""
    return sb_init.dense_kernel_initializer()


def channels(x):
    """The channel count of an image tensor in the global data format."""
    return x.shape[-1 if keras.config.image_data_format() == "channels_last" else 1]


def batch_norm(x, name):
    axis = -1 if keras.config.image_data_format() == "channels_last" else 1
    return keras.layers.BatchNormalization(
        axis=axis, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )(x)


def pointwise(x, filters, name, kernel=None, use_bias=False):
    """A 1x1 convolution; with ``kernel``, a `SharedConv2D` user."""
    if kernel is not None:
        return SharedConv2D(name=name)([x, kernel])
    fan_in = channels(x)
    return keras.layers.Conv2D(
        filters,
        1,
        use_bias=use_bias,
        kernel_initializer=torch_default_initializer(),
        bias_initializer=sb_init.dense_bias_initializer(fan_in),
        name=name,
    )(x)


def depthwise(x, strides, name):
    """3x3 depthwise convolution with PyTorch's symmetric padding 1."""
    padding = "same"
    if strides > 1:
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.DepthwiseConv2D(
        3,
        strides=strides,
        padding=padding,
        use_bias=False,
        # PyTorch's fan_in of a depthwise kernel is 3 * 3 * 1.
        depthwise_initializer=keras.initializers.RandomUniform(-1 / 3, 1 / 3),
        name=name,
    )(x)


def inverted_residual(
    x, out_channels, expansion, strides, name, shortcut, kernels=None
):
    """expand 1x1 - BN - ReLU - depthwise 3x3 - BN - ReLU - project 1x1 - BN.

    Args:
        shortcut: ``"imagenet"`` (identity when stride 1 and the widths
            agree, else none) or ``"cifar"`` (the authors' CIFAR-100 code:
            every stride-1 block is residual, with a 1x1 conv + BN
            projection when the widths differ).
        kernels: None, or a dict with the shared ``"expand"`` and optionally
            ``"project"`` kernel tensors.
    """
    kernels = kernels or {}
    in_channels = channels(x)
    planes = expansion * in_channels
    y = pointwise(x, planes, f"{name}_expand", kernel=kernels.get("expand"))
    y = batch_norm(y, f"{name}_expand_bn")
    y = keras.layers.ReLU(name=f"{name}_expand_relu")(y)
    y = depthwise(y, strides, f"{name}_depthwise")
    y = batch_norm(y, f"{name}_depthwise_bn")
    y = keras.layers.ReLU(name=f"{name}_depthwise_relu")(y)
    y = pointwise(y, out_channels, f"{name}_project", kernel=kernels.get("project"))
    y = batch_norm(y, f"{name}_project_bn")
    if strides != 1:
        return y
    if in_channels == out_channels:
        residual = x
    elif shortcut == "cifar":
        residual = pointwise(x, out_channels, f"{name}_shortcut")
        residual = batch_norm(residual, f"{name}_shortcut_bn")
    else:
        return y
    return keras.layers.Add(name=f"{name}_add")([y, residual])


def stem(x, filters, variant):
    """ImageNet: 3x3/2 conv (bias) - BN - ReLU6; CIFAR: 1x1 conv, padding 1.

    The authors' CIFAR stem is a 1x1 convolution with ``padding=1``: the
    output is 34x34 and its border is the bias alone. It is kept as is.
    """
    x = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
    kernel_size, strides = (3, 2) if variant == "imagenet" else (1, 1)
    fan_in = kernel_size * kernel_size * channels(x)
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="valid",
        kernel_initializer=torch_default_initializer(),
        bias_initializer=sb_init.dense_bias_initializer(fan_in),
        name="stem_conv",
    )(x)
    x = batch_norm(x, "stem_bn")
    return keras.layers.ReLU(6.0, name="stem_relu")(x)


def head(x, filters):
    """1x1 conv (bias) - BN - ReLU6."""
    x = pointwise(x, filters, "head_conv", use_bias=True)
    x = batch_norm(x, "head_bn")
    return keras.layers.ReLU(6.0, name="head_relu")(x)


def classifier(x, num_classes, dropout, activation):
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    fan_in = x.shape[-1]
    return keras.layers.Dense(
        num_classes,
        activation=activation,
        kernel_initializer=sb_init.dense_kernel_initializer(),
        bias_initializer=sb_init.dense_bias_initializer(fan_in),
        name="predictions",
    )(x)


def make_divisible(value, divisor=8):
    """torchvision's channel rounding for width multipliers."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


def scaled(channels, alpha):
    return channels if alpha == 1.0 else make_divisible(channels * alpha)


def head_channels(alpha):
    return 1280 if alpha <= 1.0 else make_divisible(1280 * alpha)
