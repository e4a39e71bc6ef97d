"""MirroredStrategy over 2 logical CPUs equals one device: DenseNet, ResNeXt.

As in test_distribute.py, BN layers are frozen (per-replica batch statistics
differ by construction); convs, bases, coefficients, the classifier and the
orthogonality penalty train for three steps.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras.layers import FilterBasis

BUILDERS = {
    "densenet": lambda: sb_keras.DenseNet(
        blocks=(2, 1, 1, 1),
        growth_rate=8,
        share=True,
        shared_rank=8,
        unique_rank=2,
        authors_layout=True,
        input_shape=(16, 16, 3),
    ),
    "resnext": lambda: sb_keras.ResNeXt(
        blocks=(2, 2),
        widths=(16, 32),
        cardinality=4,
        base_width=16,
        share=True,
        shared_rank=8,
        unique_rank=4,
        input_shape=(16, 16, 3),
    ),
}


def _train(strategy, build, weights, x, y):
    with strategy.scope():
        model = build()
        model.set_weights(weights)
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        model.compile(
            optimizer=keras.optimizers.SGD(0.02, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model, history.history["loss"][0]


@pytest.mark.parametrize(
    "family", ["densenet", pytest.param("resnext", marks=pytest.mark.slow)]
)
def test_mirrored_equals_single_device(family, mirrored_strategy):
    build = BUILDERS[family]
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (24, 16, 16, 3)).astype("float32")  # 3 steps
    y = rng.randint(0, 100, 24)
    reference = build()
    for layer in reference.layers:
        if isinstance(layer, FilterBasis):
            for b in layer.bases:
                b.assign(np.array(b) * 1.3)  # a penalty with a gradient
    for _ in range(5):
        reference(x, training=True)  # BN statistics (frozen in the runs)
    weights = reference.get_weights()
    single, loss1 = _train(
        tf.distribute.OneDeviceStrategy("CPU:0"), build, weights, x, y
    )
    mirrored, loss2 = _train(mirrored_strategy, build, weights, x, y)
    assert mirrored.distribute_strategy.num_replicas_in_sync == 2
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5, err_msg=a.path)
    moved = [
        np.abs(np.array(w) - weights[i]).max()
        for i, w in enumerate(single.weights)
        if w.path.endswith("/basis")
    ]
    assert moved and min(moved) > 1e-5
