"""Output paths, checked before any work starts.

A run or a conversion that can only fail at its very end (a folder that is
a file, a parent that is a file, a read-only folder) is refused at once with
one line naming the path, instead of an ``OSError`` about a temporary file
after minutes of work.
"""

import os


def check_output_folder(path, arg="output"):
    """Checks that ``path`` is, or can be created as, a writable folder.

    Args:
        path: the folder.
        arg: the argument's name, for the message.

    Returns:
        ``path`` (unchanged).

    Raises:
        ValueError: ``path`` or one of its parents is a file, or the closest
            existing folder cannot be written.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`{arg}` must be a folder path. Received: {arg}={path!r}")
    probe = os.path.abspath(os.fspath(path))
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "is" if probe == os.path.abspath(path) else f"lies under {probe!r},"
        raise ValueError(
            f"`{arg}` must be a folder, but it {where} a file. Received: "
            f"{arg}={os.fspath(path)!r}"
        )
    if os.path.isdir(probe) and not os.access(probe, os.W_OK):
        raise ValueError(
            f"`{arg}` cannot be written ({probe!r} is read-only). Received: "
            f"{arg}={os.fspath(path)!r}"
        )
    return path


def check_output_file(path, arg="output"):
    """Checks that a file can be written at ``path`` (its folder may not exist).

    Raises:
        ValueError: ``path`` is a folder, or its folder cannot be created or
            written (see `check_output_folder`).
    """
    if os.path.isdir(path):
        raise ValueError(
            f"`{arg}` is a folder, not a file. Received: {arg}={os.fspath(path)!r}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    try:
        check_output_folder(folder, arg)
    except ValueError:
        raise ValueError(
            f"`{arg}` cannot be written: its folder is a file or read-only. "
            f"Received: {arg}={os.fspath(path)!r}"
        ) from None
    return path
