"""Top-1 evaluation of models and model files (sb_keras.evaluate)."""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras import checkpoints
from sb_keras.evaluate import PREDICTORS
from sb_keras.evaluate import evaluate
from sb_keras.evaluate import get_predictor
from sb_keras.evaluate import top1


@pytest.fixture(scope="module")
def tiny_model():
    model = sb_keras.ResNet(depth=8)
    rng = np.random.default_rng(0)
    for v in model.weights:
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.5, 2.0, tuple(v.shape)).astype("float32"))
        else:
            v.assign(rng.normal(0, 0.3, tuple(v.shape)).astype("float32"))
    return model


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("data")
    x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 24)
    np.savez(folder / "test.npz", x=x, y=y)
    return str(folder), x, y


def _expected(model, x, y):
    logits = np.asarray(model(x.astype("float32"), training=False))
    return int(np.sum(np.argmax(logits, -1) == y))


def test_top1_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1(logits, np.array([1, 1, 1])) == (2, 3)
    with pytest.raises(ValueError, match="logits shape"):
        top1(logits, np.array([1, 1]))


def test_evaluate_model_object(tiny_model, test_dir, tmp_path):
    folder, x, y = test_dir
    correct = _expected(tiny_model, x, y)
    result = evaluate(tiny_model, data_dir=folder, batch_size=7)
    assert result == {"top1": 100.0 * correct / 24, "correct": correct, "total": 24}


def test_evaluate_keras_file(tiny_model, test_dir, tmp_path):
    folder, x, y = test_dir
    path = str(tmp_path / "tiny.keras")
    tiny_model.save(path)
    assert evaluate(path, data_dir=folder, limit=10)["correct"] == _expected(
        tiny_model, x[:10], y[:10]
    )


def test_evaluate_checkpoint_file(tiny_model, test_dir, tmp_path):
    folder, x, y = test_dir
    path = str(tmp_path / "tiny.pth")
    checkpoints.save_authors_state_dict(tiny_model, path, format="zip")
    result = evaluate(path, data_dir=folder)
    assert result["correct"] == _expected(tiny_model, x, y)
    assert PREDICTORS[".pt"] is PREDICTORS[".pth"]


def test_evaluate_bad_arguments(tiny_model, test_dir, tmp_path):
    folder, _, _ = test_dir
    with pytest.raises(ValueError, match=r"Received: model='.*model\.onnx'"):
        get_predictor(str(tmp_path / "model.onnx"))
    with pytest.raises(FileNotFoundError, match="absent.keras"):
        get_predictor(str(tmp_path / "absent.keras"))
    with pytest.raises(ValueError, match="limit=0"):
        evaluate(tiny_model, data_dir=folder, limit=0)
    assert set(PREDICTORS) >= {".keras", ".pth"}


def test_predictor_of_keras_model_returns_logits(tiny_model, test_dir):
    _, x, _ = test_dir
    logits = get_predictor(tiny_model, batch_size=5)(x[:6])
    np.testing.assert_allclose(
        logits, np.asarray(tiny_model(x[:6].astype("float32"))), atol=1e-5
    )
    assert isinstance(tiny_model, keras.Model)
