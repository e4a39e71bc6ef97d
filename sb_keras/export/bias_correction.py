"""Empirical bias correction for int8 weights (post-training).

Rounding the weights to int8 shifts the *mean* of every convolution's output
(``E[(W_q - W) x] = (W_q - W) E[x]`` is not zero when the inputs, e.g. ReLU
outputs, have a non-zero mean), and the shifts add up along the network.
With one weight scale per tensor (``per_channel=False``: the smallest
decomposed files) the shift is large, because most output channels use only
a few of the 255 levels. Bias correction (Nagel et al., *Data-Free
Quantization Through Weight Equalization and Bias Correction*, ICCV 2019;
here the empirical variant on real images) moves each layer's bias so that
the mean of its output, with every weight up to it rounded as the TFLite
converter rounds it, equals the float model's. The layers are corrected one
after the other, in graph order, so that each correction sees the corrected
layers before it.

The corrected model has the original float weights and new biases; the
converter then rounds the weights exactly as simulated here (symmetric,
``max |w| / 127`` per output channel or per tensor).
"""

import keras
import numpy as np

from sb_keras.export import graph
from sb_keras.layers import FilterBasis

_BIASED = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def round_weights(w, per_channel=True):
    """``w`` rounded to TFLite's symmetric int8 grid (last axis = channels)."""
    w = np.asarray(w, np.float32)
    if per_channel:
        m = np.abs(w).reshape(-1, w.shape[-1]).max(0)
    else:
        m = np.abs(w).max()
    scale = np.maximum(m, 1e-12) / 127.0
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def _rounded_weights(layer, per_channel):
    weights = layer.get_weights()
    if isinstance(layer, FilterBasis):
        return [round_weights(w, per_channel) for w in weights]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = weights[0]
        kh, kw, c, mult = kernel.shape
        flat = round_weights(kernel.reshape(kh, kw, 1, c * mult), per_channel)
        return [flat.reshape(kernel.shape)] + weights[1:]
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        return [round_weights(weights[0], per_channel)] + weights[1:]
    return weights


def _channel_means(model, layers, images, batch_size):
    """Per-channel means of ``layers``' outputs over images and positions."""
    tap = keras.Model(
        model.inputs, [model.get_layer(lay.name).output for lay in layers]
    )
    sums = None
    for start in range(0, len(images), batch_size):
        outs = tap(images[start : start + batch_size], training=False)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        outs = [np.asarray(o, np.float64).reshape(-1, o.shape[-1]).sum(0) for o in outs]
        sums = outs if sums is None else [a + o for a, o in zip(sums, outs)]
    counts = [len(images) * int(np.prod(lay.output.shape[1:-1])) for lay in layers]
    return [s / n for s, n in zip(sums, counts)]


def correct_bias(model, images, per_channel=True, batch_size=32):
    """A copy of ``model`` whose biases undo the mean shift of int8 weights.

    Args:
        model: a folded model (`sb_keras.export.fold_model`, either layout).
        images: real calibration images ``(N, H, W, C)``; 128 are plenty.
        per_channel: simulate one weight scale per output channel (the
            converter's default) or per tensor (``per_channel=False`` of
            `sb_keras.export.convert`). Must match the conversion.
        batch_size: images per forward pass.

    Returns:
        A new functional model: same weights, corrected biases of every
        `Conv2D`/`DepthwiseConv2D`/`Dense` with a bias. Convert it with the
        same ``per_channel``.

    Example:

    >>> import numpy as np, sb_keras
    >>> from sb_keras import export
    >>> folded = export.fold_model(sb_keras.ResNet(depth=8), "decomposed")
    >>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    >>> fixed = export.correct_bias(folded, x, per_channel=False)
    >>> len(fixed.weights) == len(folded.weights)
    True
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            "`images` must be a non-empty batch (N, H, W, C). Received: "
            f"images.shape={images.shape}"
        )
    biased = []
    for node in graph.ordered_nodes(model):
        layer = node.operation
        if isinstance(layer, _BIASED) and layer.use_bias and layer not in biased:
            biased.append(layer)
    rounded = keras.models.clone_model(model)
    for layer in model.layers:
        if layer.weights:
            rounded.get_layer(layer.name).set_weights(
                _rounded_weights(layer, per_channel)
            )
    reference = _channel_means(model, biased, images, batch_size)
    for layer, mean in zip(biased, reference):
        (got,) = _channel_means(rounded, [layer], images, batch_size)
        copy = rounded.get_layer(layer.name)
        weights = copy.get_weights()
        weights[-1] = (weights[-1] - (got - mean)).astype(np.float32)
        copy.set_weights(weights)
    out = keras.models.clone_model(model)
    out.set_weights(model.get_weights())
    for layer in biased:
        target = out.get_layer(layer.name)
        weights = target.get_weights()
        weights[-1] = rounded.get_layer(layer.name).get_weights()[-1]
        target.set_weights(weights)
    return out
