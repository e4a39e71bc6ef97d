"""A plain functional Keras ResNet, recognized by structure, as an `sb_keras.ResNet`.

`plain_resnet` walks the graph of a functional `keras.Model` backwards from
its output and matches it against the layout of the plain basic-block
`sb_keras.ResNet`s; layer names do not matter. Recognized (channels-last,
one image input, one output):

* head: ``Dense(GlobalAveragePooling2D(x))`` (any Dense activation; no bias
  counts as a zero bias), or no head (the last block's output);
* blocks: ``ReLU(Add([BN(Conv3x3(ReLU(BN(Conv3x3/s(x))))), shortcut(x)]))``
  with the shortcut the identity, ``BN(Conv1x1/s(x))`` (projection) or any
  weight-free sub-graph of ``x`` that computes the option-A shortcut
  (``x[:, ::2, ::2, :]`` zero-padded by ``C/2`` channels on both sides,
  e.g. written with ``keras.ops`` or a ``Lambda``; recognized by evaluating
  it on random inputs);
* stem: ``ReLU(BN(Conv3x3(p)))`` (CIFAR) or ``MaxPool3x3/2(ZeroPadding2D(1)(
  ReLU(BN(Conv7x7/2(ZeroPadding2D(3)(p))))))`` (ImageNet), where ``p`` is
  the input itself or a weight-free function of it equal to one of
  `sb_keras.layers.preprocessing.NORMALIZATIONS` (e.g. ``Rescaling`` +
  ``Normalization`` with those statistics);
* every Conv2D bias-free, linear, undilated, ungrouped; 3x3 and 7x7 convs
  ``ZeroPadding2D(k // 2)`` then ``padding="valid"``, or at stride 1
  ``padding="same"`` (the PyTorch padding of `sb_keras.ResNet`; TF's
  ``"same"`` pads asymmetrically at stride 2, a different function); ReLU
  as ``keras.layers.ReLU()`` or ``Activation("relu")``; any
  ``BatchNormalization`` on the channel axis (its epsilon is converted);
* stages (a new one where the stride or the width changes) that an
  `sb_keras.ResNet` has: widths 16/32/64, ``n`` blocks each, strides
  1/2/2, option-A shortcuts and the CIFAR stem (ResNet-``6n+2``); or widths
  64/128/256/512, 2/2/2/2 or 3/4/6/3 blocks, strides 1/2/2/2, projection
  shortcuts, either stem (ResNet-18/34).

Anything else raises a `ValueError` that says what was found.
"""

import keras
import numpy as np

from sb_keras.compression.keras_graph import Mismatch
from sb_keras.compression.keras_graph import describe
from sb_keras.compression.keras_graph import match_bn
from sb_keras.compression.keras_graph import match_conv
from sb_keras.compression.keras_graph import match_relu
from sb_keras.compression.keras_graph import producer
from sb_keras.compression.keras_graph import same_function
from sb_keras.compression.keras_graph import single_input
from sb_keras.compression.keras_graph import spatial_size
from sb_keras.compression.keras_graph import weight_free_function
from sb_keras.layers import PixelNormalization
from sb_keras.layers import ZeroPadShortcut
from sb_keras.layers.preprocessing import NORMALIZATIONS
from sb_keras.models import arguments as checks
from sb_keras.models.resnet.resnet import IMAGENET_DEPTHS
from sb_keras.models.resnet.resnet import ResNet
from sb_keras.models.resnet.resnet import _is_cifar_depth

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)


def _block(tensor):
    """One basic block ending at ``tensor``; None when it is not ReLU(Add)."""
    op, inputs = producer(tensor)
    if not isinstance(op, (keras.layers.ReLU, keras.layers.Activation)):
        return None
    add, branches = producer(inputs[0]) if len(inputs) == 1 else (None, [])
    if not isinstance(add, keras.layers.Add):
        return None
    match_relu(tensor, f"after {describe(add)}")
    if len(branches) != 2:
        raise Mismatch(f"{describe(add)} adds {len(branches)} tensors, not 2")
    found = []
    for main in (0, 1):
        try:
            block = _main_branch(branches[main], add)
        except Mismatch as error:
            found.append(str(error))
            continue
        block["shortcut"] = _shortcut(branches[1 - main], block, add)
        return block
    raise Mismatch(
        f"neither input of {describe(add)} is conv3x3-BN-ReLU-conv3x3-BN: "
        + "; ".join(found)
    )


