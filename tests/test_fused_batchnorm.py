"""`FusedBatchNormalization` is Keras's BatchNormalization, computed faster.

Each case runs the same batch through a `keras.layers.BatchNormalization`
and a `FusedBatchNormalization` with equal weights and statistics and
compares the training output, the gradients with respect to the input,
gamma and beta, the moving statistics after the step, and the inference
output. The fused kernel must actually run where it applies (checked in
the traced graph), and models built by sb_keras use the layer.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras.layers import FusedBatchNormalization
from sb_keras.layers.batch_norm import fused_batch_norm_applies


def _pair(axis, shape, **kwargs):
    rng = np.random.default_rng(0)
    plain = keras.layers.BatchNormalization(axis=axis, momentum=0.9, **kwargs)
    fused = FusedBatchNormalization(axis=axis, momentum=0.9, **kwargs)
    plain.build(shape)
    fused.build(shape)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in plain.weights]
    plain.set_weights(weights)
    fused.set_weights(weights)
    return plain, fused


def _train_step(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        # A loss that is not shift-invariant per channel, so every gradient
        # is non-trivial.
        loss = tf.reduce_sum(tf.cast(y, "float32") ** 3)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return y, grads


CASES = [
    # (id, axis, input shape, kwargs, policy, fused kernel expected)
    ("last_16", -1, (8, 5, 5, 16), {}, "float32", True),
    ("first_8", 1, (8, 8, 5, 5), {}, "float32", True),
    ("last_6_moments", -1, (8, 5, 5, 6), {}, "float32", False),
    (
        "no_scale_center",
        -1,
        (8, 5, 5, 8),
        {"scale": False, "center": False},
        "float32",
        True,
    ),
    ("bfloat16", -1, (8, 5, 5, 16), {}, "mixed_bfloat16", True),
    ("dense_2d", -1, (8, 16), {}, "float32", False),
]


@pytest.mark.parametrize(
    "axis, shape, kwargs, policy, applies",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_equals_keras_batchnorm(axis, shape, kwargs, policy, applies):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        plain, fused = _pair(axis, shape, **kwargs)
    finally:
        keras.config.set_dtype_policy(previous)
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    x = tf.constant(x, dtype=plain.compute_dtype)
    assert fused_batch_norm_applies(x, axis) == applies
    y_plain, g_plain = _train_step(plain, x)
    y_fused, g_fused = _train_step(fused, x)
    assert y_fused.dtype == y_plain.dtype
    bf16 = policy == "mixed_bfloat16"
    # bfloat16 outputs: equal up to one bfloat16 rounding (8 bits).
    tol = dict(rtol=1e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y_fused, "float32"), np.asarray(y_plain, "float32"), **tol
    )
    for a, b in zip(g_fused, g_plain):
        a, b = np.asarray(a, "float32"), np.asarray(b, "float32")
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= (2e-2 if bf16 else 1e-5) * scale
    for a, b in zip(fused.non_trainable_weights, plain.non_trainable_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.moving_variance, 1.0)  # the update happened
    fused.set_weights(plain.get_weights())  # inference: Keras's own path
    np.testing.assert_array_equal(
        np.asarray(fused(x, training=False), "float32"),
        np.asarray(plain(x, training=False), "float32"),
    )
    # The fused kernel is what runs where it applies.
    graph = tf.function(lambda v: fused(v, training=True)).get_concrete_function(x)
    ops_run = {op.type for op in graph.graph.get_operations()}
    assert ("FusedBatchNormV3" in ops_run) == applies


def test_frozen_and_inference_take_keras_path():
    plain, fused = _pair(-1, (4, 3, 3, 8))
    fused.trainable = False
    x = tf.constant(np.random.default_rng(2).normal(size=(4, 3, 3, 8)), "float32")
    before = fused.get_weights()
    np.testing.assert_array_equal(fused(x, training=True), plain(x, training=False))
    for a, b in zip(fused.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_models_use_it_and_train_like_keras_batchnorm():
    """A plain ResNet-8's SGD steps equal those of its Keras-BN twin."""
    model = sb_keras.ResNet(8, num_classes=10)
    bns = [
        layer for layer in model.layers if "BatchNormalization" in type(layer).__name__
    ]
    assert bns and all(isinstance(b, FusedBatchNormalization) for b in bns)

    def plain_bn(layer):
        if isinstance(layer, FusedBatchNormalization):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    functional = keras.Model(model.inputs, model.outputs)
    twin = keras.models.clone_model(functional, clone_function=plain_bn)
    assert sum(type(b) is keras.layers.BatchNormalization for b in twin.layers) == len(
        bns
    )
    twin.set_weights(model.get_weights())
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 16)
    for m in (model, twin):
        m.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        for _ in range(2):
            m.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
