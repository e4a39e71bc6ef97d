"""Picking a `tf.distribute` strategy, and making `fit` work multi-worker.

* ``"auto"``: `MultiWorkerMirroredStrategy` when ``TF_CONFIG`` lists more
  than one task, else `MirroredStrategy` over all visible GPUs, else over
  ``devices`` logical CPU devices when more than one is asked for, else the
  default (single device) strategy.
* ``"mirrored"``: `MirroredStrategy` over the GPUs, or over ``devices``
  logical CPUs (all logical CPUs when ``devices`` is None).
* ``"multiworker"``: `MultiWorkerMirroredStrategy` from ``TF_CONFIG``.
* ``"none"``: the default strategy.

Keras 3.15's ``fit`` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585): its symbolic build reduces a batch of
``PerReplica`` values eagerly, and its log reduction asks for ``axis=0`` on
scalars. `multi_worker_fit_fix` is a context manager that replaces those
two private functions for the duration of ``fit``/``evaluate`` (only under
that strategy, only on the Keras versions known to need it); everything
else (callbacks, loss scaling, checkpoints) is Keras's own code path.
"""

import contextlib
import json
import os

STRATEGIES = ("auto", "mirrored", "multiworker", "none")
# Keras versions whose TF trainer has the multi-worker bug (#20585).
_MWMS_FIX_VERSIONS = ((3, 0), (3, 16))


def tf_config_tasks():
    """Number of tasks in ``TF_CONFIG`` (0 when unset)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError) as e:
        raise ValueError(
            f"TF_CONFIG is not valid JSON with a 'cluster'. Received: TF_CONFIG={raw!r}"
        ) from e
    return sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))


def is_chief():
    """Whether this process writes the run's files (task 0 / the chief)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True
    task = json.loads(raw).get("task", {})
    cluster = json.loads(raw).get("cluster", {})
    if task.get("type") == "chief":
        return True
    if task.get("type") == "worker":
        return "chief" not in cluster and int(task.get("index", 0)) == 0
    return False


def task_id():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return "chief"
    task = json.loads(raw).get("task", {})
    return f"{task.get('type', 'worker')}{task.get('index', 0)}"


def configure_cpu_devices(n):
    """Splits the first physical CPU into ``n`` logical devices.

    Must run before TensorFlow initializes its devices; when they already
    exist (e.g. set up by the caller) and there are at least ``n``, nothing
    changes.
    """
    import tensorflow as tf

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"`devices` must be a positive integer. Received: devices={n!r}"
        )
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < n:
            raise ValueError(
                f"TensorFlow already initialized {have} logical CPU device(s); "
                f"set `devices` before any TensorFlow operation runs. "
                f"Received: devices={n}"
            ) from None
    return [f"/cpu:{i}" for i in range(n)]


# One MirroredStrategy per device set and process: the CPU collectives of two
# MirroredStrategy objects in one process share instance keys and abort with
# "Shape mismatch in the collective" once both have run (seen with TF 2.21).
_MIRRORED = {}


def mirrored_strategy(device_names):
    """The process-wide `tf.distribute.MirroredStrategy` over ``device_names``.

    Creating a second MirroredStrategy over the same devices in one process
    breaks the first one's collectives, so calling ``train`` twice (e.g. in a
    notebook) would fail; this returns the same strategy each time.
    """
    import tensorflow as tf

    key = tuple(name.lower() for name in device_names)
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(list(device_names))
    return _MIRRORED[key]


