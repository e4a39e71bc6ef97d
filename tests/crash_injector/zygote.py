"""Imports TensorFlow once, then forks one training run per request.

Each training process of tests/test_crash_safety.py would pay the
TensorFlow import (5-10 s); a fork of this process pays it once. Nothing of
TensorFlow runs here before the fork (only imports), so a child starts
like a fresh process. Started with ``sitecustomize`` (the fault injector)
on the path; the children set its variables.

Protocol, one JSON object per line: a request on stdin
``{"config": {...TrainConfig...}, "env": {...}, "log": path}``; on stdout
``{"pid": n}`` when the child starts, then ``{"pid": n, "rc": code}`` (a
negative code is the signal that killed it).
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
    os.environ.update(request["env"])
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        train(TrainConfig(**request["config"]))
    except BaseException:  # report it, whatever it is
        traceback.print_exc()
        code = 1
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
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"pid": pid, "rc": rc}), flush=True)


if __name__ == "__main__":
    main()