def _main_branch(tensor, add):
    where = f"residual branch of {describe(add)}"
    bn2, y = match_bn(tensor, where)
    conv2, y, stride2 = match_conv(y, 3, where)
    if stride2 != 1:
        raise Mismatch(f"{where}: second conv {describe(conv2)} has stride {stride2}")
    y = match_relu(y, where)
    bn1, y = match_bn(y, where)
    conv1, x, stride = match_conv(y, 3, where)
    if conv1.filters != conv2.filters:
        raise Mismatch(
            f"{where}: {describe(conv1)} has {conv1.filters} filters, "
            f"{describe(conv2)} {conv2.filters} (not a basic block)"
        )
    return {
        "conv1": conv1,
        "bn1": bn1,
        "conv2": conv2,
        "bn2": bn2,
        "input": x,
        "stride": stride,
        "in": x.shape[-1],
        "out": conv2.filters,
    }


def _shortcut(tensor, block, add):
    where = f"shortcut of {describe(add)}"
    x, stride, out = block["input"], block["stride"], block["out"]
    if tensor is x:
        if stride != 1 or block["in"] != out:
            raise Mismatch(f"{where}: identity, but the block changes the shape")
        return ("identity",)
    op, _ = producer(tensor)
    if isinstance(op, keras.layers.BatchNormalization):
        bn, y = match_bn(tensor, where)
        conv, y, conv_stride = match_conv(y, 1, where)
        if y is not x or conv_stride != stride:
            raise Mismatch(
                f"{where}: {describe(conv)} is not a 1x1/{stride} of the block input"
            )
        return ("projection", conv, bn)
    sub = weight_free_function(x, tensor, where)
    reference = ZeroPadShortcut(out, strides=stride)
    if stride == 1 or not same_function(
        sub, reference, (*spatial_size(x), block["in"])
    ):
        raise Mismatch(
            f"{where}: {describe(op)} computes neither the identity, a 1x1 conv + BN "
            "nor the option-A (subsample, zero-pad channels) shortcut"
        )
    return ("zero_pad",)


def _stem(tensor):
    """``(kind, conv, bn, input)`` of the stem that ends at ``tensor``."""
    op, inputs = producer(tensor)
    if isinstance(op, keras.layers.MaxPooling2D):
        where = f"ImageNet stem at {describe(op)}"
        if (
            tuple(op.pool_size) != (3, 3)
            or tuple(op.strides) != (2, 2)
            or op.padding != "valid"
        ):
            raise Mismatch(f"{where}: not a 3x3/2 max-pool with padding='valid'")
        pad, pad_inputs = producer(single_input(op, inputs))
        if not isinstance(pad, keras.layers.ZeroPadding2D) or (
            tuple(map(tuple, pad.padding)) != ((1, 1), (1, 1))
        ):
            raise Mismatch(f"{where}: expected ZeroPadding2D(1) before it")
        y = match_relu(single_input(pad, pad_inputs), where)
        bn, y = match_bn(y, where)
        conv, x, stride = match_conv(y, 7, where)
        if stride != 2:
            raise Mismatch(f"{where}: {describe(conv)} has stride {stride}, not 2")
        return "imagenet", conv, bn, x
    where = "stem"
    y = match_relu(tensor, where)
    bn, y = match_bn(y, where)
    conv, x, stride = match_conv(y, 3, where)
    if stride != 1:
        raise Mismatch(f"{where}: {describe(conv)} has stride {stride}")
    return "cifar", conv, bn, x


def _preprocessing(model, tensor):
    """The name of the normalization between the input and the stem, or None."""
    if tensor is model.inputs[0]:
        return None
    sub = weight_free_function(model.inputs[0], tensor, "before the stem conv")
    shape = (*spatial_size(model.inputs[0]), 3)
    for name, (mean, std) in NORMALIZATIONS.items():
        if same_function(sub, PixelNormalization(mean, std), shape, 0.0, 255.0):
            return name
    layers = ", ".join(describe(op) for op in sub.operations[1:])
    raise Mismatch(
        f"the layers before the stem conv ({layers}) compute none of the "
        f"normalizations {sorted(NORMALIZATIONS)} of sb_keras"
    )