def make_strategy(strategy="auto", devices=None):
    """Returns the `tf.distribute.Strategy` described by ``strategy``.

    Args:
        strategy: one of `STRATEGIES` (see the module docstring).
        devices: number of devices: logical CPU devices when there is no
            GPU, else the first ``devices`` GPUs. None uses all GPUs (or one
            CPU).

    Example:

    >>> make_strategy("none").num_replicas_in_sync
    1
    """
    import tensorflow as tf

    if strategy not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {STRATEGIES}. Received: strategy={strategy!r}"
        )
    if devices is not None and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise ValueError(
            f"`devices` must be a positive integer. Received: devices={devices!r}"
        )
    tasks = tf_config_tasks()
    if strategy == "multiworker" or (strategy == "auto" and tasks > 1):
        if tasks < 1:
            raise ValueError(
                "strategy='multiworker' needs the TF_CONFIG environment variable "
                "(cluster and task). Received: TF_CONFIG unset"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if strategy == "none":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [f"/gpu:{i}" for i in range(len(gpus))][: devices or len(gpus)]
        return mirrored_strategy(names)
    if strategy == "auto" and devices in (None, 1):
        return tf.distribute.get_strategy()
    if devices is None:
        devices = len(tf.config.list_logical_devices("CPU"))
    return mirrored_strategy(configure_cpu_devices(devices))


def _keras_version():
    import keras

    return tuple(int(p) for p in keras.__version__.split(".")[:2])


def _is_multi_worker(strategy):
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def needs_multi_worker_fix(strategy):
    low, high = _MWMS_FIX_VERSIONS
    return _is_multi_worker(strategy) and low <= _keras_version() < high


@contextlib.contextmanager
def multi_worker_fit_fix(strategy):
    """Makes ``model.fit``/``evaluate`` work under multi-worker (keras#20585).

    A no-op unless ``strategy`` is a multi-worker
    `MultiWorkerMirroredStrategy` and Keras is a version known to fail
    (3.x before 3.16). Inside the context two private functions of Keras's
    TensorFlow trainer are replaced; they are restored on exit:

    1. the symbolic build takes the first local replica's batch instead of
       reducing ``PerReplica`` values eagerly (a cross-worker reduce of
       images, which fails and is useless: only shapes matter);
    2. the reduction of the step's logs averages scalars over all replicas
       of all workers with ``axis=None`` (Keras asks for ``axis=0``, which
       fails on scalars).
    """
    if not needs_multi_worker_fix(strategy):
        yield
        return
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def first_local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(first_local, next(it))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strat, reduction):
        if reduction in ("auto", "mean") and _is_multi_worker(strat):

            def mean(v):
                if isinstance(v, tf.distribute.DistributedValues) or (
                    tf.is_tensor(v) and v.shape.rank == 0
                ):
                    return strat.reduce("MEAN", v, axis=None)
                return original_reduce(v, strat, reduction)

            return tf.nest.map_structure(mean, values)
        return original_reduce(values, strat, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build = original_build
        tf_trainer.reduce_per_replica = original_reduce


def _callback_base():
    import keras

    return keras.callbacks.Callback


class SyncMovingStatistics(_callback_base()):
    """Averages non-trainable float variables over all replicas each epoch.

    Under `MirroredStrategy` (one or several workers) each replica updates
    the BatchNorm moving statistics from its own slice of the batch, and a
    saved model gets the first local replica's copy: different workers end
    with different statistics. This callback all-reduces them (mean over
    every replica of every worker) at the end of each epoch, before the
    checkpoints and the backup are written, so every worker saves the same
    model. Place it before the saving callbacks.

    Args:
        strategy: the strategy the model was built under.
    """

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self._fn = None

    def on_epoch_end(self, epoch, logs=None):
        self.sync()

    def sync(self):
        if self.strategy.num_replicas_in_sync == 1:
            return
        import tensorflow as tf

        if self._fn is None:
            variables = [
                v for v in self.model.non_trainable_variables if "float" in str(v.dtype)
            ]
            strategy = self.strategy

            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                local = [tf.identity(v.value) for v in variables]
                means = ctx.all_reduce("MEAN", local)
                for v, m in zip(variables, means):
                    v.value.assign(m)

            self._fn = tf.function(lambda: strategy.run(replica_fn))
        self._fn()
