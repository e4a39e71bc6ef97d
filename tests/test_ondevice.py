"""On-device atom training: the `.tflite` trains like Keras, in LiteRT."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras.adaptation import ondevice
from sb_keras.adaptation.gradients import builtin_gradients
from sb_keras.export.tflite import op_names

pytest.importorskip("ai_edge_litert")
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

BATCH, CLASSES, LR = 4, 4, 0.05
# Relative tolerance of the LiteRT weights after the steps vs Keras: float32
# convolutions summed in another order (measured: 1.7e-5 of the update,
# 1.2e-6 of the weights, atoms + BN + head, 3 steps).
UPDATE_RTOL = 1e-3
WEIGHT_RTOL = 1e-5


def tiny_model(route="auto"):
    model = sb_keras.ACDCResNet(
        depth=8,
        sharing="network",
        num_classes=CLASSES,
        input_shape=(16, 16, 3),
        route=route,
    )
    rng = np.random.RandomState(3)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, n).astype("float32"))
    return model


def batches(steps, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(0, 255, (steps, BATCH, 16, 16, 3)).astype("float32")
    y = rng.randint(0, CLASSES, (steps, BATCH)).astype("int32")
    return x, y


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(7)
    model = tiny_model()
    path = str(tmp_path_factory.mktemp("ondevice") / "train.tflite")
    names = ondevice.export_ondevice_training(
        model, path, batch_size=BATCH, learning_rate=LR, batchnorm=True, classifier=True
    )
    weights = [np.array(w) for w in model.get_weights()]
    return path, names, weights


def keras_steps(weights, x, y, route="auto", batchnorm=True, classifier=True):
    """The same SGD steps in Keras (TensorFlow's own gradients, eager)."""
    model = tiny_model(route)
    model.set_weights(weights)
    variables = ondevice.trainable_variables(model, batchnorm, classifier)
    optimizer = keras.optimizers.SGD(LR)
    for xb, yb in zip(x, y):
        with tf.GradientTape() as tape:
            logits = model(xb, training=False)
            loss = keras.losses.sparse_categorical_crossentropy(
                yb, logits, from_logits=True
            )
            loss = tf.reduce_mean(loss)
        optimizer.apply(tape.gradient(loss, variables), variables)
    return model, variables


def test_builtin_ops_only(exported):
    path, _, _ = exported
    with open(path, "rb") as f:
        ops = op_names(f.read())
    assert not [op for op in ops if op.startswith("CUSTOM")], ops
    assert "TRANSPOSE_CONV" in ops and "ASSIGN_VARIABLE" in ops
    signatures = Interpreter(model_path=path).get_signature_list()
    assert sorted(signatures) == ["infer", "restore", "save", "train"]


def test_litert_steps_match_keras(exported):
    path, names, weights = exported
    interpreter = Interpreter(model_path=path)
    train = interpreter.get_signature_runner("train")
    save = interpreter.get_signature_runner("save")
    infer = interpreter.get_signature_runner("infer")
    before = save()
    x, y = batches(3)
    losses = [float(train(x=xb, y=yb)["loss"]) for xb, yb in zip(x, y)]
    after = save()
    model, variables = keras_steps(weights, x, y)
    assert losses[-1] < losses[0] + 1.0 and all(np.isfinite(losses))
    for name, v in zip(names, variables):
        ref = np.array(v)
        update = ref - before[name]
        assert np.abs(update).max() > 0, name
        err = np.abs(after[name] - ref).max()
        assert err <= UPDATE_RTOL * np.abs(update).max(), (name, err)
        assert err <= WEIGHT_RTOL * np.abs(ref).max(), (name, err)
    images = batches(1, seed=5)[0][0]
    logits = infer(x=images)["logits"]
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_atom_route_steps_match_keras(tmp_path):
    # The tiny model runs the kernel route; the atom route (the one for small
    # files) convolves with the atoms directly: another gradient path.
    model = tiny_model(route="atoms")
    path = str(tmp_path / "atoms.tflite")
    names = ondevice.export_ondevice_training(
        model, path, batch_size=BATCH, learning_rate=LR
    )
    weights = [np.array(w) for w in model.get_weights()]
    runner = Interpreter(model_path=path).get_signature_runner
    before = runner("save")()
    x, y = batches(3)
    for xb, yb in zip(x, y):
        runner("train")(x=xb, y=yb)
    after = runner("save")()
    _, variables = keras_steps(weights, x, y, "atoms", False, False)
    for name, v in zip(names, variables):
        ref = np.array(v)
        update = np.abs(ref - before[name]).max()
        assert np.abs(after[name] - ref).max() <= UPDATE_RTOL * update, name


def test_save_restore_round_trip(exported):
    path, names, _ = exported
    interpreter = Interpreter(model_path=path)
    train = interpreter.get_signature_runner("train")
    save = interpreter.get_signature_runner("save")
    restore = interpreter.get_signature_runner("restore")
    infer = interpreter.get_signature_runner("infer")
    x, y = batches(2, seed=1)
    images = batches(1, seed=2)[0][0]
    train(x=x[0], y=y[0])
    saved = {k: np.array(v) for k, v in save().items()}
    logits = np.array(infer(x=images)["logits"])
    train(x=x[1], y=y[1])
    assert not np.allclose(infer(x=images)["logits"], logits)
    restore(**saved)
    for name, value in save().items():
        np.testing.assert_array_equal(value, saved[name])
    np.testing.assert_array_equal(infer(x=images)["logits"], logits)
    # A fresh interpreter takes the app's stored tensors.
    fresh = Interpreter(model_path=path)
    fresh.get_signature_runner("restore")(**saved)
    np.testing.assert_array_equal(
        fresh.get_signature_runner("infer")(x=images)["logits"], logits
    )
    assert set(saved) == set(names)


@pytest.mark.parametrize("padding,stride", [("SAME", 1), ("SAME", 2), ("VALID", 2)])
def test_kernel_gradient_is_tf_gradient(padding, stride):
    rng = np.random.RandomState(0)
    x = tf.constant(rng.normal(size=(2, 9, 9, 3)).astype("float32"))
    w = tf.Variable(rng.normal(size=(3, 3, 3, 5)).astype("float32"))

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.relu(tf.nn.conv2d(x, w, stride, padding))
            loss = tf.reduce_sum(y[:, ::2, 1::2, :] ** 2)
        return tape.gradient(loss, [x, w])

    expected = grads(x)
    with builtin_gradients():
        fn = tf.function(grads).get_concrete_function(x)
    kinds = {op.type for op in fn.graph.get_operations()}
    assert not kinds & {"Conv2DBackpropFilter", "ReluGrad", "StridedSliceGrad"}
    for got, want in zip(fn(x), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_model_without_atoms_is_refused(tmp_path):
    model = sb_keras.ACDCResNet(depth=8, sharing=None, input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="Received: model="):
        ondevice.export_ondevice_training(model, str(tmp_path / "m.tflite"))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"learning_rate": -1.0}])
def test_bad_arguments(tmp_path, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Received: {name}="):
        ondevice.export_ondevice_training(
            tiny_model(), str(tmp_path / "m.tflite"), **kwargs
        )
