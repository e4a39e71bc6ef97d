"""The prepared device check runs end to end here (CPU: GPU parts skipped).

``bench/gpu_check.sh --quick`` is run as a user would, in its own process;
its JSON report must say every check passed, list what it skipped for want
of a GPU, and hold a throughput row and a real-data training run.
"""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_gpu_check_quick(tmp_path, cifar10_dir):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    run = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "bench", "gpu_check.sh"),
            "--quick",
            "--out",
            str(tmp_path),
            "--data-dir",
            cifar10_dir,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["ok"] is True
    layers = [c for c in report["checks"] if c["check"] == "layers"]
    assert {c["xla"] for c in layers} == {False, True}
    assert all(
        c["basis_conv_vs_composed_rel"] < 1e-4
        for c in layers
        if c["precision"] == "float32"
    )
    if not tf.config.list_physical_devices("GPU"):
        assert any("no GPU" in s for s in report["skipped"])
    assert any(r["images_per_s"] for r in report["throughput"])
    assert report["training"]["ok"] and report["training"]["metrics"]["test_images"]
    assert (tmp_path / "device_check.md").read_text().startswith("# sb_keras device")
