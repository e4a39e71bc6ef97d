"""The ``convert`` and ``evaluate`` commands on the authors' real checkpoints.

The expected numbers come from ``reference_logits.npz`` (the authors' own
PyTorch model code on the exact test images), never from sb_keras.
"""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from sb_keras import cli
from tests.conftest import shared_path

NET_RL2 = shared_path("pretrained", "net_rl2")
RESNET32 = "CIFAR10_ResNet32_Double_S16U1_6.93err"
RESNET56 = "CIFAR10_ResNet56_S16U1_7.46err"
CHECKPOINTS = {RESNET32: f"{RESNET32}.pth", RESNET56: f"{RESNET56}.pth.pth"}
N = 40  # test images per run: enough for a non-trivial count, cheap on CPU


def _require_shared():
    if not os.path.isfile(os.path.join(NET_RL2, "reference_logits.npz")):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    subset = shared_path("datasets", "cifar10", "lossless_subset.npz")
    if not os.path.isfile(subset):
        pytest.skip("the real CIFAR-10 is not beside this checkout")
    return subset


@pytest.fixture(scope="module")
def exact_test_dir(tmp_path_factory):
    """A --data-dir whose test.npz holds the first exact CIFAR-10 test images."""
    subset = _require_shared()
    with np.load(subset) as f:
        x, y = f["x_test"][:N], f["y_test"][:N]
    folder = tmp_path_factory.mktemp("cifar10")
    np.savez(folder / "test.npz", x=x, y=y)
    return str(folder)


def _reference_correct(key, limit):
    """Correct predictions of the authors' model on the first test images."""
    with np.load(os.path.join(NET_RL2, "reference_logits.npz")) as f:
        logits, y = f[key][:limit], f["y"][:limit]
    return int(np.sum(logits.argmax(-1) == y))


def _checkpoint(key):
    return os.path.join(NET_RL2, CHECKPOINTS[key])


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(CHECKPOINTS))
def test_evaluate_checkpoint(key, exact_test_dir, capsys):
    code, out, err = _run(
        ["evaluate", _checkpoint(key), "--data-dir", exact_test_dir], capsys
    )
    assert code == 0, err
    assert f"({_reference_correct(key, N)}/{N})" in out


def test_convert_then_evaluate(exact_test_dir, tmp_path, capsys):
    out_path = str(tmp_path / "sub" / "resnet32.keras")
    code, out, err = _run(["convert", _checkpoint(RESNET32), out_path], capsys)
    assert code == 0, err
    assert "resnet32_s16u1_double" in out
    assert "245,642 parameters" in out  # README: unique params of the file
    # The .keras file predicts what the authors' model predicts.
    code, out, err = _run(["evaluate", out_path, "--data-dir", exact_test_dir], capsys)
    assert code == 0, err
    assert f"({_reference_correct(RESNET32, N)}/{N})" in out


@pytest.mark.slow
def test_python_m_sb_keras_evaluate(exact_test_dir):
    key = RESNET32
    limit = 10
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sb_keras",
            "evaluate",
            _checkpoint(key),
            "--data-dir",
            exact_test_dir,
            "--limit",
            str(limit),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({_reference_correct(key, limit)}/{limit})" in result.stdout


def test_convert_needs_keras_output(tmp_path, capsys):
    code, _, err = _run(["convert", "model.pth", str(tmp_path / "m.h5")], capsys)
    assert code == 2
    assert "Received: output=" in err and "m.h5" in err


def test_convert_missing_checkpoint(tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    code, _, err = _run(["convert", missing, str(tmp_path / "m.keras")], capsys)
    assert code == 2
    assert "missing.pth" in err
    assert not os.path.exists(tmp_path / "m.keras")


def test_evaluate_unknown_suffix(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    code, _, err = _run(["evaluate", str(path), "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    assert "model.onnx" in err


def test_convert_refuses_foreign_global(tmp_path, capsys):
    """A checkpoint whose pickle would call os.system is refused; nothing runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"net_state_dict": Payload()}, 2))
    out_path = tmp_path / "evil.keras"
    code, _, err = _run(["convert", str(path), str(out_path)], capsys)
    assert code == 2
    assert "system" in err and "Received: global=" in err
    assert not marker.exists()
    assert not out_path.exists()
