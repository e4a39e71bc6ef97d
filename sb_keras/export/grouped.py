"""Folding of `GroupedBasisConv2D` (the DenseNet/ResNeXt decomposed layer)."""

import keras
import numpy as np

from sb_keras.layers import SharedConv2D
from sb_keras.layers.grouped_basis_conv import bn_affine


def _conv(kernel, bias, groups, name, x):
    layer = keras.layers.Conv2D(
        kernel.shape[-1],
        kernel.shape[:2],
        padding="same",
        groups=groups,
        use_bias=bias is not None,
        name=name,
    )
    y = layer(x)
    weights = [np.asarray(kernel, np.float32)]
    if bias is not None:
        weights.append(np.asarray(bias, np.float32))
    layer.set_weights(weights)
    return y


def fold_grouped_basis_conv(layer, x, bases, basis_tensor, decomposed):
    """Builtin Keras layers equal to ``layer`` in inference mode.

    Args:
        layer: the trained `GroupedBasisConv2D`.
        x: the (new graph's) input tensor.
        bases: the basis arrays of the layer's node, in call order.
        basis_tensor: in the decomposed layout, the new graph's tensor of
            the basis the layer convolves with (else None).
        decomposed: keep the shared basis one tensor (`SharedConv2D`).

    Returns:
        The output tensor.
    """
    name = layer.name
    coeff, coeff_bias = layer.fold_coefficients()
    coeff = coeff.astype(np.float64)
    scale, shift = bn_affine(layer.basis_bn)
    linear = layer.activation is None
    ungrouped = layer.unique_groups == 1 and layer.shared_groups == 1
    if not decomposed and linear and ungrouped:
        # Everything is linear: one k x k convolution with a bias.
        kernel, bias = layer.fold_basis(bases)
        mixed = np.tensordot(kernel.astype(np.float64), coeff[0, 0], axes=([3], [0]))
        return _conv(mixed, bias @ coeff[0, 0] + coeff_bias, 1, name, x)
    u = layer.unique_rank
    parts = []
    if layer.unique_kernel is not None:
        unique = np.asarray(layer.unique_kernel, np.float64)
        bias = None
        if not decomposed:  # the basis BN folds into each part
            unique, bias = unique * scale[:u], shift[:u]
        parts.append(_conv(unique, bias, layer.unique_groups, f"{name}_unique", x))
    if layer.shared_rank:
        if decomposed:
            parts.append(SharedConv2D(name=f"{name}_shared")([x, basis_tensor]))
        else:
            shared = np.asarray(bases[layer.basis_index], np.float64)
            parts.append(
                _conv(
                    shared * scale[u:],
                    shift[u:],
                    layer.shared_groups,
                    f"{name}_shared",
                    x,
                )
            )
    z = parts[0]
    if len(parts) > 1:
        z = keras.layers.Concatenate(name=f"{name}_concat")(parts)
    if decomposed:
        if linear:
            # The basis BN folds into the coefficients.
            coeff_bias = shift @ coeff[0, 0] + coeff_bias
            coeff = coeff * scale[:, None]
        else:
            bn = keras.layers.BatchNormalization(
                epsilon=layer.basis_bn.epsilon, name=f"{name}_basis_bn"
            )
            z = bn(z)
            bn.set_weights([np.asarray(w) for w in layer.basis_bn.weights])
    if not linear:
        z = keras.layers.ReLU(name=f"{name}_relu")(z)
    return _conv(coeff, coeff_bias, 1, f"{name}_coeff", z)
