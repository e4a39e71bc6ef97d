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

import collections
import concurrent.futures
import io
import json
import os
import queue
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
EPOCHS = 3  # the third boundary also removes the first epoch's state
RANDOM_KILLS = 5
WORKERS = min(2, os.cpu_count() or 1)  # runs in flight at once
Run = collections.namedtuple("Run", "rc start text cpu")
CPU_SECONDS = []  # of every training run, to size this file's cost


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
                x, y = f["x"], f["y"]
            keep = np.linspace(0, len(y) - 1, n).astype(int)  # test is sorted
            x, y = x[keep], y[keep]
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
        """Runs ``train(config)``; returns a `Run` (exit code, start time,
        its output, its CPU seconds)."""
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
        done = json.loads(line)
        CPU_SECONDS.append(done["cpu"])
        with open(log) as f:
            return Run(done["rc"], start, f.read(), done["cpu"])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


class Pool:
    """`WORKERS` zygotes; `map` runs independent cases on them at once."""

    def __init__(self):
        self.zygotes = [Zygote() for _ in range(WORKERS)]
        self.free = queue.Queue()
        for z in self.zygotes:
            self.free.put(z)

    def run(self, *args, **kwargs):
        z = self.free.get()
        try:
            return z.run(*args, **kwargs)
        finally:
            self.free.put(z)

    def map(self, fn, items):
        """``fn(item)`` for every item; returns the non-None results."""
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
            return [r for r in ex.map(fn, items) if r is not None]

    def close(self):
        for z in self.zygotes:
            z.close()


@pytest.fixture(scope="module")
def zygote():
    pool = Pool()
    yield pool
    pool.close()
    print(f"\n{len(CPU_SECONDS)} training runs, {sum(CPU_SECONDS):.0f} CPU s")


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
    run = zygote.run(
        _config(data_dir, output),
        folder / "log.txt",
        SB_CRASH_ROOT=str(output),
        SB_CRASH_LOG=str(ops),
    )
    assert run.rc == 0, run.text[-3000:]
    files, log, metrics, temporaries = _outcome(str(output))
    assert not temporaries
    assert [len(v) for v in metrics["history"].values()] == [EPOCHS] * len(
        metrics["history"]
    )
    assert len(log.decode().strip().splitlines()) == 1 + EPOCHS
    return {
        "output": str(output),
        "ops": _read_ops(ops),
        "start": run.start,
        "seconds": time.time() - run.start,
        "files": files,
        "log": log,
        "metrics": metrics,
    }


def _differences(reference, output, what):
    """None if ``output`` ended as the reference did, else what differs."""
    files, log, metrics, temporaries = _outcome(output)
    if temporaries:
        return f"{what}: temporary files left: {temporaries}"
    for name, arrays in reference["files"].items():
        if sorted(files[name]) != sorted(arrays):
            return f"{what}: the variables of {name} differ"
        for key, value in arrays.items():
            if not np.array_equal(files[name][key], value):
                return f"{what}: {name} {key} differs"
    if log != reference["log"]:
        return f"{what}: log.csv differs: {log!r}"
    if metrics["history"] != reference["metrics"]["history"]:
        return f"{what}: metrics.json history differs: {metrics['history']}"
    if metrics["test_accuracy"] != reference["metrics"]["test_accuracy"]:
        return f"{what}: test accuracy differs"
    return None


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
    assert {"open", "h5py.File", "fsync", "replace", "remove"} <= kinds, kinds
    names = {n: f"{op} {p}" for n, _, op, p in reference["ops"]}

    def case(n):
        what = f"kill before op {n} ({names[n]})"
        output = tmp_path / f"kill{n}"
        config = _config(data_dir, output)
        run = zygote.run(
            config,
            tmp_path / f"kill{n}.txt",
            SB_CRASH_ROOT=str(output),
            SB_CRASH_AT=str(n),
        )
        if run.rc != -signal.SIGKILL:
            return f"{what}: exit code {run.rc}: {run.text[-2000:]}"
        run = zygote.run(config, tmp_path / f"rerun{n}.txt")
        if run.rc != 0:
            return f"{what}: the rerun failed: {run.text[-2000:]}"
        if "skipped" in run.text:  # atomic writes: nothing is ever damaged
            return f"{what}: the rerun skipped a state: {run.text[-2000:]}"
        return _differences(reference, str(output), what)

    errors = zygote.map(case, sweep)
    assert not errors, "\n".join(errors)


@pytest.mark.slow  # 10 more training runs
def test_sigkill_at_random_instants(reference, data_dir, zygote, tmp_path):
    # From late in the first epoch to the end of the run.
    first_save = reference["ops"][0][1] - reference["start"]
    rng = random.Random(20261130)
    delays = [
        rng.uniform(0.8 * first_save, reference["seconds"]) for _ in range(RANDOM_KILLS)
    ]

    def case(i):
        what = f"kill at {delays[i]:.2f} s"
        output = tmp_path / f"random{i}"
        config = _config(data_dir, output)
        run = zygote.run(config, tmp_path / f"r{i}.txt", kill_after=delays[i])
        if run.rc not in (0, -signal.SIGKILL):
            return f"{what}: exit code {run.rc}: {run.text[-2000:]}"
        run = zygote.run(config, tmp_path / f"r{i}b.txt")
        if run.rc != 0:
            return f"{what}: the rerun failed: {run.text[-2000:]}"
        return _differences(reference, str(output), what)

    errors = zygote.map(case, range(RANDOM_KILLS))
    assert not errors, "\n".join(errors)


def test_damaged_state_is_skipped_and_named(reference, data_dir, zygote, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(reference["output"], output)
    newest = state.state_path(str(output / "backup"), EPOCHS)
    with open(newest, "r+b") as f:
        f.truncate(96)  # what an in-place writer leaves when killed
    os.remove(output / "metrics.json")
    run = zygote.run(_config(data_dir, output), tmp_path / "log.txt")
    assert run.rc == 0, run.text[-3000:]
    assert f"skipped the training state {newest}" in run.text
    assert _differences(reference, str(output), "damaged state") is None
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
    config = TrainConfig(**_config(data_dir, tmp_path / "run"))
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
