"""`train` survives SIGKILL at any instant and ends bitwise equal.

A fault injector (``tests/crash_injector/sitecustomize.py``, loaded through
``PYTHONPATH``) kills the training process just before the N-th file
operation under the run folder. The sweep kills at every operation of the
last epoch boundary and of the final writes (model, log, metrics), one per
run; the random cases kill at timer-chosen instants. After each kill the
same run is started again and must end with every weight (model,
optimizer, both checkpoints) bitwise equal to an uninterrupted run
(deterministic ops), ``log.csv`` equal byte for byte and ``metrics.json``
holding every epoch once.

Each run is a fork of one process that imported TensorFlow once
(``tests/crash_injector/zygote.py``): a fresh interpreter per run would
spend most of the test importing TensorFlow.
"""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest

from sb_keras.training import NonFiniteLossError
from sb_keras.training import TrainConfig
from sb_keras.training import state
from sb_keras.training import train
from tests.conftest import shared_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECTOR = os.path.join(REPO, "tests", "crash_injector")
EPOCHS = 2
RANDOM_KILLS = 5


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([INJECTOR, REPO])}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in ("SB_CRASH_ROOT", "SB_CRASH_AT", "SB_CRASH_LOG"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """256 training and 128 test images: real CIFAR-10 where it is beside
    the checkout, else random pixels, in the `sb_keras.data` npz layout."""
    folder = tmp_path_factory.mktemp("data")
    source = shared_path("datasets", "cifar10")
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 128)):
        path = os.path.join(source, f"{split}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                x, y = f["x"][:n], f["y"][:n]
        else:
            x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, 10, n)
        np.savez(folder / f"{split}.npz", x=x, y=y)
    return str(folder)


def _config(data_dir, output):
    return dict(
        model="resnet20_s16u1_double",
        model_args={"depth": 8},
        data_dir=data_dir,
        output=str(output),
        epochs=EPOCHS,
        batch_size=64,
        lr=0.05,
        seed=3,
        deterministic=True,
        verbose=0,
        tensorboard=False,
        strategy="none",
    )


class Zygote:
    """Forks training runs from one process that imported TensorFlow."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(INJECTOR, "zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env(SB_CRASH_ROOT=""),
            text=True,
        )

    def run(self, config, log, kill_after=None, **env):
        """Runs ``train(config)``; returns (exit code, start time, its output)."""
        request = {"config": config, "env": env, "log": str(log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        start = time.time()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it had finished already
                pass
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        rc = json.loads(line)["rc"]
        with open(log) as f:
            return rc, start, f.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _read_ops(path):
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return [(int(n), float(t), op, p) for n, t, op, p in rows]


def _weights(path):
    """Every array of a `.keras` (model and optimizer) or a weights file."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as z:
            f = h5py.File(io.BytesIO(z.read("model.weights.h5")), "r")
    else:
        f = h5py.File(path, "r")
    arrays = {}
    with f:
        f.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()])
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return arrays


def _outcome(output):
    files = {
        name: _weights(os.path.join(output, name))
        for name in ("model.keras", "checkpoints/last.keras", "checkpoints/best.keras")
    }
    with open(os.path.join(output, "log.csv"), "rb") as f:
        log = f.read()
    with open(os.path.join(output, "metrics.json")) as f:
        metrics = json.load(f)
    temporaries = [
        os.path.join(root, n)
        for root, _, names in os.walk(output)
        for n in names
        if n.startswith(".tmp-")
    ]
    return files, log, metrics, temporaries


def _snapshot(folder):
    """(mtime, bytes) of every file under ``folder``."""
    snap = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                snap[os.path.relpath(path, folder)] = (
                    os.stat(path).st_mtime_ns,
                    f.read(),
                )
    return snap


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, zygote):
    """The uninterrupted run, with the list of its file operations."""
    folder = tmp_path_factory.mktemp("reference")
    output = folder / "run"
    ops = folder / "ops.tsv"
    rc, start, text = zygote.run(
        _config(data_dir, output),
        folder / "log.txt",
        SB_CRASH_ROOT=str(output),
        SB_CRASH_LOG=str(ops),
    )
    assert rc == 0, text[-3000:]
    files, log, metrics, temporaries = _outcome(str(output))
    assert not temporaries
    assert [len(v) for v in metrics["history"].values()] == [EPOCHS] * len(
        metrics["history"]
    )
    assert len(log.decode().strip().splitlines()) == 1 + EPOCHS
    return {
        "output": str(output),
        "ops": _read_ops(ops),
        "start": start,
        "seconds": time.time() - start,
        "files": files,
        "log": log,
        "metrics": metrics,
    }


def _assert_same_as(reference, output, what):
    files, log, metrics, temporaries = _outcome(output)
    assert not temporaries, f"{what}: temporary files left: {temporaries}"
    for name, arrays in reference["files"].items():
        assert sorted(files[name]) == sorted(arrays), f"{what}: {name} variables"
        for key, value in arrays.items():
            assert np.array_equal(files[name][key], value), f"{what}: {name} {key}"
    assert log == reference["log"], f"{what}: log.csv differs"
    assert metrics["history"] == reference["metrics"]["history"], what
    assert metrics["test_accuracy"] == reference["metrics"]["test_accuracy"], what


def _last_boundary(ops):
    """Operation numbers of the last epoch boundary and the final writes."""
    log_writes = [n for n, _, op, p in ops if op == "replace" and p == "log.csv"]
    assert len(log_writes) == EPOCHS  # one per epoch; the final one is unchanged
    first = log_writes[-2] + 2  # after the previous boundary's folder fsync
    return list(range(first, ops[-1][0] + 1))


