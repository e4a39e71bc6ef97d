"""Our own model/layer test helper (keras.src.testing is private).

``run_model_test`` checks, for any sb_keras model:
config JSON round trip, unique weight counts, one ``fit`` step that moves
the weights, and a ``.keras`` save/load that returns the same class with
equal outputs and one variable per shared basis.
"""

import json
import os
import tempfile

import keras
import numpy as np

import sb_keras
from sb_keras.layers import FilterBasis


def random_images(model, batch=2, seed=0):
    shape = tuple(d if d is not None else 32 for d in model.input_shape[1:])
    rng = np.random.RandomState(seed)
    return rng.uniform(-1, 1, size=(batch, *shape)).astype("float32")


def basis_variables(model):
    """Unique variables owned by FilterBasis layers (by id)."""
    seen = {}
    for layer in model._flatten_layers():
        if isinstance(layer, FilterBasis):
            for v in layer.bases:
                seen[id(v)] = v
    return list(seen.values())


def unique_variable_count(model):
    return len({id(v) for v in model.weights})


def assert_config_round_trip(model):
    config = model.get_config()
    text = json.dumps(keras.saving.serialize_keras_object(model))
    clone = keras.saving.deserialize_keras_object(json.loads(text))
    assert type(clone) is type(model)
    assert clone.get_config() == config
    return clone


def assert_save_load(model, x, atol=1e-6):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        restored = keras.models.load_model(path)
    assert type(restored) is type(model)
    assert unique_variable_count(restored) == unique_variable_count(model)
    assert len(basis_variables(restored)) == len(basis_variables(model))
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=atol
    )
    return restored


def assert_one_fit_step(model, x, num_classes):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    y = np.arange(len(x)) % num_classes
    before = [np.array(v) for v in model.trainable_weights]
    history = model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    moved = sum(
        not np.allclose(b, np.array(v)) for b, v in zip(before, model.trainable_weights)
    )
    assert moved > 0.5 * len(before), f"only {moved}/{len(before)} moved"


def run_model_test(model, expected_params=None, num_classes=None):
    """Runs the whole checklist on ``model``; returns the restored model."""
    x = random_images(model)
    if expected_params is not None:
        assert sb_keras.count_params(model) == expected_params
    assert_config_round_trip(model)
    restored = assert_save_load(model, x)
    classes = num_classes or model.output_shape[-1]
    assert_one_fit_step(model, x, classes)
    return restored
