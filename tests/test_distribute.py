"""MirroredStrategy over 2 logical CPU devices equals one device.

BatchNorm layers compute batch statistics per replica under MirroredStrategy
(as PyTorch's DataParallel, which the authors used), so the two runs can only
be equal with BN in inference mode: the BN layers are frozen here and
everything else (convs, bases, coefficients, classifier, the orthogonality
penalty) trains.
"""

import keras
import numpy as np
import tensorflow as tf

import sb_keras
from sb_keras.layers import FilterBasis


def _train(strategy, weights, x, y):
    with strategy.scope():
        model = sb_keras.ResNet(depth=14, share=True, sharing="double")
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


def test_mirrored_equals_single_device(mirrored_strategy):
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")  # 3 steps
    y = rng.randint(0, 10, 24)
    reference = sb_keras.ResNet(depth=14, share=True, sharing="double")
    # Move the bases off orthonormal so the penalty has a gradient.
    for layer in reference.layers:
        if isinstance(layer, FilterBasis):
            for b in layer.bases:
                b.assign(np.array(b) * 1.3)
    # Calibrate the BN statistics (they stay frozen during the runs).
    for _ in range(25):
        reference(x, training=True)
    weights = reference.get_weights()

    single, loss1 = _train(tf.distribute.OneDeviceStrategy("CPU:0"), weights, x, y)
    mirrored, loss2 = _train(mirrored_strategy, weights, x, y)
    assert mirrored.distribute_strategy.num_replicas_in_sync == 2
    assert sb_keras.orthogonality_loss(single) > 1e-3
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5, err_msg=a.path)
    # The runs really trained: the stem kernel and a basis moved.
    for i, w in enumerate(single.weights):
        if w.path in ("stem_conv/kernel", "stage2_basis/basis_2"):
            assert np.abs(np.array(w) - weights[i]).max() > 1e-4, w.path

    # One mirrored variable per basis.
    bases = [
        v
        for layer in mirrored.layers
        if isinstance(layer, FilterBasis)
        for v in layer.bases
    ]
    assert len(bases) == 6
    assert len({id(v) for v in mirrored.trainable_weights}) == len(
        mirrored.trainable_weights
    )
    assert all(
        isinstance(v.value, tf.distribute.DistributedValues)
        or "Mirrored" in type(v.value).__name__
        for v in bases
    )
