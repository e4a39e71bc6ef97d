"""`adapt`: few-shot fine-tuning of the atoms of an ACDC model in Keras."""

import keras
import numpy as np
import tensorflow as tf

from sb_keras.layers import ACDCConv2D
from sb_keras.models.acdc_resnet.adaptation import freeze_all_but_atoms


def _acdc_layers(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, ACDCConv2D)
    ]


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def replace_head(model, num_classes, seed=None):
    """The model with a new (Glorot-initialized) classifier of ``num_classes``.

    The last `Dense` layer (the classifier) is replaced; everything before
    it is shared with ``model`` (same layers, same variables). The new head
    outputs logits.

    Args:
        model: a functional Keras model whose last layer is a `Dense`.
        num_classes: classes of the new head.
        seed: seed of the new kernel's initializer (Glorot uniform).

    Returns:
        A functional `keras.Model`.
    """
    num_classes = _check_count("num_classes", num_classes)
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(
            "`model` must end with a Dense classifier to replace its head. "
            f"Received: model={model.name!r} ending in {type(head).__name__}"
        )
    features = head.input
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name="adapted_predictions",
    )(features)
    return keras.Model(model.inputs, outputs, name=f"{model.name}_adapted")


def _from_logits(model):
    activation = getattr(model.layers[-1], "activation", None)
    return activation in (None, keras.activations.linear)


def check_support_set(model, x, y):
    """Validates a support set against ``model``; returns NumPy ``(x, y)``."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(
            f"The support set `x` is empty. Received: x with shape {x.shape}"
        )
    if y.ndim != 1:
        y = y.reshape(-1) if y.ndim == 2 and y.shape[-1] == 1 else y
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            "`y` must hold one integer label per image of `x` "
            f"({len(x)} images). Received: y with shape {y.shape}"
        )
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"`y` must hold integer class labels. Received: y.dtype={y.dtype}"
        )
    expected = tuple(model.input_shape[1:])
    if len(expected) != x.ndim - 1 or any(
        e is not None and e != s for e, s in zip(expected, x.shape[1:])
    ):
        raise ValueError(
            f"`x` must hold images of shape {expected}. Received: x with shape "
            f"{x.shape}"
        )
    classes = int(model.output_shape[-1])
    bad = y[(y < 0) | (y >= classes)]
    if bad.size:
        raise ValueError(
            f"Labels must lie in [0, {classes}) for the model's head of {classes} "
            "classes (pass `num_classes=` for a new head). Received: "
            f"y={int(bad[0])}"
        )
    return x, y.astype("int64")


def adapt(
    model,
    x,
    y,
    steps=100,
    learning_rate=0.01,
    batchnorm=False,
    batch_size=None,
    num_classes=None,
    atoms=True,
    optimizer=None,
    seed=0,
    verbose=0,
):
    """Adapts an ACDC model to a new task by training only its atoms.

    ACDC's few-shot recipe: the coefficients alpha (shared by the network
    or a stage) and every other weight stay fixed; only the few ``k x k``
    atoms of each `ACDCConv2D` learn, optionally with the BatchNorm layers
    (``batchnorm=True``). With ``num_classes`` the classifier is replaced by
    a new trainable one for the new classes. The model is changed in place
    (its trainable flags and weights); pass a copy to keep the original.

    Args:
        model: a Keras model with `ACDCConv2D` layers (e.g.
            `sb_keras.ACDCResNet`), taking images as its training data
            does (uint8 for the sb_keras models).
        x: support images, shape ``(N, H, W, C)``.
        y: integer labels, shape ``(N,)``, in ``[0, classes)``.
        steps: optimizer steps. Defaults to `100`.
        learning_rate: SGD learning rate. Defaults to `0.01`.
        batchnorm: also train BatchNorm (gamma, beta, statistics). Defaults
            to `False`.
        batch_size: images per step. Defaults to the whole support set (at
            most 128).
        num_classes: replace the classifier by a new trainable one of this
            many classes. Defaults to None (keep the head, frozen).
        atoms: train the atoms (ACDC's mode; needs ACDC layers). With
            `False` only the new head / BatchNorm train, the baseline for
            a plain model. Defaults to `True`.
        optimizer: a Keras optimizer replacing SGD(``learning_rate``).
        seed: seed of the shuffling and of the new head's initializer.
        verbose: `fit` verbosity.

    Returns:
        ``(adapted_model, history)``: the model (a new functional model
        sharing the layers when the head was replaced) and the
        `keras.callbacks.History` of the steps.

    Example:

    >>> import numpy as np, sb_keras
    >>> from sb_keras.adaptation import adapt
    >>> model = sb_keras.ACDCResNet(depth=8, sharing="network")
    >>> x = np.zeros((4, 32, 32, 3), "uint8"); y = np.array([0, 1, 0, 1])
    >>> adapted, history = adapt(model, x, y, steps=1, num_classes=2)
    >>> adapted.output_shape
    (None, 2)
    """
    steps = _check_count("steps", steps)
    if isinstance(learning_rate, bool) or not (
        isinstance(learning_rate, (int, float)) and learning_rate > 0
    ):
        raise ValueError(
            "`learning_rate` must be a positive number. Received: "
            f"learning_rate={learning_rate!r}"
        )
    if atoms and not _acdc_layers(model):
        raise ValueError(
            "`model` has no ACDCConv2D layer, so it has no atoms to adapt "
            "(use atoms=False to train only the head / BatchNorm). Received: "
            f"model={model.name!r}"
        )
    if num_classes is not None:
        model = replace_head(model, num_classes, seed=seed)
    x, y = check_support_set(model, x, y)
    if batch_size is None:
        batch_size = min(len(x), 128)
    batch_size = _check_count("batch_size", batch_size)
    if atoms:
        freeze_all_but_atoms(model, batchnorm=batchnorm, classifier=False)
    else:
        for layer in model.layers:
            layer.trainable = False
        for layer in model._flatten_layers(include_self=False):
            if batchnorm and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = True
    if num_classes is not None:
        model.layers[-1].trainable = True
    if not model.trainable_weights:
        raise ValueError(
            "Nothing to train: pass atoms=True, batchnorm=True or num_classes. "
            f"Received: atoms={atoms}, batchnorm={batchnorm}, "
            f"num_classes={num_classes}"
        )
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=_from_logits(model)
        ),
        metrics=["accuracy"],
    )
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=len(x) >= batch_size)
    )
    history = model.fit(
        data, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=verbose
    )
    return model, history
