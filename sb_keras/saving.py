"""Loading ``.keras`` files with a check first: broken files fail fast and clearly.

``keras.models.load_model`` reports a broken archive late (after building
the model) and without the file's name: a truncated weights file gives
``OSError: Unable to synchronously open file (truncated file: ...)``, a
damaged ``config.json`` a bare ``JSONDecodeError``. `load_model` checks
the archive first, in time and memory bounded by the file (no entry is
decompressed beyond a bounded ratio, ``config.json`` is read up to
`MAX_CONFIG_BYTES`), and every error names the file, the entry and the
problem. The ``sb-keras`` commands load models through it.

Example:

>>> import sb_keras.saving
>>> model = sb_keras.saving.load_model("runs/quickstart/model.keras")
... # doctest: +SKIP
"""

import io
import json
import os
import zipfile

_CONFIG = "config.json"
_METADATA = "metadata.json"
_WEIGHTS_H5 = "model.weights.h5"
# A model's config.json (its layers' configs) is far below this.
MAX_CONFIG_BYTES = 64 * 2**20
# Keras stores its entries uncompressed; a deflated one may expand this much
# (plus the slack) before it is called a zip bomb.
MAX_COMPRESSION_RATIO = 64
COMPRESSION_SLACK_BYTES = 2**20


class ModelFileError(ValueError):
    """A model file that is truncated, corrupt or not a ``.keras`` archive."""


def validate_model_file(path):
    """Checks that ``path`` is a complete ``.keras`` archive.

    Checked, in this order: the zip structure and the CRC of every entry
    (a truncated or damaged archive), the compression ratio of every entry
    (zip bombs), ``config.json`` (valid JSON describing a Keras object),
    ``metadata.json`` (valid JSON) and ``model.weights.h5`` (an HDF5 file
    whose size matches its superblock, every object header readable).

    Args:
        path: the ``.keras`` file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ModelFileError: the archive is broken; the message names the file,
            the entry and the problem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file. Received: model={path!r}")

    def fail(problem):
        return ModelFileError(f"Cannot load {path!r}: {problem}.")

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise fail(f"it is not a complete .keras (zip) archive ({e})") from e
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        if _CONFIG not in infos:
            raise fail(f"the archive has no {_CONFIG}; entries: {sorted(infos)[:8]}")
        for info in infos.values():
            bound = MAX_COMPRESSION_RATIO * info.compress_size + COMPRESSION_SLACK_BYTES
            if info.file_size > bound:
                raise fail(
                    f"entry {info.filename!r} expands from {info.compress_size} "
                    f"to {info.file_size} bytes (more than MAX_COMPRESSION_RATIO="
                    f"{MAX_COMPRESSION_RATIO} times; a zip bomb?)"
                )
        try:
            damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise fail(f"the archive is truncated or corrupt ({e})") from e
        if damaged is not None:
            raise fail(f"entry {damaged!r} is damaged (CRC mismatch)")
        _check_json(archive, infos[_CONFIG], fail, config=True)
        if _METADATA in infos:
            _check_json(archive, infos[_METADATA], fail, config=False)
        if _WEIGHTS_H5 in infos:
            _check_h5(archive, infos[_WEIGHTS_H5], fail)


def _check_json(archive, info, fail, config):
    if info.file_size > MAX_CONFIG_BYTES:
        raise fail(
            f"{info.filename} has {info.file_size} bytes, more than "
            f"MAX_CONFIG_BYTES={MAX_CONFIG_BYTES}"
        )
    with archive.open(info) as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise fail(f"{info.filename} is not valid JSON ({e})") from e
    if config and not (
        isinstance(value, dict)
        and isinstance(value.get("class_name"), str)
        and isinstance(value.get("config"), dict)
    ):
        raise fail(
            f"{info.filename} does not describe a Keras object (a JSON object "
            "with 'class_name' and 'config')"
        )


def _check_h5(archive, info, fail):
    import h5py

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            obj.id.get_storage_size()  # reads the dataset's layout message

    try:
        with archive.open(info) as raw:
            if info.compress_type != zipfile.ZIP_STORED:
                # Seeking in a deflated entry re-decompresses it from the
                # start: read it once (its size is bounded by the ratio check).
                raw = io.BytesIO(raw.read(info.file_size))
            with h5py.File(raw, "r") as h5:
                h5.visititems(visit)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise fail(f"{info.filename} is truncated or corrupt ({e})") from e


def load_model(path, custom_objects=None, compile=True, safe_mode=True):
    """``keras.models.load_model`` after `validate_model_file`.

    Files that are not ``.keras`` archives by name (``.h5``) go to Keras
    unchecked. The sb_keras classes are registered (this module is part of
    the package), so no ``custom_objects`` are needed for them.

    Args:
        path: the model file.
        custom_objects: passed to Keras.
        compile: passed to Keras.
        safe_mode: passed to Keras.

    Returns:
        The model.

    Raises:
        FileNotFoundError: no file at ``path``.
        ModelFileError: the file is broken, or Keras could not rebuild the
            model from it (the message names the file and Keras's error).
    """
    import keras

    path = os.fspath(path)
    if path.endswith(".keras"):
        validate_model_file(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"No model file. Received: model={path!r}")
    try:
        return keras.models.load_model(
            path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ModelFileError(
            f"Cannot load {path!r}: Keras could not rebuild the model "
            f"({type(e).__name__}: {e})"
        ) from e
