"""Imports TensorFlow once, then forks one training run per request.

Each training process of tests/test_crash_safety.py would pay the
TensorFlow import (5-10 s); a fork of this process pays it once. Nothing of
TensorFlow runs here before the fork (only imports), so a child starts
like a fresh process. Started with ``sitecustomize`` (the fault injector)
on the path; the children set its variables.

Protocol, one JSON object per line: a request on stdin
``{"config": {...TrainConfig...}, "env": {...}, "log": path}``; on stdout
``{"pid": n}`` when the child starts, then ``{"pid": n, "rc": code, "cpu":
seconds}`` (a negative code is the signal that killed it; the child's CPU
time).
"""

import json
import os
import sys
import traceback

import h5py  # noqa: F401
import keras  # noqa: F401
import tensorflow  # noqa: F401

from sb_keras.training import TrainConfig
from sb_keras.training import train


def _child(request):
    code = 1
    try:
        os.environ.update({k: str(v) for k, v in request["env"].items()})
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        train(TrainConfig(**request["config"]))
        code = 0
    except BaseException:  # report it, whatever it is
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main():
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        print(json.dumps({"pid": pid, "rc": rc, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    main()
