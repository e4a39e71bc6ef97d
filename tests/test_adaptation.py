"""`sb_keras.adaptation.adapt` and ``sb-keras adapt``."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras import cli
from sb_keras.adaptation import adapt
from sb_keras.layers import ACDCConv2D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(sharing="network", num_classes=4):
    return sb_keras.ACDCResNet(
        depth=8, sharing=sharing, num_classes=num_classes, input_shape=(16, 16, 3)
    )


def support(n=8, classes=4, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, (n, 16, 16, 3)).astype("uint8")
    return x, np.arange(n) % classes


def snapshot(model):
    return {v.path: np.array(v) for v in model.weights}


def test_one_step_equals_a_plain_sgd_step_on_the_atoms():
    model = tiny_model()
    reference = tiny_model()
    reference.set_weights(model.get_weights())
    x, y = support()
    before = snapshot(model)
    adapt(model, x, y, steps=1, learning_rate=0.1, batch_size=len(x))
    after = snapshot(model)
    atoms = [
        layer.atoms
        for layer in reference._flatten_layers()
        if isinstance(layer, ACDCConv2D)
    ]
    with tf.GradientTape() as tape:
        logits = reference(x.astype("float32"), training=False)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    grads = tape.gradient(loss, atoms)
    expected = {v.path: np.array(v) - 0.1 * np.array(g) for v, g in zip(atoms, grads)}
    for path, value in after.items():
        if path in expected:
            assert not np.allclose(value, before[path]), path
            np.testing.assert_allclose(value, expected[path], rtol=1e-4, atol=1e-6)
        else:  # alpha, BN (weights and statistics), stem and head stay
            np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_new_head_and_batchnorm_learn_the_support_set():
    model = tiny_model()
    x, y = support(n=6, classes=3)
    before = snapshot(model)
    adapted, history = adapt(
        model, x, y, steps=40, learning_rate=0.05, num_classes=3, batchnorm=True
    )
    assert adapted.output_shape == (None, 3)
    losses = history.history["loss"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    logits = adapted.predict(x, verbose=0)
    assert np.mean(np.argmax(logits, -1) == y) == 1.0
    after = snapshot(adapted)
    assert not np.allclose(after["stage1_block1_bn1/gamma"], before[
        "stage1_block1_bn1/gamma"])  # fmt: skip
    np.testing.assert_array_equal(
        after["coefficients/alpha"], before["coefficients/alpha"]
    )
    np.testing.assert_array_equal(after["stem_conv/kernel"], before["stem_conv/kernel"])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"y": np.array([0, 1, 2, 4])}, "Received: y=4"),
        (
            {"x": np.zeros((0, 16, 16, 3), "uint8"), "y": np.zeros(0, "int64")},
            "x with shape",
        ),
        ({"y": np.array([0, 1, 2])}, "Received: y with shape"),
        ({"steps": 0}, "Received: steps=0"),
        ({"learning_rate": -1}, "Received: learning_rate=-1"),
        ({"num_classes": 0}, "Received: num_classes=0"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    x, y = support(n=4)
    kwargs = {"x": x, "y": y, **change}
    with pytest.raises(ValueError, match=match):
        adapt(tiny_model(), **kwargs)


def test_model_without_acdc_layers_is_refused_for_atoms():
    model = tiny_model(sharing=None)
    x, y = support(n=4)
    with pytest.raises(ValueError, match="Received: model="):
        adapt(model, x, y, steps=1)
    # The plain baseline: only a new head trains.
    adapted, _ = adapt(model, x, y, steps=1, atoms=False, num_classes=2 + 2)
    assert {v.path for v in adapted.trainable_weights} == {
        "adapted_predictions/kernel",
        "adapted_predictions/bias",
    }


def _command():
    script = os.path.join(os.path.dirname(sys.executable), "sb-keras")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "sb_keras"]


def test_cli_adapt_on_cifar10(cifar10_dir, tmp_path):
    model = sb_keras.ACDCResNet(depth=8, sharing="network")
    source = str(tmp_path / "model.keras")
    model.save(source)
    output = str(tmp_path / "adapted.keras")
    env = {**os.environ, "PYTHONPATH": ROOT}
    args = ["adapt", source, "--data-dir", cifar10_dir, "--classes", "5,6,7"]
    args += ["--shots", "2", "--steps", "3", "--test-limit", "300", "--output", output]
    out = subprocess.run(
        _command() + args, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["test_images"] == 300 and 0.0 <= result["test_accuracy"] <= 1.0
    adapted = keras.models.load_model(output)
    assert adapted.output_shape == (None, 3)
    # Only atoms and the new head moved.
    for v in adapted.weights:
        if v.path in ("coefficients/alpha", "stem_conv/kernel"):
            np.testing.assert_array_equal(
                v, model.get_layer(v.path.split("/")[0]).weights[0]
            )
    x_test = np.load(os.path.join(cifar10_dir, "test.npz"))
    keep = np.isin(x_test["y"], [5, 6, 7])
    assert keep.sum() >= 300
    assert sorted(os.listdir(tmp_path)) == ["adapted.keras", "model.keras"]


def test_cli_adapt_bad_classes(capsys, tmp_path):
    code = cli.main(
        ["adapt", "m.keras", "--classes", "5", "--output", str(tmp_path / "a.keras")]
    )
    assert code == 2
    assert "Received: --classes='5'" in capsys.readouterr().err
