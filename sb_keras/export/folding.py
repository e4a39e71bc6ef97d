"""Folding a trained model into plain inference layers.

Two layouts, both exact in inference (BatchNorm uses its moving statistics):

* ``"folded"``: every `BasisConv2D` (basis -> BN -> 1x1 coefficients -> BN)
  becomes one ``k x k`` `Conv2D` with a bias (`BasisConv2D.fold`), every
  `SharedConv2D` a `Conv2D` holding the shared kernel, and the `FilterBasis`
  nodes disappear. Fewest ops; the shared kernels are stored once per user.
* ``"decomposed"``: the sharing is kept. A `BasisConv2D` becomes a unique
  ``k x k`` conv and a shared ``k x k`` conv (the `FilterBasis` variable,
  stored once), a concatenation and a 1x1 conv into which both BatchNorms
  are folded. Fewest bytes. A BatchNorm after a shared kernel becomes a
  per-channel scale and shift (a 1x1 depthwise conv), so the converter
  cannot fold it into a per-user copy of the kernel.
* ``"mixed"``: decomposed where it saves many weights per output position
  (`rewrites.MIXED_MIN_SAVING`; the late, narrow-spatial stages that hold
  most of the weights), folded elsewhere. Nearly the bytes of
  ``"decomposed"`` at nearly the speed of ``"folded"``.

In every layout the option-A shortcut runs as ops LiteRT's XNNPACK
delegate takes (`rewrites.shortcut`).

In both, a BatchNorm whose only input is a convolution without activation
is folded into that convolution's kernel and bias (in ``"decomposed"``, not
into a shared kernel, which stays shared).
"""

import keras
import numpy as np

from sb_keras.export import graph
from sb_keras.export import rewrites
from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers import GroupedBasisConv2D
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut

LAYOUTS = ("folded", "decomposed", "mixed")
# sb_keras layers that export as they are (constants and builtin ops only).
_KEEP = (PixelNormalization,)
_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def bn_affine(bn):
    """``(scale, shift)`` float64 arrays of an inference-mode BatchNorm."""
    if tuple(np.atleast_1d(bn.axis)) not in ((-1,), (3,), (1,)) and bn.axis != -1:
        raise graph.UnsupportedLayerError(
            f"Only channels-last BatchNorm folds. Received: {bn.name} axis={bn.axis}"
        )
    mean = np.asarray(bn.moving_mean, np.float64)
    var = np.asarray(bn.moving_variance, np.float64)
    gamma = np.ones_like(mean) if bn.gamma is None else np.asarray(bn.gamma, np.float64)
    beta = np.zeros_like(mean) if bn.beta is None else np.asarray(bn.beta, np.float64)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _is_linear(layer):
    act = getattr(layer, "activation", None)
    return act is None or act is keras.activations.linear


def _foldable_bns(model):
    """BatchNorm nodes that fold into their producer, keyed by id(bn layer)."""
    uses = graph.consumers(model)
    out = {}
    outputs = {id(t) for t in model.outputs}
    for node in graph.ordered_nodes(model):
        layer = node.operation
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        (x,) = node.input_tensors
        prod, _ = graph.producer(x)
        if id(x) in outputs or len(uses.get(id(x), [])) != 1:
            continue
        if isinstance(prod, (*_CONVS, BasisConv2D, SharedConv2D)) and _is_linear(prod):
            out[id(layer)] = prod
    return out


def _conv2d(kernel, bias, strides, padding, name, dilation=1, groups=1):
    kh, kw, _, filters = kernel.shape
    layer = keras.layers.Conv2D(
        filters,
        (kh, kw),
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
        groups=groups,
        use_bias=bias is not None,
        name=name,
    )
    return layer, [kernel.astype(np.float32)] + (
        [] if bias is None else [bias.astype(np.float32)]
    )


def _apply(layer, weights, x):
    y = layer(x)
    layer.set_weights(weights)
    return y


def _basis_values(node):
    """The shared basis arrays a `BasisConv2D`/`SharedConv2D` node uses."""
    values = []
    for t in node.input_tensors[1:]:
        owner, index = graph.producer(t)
        if not isinstance(owner, FilterBasis):
            raise graph.UnsupportedLayerError(
                "A shared kernel must come from a FilterBasis layer. "
                f"Received: {node.operation.name} fed by {owner.name}"
            )
        values.append(np.asarray(owner.bases[index]))
    return values


