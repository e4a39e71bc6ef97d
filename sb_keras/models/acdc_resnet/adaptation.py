"""Few-shot adaptation of ACDC models: tune the atoms, keep alpha."""

import keras

from sb_keras.layers import ACDCConv2D


def freeze_all_but_atoms(model, batchnorm=False, classifier=False):
    """Makes only the ACDC atoms trainable (plus BN / classifier if asked).

    ACDC adapts a trained network to a new task by fine-tuning the few
    per-layer atoms while the shared coefficients alpha and every other
    weight stay fixed: a few thousand trainable numbers for a whole
    ResNet-18. Frozen BatchNorm layers run in inference mode (their moving
    statistics are used and not updated), as Keras does for non-trainable
    BN.

    Call it before ``compile`` (Keras collects the trainable weights when
    the train step is built). It changes ``trainable`` flags in place.

    Args:
        model: a model with `ACDCConv2D` layers (e.g. `sb_keras.ACDCResNet`).
        batchnorm: also train the BatchNorm layers (gamma, beta and
            statistics) and the biases of ACDC convolutions without BN.
            Defaults to `False`.
        classifier: also train the final `Dense` layer(s) (a new head for
            the new classes). Defaults to `False`.

    Returns:
        The model's trainable variables after the change.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ACDCResNet(depth=20, sharing="network")
    >>> trainable = sb_keras.freeze_all_but_atoms(model)
    >>> sorted({v.name for v in trainable})
    ['atoms']
    >>> sum(int(v.numpy().size) for v in trainable)  # 116 blocks x 6 atoms x 3x3
    6264

    Reference: Ze Wang, Xiuyuan Cheng, Guillermo Sapiro and Qiang Qiu,
    *ACDC: Weight Sharing in Atom-Coefficient Decomposed Convolution*
    (arXiv 2009.02386), few-shot classification by adapting atoms only.
    """
    layers = [layer for layer in model._flatten_layers(include_self=False)]
    convs = [layer for layer in layers if isinstance(layer, ACDCConv2D)]
    if not convs:
        raise ValueError(
            "`model` has no ACDCConv2D layer, so it has no atoms to adapt. "
            f"Received: model={model.name!r}"
        )
    for layer in model.layers:
        layer.trainable = False
    for conv in convs:
        conv.trainable = True
        if conv.coefficient_layer is not None:
            conv.coefficient_layer.trainable = False
        if conv.bias is not None:
            conv.bias.trainable = bool(batchnorm)
    for layer in layers:
        if batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
        if classifier and isinstance(layer, keras.layers.Dense):
            layer.trainable = True
    return list(model.trainable_variables)
