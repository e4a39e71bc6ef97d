"""Training: PyTorch-semantics SGD, schedule, distribution, resume, NaN guard.

Tiny models (CIFAR ResNet-14 shared, 16x16 images) and a few hundred random
images keep the default tests within seconds; the multi-process tests
(SIGKILL and resume, two workers on 127.0.0.1) are marked slow.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras import data
from sb_keras.training import NaNGuard
from sb_keras.training import NonFiniteLossError
from sb_keras.training import PyTorchSGD
from sb_keras.training import TrainConfig
from sb_keras.training import compile_model
from sb_keras.training import learning_rate_schedule
from sb_keras.training import train
from sb_keras.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"depth": 14}  # two blocks per stage: the second one is shared


def write_npz(folder, n_train=96, n_test=32, size=16, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(
            os.path.join(folder, f"{split}.npz"),
            x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            y=rng.integers(0, 10, n),
        )
    return str(folder)


def tiny_config(tmp_path, **kw):
    base = dict(
        model="resnet20_s16u1_double",
        model_args=dict(TINY),
        data_dir=write_npz(tmp_path / "data"),
        output=str(tmp_path / "run"),
        epochs=2,
        batch_size=32,
        lr=0.05,
        verbose=0,
        tensorboard=False,
        strategy="none",
    )
    base.update(kw)
    return TrainConfig(**base)


# --- the optimizer -----------------------------------------------------------


def test_pytorch_sgd_one_step_equals_hand_computed_update():
    """A linear model with MSE: the gradient and the update by hand."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    t = rng.normal(size=(8, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    w0, b0 = (np.array(v, np.float64) for v in model.get_weights())
    lr, wd = 0.1, 0.05
    model.compile(optimizer=PyTorchSGD(lr, momentum=0.9, weight_decay=wd), loss="mse")
    model.fit(x, t, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # loss = mean((x w + b - t)^2) over 8 x 2 entries
    r = x.astype(np.float64) @ w0 + b0 - t
    gw = 2.0 / r.size * x.T @ r
    gb = 2.0 / r.size * r.sum(0)
    # torch: d_p = g + wd * p; buf = d_p (first step); p -= lr * buf
    w1 = w0 - lr * (gw + wd * w0)
    b1 = b0 - lr * (gb + wd * b0)
    np.testing.assert_allclose(model.get_weights()[0], w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b1, rtol=1e-5, atol=1e-6)


def test_pytorch_sgd_momentum_with_changing_lr_follows_torch():
    """Three steps with a learning rate that changes: torch's buffer form."""
    var = keras.Variable(np.array([1.0, -2.0, 3.0], "float32"))
    grads = [np.array(g, "float32") for g in ([0.5, 0.1, -1.0], [1, 2, 3], [-2, 0, 1])]
    lrs = [0.1, 0.1, 0.01]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, 0.01])
    opt = PyTorchSGD(schedule, momentum=0.9, weight_decay=1e-2)
    p, buf = np.array([1.0, -2.0, 3.0]), np.zeros(3)
    for g, lr in zip(grads, lrs):
        opt.apply_gradients([(tf.constant(g), var)])
        d = g + 1e-2 * p
        buf = 0.9 * buf + d
        p = p - lr * buf
    np.testing.assert_allclose(np.array(var), p, rtol=1e-6)


def test_pytorch_sgd_config_round_trip_and_bad_args():
    opt = PyTorchSGD(0.2, momentum=0.8, weight_decay=1e-4, nesterov=True)
    clone = PyTorchSGD.from_config(opt.get_config())
    assert (clone.momentum, clone.coupled_weight_decay, clone.nesterov) == (
        0.8,
        1e-4,
        True,
    )
    with pytest.raises(ValueError, match="momentum=-1"):
        PyTorchSGD(momentum=-1)


def test_step_schedule_matches_multistep_lr_per_epoch():
    steps, epochs = 5, 8
    s = learning_rate_schedule(0.1, "step", epochs, steps)
    got = [float(s(i)) for i in range(steps * epochs)]
    # MultiStepLR(milestones=[4, 6]) stepped per epoch; 50 % / 75 % of 8
    want = [0.1 * 0.1 ** sum(e >= m for m in (4, 6)) for e in range(epochs)]
    np.testing.assert_allclose(got, np.repeat(want, steps), rtol=1e-6)
    s = learning_rate_schedule(0.1, "step:2", epochs, steps)
    assert float(s(2 * steps - 1)) == pytest.approx(0.1)
    assert float(s(2 * steps)) == pytest.approx(0.01)


