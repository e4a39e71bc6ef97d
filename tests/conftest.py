"""Test session setup: quiet TF, 2 logical CPU devices, deterministic seeds.

Two logical CPU devices must be configured before TensorFlow initializes its
devices, so this happens at import time, before any test module runs. Single
device code is unaffected (the default strategy uses CPU:0 only);
distribution tests use ``MirroredStrategy(["CPU:0", "CPU:1"])``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
except RuntimeError:  # already initialized by another plugin
    pass

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one MirroredStrategy over CPU:0 and CPU:1 of the test session.

    A second MirroredStrategy in the same process makes the CPU collectives
    of the first clash ("Shape mismatch in the collective"), so every test
    shares this one.
    """
    from sb_keras.training.distribute import make_strategy

    return make_strategy("mirrored", devices=2)


@pytest.fixture(autouse=True)
def _seed_and_clear():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def shared_path(*parts):
    """A path inside the project's ``shared/`` folder (beside the repo)."""
    return os.path.normpath(os.path.join(SHARED, *parts))


@pytest.fixture
def cifar10_dir():
    path = shared_path("datasets", "cifar10")
    if not os.path.exists(os.path.join(path, "test.npz")):
        pytest.skip("the real CIFAR-10 is not beside this checkout")
    return path
