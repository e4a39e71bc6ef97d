"""Post-training compression of a small plain MobileNetV2 (no fine-tune).

A plain CIFAR-variant `sb_keras.MobileNetV2` (10 classes, width ``alpha``)
is taken at random initialization or after a brief training on CIFAR-10
(``--epochs``, Adam, no augmentation), then compressed into the shared
model (`sb_keras.compress`: single or double sharing, whitened or plain),
optionally fine-tuned (``--finetune-epochs``, Adam 3e-4, the same images;
the plain control alike).
Prints the kernel relative errors per group (plain metric), top-1 on the
test images before and after (no fine-tune), the top-1 agreement with the
plain model and the seconds each compression took.

Usage (from the repo root, the data beside it in ../shared):

    python bench/compress_mobilenet_v2.py [--alpha 0.35] [--epochs 0]
        [--train-count 10000] [--calibration 256] [--test-count 1000]
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared")

import sb_keras  # noqa: E402
from sb_keras import data  # noqa: E402


def _predict(model, x):
    return model.predict(x, batch_size=250, verbose=0).argmax(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--train-count", type=int, default=10000)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--test-count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="then fine-tune each model (and the plain control) this long",
    )
    args = parser.parse_args(argv)

    import keras

    keras.utils.set_random_seed(args.seed)
    folder = os.path.join(SHARED, "datasets", "cifar10")
    x_train, y_train = data.load_arrays("cifar10", "train", folder)
    x_test, y_test = data.load_arrays("cifar10", "test", folder)
    x_train = x_train[: args.train_count].astype("float32")
    y_train = y_train[: args.train_count]  # the train split is shuffled
    # The test split is sorted by class: a seeded random subset.
    pick = np.random.RandomState(args.seed).permutation(len(y_test))[: args.test_count]
    x_test, y_test = x_test[pick].astype("float32"), y_test[pick]
    plain = sb_keras.MobileNetV2(variant="cifar", alpha=args.alpha, num_classes=10)

    def fit(model, epochs, lr):
        model.compile(
            keras.optimizers.Adam(lr),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)

    if args.epochs:
        start = time.time()
        fit(plain, args.epochs, 1e-3)
        print(f"trained {args.epochs} epochs in {time.time() - start:.0f} s")
    calibration = x_train[: args.calibration]
    reference = _predict(plain, x_test)
    print(
        f"plain: {sb_keras.count_params(plain):,} parameters, "
        f"top-1 {np.mean(reference == y_test):.1%} on {len(y_test)} test images"
    )
    print(
        "| sharing | method | params | expand rel. error (mean / max) "
        "| project rel. error (mean / max) | expand objective: aligned / own "
        "orders (mean) | top-1 | agreement | s |"
        + (" top-1 fine-tuned |" if args.finetune_epochs else "")
    )
    print(
        "|---|---|---:|---|---|---|---:|---:|---:|"
        + "---:|" * (args.finetune_epochs > 0)
    )
    for sharing in ("single", "double"):
        for method in ("whitened", "plain"):
            start = time.time()
            shared, report = sb_keras.compress(
                plain,
                sharing=sharing,
                method=method,
                calibration_data=calibration if method == "whitened" else None,
            )
            seconds = time.time() - start
            cells = []
            for kind in ("expand", "project"):
                errors = [
                    g["relative_error"] for g in report["groups"] if g["group"] == kind
                ]
                cells.append(
                    f"{np.mean(errors):.3f} / {np.max(errors):.3f}" if errors else "-"
                )
            expand = [g for g in report["groups"] if g["group"] == "expand"]
            aligned = np.mean([g["objective_error"] for g in expand])
            own = np.mean([g["initial_objective_error"] for g in expand])
            predicted = _predict(shared, x_test)
            tuned = ""
            if args.finetune_epochs:
                fit(shared, args.finetune_epochs, 3e-4)
                tuned = f" {np.mean(_predict(shared, x_test) == y_test):.1%} |"
            print(
                f"| {sharing} | {method} | {report['params_after']:,} | "
                f"{cells[0]} | {cells[1]} | {aligned:.3f} / {own:.3f} | "
                f"{np.mean(predicted == y_test):.1%} | "
                f"{np.mean(predicted == reference):.1%} | {seconds:.0f} |{tuned}"
            )
    if args.finetune_epochs:
        control = sb_keras.MobileNetV2(**plain.get_config())
        control.set_weights(plain.get_weights())
        fit(control, args.finetune_epochs, 3e-4)
        top1 = np.mean(_predict(control, x_test) == y_test)
        print(f"plain control fine-tuned alike: top-1 {top1:.1%}")


if __name__ == "__main__":
    main()