def test_sigkill_at_each_file_operation_of_an_epoch_boundary(
    reference, data_dir, zygote, tmp_path
):
    sweep = _last_boundary(reference["ops"])
    kinds = {op.split("(")[0] for n, _, op, _ in reference["ops"] if n in sweep}
    assert {"open", "h5py.File", "fsync", "replace"} <= kinds, kinds
    names = {n: f"{op} {p}" for n, _, op, p in reference["ops"]}
    for n in sweep:
        output = tmp_path / f"kill{n}"
        config = _config(data_dir, output)
        rc, _, text = zygote.run(
            config, tmp_path / f"kill{n}.txt", SB_CRASH_ROOT=str(output), SB_CRASH_AT=n
        )
        assert rc == -signal.SIGKILL, f"op {n} ({names[n]}): {text[-3000:]}"
        rc, _, text = zygote.run(config, tmp_path / f"rerun{n}.txt")
        assert rc == 0, f"rerun after a kill at op {n} ({names[n]}): {text[-3000:]}"
        assert "skipped" not in text  # atomic writes: nothing is ever damaged
        _assert_same_as(reference, str(output), f"kill before op {n} ({names[n]})")


def test_sigkill_at_random_instants(reference, data_dir, zygote, tmp_path):
    # From late in the first epoch to the end of the run.
    first_save = reference["ops"][0][1] - reference["start"]
    rng = random.Random(20261130)
    for i in range(RANDOM_KILLS):
        delay = rng.uniform(0.8 * first_save, reference["seconds"])
        output = tmp_path / f"random{i}"
        config = _config(data_dir, output)
        rc, _, text = zygote.run(config, tmp_path / f"r{i}.txt", kill_after=delay)
        assert rc in (0, -signal.SIGKILL), text[-3000:]
        rc, _, text = zygote.run(config, tmp_path / f"r{i}b.txt")
        assert rc == 0, f"rerun after a kill at {delay:.2f} s: {text[-3000:]}"
        _assert_same_as(reference, str(output), f"kill at {delay:.2f} s")


def test_damaged_state_is_skipped_and_named(reference, data_dir, zygote, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(reference["output"], output)
    newest = state.state_path(str(output / "backup"), EPOCHS)
    with open(newest, "r+b") as f:
        f.truncate(96)  # what an in-place writer leaves when killed
    os.remove(output / "metrics.json")
    rc, _, text = zygote.run(_config(data_dir, output), tmp_path / "log.txt")
    assert rc == 0, text[-3000:]
    assert f"skipped the training state {newest}" in text
    _assert_same_as(reference, str(output), "resumed past a damaged state")
    with open(output / "metrics.json") as f:
        assert json.load(f)["resumed_at_epoch"] == EPOCHS - 1


@pytest.mark.parametrize("damage", ["empty", "truncated", "nan", "record"])
def test_read_state_refuses_a_damaged_file(reference, tmp_path, damage):
    backup = tmp_path / "backup"
    shutil.copytree(os.path.join(reference["output"], "backup"), backup)
    newest = state.state_path(str(backup), EPOCHS)
    if damage in ("empty", "truncated"):
        with open(newest, "r+b") as f:
            f.truncate(0 if damage == "empty" else 4096)
    else:
        with h5py.File(newest, "r+") as f:
            if damage == "nan":
                names = []
                f.visititems(
                    lambda k, o: (
                        names.append(k)
                        if isinstance(o, h5py.Dataset) and o.dtype.kind == "f"
                        else None
                    )
                )
                f[names[0]][...] = np.nan
            else:
                record = json.loads(f.attrs[state.STATE_ATTR])
                record["epoch"] = EPOCHS + 1
                f.attrs[state.STATE_ATTR] = json.dumps(record)
    said = []
    found = state.find_resume_state(str(backup), log=said.append)
    assert found.epoch == EPOCHS - 1
    assert len(said) == 1 and newest in said[0], said


def test_rerun_of_a_finished_run_changes_nothing(reference, data_dir, tmp_path):
    """A fresh interpreter (not a fork) finds the run complete."""
    output = tmp_path / "run"
    shutil.copytree(reference["output"], output, copy_function=shutil.copy2)
    before = _snapshot(output)
    code = "import json, sys; from sb_keras.training import TrainConfig, train; "
    code += "train(TrainConfig(**json.loads(sys.argv[1])))"
    config = json.dumps(_config(data_dir, output))
    done = subprocess.run(
        [sys.executable, "-c", code, config], env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _snapshot(output) == before


class _BreakWeightsOnLastStep(keras.callbacks.Callback):
    """NaN weights after the last step of epoch 2 (its loss was finite)."""

    def on_train_batch_end(self, batch, logs=None):
        if self.params["steps"] == batch + 1 and self._epoch == 1:
            for v in self.model.trainable_variables:
                v.assign(np.full(v.shape, np.nan, v.dtype))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


def test_non_finite_weights_are_never_saved(data_dir, tmp_path):
    config = TrainConfig(**{**_config(data_dir, tmp_path / "run"), "epochs": 3})
    with pytest.raises(NonFiniteLossError, match="end of epoch 2") as err:
        train(config, callbacks=[_BreakWeightsOnLastStep()])
    message = str(err.value)
    kept = state.find_resume_state(os.path.join(config.output, "backup"))
    assert kept.epoch == 1
    assert [e for e, _ in state.list_states(os.path.join(config.output, "backup"))] == [
        1
    ]
    for path in (
        kept.path,
        os.path.join(config.output, "checkpoints", "last.keras"),
        os.path.join(config.output, "checkpoints", "best.keras"),
    ):
        assert path in message and os.path.exists(path)
        assert all(
            np.isfinite(a).all() for a in _weights(path).values() if a.dtype.kind == "f"
        )