def _head(model):
    """``(dense or None, feature tensor)``."""
    out = model.outputs[0]
    op, inputs = producer(out)
    if not isinstance(op, keras.layers.Dense):
        return None, out
    pool, pool_inputs = producer(single_input(op, inputs))
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D) or (
        pool.keepdims or pool.data_format != "channels_last"
    ):
        raise Mismatch(
            f"head: expected GlobalAveragePooling2D before {describe(op)}, "
            f"found {describe(pool)}"
        )
    return op, single_input(pool, pool_inputs)


def _parse(model):
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not isinstance(model, keras.Model) or not inputs or not outputs:
        raise Mismatch(f"a {type(model).__name__}, not a functional keras.Model")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise Mismatch(f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    if model.inputs[0].shape[-1] != 3 or len(model.inputs[0].shape) != 4:
        raise Mismatch(f"input shape {model.inputs[0].shape}, not (H, W, 3)")
    dense, x = _head(model)
    blocks = []
    while True:
        block = _block(x)
        if block is None:
            break
        blocks.insert(0, block)
        x = block["input"]
    if not blocks:
        op, _ = producer(x)
        raise Mismatch(
            f"no residual block (ReLU of an Add) before the head; "
            f"the features come from {describe(op)}"
        )
    stem, conv, bn, x = _stem(x)
    return {
        "stem": (stem, conv, bn),
        "preprocessing": _preprocessing(model, x),
        "blocks": blocks,
        "dense": dense,
    }


def _stages(blocks):
    stages = []
    for block in blocks:
        if not stages or block["stride"] != 1 or block["in"] != block["out"]:
            stages.append([])
        elif block["shortcut"][0] != "identity":
            raise Mismatch(
                f"a {block['shortcut'][0]} shortcut at {describe(block['conv1'])} "
                "where the shape does not change"
            )
        stages[-1].append(block)
    return stages


def _depth(parsed, stages):
    """The `sb_keras.ResNet` depth of the layout, or a mismatch saying why."""
    stem = parsed["stem"][0]
    widths = tuple(s[0]["out"] for s in stages)
    counts = tuple(len(s) for s in stages)
    strides = tuple(s[0]["stride"] for s in stages)
    kinds = tuple(s[0]["shortcut"][0] for s in stages)
    stem_width = parsed["stem"][1].filters
    depth = None
    if (widths, strides, stem, stem_width) == (CIFAR_WIDTHS, (1, 2, 2), "cifar", 16):
        if len(set(counts)) == 1 and kinds[1:] == ("zero_pad",) * 2:
            depth = 6 * counts[0] + 2
            if not _is_cifar_depth(depth) or depth > checks.MAX_CIFAR_DEPTH:
                depth = None
    elif (widths, strides, stem_width) == (IMAGENET_WIDTHS, (1, 2, 2, 2), 64):
        if kinds[1:] == ("projection",) * 3:
            depth = {v[1]: k for k, v in IMAGENET_DEPTHS.items() if v[0] == "basic"}
            depth = depth.get(counts)
    if depth is None:
        raise Mismatch(
            f"a basic-block ResNet with the {stem} stem ({stem_width} filters), "
            f"stage widths {widths}, blocks per stage {counts}, first strides "
            f"{strides} and first shortcuts {kinds}, which no sb_keras.ResNet has "
            "(ResNet-6n+2: widths 16/32/64, n blocks each, strides 1/2/2, "
            "option-A shortcuts, CIFAR stem; ResNet-18/34: widths 64/128/256/512, "
            "2/2/2/2 or 3/4/6/3 blocks, strides 1/2/2/2, projection shortcuts)"
        )
    return depth


def _bn_weights(bn, epsilon):
    """The four BN statistics for a BN of ``epsilon`` computing the same."""
    c = bn.moving_mean.shape[0]
    gamma = np.ones(c) if bn.gamma is None else np.asarray(bn.gamma, np.float64)
    beta = np.zeros(c) if bn.beta is None else np.asarray(bn.beta, np.float64)
    mean = np.asarray(bn.moving_mean, np.float64)
    var = np.asarray(bn.moving_variance, np.float64)
    new_var = var + bn.epsilon - epsilon
    new_var = np.where(new_var >= 0, new_var, var)
    gamma = gamma * np.sqrt((new_var + epsilon) / (var + bn.epsilon))
    return gamma, beta, mean, new_var


def _copy(pairs, target):
    from sb_keras.compression.resnet import _set_bn

    for name, layer in pairs:
        into = target.get_layer(name)
        if isinstance(layer, keras.layers.BatchNormalization):
            _set_bn(into, *_bn_weights(layer, into.epsilon))
        elif isinstance(layer, keras.layers.Dense):
            bias = layer.bias if layer.use_bias else np.zeros(layer.units)
            into.set_weights([np.asarray(layer.kernel), np.asarray(bias)])
        else:
            into.set_weights([np.asarray(layer.kernel)])


def plain_resnet(model):
    """The plain `sb_keras.ResNet` that computes what a Keras ResNet computes.

    ``model`` is a functional `keras.Model` of one of the layouts of the
    module docstring, with any layer names; its weights are copied into
    the matching plain `sb_keras.ResNet` (BatchNorm epsilons converted
    exactly), and the two are compared on random images.

    Args:
        model: a functional Keras ResNet (see the module docstring).

    Returns:
        The plain (``share=False``) `sb_keras.ResNet` with ``model``'s
        weights, input shape, classes and classifier activation.

    Raises:
        ValueError: the layout is not recognized (the message says where),
            or the rebuilt model does not reproduce ``model``.
    """
    name = getattr(model, "name", None)
    try:
        parsed = _parse(model)
        stages = _stages(parsed["blocks"])
        depth = _depth(parsed, stages)
    except Mismatch as found:
        raise ValueError(
            "`model` is not a recognized plain ResNet (an sb_keras.ResNet, or a "
            "functional Keras ResNet of the same layout: see "
            f"sb_keras.compression.keras_resnet). Found: {found}. "
            f"Received: model={name!r}"
        ) from None
    dense = parsed["dense"]
    activation = None
    if dense is not None:
        activation = keras.activations.serialize(dense.activation)
        if not isinstance(activation, str):  # a custom callable
            activation = dense.activation
        activation = None if activation == "linear" else activation
    stem, conv, bn = parsed["stem"]
    target = ResNet(
        depth,
        stem=None if depth not in IMAGENET_DEPTHS else stem,
        num_classes=None if dense is None else dense.units,
        input_shape=tuple(model.inputs[0].shape[1:]),
        include_top=dense is not None,
        classifier_activation=activation,
        preprocessing=parsed["preprocessing"],
        name=name,
    )
    pairs = [("stem_conv", conv), ("stem_bn", bn)]
    if dense is not None:
        pairs.append(("predictions", dense))
    for g, stage in enumerate(stages):
        for i, block in enumerate(stage):
            prefix = f"stage{g + 1}_block{i + 1}"
            for part in ("conv1", "bn1", "conv2", "bn2"):
                pairs.append((f"{prefix}_{part}", block[part]))
            if block["shortcut"][0] == "projection":
                pairs.append((f"{prefix}_shortcut", block["shortcut"][1]))
                pairs.append((f"{prefix}_shortcut_bn", block["shortcut"][2]))
    _copy(pairs, target)
    _verify(model, target)
    return target


def _verify(model, target):
    shape = (*spatial_size(model.inputs[0], 32), 3)
    x = np.random.RandomState(1).uniform(0, 255, (2, *shape)).astype("float32")
    want = np.asarray(model(x, training=False), np.float64)
    got = np.asarray(target(x, training=False), np.float64)
    scale = max(float(np.max(np.abs(want))), 1.0)
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-4 * scale):
        diff = np.max(np.abs(got - want)) if got.shape == want.shape else got.shape
        raise ValueError(
            "`model` matched the layout of an sb_keras.ResNet, but the rebuilt "
            f"model differs from it on random images (by {diff}). "
            f"Received: model={getattr(model, 'name', None)!r}"
        )