# --- data --------------------------------------------------------------------


def test_epoch_data_does_not_depend_on_the_start_epoch():
    x = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    y = np.arange(12)
    full = list(data.make_train_dataset(x, y, 4, seed=3, epochs=3).as_numpy_iterator())
    late = data.make_train_dataset(x, y, 4, seed=3, epochs=3, initial_epoch=2)
    late = list(late.as_numpy_iterator())
    assert len(full) == 9 and len(late) == 3
    for a, b in zip(full[6:], late):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # epochs differ from each other, and every epoch is a permutation
    assert not np.array_equal(full[0][1], full[3][1])
    assert sorted(np.concatenate([b[1] for b in full[3:6]])) == list(range(12))


# --- distribution ------------------------------------------------------------


def _duplicated_batches(n_steps, half, seed=0):
    """Global batches [h, h]: each replica's half is the same images, so BN
    batch statistics per replica equal those of the whole batch."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n_steps):
        h = rng.integers(0, 256, (half, 16, 16, 3)).astype("float32")
        yh = rng.integers(0, 10, half)
        xs.append(np.concatenate([h, h]))
        ys.append(np.concatenate([yh, yh]))
    return tf.data.Dataset.from_tensor_slices((np.stack(xs), np.stack(ys)))


def _fit_tiny(strategy, weights=None, steps=3):
    config = TrainConfig(epochs=1, lr=0.1, weight_decay=5e-4)
    with strategy.scope():
        model = sb_keras.ResNet(share=True, input_shape=(16, 16, 3), **TINY)
        if weights is not None:
            model.set_weights(weights)
        compile_model(model, config, steps_per_epoch=steps)
    init = [np.array(w) for w in model.get_weights()]
    model.fit(_duplicated_batches(steps, 4), epochs=1, shuffle=False, verbose=0)
    return init, model


@pytest.mark.slow  # ~35 s on 2 shared cores (two ResNet-14 traces)
def test_two_logical_cpus_match_one_device(mirrored_strategy):
    mirrored = mirrored_strategy
    assert mirrored.num_replicas_in_sync == 2
    init, single = _fit_tiny(tf.distribute.get_strategy())
    _, double = _fit_tiny(mirrored, weights=init)
    assert single.losses, "the orthogonality penalty must be part of the loss"
    moved = [not np.allclose(a, b) for a, b in zip(init, single.get_weights())]
    assert sum(moved) > len(init) // 2
    for a, b in zip(single.get_weights(), double.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_make_strategy_choices(monkeypatch):
    from sb_keras.training import make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert make_strategy("none").num_replicas_in_sync == 1
    assert make_strategy("auto").num_replicas_in_sync == 1  # no GPU here
    two = make_strategy("auto", devices=2)
    assert isinstance(two, tf.distribute.MirroredStrategy)
    assert two.num_replicas_in_sync == 2
    with pytest.raises(ValueError, match="TF_CONFIG unset"):
        make_strategy("multiworker")
    with pytest.raises(ValueError, match="devices=0"):
        make_strategy("mirrored", devices=0)


# --- the NaN guard -----------------------------------------------------------


class _Poison(keras.callbacks.Callback):
    """Makes every weight NaN at the start of epoch ``at`` (0-based)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            for v in self.model.trainable_variables:
                v.assign(tf.fill(v.shape, float("nan")))


