"""The paper's recipe: learning-rate schedules and the run's callbacks."""

import math
import os

import keras

from sb_keras.training.distribute import SyncMovingStatistics

SCHEDULES = ("step", "cosine", "constant")
# Kang & Kim, CIFAR: lr x0.1 after epochs 150 and 225 of 300.
PAPER_MILESTONES = (0.5, 0.75)


class NonFiniteLossError(FloatingPointError):
    """Raised by `NaNGuard` when the training loss stops being finite."""


def parse_schedule(schedule, epochs):
    """Milestone epochs of a schedule string, or the name of a smooth one.

    ``"step"`` is the paper's step decay scaled to ``epochs`` (x0.1 at 50 %
    and 75 % of the run: epochs 150 and 225 of 300); ``"step:30,60,90"``
    gives explicit milestones; ``"cosine"`` and ``"constant"`` are what they
    say.

    Returns:
        ``("step", [milestone epochs])``, ``("cosine", None)`` or
        ``("constant", None)``.
    """
    if not isinstance(schedule, str):
        raise ValueError(
            f"`schedule` must be a string. Received: schedule={schedule!r}"
        )
    if schedule in ("cosine", "constant"):
        return schedule, None
    if schedule == "step":
        return "step", sorted({max(1, round(f * epochs)) for f in PAPER_MILESTONES})
    if schedule.startswith("step:"):
        try:
            milestones = sorted(int(m) for m in schedule[5:].split(",") if m)
        except ValueError:
            milestones = []
        if milestones and all(m > 0 for m in milestones):
            return "step", milestones
    raise ValueError(
        "`schedule` must be 'step', 'step:E1,E2,...' (positive epochs), 'cosine' "
        f"or 'constant'. Received: schedule={schedule!r}"
    )


def learning_rate_schedule(lr, schedule, epochs, steps_per_epoch, factor=0.1):
    """The learning rate of every optimizer step, as a Keras schedule.

    Step decay follows PyTorch's ``MultiStepLR`` stepped once per epoch:
    epoch ``e`` (0-based) trains with ``lr * factor ** (number of
    milestones <= e)``. Keras evaluates the schedule at the 0-based step
    index, so a milestone ``m`` becomes the boundary ``m * steps - 1``.

    Example:

    >>> s = learning_rate_schedule(0.1, "step", epochs=4, steps_per_epoch=10)
    >>> [round(float(s(i)), 4) for i in (0, 19, 20, 29, 30)]
    [0.1, 0.1, 0.01, 0.01, 0.001]
    """
    kind, milestones = parse_schedule(schedule, epochs)
    if kind == "constant":
        return float(lr)
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            float(lr), decay_steps=max(1, epochs * steps_per_epoch)
        )
    boundaries = [m * steps_per_epoch - 1 for m in milestones]
    values = [float(lr) * factor**i for i in range(len(milestones) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss or weight, before saving.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch's other
    callbacks run (and so could checkpoint NaN weights), this raises
    `NonFiniteLossError` from the batch hook when the loss is not finite,
    and from the epoch-end hook when a model or optimizer variable is not
    (the last step of an epoch can break the weights with a finite loss).
    Put it *first* in the callback list and the backup and checkpoints keep
    the last good state.

    Args:
        keep: a sentence naming what was kept (shown in the error), or a
            function returning it when the error is raised.
    """

    def __init__(self, keep=""):
        super().__init__()
        self.keep = keep
        self._epoch = 0

    def _kept(self):
        return self.keep() if callable(self.keep) else self.keep

    def _stop(self, what):
        raise NonFiniteLossError(
            f"{what}; training stopped. {self._kept()} Lower the learning rate "
            "(--lr) or check the data, then run the same command again to "
            "resume from the last good state."
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self._stop(
                f"The training loss became {loss} at epoch {self._epoch + 1}, "
                f"batch {batch + 1}"
            )

    def on_epoch_end(self, epoch, logs=None):
        from sb_keras.training.state import non_finite_variables

        optimizer = self.model.optimizer
        variables = [*self.model.weights, *(optimizer.variables if optimizer else [])]
        bad = non_finite_variables(variables)
        if bad:
            self._stop(
                f"The variables {', '.join(bad[:3])} became non-finite at the end "
                f"of epoch {epoch + 1}; epoch {epoch + 1} was not saved"
            )


def make_callbacks(output, strategy=None, tensorboard=True, extra=(), resume=None):
    """The run's callbacks, in order: NaN guard, statistics sync, extra,
    checkpoints, state backup (and log), TensorBoard.

    Files (under ``output``; a non-chief worker writes under
    ``output/<task>`` so workers never race on one file), each written
    atomically:

    * ``checkpoints/best.keras`` (highest ``val_accuracy`` over the whole
      run, resumptions included) and ``checkpoints/last.keras``.
    * ``backup/epoch-NNNNN.weights.h5``: the resumable state after each
      epoch (`sb_keras.training.state`); the previous one is kept.
    * ``log.csv`` (every epoch once, across resumptions) and
      ``tensorboard/``.

    Args:
        output: the run folder.
        strategy: the `tf.distribute` strategy (moving statistics sync).
        tensorboard: add `keras.callbacks.TensorBoard`.
        extra: callbacks to run after the NaN guard.
        resume: the `sb_keras.training.state.RunState` to resume, or None.
    """
    from sb_keras.training import state

    ckpt = os.path.join(output, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    history = resume.history if resume else None
    callbacks = [
        NaNGuard(keep=lambda: state.describe_kept(output)),
        *([SyncMovingStatistics(strategy)] if strategy is not None else []),
        *extra,
        state.AtomicModelCheckpoint(
            os.path.join(ckpt, "best.keras"),
            history=history,
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
        ),
        state.AtomicModelCheckpoint(os.path.join(ckpt, "last.keras")),
        state.StateBackup(
            os.path.join(output, "backup"),
            resume=resume,
            log_csv=os.path.join(output, "log.csv"),
        ),
    ]
    if tensorboard:
        callbacks.append(
            keras.callbacks.TensorBoard(
                os.path.join(output, "tensorboard"), update_freq="epoch"
            )
        )
    return callbacks
