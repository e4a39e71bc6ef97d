"""Parameter and MAC counts, with a table against the unshared baseline.

Conventions of the paper's tables (method §3.3): parameters are the unique
learnable numbers (a shared tensor counted once, BatchNorm gamma and beta
included, BatchNorm moving statistics excluded); MACs are the conv and dense
multiply-accumulates for one image, each *use* of a shared kernel counted.
"""

import keras

from sb_keras.layers import ACDCConv2D
from sb_keras.layers import BasisConv2D
from sb_keras.layers import SharedConv2D

_STATISTICS = ("moving_mean", "moving_variance", "num_batches_tracked")


def _unique_variables(model):
    seen, out = set(), []
    for v in model.weights:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def count_params(model):
    """Unique learnable parameters of ``model`` (BN statistics excluded).

    Example:

    >>> import sb_keras
    >>> sb_keras.count_params(sb_keras.ResNet(depth=56))
    853018
    """
    total = 0
    for v in _unique_variables(model):
        if v.path.split("/")[-1] in _STATISTICS:
            continue
        total += int(_prod(v.shape))
    return total


def _prod(shape):
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _spatial(shape):
    return _prod([d for d in shape[1:-1]])


def _channels_last(layer, shape):
    """An image ``shape`` of ``layer`` in channels_last order.

    A layer with ``data_format="channels_first"`` (Keras's convs, the
    sb_keras conv layers) has ``(batch, channels, *spatial)`` shapes.
    """
    if getattr(layer, "data_format", None) == "channels_first" and len(shape) > 2:
        return (shape[0], *shape[2:], shape[1])
    return shape


def layer_macs(layer, input_shapes, output_shape):
    """Multiply-accumulates of one call of ``layer`` for one example.

    Shapes are in the layer's ``data_format`` (channels_last or
    channels_first); the count is the same in both.
    """
    input_shapes = list(input_shapes)
    if input_shapes:
        input_shapes[0] = _channels_last(layer, input_shapes[0])
    output_shape = _channels_last(layer, output_shape)
    if isinstance(layer, BasisConv2D):
        out = _spatial(output_shape)
        kh, kw = layer.kernel_size
        channels = input_shapes[0][-1]
        return out * (kh * kw * channels * layer.rank + layer.rank * layer.filters)
    if isinstance(layer, SharedConv2D):
        kh, kw, cin, cout = layer.kernel_shape
        return _spatial(output_shape) * kh * kw * cin * cout
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return _spatial(output_shape) * kh * kw * output_shape[-1]
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = input_shapes[0][-1] // layer.groups
        return _spatial(output_shape) * kh * kw * cin * output_shape[-1]
    if isinstance(layer, keras.layers.Dense):
        return _prod(output_shape[1:]) * input_shapes[0][-1]
    if isinstance(layer, ACDCConv2D):
        return _spatial(output_shape) * layer.macs_per_position()
    if hasattr(layer, "macs_per_position"):  # e.g. GroupedBasisConv2D
        return _spatial(output_shape) * layer.macs_per_position()
    return 0


def count_macs(model):
    """Multiply-accumulates for one example (conv and dense layers).

    Every call of a layer in the graph is counted, so each use of a shared
    basis costs its full convolution. Nested models are walked.

    Example:

    >>> import sb_keras
    >>> round(sb_keras.count_macs(sb_keras.ResNet(depth=56)) / 1e6, 1)
    125.5
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
            continue
        for node in layer._inbound_nodes:
            ins = [tuple(t.shape) for t in node.input_tensors]
            outs = node.output_tensors
            if not outs:
                continue
            total += layer_macs(layer, ins, tuple(outs[0].shape))
    return total


def baseline_of(model):
    """The unshared model matching ``model``, or None if it has none."""
    config_fn = getattr(model, "baseline_config", None)
    if config_fn is None:
        return None
    return type(model).from_config(config_fn())


def count_table(models, baseline=True):
    """A Markdown table of parameters and MACs, each against its baseline.

    Args:
        models: a model, or a list of models or registry names.
        baseline: also build each model's unshared baseline and report the
            ratios.

    Returns:
        The table as a string (print it).
    """
    from sb_keras.registry import get_model

    if not isinstance(models, (list, tuple)):
        models = [models]
    header = "| model | params | MACs (M) |"
    rule = "|---|---:|---:|"
    if baseline:
        header += " baseline | baseline params | params ratio | MACs ratio |"
        rule += "---|---:|---:|---:|"
    rows = [header, rule]
    for m in models:
        if isinstance(m, str):
            m = get_model(m)
        p, macs = count_params(m), count_macs(m)
        row = f"| {m.name} | {p:,} | {macs / 1e6:.1f} |"
        if baseline:
            base = baseline_of(m)
            if base is None:
                row += " - | - | - | - |"
            else:
                bp, bm = count_params(base), count_macs(base)
                row += f" {base.name} | {bp:,} | {p / bp:.3f} | {macs / bm:.3f} |"
        rows.append(row)
    return "\n".join(rows)