def test_nan_guard_stops_and_keeps_the_last_good_state(tmp_path):
    from sb_keras.training import state

    config = tiny_config(tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 1") as err:
        train(config, callbacks=[_Poison(at=1)])
    backup = os.path.join(config.output, "backup")
    kept = state.find_resume_state(backup)
    assert kept.epoch == 1
    assert kept.path in str(err.value) and os.path.exists(kept.path)
    last = keras.models.load_model(
        os.path.join(config.output, "checkpoints", "last.keras")
    )
    assert all(np.isfinite(w).all() for w in last.get_weights())
    model = trainer.build_model(config, 10, (16, 16, 3))
    model.load_weights(kept.path)
    assert all(np.isfinite(np.array(w)).all() for w in model.weights)


def test_nan_guard_message_on_a_plain_fit():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((4, 2), "float32")
    y = np.full((4, 1), np.nan, "float32")
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 1"):
        model.fit(x, y, callbacks=[NaNGuard()], verbose=0)


# --- a whole run and bad input -----------------------------------------------


def test_train_writes_model_metrics_and_logs(tmp_path):
    config = tiny_config(tmp_path)
    metrics = train(config)
    out = config.output
    restored = keras.models.load_model(os.path.join(out, "model.keras"))
    assert type(restored) is sb_keras.ResNet
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert len(saved["history"]["loss"]) == 2
    with open(os.path.join(out, "log.csv")) as f:
        assert len(f.read().strip().splitlines()) == 3  # header + 2 epochs
    for name in ("best.keras", "last.keras"):
        assert os.path.exists(os.path.join(out, "checkpoints", name))
    # Evaluating the saved model gives the metrics' accuracy.
    x, y = data.load_arrays("cifar10", "test", config.data_dir)
    acc = np.mean(np.argmax(restored.predict(x, verbose=0), -1) == y)
    assert acc == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    # Running the finished command again trains nothing and keeps the result.
    files = [os.path.join(out, n) for n in ("metrics.json", "log.csv", "model.keras")]
    stamps = [os.stat(p).st_mtime_ns for p in files]
    again = train(config)
    assert again == json.loads(json.dumps(metrics))
    assert [os.stat(p).st_mtime_ns for p in files] == stamps


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model": "resnet7"}, "name='resnet7'"),
        ({"dataset": "mnist"}, "dataset='mnist'"),
        ({"precision": "float16"}, "precision='float16'"),
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"epochs": 0}, "epochs=0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"strategy": "tpu"}, "strategy='tpu'"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(tmp_path), **overrides)
    assert not os.path.exists(tmp_path / "run")


def test_data_dir_without_files_fails_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError, match="no train.npz"):
        train(tiny_config(tmp_path), data_dir=str(empty))
    assert not os.path.exists(tmp_path / "run")


def test_batch_not_divisible_by_replicas_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="2 replicas. Received: batch_size=33"):
        train(tiny_config(tmp_path), strategy="mirrored", devices=2, batch_size=33)
    assert not os.path.exists(tmp_path / "run")


def test_cli_reports_bad_input(capsys, tmp_path):
    from sb_keras import cli

    code = cli.main(["train", "--model", "nope", "--output", str(tmp_path / "r")])
    assert code == 2
    assert "Received: name='nope'" in capsys.readouterr().err


# --- processes: SIGKILL and resume; two workers --------------------------------

_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    import keras
    from sb_keras.training import TrainConfig, train

    config = TrainConfig(**json.loads(sys.argv[1]))
    kill_at = json.loads(sys.argv[2])

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if [self.epoch, batch] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    train(config, callbacks=[Kill()] if kill_at else [])
    """
)


def _run(config, kill_at=None, env=None):
    args = dict(vars(config))
    cmd = [sys.executable, "-c", _RUN, json.dumps(args), json.dumps(kill_at)]
    full_env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    full_env.update(env or {})
    return subprocess.Popen(cmd, env=full_env, stderr=subprocess.PIPE, text=True)


def _final_weights(output):
    model = keras.models.load_model(os.path.join(output, "model.keras"))
    return [np.array(w) for w in model.weights]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_equals_uninterrupted_run(tmp_path):
    common = dict(epochs=3, deterministic=True, seed=7)
    straight = tiny_config(tmp_path, output=str(tmp_path / "straight"), **common)
    killed = tiny_config(tmp_path, output=str(tmp_path / "killed"), **common)
    p = _run(straight)
    q = _run(killed, kill_at=[1, 1])  # epoch 2, after its 2nd of 3 batches
    assert q.wait(900) == -signal.SIGKILL, q.stderr.read()[-2000:]
    assert p.wait(900) == 0, p.stderr.read()[-2000:]
    assert not os.path.exists(os.path.join(killed.output, "model.keras"))
    r = _run(killed)  # the same command again
    assert r.wait(900) == 0, r.stderr.read()[-2000:]
    with open(os.path.join(killed.output, "metrics.json")) as f:
        assert json.load(f)["resumed_at_epoch"] == 1
    for a, b in zip(_final_weights(straight.output), _final_weights(killed.output)):
        np.testing.assert_array_equal(a, b)  # deterministic ops: bitwise


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_localhost_train_to_identical_weights(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    config = tiny_config(tmp_path, strategy="multiworker", epochs=2)
    procs = []
    for i in range(2):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": i},
        }
        procs.append(_run(config, env={"TF_CONFIG": json.dumps(tf_config)}))
    try:
        codes = [p.wait(900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    chief = _final_weights(config.output)
    other = _final_weights(os.path.join(config.output, "worker1"))
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(config.output, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["replicas"] == 2
    assert all(np.isfinite(metrics["history"]["loss"]))
