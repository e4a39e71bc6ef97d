"""Weight scales that SGD can fine-tune, without changing what a model computes.

A convolution followed by a BatchNorm is scale-invariant in training: the BN
divides out any per-filter scale ``c`` of the kernel. Its gradient scales as
``1 / c`` and the relative step as ``1 / c**2``, so a kernel that is much
smaller than those SGD trained (a folded kernel ``basis x (basis BN scale) x
coefficients``, or the projections of a compressed layer) takes steps far
larger than the learning rate suggests. Measured on the plain ResNet-56
folded from the authors' ResNet56-S16U1 (filter norms down to 0.12): 16 SGD
steps at lr 1e-3 took it from 92.4 % to 36.1 % top-1 on the exact test
images.

`rebalance` rescales every such kernel's output filters to a common norm
(that of He initialization, ``sqrt(2 * fan_in / fan_out)``) and moves the
factor into the BN (moving mean x ``c``, moving variance x ``c**2``, gamma
corrected for the epsilon), so inference is unchanged (float rounding) and
training steps have their usual size.
"""

import keras
import numpy as np

from sb_keras.layers.basis_conv import BasisConv2D


def _rescale_bn(bn, c):
    """Inference of ``bn(c * y)`` equal to that of ``bn(y)``: stats times c."""
    mean = np.asarray(bn.moving_mean, np.float64)
    var = np.asarray(bn.moving_variance, np.float64)
    eps = bn.epsilon
    new_var = var * c**2
    if bn.gamma is not None:
        gamma = np.asarray(bn.gamma, np.float64)
        # gamma' c / sqrt(c^2 var + eps) == gamma / sqrt(var + eps)
        scale = np.sqrt(new_var + eps) / (c * np.sqrt(var + eps))
        bn.gamma.assign((gamma * scale).astype(np.float32))
    bn.moving_mean.assign((mean * c).astype(np.float32))
    bn.moving_variance.assign(new_var.astype(np.float32))


def _factors(matrix, fan_in, fan_out):
    """Per-output-column factors that bring each column to He's norm."""
    target = np.sqrt(2.0 * fan_in / fan_out)
    norms = np.linalg.norm(matrix, axis=0)
    return np.where(norms > 0, target / np.maximum(norms, 1e-30), 1.0)


def rebalance(model):
    """Rescales conv->BN pairs of ``model`` in place (see the module docstring).

    Handles a `keras.layers.Conv2D` without bias whose output feeds only a
    BatchNorm, and the coefficients of a `BasisConv2D` (its output BN).

    Args:
        model: a functional Keras model (e.g. an `sb_keras.ResNet`).

    Returns:
        The number of layers rescaled.
    """
    count = 0
    for layer in model.layers:
        if isinstance(layer, BasisConv2D):
            coeff = np.asarray(layer.coefficients, np.float64)  # (1, 1, R, F)
            m = coeff[0, 0]
            c = _factors(m, m.shape[0], m.shape[1])
            layer.coefficients.assign((coeff * c).astype(np.float32))
            _rescale_bn(layer.bn, c)
            count += 1
            continue
        if type(layer) is not keras.layers.Conv2D or layer.use_bias:
            continue
        consumers = [node.operation for node in layer._outbound_nodes]
        if len(consumers) != 1 or not isinstance(
            consumers[0], keras.layers.BatchNormalization
        ):
            continue
        kernel = np.asarray(layer.kernel, np.float64)
        m = kernel.reshape(-1, kernel.shape[-1])
        fan_out = kernel.shape[-1] * int(np.prod(kernel.shape[:2]))
        c = _factors(m, m.shape[0], fan_out)
        layer.kernel.assign((kernel * c).astype(np.float32))
        _rescale_bn(consumers[0], c)
        count += 1
    return count
