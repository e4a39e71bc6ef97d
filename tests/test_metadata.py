"""TFLite Metadata of exported classifiers, checked with a real client.

MediaPipe's ``ImageClassifier`` loads the exported file as it is (labels and
input normalization from the metadata) and must give the same top-1 labels
as the LiteRT evaluation. MediaPipe pins numpy/protobuf versions that
conflict with TensorFlow's, so it lives in a virtual environment of its own,
created once under the repository's ignored ``build/`` folder. Creating it
takes a minute or more, so these tests run in CI's slow step.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import sb_keras
from sb_keras import litert
from sb_keras.export import metadata
from sb_keras.export import pipeline
from tests.conftest import shared_path

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "build", "mediapipe-venv")

_CLASSIFY = """
import sys
import numpy as np
import mediapipe as mp
from mediapipe.tasks.python import BaseOptions, vision
options = vision.ImageClassifierOptions(
    base_options=BaseOptions(model_asset_path=sys.argv[1]), max_results=1)
classifier = vision.ImageClassifier.create_from_options(options)
for image in np.load(sys.argv[2]):
    result = classifier.classify(
        mp.Image(image_format=mp.ImageFormat.SRGB,
                 data=np.ascontiguousarray(image)))
    print(result.classifications[0].categories[0].category_name)
"""


@pytest.fixture(scope="session")
def mediapipe_python():
    python = os.path.join(VENV, "bin", "python")
    check = [python, "-c", "import mediapipe.tasks.python.vision"]
    if os.path.exists(python) and subprocess.run(check).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", metadata.MEDIAPIPE_PIN],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        text = done.stderr.lower()
        if any(k in text for k in ("connection", "network", "resolve", "no matching")):
            pytest.skip(f"the package registry is unreachable: {done.stderr[-300:]}")
        raise RuntimeError(f"pip install {metadata.MEDIAPIPE_PIN}: {done.stderr}")
    return python


def classify_with_mediapipe(python, path, images, tmp_path):
    npy = tmp_path / "images.npy"
    np.save(npy, images.astype(np.uint8))
    done = subprocess.run(
        [python, "-c", _CLASSIFY, str(path), str(npy)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    "quantize", ["none", "int8"]
)
def test_mediapipe_classifies_like_litert(
    quantize, mediapipe_python, cifar10_dir, tmp_path
):
    checkpoint = shared_path(
        "pretrained", "net_rl2", "CIFAR10_ResNet32_Double_S16U1_6.93err.pth"
    )
    if not os.path.exists(checkpoint):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    with np.load(os.path.join(cifar10_dir, "lossless_subset.npz")) as f:
        x, y = f["x_test"][:200], f["y_test"][:200].reshape(-1)
    model = sb_keras.load_authors_checkpoint(checkpoint)
    path = tmp_path / f"m_{quantize}.tflite"
    pipeline.export_tflite(
        model,
        path,
        quantize=quantize,
        data_dir=cifar10_dir,
        calibration_count=32,
        metadata_python=mediapipe_python,
    )
    expected = [
        metadata.CIFAR10_LABELS[i]
        for i in litert.predict(str(path), x.astype(np.float32)).argmax(-1)
    ]
    got = classify_with_mediapipe(mediapipe_python, path, x, tmp_path)
    assert got == expected
    names = np.array(metadata.CIFAR10_LABELS)
    assert np.mean(np.array(got) == names[y]) > 0.85  # a trained model (92.9 %)


def test_user_labels_and_missing_writer(mediapipe_python, tmp_path, monkeypatch):
    model = sb_keras.ResNet(depth=8)
    labels = tmp_path / "labels.txt"
    names = [f"class_{i}" for i in range(10)]
    labels.write_text("\n".join(names) + "\n")
    path = tmp_path / "m.tflite"
    pipeline.export_tflite(
        model, path, labels=str(labels), metadata_python=mediapipe_python
    )
    x = np.random.RandomState(0).randint(0, 256, (8, 32, 32, 3))
    got = classify_with_mediapipe(mediapipe_python, path, x, tmp_path)
    assert set(got) <= set(names)
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="10 classes"):
        pipeline.export_tflite(
            model, path, labels=str(bad), metadata_python=mediapipe_python
        )
    monkeypatch.delenv(metadata.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="mediapipe==0.10.21"):
        pipeline.export_tflite(model, path, labels=str(labels))
