"""Running ``sb-keras`` as a user types it: one fresh process per command."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command():
    """The console script beside this Python, else ``python -m sb_keras``."""
    script = os.path.join(os.path.dirname(sys.executable), "sb-keras")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "sb_keras"]


def env():
    """The environment of a child: this checkout first on the path, TF quiet."""
    out = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return out


def sb_keras(*args, cwd=None, timeout=600):
    """Runs ``sb-keras ARGS`` in a new process; returns the CompletedProcess."""
    return subprocess.run(
        [*command(), *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=cwd,
        timeout=timeout,
    )


def python(code, *args, timeout=600):
    """Runs ``python -c CODE ARGS`` in a new process (this checkout on the path)."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
    )


def ok(result):
    """Asserts a zero exit; returns stdout."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def error_line(result):
    """Asserts a clean failure (exit != 0, no traceback); returns its message.

    The message is the last line of stderr (TensorFlow's start-up chatter may
    come before it).
    """
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stdout[-2000:]
    assert lines[-1].startswith("sb-keras"), result.stderr[-3000:]
    return lines[-1]


def subset_folder(source, folder, n_train=512, n_test=200):
    """Writes a small real-data folder: the first ``n_train`` training images
    and ``n_test`` evenly spaced test images (the test split is sorted by
    class, so its first images would all be one class)."""
    os.makedirs(folder, exist_ok=True)
    with np.load(os.path.join(source, "train.npz")) as f:
        np.savez(
            os.path.join(folder, "train.npz"), x=f["x"][:n_train], y=f["y"][:n_train]
        )
    with np.load(os.path.join(source, "test.npz")) as f:
        keep = np.linspace(0, len(f["y"]) - 1, n_test).astype(int)
        np.savez(os.path.join(folder, "test.npz"), x=f["x"][keep], y=f["y"][keep])
    return folder
