"""Atomic file writes: a reader sees the old file or the new one, never a part.

Every file is written as a temporary file in the same folder (so the rename
stays on one file system), flushed and ``fsync``-ed, renamed over the target
with `os.replace`, and the folder is ``fsync``-ed so the rename itself is
durable. Until the rename, the previous file is untouched.
"""

import contextlib
import os
import uuid

TEMP_PREFIX = ".tmp-"


def fsync_dir(folder):
    """Makes the entries of ``folder`` (a rename, a removal) durable."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path; on success it atomically becomes ``path``.

    The temporary name keeps the target's suffix (Keras checks that a model
    file ends in ``.keras`` and a weights file in ``.weights.h5``). If the
    body raises, the temporary file is removed and ``path`` is unchanged.

    Example:

    >>> with atomic_path("model.keras") as tmp:  # doctest: +SKIP
    ...     model.save(tmp)
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def write_bytes(path, content, if_changed=False):
    """Writes ``content`` to ``path`` atomically.

    Args:
        path: the target file.
        content: `bytes` or `str` (UTF-8).
        if_changed: leave ``path`` untouched (same mtime) when it already
            holds exactly ``content``.

    Returns:
        True if the file was written.
    """
    if isinstance(content, str):
        content = content.encode("utf-8")
    if if_changed and read_bytes(path) == content:
        return False
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
    return True


def read_bytes(path):
    """The bytes of ``path``, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def remove_temporaries(folder):
    """Removes temporary files a killed writer left in ``folder``."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed
