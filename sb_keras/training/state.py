"""The resumable state of a run: one self-describing file per finished epoch.

``backup/epoch-NNNNN.weights.h5`` holds what `keras.Model.save_weights`
writes (model and optimizer variables) plus one HDF5 attribute with the
epoch count and the metric history of every epoch so far. It is written
atomically (`sb_keras.io_utils.atomic_path`), only when every variable is
finite, and the previous epoch's file is kept until the new one is in
place. A resume reads the newest file that validates (opens as HDF5, has a
consistent record, all values finite) and names every file it skips.
``log.csv`` is rewritten from that history, so it lists each epoch once.
"""

import csv
import io
import json
import os
import re
import sys
import time
import zipfile

import keras
import numpy as np

from sb_keras import io_utils

STATE_ATTR = "sb_keras_training_state"
STATE_VERSION = 1
_STATE_NAME = re.compile(r"^epoch-(\d{5})\.weights\.h5$")


class InvalidStateError(ValueError):
    """A state file that cannot be resumed from (the message says why)."""


class RunState:
    """A validated state file: ``path``, ``epoch`` (epochs finished),
    ``history`` (metric name -> one float per epoch) and ``seconds`` (wall
    time of each epoch)."""

    def __init__(self, path, epoch, history, seconds):
        self.path, self.epoch, self.history, self.seconds = (
            path,
            epoch,
            history,
            seconds,
        )


def state_path(backup_dir, epoch):
    """The state file of ``epoch`` finished epochs."""
    return os.path.join(backup_dir, f"epoch-{epoch:05d}.weights.h5")


def list_states(backup_dir):
    """``(epoch, path)`` of the state files in ``backup_dir``, newest first."""
    try:
        names = os.listdir(backup_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _STATE_NAME.match(n))]
    return [(e, os.path.join(backup_dir, n)) for e, n in sorted(found, reverse=True)]


def read_state(path):
    """Validates the state file ``path``; raises `InvalidStateError`."""
    import h5py

    match = _STATE_NAME.match(os.path.basename(path))
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(STATE_ATTR)
            if raw is None:
                raise InvalidStateError("it has no training-state record")
            record = json.loads(raw)
            bad = []

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
                    if not np.isfinite(obj[()]).all():
                        bad.append(name)

            f.visititems(visit)
    except InvalidStateError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise InvalidStateError(f"it is not a complete HDF5 file ({e})") from None
    if bad:
        raise InvalidStateError(f"non-finite values in {', '.join(bad[:3])}")
    epoch = record.get("epoch")
    history = record.get("history")
    seconds = record.get("seconds")
    if (
        record.get("version") != STATE_VERSION
        or not isinstance(epoch, int)
        or (match and int(match.group(1)) != epoch)
        or not isinstance(history, dict)
        or not isinstance(seconds, list)
        or len(seconds) != epoch
        or any(len(v) != epoch for v in history.values())
    ):
        raise InvalidStateError(
            f"its record does not match its name ({json.dumps(record)[:200]})"
        )
    return RunState(path, epoch, history, seconds)


def find_resume_state(backup_dir, log=None):
    """The newest valid state in ``backup_dir``, or None for a new run.

    Every state file skipped is reported with its reason through ``log``
    (default: a line on stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for _, path in list_states(backup_dir):
        try:
            return read_state(path)
        except InvalidStateError as e:
            log(f"sb_keras: skipped the training state {path}: {e}.")
    return None


def non_finite_variables(variables):
    """Paths of the variables holding NaN or inf."""
    return [
        getattr(v, "path", v.name)
        for v in variables
        if np.asarray(v).dtype.kind == "f" and not np.isfinite(np.asarray(v)).all()
    ]


def history_csv(history):
    """``log.csv`` as `keras.callbacks.CSVLogger` lays it out (epoch, keys)."""
    keys = sorted(history)
    n = len(next(iter(history.values()), []))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for i in range(n):
        writer.writerow([i, *(history[k][i] for k in keys)])
    return out.getvalue()


class StateBackup(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with one atomic file per epoch.

    Restores ``resume`` (a `RunState` chosen before the input pipeline was
    built, so data and weights start at the same epoch); at every epoch end
    checks the variables are finite, writes the new state, removes states
    older than the previous one, and rewrites ``log_csv`` from the history.

    Args:
        backup_dir: the folder of the state files.
        resume: the `RunState` to start from, or None.
        log_csv: path of the CSV log, or None.
    """

    def __init__(self, backup_dir, resume=None, log_csv=None):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.resume = resume
        self.log_csv = log_csv
        history = resume.history if resume else {}
        self.history = {k: list(v) for k, v in history.items()}
        self.seconds = list(resume.seconds) if resume else []
        self.epoch = resume.epoch if resume else 0
        self._start = None

    def on_train_begin(self, logs=None):
        if self.resume is None:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.resume.path)
        self.model._initial_epoch = self.resume.epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if self.epoch and set(logs) != set(self.history):
            raise ValueError(
                f"The metrics of epoch {epoch + 1} ({sorted(logs)}) differ from "
                f"those of the resumed state ({sorted(self.history)}). "
                f"Received: logs={logs}"
            )
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        self.seconds.append(round(time.time() - (self._start or time.time()), 3))
        self.epoch = epoch + 1
        self._save_model()

    def _save_model(self):
        variables = [*self.model.weights, *self.model.optimizer.variables]
        bad = non_finite_variables(variables)
        if bad:  # NaNGuard stops first; this keeps a bad state out regardless
            raise FloatingPointError(f"Non-finite variables, not saved: {bad[:3]}")
        import h5py

        os.makedirs(self.backup_dir, exist_ok=True)
        record = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "history": self.history,
            "seconds": self.seconds,
        }
        with io_utils.atomic_path(state_path(self.backup_dir, self.epoch)) as tmp:
            self.model.save_weights(tmp)
            with h5py.File(tmp, "a") as f:
                f.attrs[STATE_ATTR] = json.dumps(record)
        for epoch, path in list_states(self.backup_dir):
            if epoch < self.epoch - 1:
                os.remove(path)
        if self.log_csv:
            io_utils.write_bytes(
                self.log_csv, history_csv(self.history), if_changed=True
            )

    def on_train_end(self, logs=None):
        pass


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that writes atomically and, on a
    resumed run, starts from the best ``monitor`` value of the history."""

    def __init__(self, filepath, history=None, **kwargs):
        super().__init__(filepath, **kwargs)
        values = [v for v in (history or {}).get(self.monitor, []) if v == v]
        if self.save_best_only and values and self.mode in ("max", "min"):
            self.best = max(values) if self.mode == "max" else min(values)

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            os.makedirs(os.path.dirname(filepath) or ".", exist_ok=True)
            with io_utils.atomic_path(filepath) as tmp:
                if self.save_weights_only:
                    self.model.save_weights(tmp, overwrite=True)
                else:
                    self.model.save(tmp, overwrite=True)


def finished_metrics(output, resume):
    """The metrics of a finished run whose files are all complete, or None.

    Complete: ``metrics.json`` parses and holds the state's history,
    ``model.keras`` is a readable zip, and ``log.csv`` is the history's.
    """
    raw = io_utils.read_bytes(os.path.join(output, "metrics.json"))
    try:
        metrics = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(metrics, dict) or metrics.get("history") != resume.history:
        return None
    try:
        with zipfile.ZipFile(os.path.join(output, "model.keras")) as z:
            if z.testzip() is not None:
                return None
    except (OSError, zipfile.BadZipFile):
        return None
    csv_text = history_csv(resume.history).encode()
    if io_utils.read_bytes(os.path.join(output, "log.csv")) != csv_text:
        return None
    return metrics


def describe_kept(output):
    """A sentence naming the saved files of the run in ``output`` that exist."""
    backup = os.path.join(output, "backup")
    state = find_resume_state(backup, log=lambda msg: None)
    kept = []
    if state is not None:
        kept.append(f"the state after epoch {state.epoch} in {state.path}")
    for name in ("last.keras", "best.keras"):
        path = os.path.join(output, "checkpoints", name)
        if os.path.exists(path):
            kept.append(path)
    if not kept:
        return "Nothing was saved (no epoch finished)."
    return "Kept: " + "; ".join(kept) + "."
