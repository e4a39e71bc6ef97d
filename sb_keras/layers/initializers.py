"""Initializers that reproduce the authors' PyTorch initialization.

The official code initializes every ``nn.Conv2d`` with
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, every
``nn.Linear`` with PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
(weight and bias) and then re-initializes the shared bases with
``orthogonal_`` on the flattened ``(filters, c_in * k * k)`` matrix.
Keras's ``Orthogonal`` initializer produces the same distribution (a Haar
orthogonal matrix from a sign-corrected QR) with the same orientation: the
filters are orthonormal when there are at most ``c_in * k * k`` of them,
otherwise the columns are.
"""

import math

import keras


def conv_kernel_initializer():
    """``kaiming_normal_(mode="fan_out", nonlinearity="relu")``."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def dense_kernel_initializer():
    """PyTorch's ``nn.Linear`` weight init: ``U(+-1/sqrt(fan_in))``."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


def dense_bias_initializer(fan_in):
    """PyTorch's ``nn.Linear`` bias init: ``U(+-1/sqrt(fan_in))``."""
    limit = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-limit, limit)


def basis_initializer():
    """Orthogonal init of the flattened basis (gain 1), as ``orthogonal_``."""
    return keras.initializers.Orthogonal(gain=1.0)