def _decisions(model, layout, min_saving):
    """``{id(layer): True}`` for the shared-basis layers kept decomposed."""
    out = {}
    for node in graph.ordered_nodes(model):
        layer = node.operation
        if isinstance(layer, BasisConv2D):
            if layout != "mixed":
                out[id(layer)] = layout == "decomposed"
                continue
            k = int(np.prod(np.broadcast_to(layer.kernel_size, (2,))))
            cin = node.input_tensors[0].shape[-1]
            folded = k * cin * layer.filters
            decomposed = k * cin * layer.unique_rank + layer.rank * layer.filters
            out[id(layer)] = rewrites.decompose_here(
                node, folded, decomposed, min_saving
            )
        elif isinstance(layer, GroupedBasisConv2D):
            # Not measured for "mixed" yet: grouped bases stay shared there.
            out[id(layer)] = layout != "folded"
        elif isinstance(layer, SharedConv2D):
            size = int(np.prod(node.input_tensors[1].shape))
            out[id(layer)] = layout == "decomposed" or (
                layout == "mixed"
                and rewrites.decompose_here(node, size, 0, min_saving)
            )
    return out


def fold_model(
    model, layout="folded", fold_batchnorm=True, name=None, min_saving=None
):
    """The inference graph of ``model`` with its shared-basis layers folded.

    Args:
        model: a functional Keras model (e.g. `sb_keras.ResNet`,
            `sb_keras.MobileNetV2`), trained.
        layout: `"folded"` (one plain conv per decomposed conv: fewest ops),
            `"decomposed"` (shared kernels kept once: fewest bytes) or
            `"mixed"` (decomposed only where that saves at least
            ``min_saving`` weights per output position).
        fold_batchnorm: also fold every BatchNorm that follows a conv.
        name: name of the new model. Defaults to ``model.name``.
        min_saving: threshold of `"mixed"`. Defaults to
            `rewrites.MIXED_MIN_SAVING`.

    Returns:
        A plain functional `keras.Model` of builtin Keras layers (plus
        `FilterBasis`/`SharedConv2D` in the decomposed layout and the
        constant-only `PixelNormalization`), equal to ``model`` in
        inference mode up to float rounding.

    Raises:
        UnsupportedLayerError: for a layer the pass does not know (a
            custom layer, a nested model).

    Example:

    >>> import numpy as np, sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True)
    >>> folded = sb_keras.export.fold_model(model)
    >>> x = np.random.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    >>> bool(np.allclose(folded(x), model(x), atol=1e-4))
    True

    Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for
    Efficient ConvNets* (arXiv 2006.05066), the inference equivalence of a
    decomposed layer and one convolution.
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"`layout` must be one of {LAYOUTS}. Received: layout={layout!r}"
        )
    if min_saving is None:
        min_saving = rewrites.MIXED_MIN_SAVING
    _check_exportable(model)
    keep = _decisions(model, layout, min_saving)
    fold_bn = _foldable_bns(model) if fold_batchnorm else {}
    # Keep the sharing: a BN after a kept shared kernel becomes a
    # per-channel scale/shift instead of being folded into the kernel.
    affine_bn = {k for k, v in fold_bn.items() if keep.get(id(v))}
    first = _first_user_scales(model, {id(v): k for k, v in fold_bn.items()}, keep)
    fold_bn = {k: v for k, v in fold_bn.items() if k not in affine_bn}
    producers_to_fold = {id(p): bn for p, bn in _bn_of(model, fold_bn).items()}

    def handler(node, args, kwargs):
        layer = node.operation
        bn = producers_to_fold.get(id(layer))
        affine = bn_affine(bn) if bn is not None else None
        decomposed = keep.get(id(layer), False)
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) in fold_bn:
            return args[0]  # folded into its producer
        if id(layer) in affine_bn:
            scale, shift = bn_affine(layer)
            stored = first.get(id(layer))
            if stored is None:
                return rewrites.channel_affine(args[0], scale, shift, layer.name)
            if stored[1]:  # this BN's scale is in the stored kernel
                return rewrites.channel_bias(args[0], shift, layer.name)
            return rewrites.channel_affine(
                args[0], scale / stored[0], shift, layer.name
            )
        if isinstance(layer, ZeroPadShortcut):
            return rewrites.shortcut(layer, args[0])
        if isinstance(layer, FilterBasis):
            if layout == "folded":
                return [None] * layer.num_bases if layer.num_bases > 1 else None
            new = FilterBasis(
                rank=layer.rank,
                in_channels=layer.in_channels,
                kernel_size=layer.kernel_size,
                num_bases=layer.num_bases,
                orthogonality=0.0,
                name=layer.name,
            )
            out = new(args[0])
            new.set_weights(layer.get_weights())
            for i, variable in enumerate(new.bases):
                if (id(layer), i) in first:
                    variable.assign(np.asarray(variable) * first[(id(layer), i)])
            return out
        if isinstance(layer, BasisConv2D):
            return _fold_basis_conv(node, layer, args, affine, decomposed)
        if isinstance(layer, GroupedBasisConv2D):
            from sb_keras.export.grouped import fold_grouped_basis_conv

            inputs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            shared = inputs[1 + layer.basis_index] if len(inputs) > 1 else None
            bases = _basis_values(node)
            return fold_grouped_basis_conv(
                layer, inputs[0], bases, shared, decomposed
            )
        if isinstance(layer, SharedConv2D):
            x = args[0][0]
            if decomposed:
                return SharedConv2D(
                    strides=layer.strides, padding=layer.padding, name=layer.name
                )(args[0])
            (kernel,) = _basis_values(node)
            kernel = kernel.astype(np.float64)
            bias = None
            if affine is not None:
                kernel = kernel * affine[0]
                bias = affine[1]
            conv, w = _conv2d(kernel, bias, layer.strides, layer.padding, layer.name)
            return _apply(conv, w, x)
        if isinstance(layer, _CONVS) and affine is not None:
            return _fold_conv_bn(layer, args[0], affine)
        if isinstance(layer, _KEEP) or graph.is_keras_builtin(layer):
            if isinstance(layer, keras.Model):
                raise graph.UnsupportedLayerError(
                    "Nested models are not supported; flatten the model first. "
                    f"Received: layer={layer.name!r}"
                )
            return graph.call_copy(layer, args, kwargs)
        raise graph.UnsupportedLayerError(
            f"Cannot export layer {layer.name!r} of class "
            f"{type(layer).__name__}: export knows the Keras builtin layers and "
            "the sb_keras layers. Received: layer="
            f"{type(layer).__module__}.{type(layer).__name__}"
        )

    return graph.rebuild(model, handler, name=name or f"{model.name}_{layout}")


def _first_user_scales(model, bn_of_producer, keep):
    """Folds one user's BN scale into a shared kernel whose users all scale.

    For a `FilterBasis` output used only by kept `SharedConv2D` layers that
    are each followed by a BatchNorm, the stored kernel becomes
    ``kernel * scale_1`` (the first user's BN scale): the first user then
    needs only a bias, the others a scale ``scale_i / scale_1`` and a
    shift. One per-channel op fewer per shared kernel, same bytes stored.

    Returns:
        ``{(id(basis layer), index): scale_1}`` and, per BN layer id,
        ``(scale_1, is_first_user)``.
    """
    users = {}
    for node in graph.ordered_nodes(model):
        for t in node.input_tensors[1:]:
            owner, index = graph.producer(t)
            if isinstance(owner, FilterBasis):
                users.setdefault((id(owner), index), []).append(node.operation)
    bns = {id(layer): layer for layer in model.layers}
    out = {}
    for key, layers in users.items():
        ok = all(
            isinstance(u, SharedConv2D) and keep.get(id(u)) and id(u) in bn_of_producer
            for u in layers
        )
        if not ok:
            continue
        scales = [bn_affine(bns[bn_of_producer[id(u)]])[0] for u in layers]
        if np.min(np.abs(scales[0])) < 1e-6 * max(np.max(np.abs(scales[0])), 1e-30):
            continue  # a zero scale cannot be divided out
        out[key] = scales[0]
        for i, u in enumerate(layers):
            out[bn_of_producer[id(u)]] = (scales[0], i == 0)
    return out


def _bn_of(model, fold_bn):
    """Maps each producer layer to the BN folded into it."""
    bns = {}
    for node in graph.ordered_nodes(model):
        if id(node.operation) in fold_bn:
            bns[fold_bn[id(node.operation)]] = node.operation
    return bns


def _fold_conv_bn(layer, x, affine):
    scale, shift = affine
    weights = layer.get_weights()
    kernel = weights[0].astype(np.float64)
    bias = weights[1].astype(np.float64) if layer.use_bias else 0.0
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        channels, mult = kernel.shape[2], kernel.shape[3]
        kernel = kernel * scale.reshape(channels, mult)
        bias = bias * scale + shift
        new = keras.layers.DepthwiseConv2D(
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            depth_multiplier=layer.depth_multiplier,
            dilation_rate=layer.dilation_rate,
            use_bias=True,
            name=layer.name,
        )
        return _apply(new, [kernel.astype(np.float32), np.asarray(bias, np.float32)], x)
    new, w = _conv2d(
        kernel * scale,
        bias * scale + shift,
        layer.strides,
        layer.padding,
        layer.name,
        dilation=layer.dilation_rate,
        groups=layer.groups,
    )
    return _apply(new, w, x)


def _check_exportable(model):
    """Refuses layers whose arguments the fold does not carry over.

    Folding rebuilds `BasisConv2D` and `SharedConv2D` as plain convolutions
    of the default Conv2D arguments; a dilated, activated, biased or
    channels_first layer would otherwise export as a different function.
    """
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, (BasisConv2D, SharedConv2D)):
            continue
        unsupported = {
            "dilation_rate": tuple(layer.dilation_rate) != (1, 1),
            "activation": layer.activation not in (None, keras.activations.linear),
            "data_format": layer.data_format != "channels_last",
            "use_bias": bool(getattr(layer, "use_bias", False))
            and isinstance(layer, SharedConv2D),
        }
        for arg, bad in unsupported.items():
            if bad:
                raise ValueError(
                    f"Export does not support `{arg}` on {type(layer).__name__} "
                    f"layer '{layer.name}' yet; build the model with the default "
                    f"(channels_last, no dilation, activation or bias). "
                    f"Received: {arg}={getattr(layer, arg)!r}"
                )


def _fold_basis_conv(node, layer, args, affine, decomposed):
    inputs = args[0]
    x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    bases = _basis_values(node)
    if not decomposed or layer.num_shared_bases == 0:
        kernel, bias = layer.fold(bases)
        kernel, bias = kernel.astype(np.float64), bias.astype(np.float64)
        if affine is not None:
            kernel, bias = kernel * affine[0], bias * affine[0] + affine[1]
        conv, w = _conv2d(kernel, bias, layer.strides, layer.padding, layer.name)
        return _apply(conv, w, x)
    # Decomposed: [unique conv, shared conv] -> concat -> 1x1 with both BNs.
    s_b, t_b = bn_affine(layer.basis_bn)
    s, t = bn_affine(layer.bn)
    if affine is not None:
        s, t = s * affine[0], t * affine[0] + affine[1]
    coeff = np.asarray(layer.coefficients, np.float64)[0, 0]
    mix = (s_b[:, None] * coeff) * s[None, :]
    bias = (t_b @ coeff) * s + t
    parts = []
    if layer.unique_kernel is not None:
        unique = np.asarray(layer.unique_kernel, np.float64)
        conv, w = _conv2d(
            unique, None, layer.strides, layer.padding, f"{layer.name}_unique"
        )
        parts.append(_apply(conv, w, x))
    parts.append(
        SharedConv2D(
            strides=layer.strides, padding=layer.padding, name=f"{layer.name}_shared"
        )([x, inputs[1 + layer.basis_index]])
    )
    z = parts[0]
    if len(parts) > 1:
        z = keras.layers.Concatenate(name=f"{layer.name}_concat")(parts)
    conv, w = _conv2d(mix[None, None], bias, 1, "valid", f"{layer.name}_coeff")
    return _apply(conv, w, z)
