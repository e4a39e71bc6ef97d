"""Presets: pretrained models as directories in keras-hub's layout.

A preset directory holds ``config.json`` (the serialized model, as
``keras.saving.serialize_keras_object`` writes it), ``model.weights.h5``
and ``metadata.json`` (versions, parameter count, source, license note,
measured accuracy, and the sha256 of the two other files, written last so
that an interrupted save is detected).

The built-in presets are the six CIFAR-10 checkpoints the authors of
*Learning Deeply Shared Filter Bases for Efficient ConvNets* released in
their repository (`ssregibility/Net_RL2` at the commit that holds them).
The first `from_preset` of such a name downloads the PyTorch file with
`keras.utils.get_file`, verifies its sha256, converts it once with
`sb_keras.load_authors_checkpoint` and caches the preset directory under
``$KERAS_HOME/sb_keras/presets/<name>`` (``~/.keras`` without
``KERAS_HOME``); later calls, offline included, read the cache.

Example:

>>> import sb_keras
>>> "resnet56_s16u1_double_cifar10" in sb_keras.list_presets()
True
>>> model = sb_keras.from_preset("resnet56_s16u1_cifar10")  # doctest: +SKIP
>>> sb_keras.save_to_preset(model, "my_preset")  # doctest: +SKIP
"""

import datetime
import hashlib
import json
import os
import warnings

AUTHORS_REPOSITORY = "ssregibility/Net_RL2"
AUTHORS_COMMIT = "f044af38186dd6aceb4906d510d6342b6771b90c"
ORIGIN = f"https://github.com/{AUTHORS_REPOSITORY}/raw/{AUTHORS_COMMIT}/pretrained/"
LICENSE_NOTE = (
    "Weights trained and released by Woochul Kang and Daeyeon Kim in "
    f"github.com/{AUTHORS_REPOSITORY} (commit {AUTHORS_COMMIT}), which has no "
    "license file at that commit; sb_keras does not redistribute them but "
    "downloads them from there. Cite arXiv 2006.05066 and check with the "
    "authors before any use beyond research."
)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
_CHECKPOINT_SUBDIR = os.path.join("sb_keras", "net_rl2")
_PRESET_SUBDIR = os.path.join("sb_keras", "presets")
_EXACT_TOP1 = (
    "top-1 of the authors' PyTorch model code on the first 1000 CIFAR-10 "
    "test images with their exact pixels"
)


def _preset(file, sha256, depth, s, sharing, error, top1=None, note=""):
    name = f"resnet{depth}_s{s}u1{'_double' if sharing == 'double' else ''}"
    star = "*" if sharing == "double" else ""
    return f"{name}_cifar10", {
        "file": file,
        "sha256": sha256,
        "class_name": "ResNet",
        "architecture": {
            "depth": depth,
            "share": True,
            "shared_rank": s,
            "unique_rank": 1,
            "sharing": sharing,
        },
        "description": f"CIFAR-10 ResNet-{depth}-S{s}U1{star} ({sharing} sharing), "
        f"the authors' checkpoint (stated test error {error} %){note}",
        "stated_test_error": error,
        "top1_exact_test_1000": top1,
    }


_NOTE_34 = (
    "; the file name says ResNet34, the authors' README table and CIFAR-10 "
    "code say ResNet-32, and the converter checks the depth it reads"
)
# sha256 None: the references give none; the hash computed at the first
# download is recorded beside the file and checked from then on.
PRESETS = dict(
    [
        _preset(
            "CIFAR10_ResNet56_S16U1_7.46err.pth.pth",
            "0b42e649f1a52de78e04f20eea89f6faa55affcd3686d79399c349265d894f1e",
            56,
            16,
            "single",
            7.46,
            {"value": 0.925, "measured": _EXACT_TOP1},
        ),
        _preset(
            "CIFAR10_ResNet32_Double_S16U1_6.93err.pth",
            "2b31e2705d2589103740def51f4692aa9cd92545c15cd8d51b3e0ed09695dbee",
            32,
            16,
            "double",
            6.93,
            {"value": 0.929, "measured": _EXACT_TOP1},
        ),
        _preset(
            "CIFAR10_ResNet56_Double_S16U1_6.30err.pth", None, 56, 16, "double", 6.30
        ),
        _preset("CIFAR10_ResNet56_S8U1_7.52err.pth.pth", None, 56, 8, "single", 7.52),
        _preset(
            "CIFAR10_ResNet34_S16U1_7.43err.pth",
            None,
            32,
            16,
            "single",
            7.43,
            note=_NOTE_34,
        ),
        _preset(
            "CIFAR10_ResNet34_S8U1_8.08err.pth",
            None,
            32,
            8,
            "single",
            8.08,
            note=_NOTE_34,
        ),
    ]
)


