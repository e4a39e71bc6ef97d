"""Fault injector of tests/test_crash_safety.py: SIGKILL at the N-th file write.

Python imports ``sitecustomize`` at start-up from the first folder of
``sys.path`` that has one, so a test that puts this folder on ``PYTHONPATH``
gets it in its training processes; the library has no test hooks. It wraps
every operation that changes files: ``open`` for writing (builtin and
``os.open``), ``h5py.File`` creation, ``os.fsync``, ``os.replace``,
``os.rename`` (logged with their target), ``os.remove``/``os.unlink``.
Only operations on paths under
``$SB_CRASH_ROOT`` count (a file descriptor is resolved via /proc). The
variables are read at every operation, so a forked child may change them.

* ``SB_CRASH_LOG``: append ``count<TAB>time<TAB>op<TAB>path`` per operation.
* ``SB_CRASH_AT``: SIGKILL this process just before operation number N.
"""

import builtins
import io
import os
import signal
import time

_real = {
    "open": builtins.open,
    "os.open": os.open,
    "fsync": os.fsync,
    "replace": os.replace,
    "rename": os.rename,
    "remove": os.remove,
    "unlink": os.unlink,
    "write": os.write,
    "close": os.close,
}
_count = [0]
_pid = [os.getpid()]


def _path_of(target):
    if isinstance(target, int):
        try:
            return os.readlink(f"/proc/self/fd/{target}")
        except OSError:
            return None
    try:
        return os.path.abspath(os.fspath(target))
    except TypeError:
        return None


def _event(op, target):
    root = os.environ.get("SB_CRASH_ROOT")
    if not root:
        return
    path = _path_of(target)
    root = os.path.abspath(root)
    if path is None or not (path == root or path.startswith(root + os.sep)):
        return
    if _pid[0] != os.getpid():  # a forked child counts from zero
        _pid[0], _count[0] = os.getpid(), 0
    _count[0] += 1
    log = os.environ.get("SB_CRASH_LOG")
    if log:
        line = f"{_count[0]}\t{time.time():.6f}\t{op}\t{os.path.relpath(path, root)}\n"
        fd = _real["os.open"](log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _real["write"](fd, line.encode())
        _real["close"](fd)
    if os.environ.get("SB_CRASH_AT") == str(_count[0]):
        os.kill(os.getpid(), signal.SIGKILL)


def _writes(mode):
    return any(c in mode for c in "wax+")


def _open(file, mode="r", *args, **kwargs):
    if _writes(mode) and not isinstance(file, int):
        _event(f"open({mode})", file)
    return _real["open"](file, mode, *args, **kwargs)


def _os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
        _event("os.open", path)
    return _real["os.open"](path, flags, *args, **kwargs)


def _wrap(name, label):
    real = _real[name]

    def wrapper(target, *args, **kwargs):
        _event(label, args[0] if name in ("replace", "rename") else target)
        return real(target, *args, **kwargs)

    return wrapper


builtins.open = io.open = _open
os.open = _os_open
os.fsync = _wrap("fsync", "fsync")
os.replace = _wrap("replace", "replace")
os.rename = _wrap("rename", "rename")
os.remove = _wrap("remove", "remove")
os.unlink = _wrap("unlink", "unlink")

try:
    import h5py

    _h5_init = h5py.File.__init__

    def _h5_file(self, name, mode="r", *args, **kwargs):
        if isinstance(name, (str, os.PathLike)) and mode != "r":
            _event(f"h5py.File({mode})", name)
        return _h5_init(self, name, mode, *args, **kwargs)

    h5py.File.__init__ = _h5_file
except ImportError:  # pragma: no cover
    pass
