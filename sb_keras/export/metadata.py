"""TFLite Metadata for exported image classifiers (labels, normalization).

Android's and MediaPipe's image classifiers read a model's TFLite Metadata:
the input's normalization, the label file, a name and a description. The
maintained writer is MediaPipe's
(``mediapipe.tasks.python.metadata.metadata_writers``); ``mediapipe`` pins
numpy and protobuf versions that conflict with TensorFlow's, so it cannot be
a dependency of sb_keras. The writer runs instead in a Python interpreter
that has ``mediapipe==0.10.21`` (its own virtual environment), given by
``python=`` / ``sb-keras export --metadata-python`` or the
``SB_KERAS_METADATA_PYTHON`` environment variable::

    python -m venv mp && mp/bin/pip install mediapipe==0.10.21
    sb-keras export model.keras model.tflite --metadata-python mp/bin/python

sb_keras models take raw ``[0, 255]`` RGB pixels and normalize inside the
graph, so the metadata states mean 0 and std 1 for a float input (the
client passes the pixel values unchanged).
"""

import json
import os
import subprocess
import tempfile

from sb_keras.export import tflite

ENV_VAR = "SB_KERAS_METADATA_PYTHON"
MEDIAPIPE_PIN = "mediapipe==0.10.21"
INSTALL_HINT = (
    f"Writing TFLite Metadata needs a Python with {MEDIAPIPE_PIN} (its own "
    f"virtual environment): python -m venv mp && mp/bin/pip install "
    f"{MEDIAPIPE_PIN}; then pass --metadata-python mp/bin/python (or set "
    f"{ENV_VAR})."
)

CIFAR10_LABELS = (
    "airplane automobile bird cat deer dog frog horse ship truck"
).split()
CIFAR100_LABELS = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl "
    "boy bridge bus butterfly camel can castle caterpillar cattle chair "
    "chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter "
    "palm_tree pear pickup_truck pine_tree plain plate poppy porcupine "
    "possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
DATASET_LABELS = {"cifar10": CIFAR10_LABELS, "cifar100": CIFAR100_LABELS}

_WRITER = """
import json, sys
from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer
a = json.load(open(sys.argv[1]))
with open(a["model"], "rb") as f:
    buffer = f.read()
writer = metadata_writer.MetadataWriter.create(buffer)
writer.add_general_info(a["name"], a["description"])
writer.add_image_input(norm_mean=a["mean"], norm_std=a["std"])  # RGB
writer.add_classification_output(metadata_writer.Labels().add(a["labels"]))
content, _ = writer.populate()
with open(a["out"], "wb") as f:
    f.write(content)
"""


def writer_python(python=None):
    """The interpreter that runs MediaPipe's writer, or None if none is set."""
    python = python or os.environ.get(ENV_VAR)
    if not python:
        return None
    if not os.path.isfile(python):
        raise ValueError(
            f"The metadata Python does not exist. {INSTALL_HINT} "
            f"Received: metadata_python={python!r}"
        )
    return python


def labels_for(dataset=None, labels_file=None, classes=None):
    """Class names from a file (one per line) or a known dataset."""
    if labels_file is not None:
        with open(labels_file) as f:
            names = [line.strip() for line in f if line.strip()]
    elif dataset in DATASET_LABELS:
        names = list(DATASET_LABELS[dataset])
    else:
        names = [str(i) for i in range(int(classes or 0))]
    if classes is not None and len(names) != classes:
        raise ValueError(
            f"The model has {classes} classes but the label list has "
            f"{len(names)} names. Received: labels={labels_file or dataset!r}"
        )
    return names


def add_metadata(
    path,
    labels,
    name="sb_keras image classifier",
    description="",
    python=None,
):
    """Adds TFLite Metadata to the ``.tflite`` file at ``path`` in place.

    Args:
        path: an exported classifier (input ``[1, H, W, 3]`` raw pixels).
        labels: the class names, in output order.
        name, description: general info of the metadata (the sb_keras
            version is appended to the description).
        python: the interpreter with MediaPipe (see the module docstring).

    Raises:
        ValueError: no interpreter with MediaPipe is set (with the install
            hint), or the writer failed.
    """
    from sb_keras.version import __version__

    python = writer_python(python)
    if python is None:
        raise ValueError(f"{INSTALL_HINT} Received: metadata_python=None")
    path = tflite.check_output_path(path)
    args = {
        "model": path,
        "name": name,
        "description": f"{description} (sb_keras {__version__})".strip(),
        "mean": [0.0],  # the graph normalizes raw [0, 255] pixels itself
        "std": [1.0],
        "labels": list(labels),
    }
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        args["out"] = os.path.join(tmp, "out.tflite")
        spec = os.path.join(tmp, "args.json")
        with open(spec, "w") as f:
            json.dump(args, f)
        done = subprocess.run(
            [python, "-c", _WRITER, spec], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise ValueError(
                "MediaPipe's metadata writer failed: "
                f"{done.stderr.strip().splitlines()[-1:]} {INSTALL_HINT} "
                f"Received: metadata_python={python!r}"
            )
        with open(args["out"], "rb") as f:
            content = f.read()
    tflite.write_atomic(path, content)
    return content
