"""``sb-keras adapt``: few-shot adaptation of an ACDC model's atoms.

Picks ``--shots`` training images of each of ``--classes`` (seeded), trains
the atoms (and ``--batchnorm``) with a new head for those classes
(`sb_keras.adaptation.adapt`), writes the model atomically and prints the
accuracy on the test images of those classes as one JSON line.
"""

import os


def parse_classes(text):
    """``"5,6,7"`` -> ``[5, 6, 7]``; a ValueError naming ``--classes``."""
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        classes = []
    if len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0:
        raise ValueError(
            "`--classes` must list at least two distinct non-negative class "
            f"ids, comma-separated. Received: --classes={text!r}"
        )
    return classes


def support_set(x, y, classes, shots, seed=0):
    """``shots`` random images per class; labels are indices into ``classes``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = []
    for c in classes:
        where = np.flatnonzero(y == c)
        if len(where) < shots:
            raise ValueError(
                f"Class {c} has {len(where)} training images, fewer than the "
                f"shots asked. Received: shots={shots}"
            )
        picks.append(rng.choice(where, shots, replace=False))
    index = np.concatenate(picks)
    return x[index], np.repeat(np.arange(len(classes)), shots)


def episode_test_set(x, y, classes, limit=None, seed=0):
    """The test images of ``classes`` with labels relabelled ``0..n-1``.

    With ``limit``, a seeded random subset of that many images (the
    CIFAR-10 files are sorted by class, so a prefix would hold one class).
    """
    import numpy as np

    keep = np.flatnonzero(np.isin(y, classes))
    if limit is not None and limit < len(keep):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(keep, limit, replace=False))
    lookup = {c: i for i, c in enumerate(classes)}
    return x[keep], np.array([lookup[int(c)] for c in y[keep]], dtype="int64")


def save_atomic(model, path):
    """Saves a `.keras` file via a temporary file in the same folder."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=folder)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(args):
    import json

    import numpy as np

    from sb_keras import counting
    from sb_keras import data
    from sb_keras.adaptation import adapt
    from sb_keras.saving import load_model

    classes = parse_classes(args.classes)
    if args.shots < 1:
        raise ValueError(f"`--shots` must be >= 1. Received: --shots={args.shots}")
    if not args.output.endswith(".keras"):
        raise ValueError(
            f"`--output` must end in '.keras'. Received: --output={args.output!r}"
        )
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ValueError(
            f"The output folder does not exist. Received: --output={args.output!r}"
        )
    model = load_model(args.model, compile=False)
    x, y = data.load_arrays(args.dataset, "train", data_dir=args.data_dir)
    missing = sorted(set(classes) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(
            f"Class ids {missing} are not in the {args.dataset} training set. "
            f"Received: --classes={args.classes!r}"
        )
    xs, ys = support_set(x, y, classes, args.shots, seed=args.seed)
    adapted, history = adapt(
        model,
        xs,
        ys,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batchnorm=args.batchnorm,
        batch_size=args.batch_size,
        num_classes=len(classes),
        seed=args.seed,
    )
    xt, yt = data.load_arrays(args.dataset, "test", data_dir=args.data_dir)
    xt, yt = episode_test_set(xt, yt, classes, limit=args.test_limit)
    logits = adapted.predict(xt, batch_size=200, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == yt))
    save_atomic(adapted, args.output)
    trainable = sum(int(np.prod(v.shape)) for v in adapted.trainable_weights)
    print(
        json.dumps(
            {
                "output": args.output,
                "classes": classes,
                "shots": args.shots,
                "steps": args.steps,
                "final_loss": float(history.history["loss"][-1]),
                "test_accuracy": accuracy,
                "test_images": int(len(yt)),
                "trainable_params": trainable,
                "total_params": int(counting.count_params(adapted)),
            }
        )
    )


def add_parser(sub):
    """Adds the ``adapt`` subcommand to the ``sb-keras`` parser."""
    p = sub.add_parser(
        "adapt",
        help="adapt an ACDC model's atoms to new classes from k images each",
    )
    p.add_argument("model", help="a .keras model with ACDC layers")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None, help="folder with train/test .npz")
    p.add_argument("--classes", required=True, help="class ids, e.g. 5,6,7,8,9")
    p.add_argument("--shots", type=int, default=5, help="images per class")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--batchnorm", action="store_true", help="also train BN")
    p.add_argument("--seed", type=int, default=0, help="picks the support set")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--output", required=True, help="the adapted .keras file")
    p.set_defaults(func=run)
