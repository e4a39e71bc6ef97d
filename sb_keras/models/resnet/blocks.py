"""Graph-building helpers of the ResNet family (functional API).

Every helper takes a tensor and returns a tensor; layer names say where a
layer sits (``stage2_block3_conv1``) so that weights load by name and
``model.summary()`` reads like the paper's tables.
"""

import contextlib
import contextvars

import keras

from sb_keras.layers import BasisConv2D
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut
from sb_keras.layers import initializers as sb_init
from sb_keras.layers.batch_norm import batch_normalization
from sb_keras.layers.batch_norm import check_batchnorm

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
BN_EPSILON = 1e-5  # PyTorch's default

# The BN convention of the model being built (`batchnorm_convention`).
_BATCHNORM = contextvars.ContextVar("sb_keras_batchnorm", default="keras")


@contextlib.contextmanager
def batchnorm_convention(batchnorm):
    """Builds every BN of the helpers below in ``batchnorm``'s convention.

    ``"keras"`` (Keras's BatchNormalization) or ``"pytorch"``
    (`sb_keras.layers.TorchBatchNormalization`, the unbiased running
    variance and ``num_batches_tracked``); the model constructor sets it
    around the graph construction.
    """
    token = _BATCHNORM.set(check_batchnorm(batchnorm))
    try:
        yield
    finally:
        _BATCHNORM.reset(token)


def batch_norm(x, name):
    return batch_normalization(
        _BATCHNORM.get(), momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )(x)


def _pad_for(x, kernel_size, strides, name):
    """PyTorch-style symmetric padding for strided convolutions.

    TF's "same" padding puts the extra row at the end, PyTorch pads
    ``k // 2`` on both sides; for stride 1 and odd ``k`` they agree.
    """
    if strides > 1 and kernel_size > 1:
        pad = kernel_size // 2
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        return x, "valid"
    return x, "same"


def conv(x, filters, kernel_size, strides, name, kernel=None):
    """A bias-free convolution; with ``kernel``, a `SharedConv2D` user."""
    x, padding = _pad_for(x, kernel_size, strides, name)
    if kernel is not None:
        return SharedConv2D(strides=strides, padding=padding, name=name)([x, kernel])
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=sb_init.conv_kernel_initializer(),
        name=name,
    )(x)


def conv_bn(x, filters, kernel_size, strides, name, bn_name, kernel=None):
    x = conv(x, filters, kernel_size, strides, name, kernel=kernel)
    return batch_norm(x, bn_name)


def basis_conv(x, filters, unique_rank, bases, basis_index, name, penalty):
    """A decomposed 3x3 convolution (stride 1) with its two BNs."""
    lam, normalizer = penalty
    inputs = [x, *bases] if bases else x
    return BasisConv2D(
        filters,
        unique_rank=unique_rank,
        basis_index=basis_index,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        orthogonality=lam,
        orthogonality_normalizer=normalizer,
        batchnorm=_BATCHNORM.get(),
        name=name,
    )(inputs)


def shortcut(x, filters, strides, kind, name):
    """Identity, option A (zero-pad) or option B (1x1 conv + BN)."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    if kind == "zero_pad":
        return ZeroPadShortcut(filters, strides=strides, name=name)(x)
    return conv_bn(x, filters, 1, strides, name, f"{name}_bn")


def basic_block(x, filters, strides, name, shortcut_kind, decomposed=None):
    """conv-BN-ReLU-conv-BN (+ shortcut) - ReLU.

    Args:
        decomposed: None for a plain block, or a dict with ``unique_rank``,
            ``bases`` (list of basis tensors) and ``penalty``
            (lambda, normalizer) for a block of decomposed convolutions.
    """
    residual = shortcut(x, filters, strides, shortcut_kind, f"{name}_shortcut")
    if decomposed is None:
        y = conv_bn(x, filters, 3, strides, f"{name}_conv1", f"{name}_bn1")
        y = keras.layers.ReLU(name=f"{name}_relu1")(y)
        y = conv_bn(y, filters, 3, 1, f"{name}_conv2", f"{name}_bn2")
    else:
        bases = decomposed["bases"]
        u = decomposed["unique_rank"]
        pen = decomposed["penalty"]
        second = 1 if len(bases) > 1 else 0
        y = basis_conv(x, filters, u, bases, 0, f"{name}_conv1", pen)
        y = keras.layers.ReLU(name=f"{name}_relu1")(y)
        y = basis_conv(y, filters, u, bases, second, f"{name}_conv2", pen)
    y = keras.layers.Add(name=f"{name}_add")([y, residual])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def bottleneck_block(x, width, strides, name, kernels=None):
    """1x1 - 3x3 (stride) - 1x1 (x4) bottleneck, projection shortcut.

    Args:
        kernels: None, or a dict with the shared ``"conv2"`` (3x3) and
            optionally ``"conv3"`` (1x1) kernel tensors.
    """
    kernels = kernels or {}
    out = 4 * width
    residual = shortcut(x, out, strides, "projection", f"{name}_shortcut")
    y = conv_bn(x, width, 1, 1, f"{name}_conv1", f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv_bn(
        y,
        width,
        3,
        strides,
        f"{name}_conv2",
        f"{name}_bn2",
        kernel=kernels.get("conv2"),
    )
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = conv_bn(
        y,
        out,
        1,
        1,
        f"{name}_conv3",
        f"{name}_bn3",
        kernel=kernels.get("conv3"),
    )
    y = keras.layers.Add(name=f"{name}_add")([y, residual])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def cifar_stem(x, filters):
    x = conv_bn(x, filters, 3, 1, "stem_conv", "stem_bn")
    return keras.layers.ReLU(name="stem_relu")(x)


def imagenet_stem(x, filters=64):
    x = conv_bn(x, filters, 7, 2, "stem_conv", "stem_bn")
    x = keras.layers.ReLU(name="stem_relu")(x)
    # Zero padding equals PyTorch's -inf padding after a ReLU.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)


def classifier(x, num_classes, activation):
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    fan_in = x.shape[-1]
    return keras.layers.Dense(
        num_classes,
        activation=activation,
        kernel_initializer=sb_init.dense_kernel_initializer(),
        bias_initializer=sb_init.dense_bias_initializer(fan_in),
        name="predictions",
    )(x)