def list_presets(cls=None):
    """Names of the built-in presets (of models of class ``cls``, if given).

    Example:

    >>> import sb_keras
    >>> len(sb_keras.list_presets())
    6
    """
    from sb_keras import models

    names = sorted(PRESETS)
    if cls is None:
        return names
    return [
        n for n in names if issubclass(getattr(models, PRESETS[n]["class_name"]), cls)
    ]


def preset_info(name):
    """The description, source file and architecture of a built-in preset."""
    _check_name(name)
    return {"name": name, **PRESETS[name]}


def cache_root(cache_dir=None):
    """Where presets are cached: ``cache_dir``, ``$KERAS_HOME`` or ``~/.keras``."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )


def sha256_of(path):
    """The sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def from_preset(preset, load_weights=True, cache_dir=None, expected=None):
    """A model from a built-in preset name or a preset directory.

    Args:
        preset: a name of `list_presets` or the path of a directory written
            by `save_to_preset`.
        load_weights: load the weights (else the architecture only).
        cache_dir: the cache root (default ``$KERAS_HOME`` or ``~/.keras``).
        expected: a model class the preset must hold (``ResNet.from_preset``).

    Returns:
        The Keras model, weights loaded.

    Raises:
        ValueError: an unknown name, a file whose sha256 does not match (a
            corrupt download or cache), a preset of another class.
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise ValueError(
            "`preset` must be a preset name of sb_keras.list_presets() or a "
            f"directory. Received: preset={preset!r}"
        )
    path = os.fspath(preset)
    if os.path.isdir(path):
        return load_preset_dir(path, load_weights, expected)
    _check_name(path)
    folder = os.path.join(cache_root(cache_dir), _PRESET_SUBDIR, path)
    if not _is_complete(folder):
        _convert_authors(path, folder, cache_dir)
    return load_preset_dir(folder, load_weights, expected)


def _check_name(name):
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(
            "Unknown preset and no such directory. Built-in presets: "
            f"{', '.join(sorted(PRESETS))}. Received: preset={name!r}"
        )


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Cannot read the preset file ({e}). Received: path={path!r}"
        ) from None


def _check_files(folder, metadata):
    for file, expected in metadata.get("files", {}).items():
        path = os.path.join(folder, file)
        actual = sha256_of(path) if os.path.isfile(path) else None
        if actual != expected:
            raise ValueError(
                f"The preset file does not match the sha256 recorded in "
                f"{METADATA_FILE} ({expected}): it is corrupt, truncated or was "
                f"changed. Save or convert the preset again. Received: "
                f"path={path!r} with sha256={actual}"
            )


def _is_complete(folder):
    meta = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(meta):
        return False
    try:
        _check_files(folder, _read_json(meta))
    except ValueError as e:
        warnings.warn(f"Converting the preset again: {e}", stacklevel=3)
        return False
    return True


def load_preset_dir(folder, load_weights=True, expected=None):
    """Loads a preset directory written by `save_to_preset`."""
    import keras

    import sb_keras  # noqa: F401  (registers the classes for deserialization)

    meta_path = os.path.join(folder, METADATA_FILE)
    if os.path.isfile(meta_path):
        _check_files(folder, _read_json(meta_path))
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"A preset directory needs {CONFIG_FILE} and {WEIGHTS_FILE}. "
            f"Received: preset={folder!r}"
        )
    config = _read_json(config_path)
    if expected is not None:
        found = config.get("class_name") if isinstance(config, dict) else None
        if found != expected.__name__ and not _is_subclass(found, expected):
            raise ValueError(
                f"The preset holds a {found}, not a {expected.__name__}; call "
                f"sb_keras.from_preset or {found}.from_preset. Received: "
                f"preset={folder!r}"
            )
    model = keras.saving.deserialize_keras_object(config)
    if load_weights:
        model.load_weights(os.path.join(folder, WEIGHTS_FILE))
    return model


def _is_subclass(class_name, expected):
    from sb_keras import models

    cls = getattr(models, str(class_name), None)
    return isinstance(cls, type) and issubclass(cls, expected)


def _write_atomic(path, write):
    """Writes ``path`` via ``write(tmp)`` on a temporary file in its folder."""
    from sb_keras import io_utils

    with io_utils.atomic_path(path) as tmp:
        write(tmp)


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _write_atomic(path, write)


def save_to_preset(model, preset_dir, metadata=None):
    """Writes ``model`` as a preset directory (keras-hub's layout).

    Each file is written atomically; ``metadata.json`` comes last and
    records the sha256 of the other two, so `from_preset` refuses a preset
    whose save was interrupted or whose files changed.

    Args:
        model: a Keras model (an sb_keras model or any serializable one).
        preset_dir: the directory (created if needed).
        metadata: extra JSON-serializable entries for ``metadata.json``
            (e.g. the source of the weights and a measured accuracy).

    Returns:
        The directory.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=8)
    >>> sb_keras.save_to_preset(model, "resnet8_preset")  # doctest: +SKIP
    >>> sb_keras.from_preset("resnet8_preset")  # doctest: +SKIP
    """
    import keras

    from sb_keras.counting import count_params
    from sb_keras.version import __version__

    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a Keras model. Received: model={type(model).__name__}"
        )
    folder = os.fspath(preset_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(
            f"The preset path exists and is not a directory. Received: "
            f"preset_dir={folder!r}"
        )
    os.makedirs(folder, exist_ok=True)
    config = keras.saving.serialize_keras_object(model)
    _write_json(os.path.join(folder, CONFIG_FILE), config)
    _write_atomic(os.path.join(folder, WEIGHTS_FILE), model.save_weights)
    meta = {
        "class_name": config.get("class_name"),
        "keras_version": keras.__version__,
        "sb_keras_version": __version__,
        "parameter_count": count_params(model),
        "keras_parameter_count": int(model.count_params()),
        "date_saved": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **(metadata or {}),
        "files": {
            f: sha256_of(os.path.join(folder, f)) for f in (CONFIG_FILE, WEIGHTS_FILE)
        },
    }
    _write_json(os.path.join(folder, METADATA_FILE), meta)
    return folder


def _checkpoint(name, cache_dir):
    """The verified local copy of a preset's checkpoint (downloaded once)."""
    import keras

    entry = PRESETS[name]
    folder = os.path.join(cache_root(cache_dir), _CHECKPOINT_SUBDIR)
    path = os.path.join(folder, entry["file"])
    recorded = path + ".sha256"
    expected, origin = entry["sha256"], "published"
    if expected is None and os.path.isfile(recorded):
        with open(recorded, encoding="ascii") as f:
            expected, origin = f.read().strip(), "recorded at the first download"
    if os.path.isfile(path) and expected is not None:
        actual = sha256_of(path)
        if actual != expected:
            raise ValueError(
                f"The cached checkpoint of preset {name!r} does not match its "
                f"sha256 ({origin}: {expected}); it is corrupt or not the "
                f"authors' file. Delete it to download it again. Received: "
                f"path={path!r} with sha256={actual}"
            )
    path = keras.utils.get_file(
        fname=entry["file"],
        origin=ORIGIN + entry["file"],
        file_hash=expected,
        hash_algorithm="sha256",
        cache_subdir=_CHECKPOINT_SUBDIR,
        cache_dir=cache_root(cache_dir),
    )
    actual = sha256_of(path)
    if expected is None:
        expected, origin = actual, "recorded at the first download"
        _write_atomic(recorded, lambda tmp: _write_text(tmp, actual + "\n"))
        warnings.warn(
            f"No published sha256 for {entry['file']}; recorded {actual} at "
            "this first download and checked from now on.",
            stacklevel=3,
        )
    return path, {"sha256": actual, "sha256_origin": origin}


def _write_text(path, text):
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _convert_authors(name, folder, cache_dir):
    from sb_keras.checkpoints import load_authors_checkpoint

    entry = PRESETS[name]
    path, digest = _checkpoint(name, cache_dir)
    model = load_authors_checkpoint(path)
    found = {k: getattr(model, k) for k in entry["architecture"]}
    if found != entry["architecture"]:
        raise ValueError(
            f"The checkpoint of preset {name!r} holds another architecture than "
            f"the preset names ({entry['architecture']}). Received: {found}"
        )
    save_to_preset(
        model,
        folder,
        metadata={
            "preset": name,
            "description": entry["description"],
            "source": {
                "repository": AUTHORS_REPOSITORY,
                "commit": AUTHORS_COMMIT,
                "file": entry["file"],
                "url": ORIGIN + entry["file"],
                **digest,
            },
            "license": LICENSE_NOTE,
            "stated_test_error": entry["stated_test_error"],
            "top1_exact_test_1000": entry["top1_exact_test_1000"],
        },
    )
