"""Few-shot adaptation on CIFAR-10: ACDC atoms vs a plain ResNet.

Pretrains a plain CIFAR ResNet and an ACDC ResNet (network-shared alpha) of
the same depth on classes 0-4 of the real CIFAR-10, then adapts each to
classes 5-9 from k images per class, every method with a new 5-way head:

* ``plain-full``: the plain model, every weight trained;
* ``plain-head``: the plain model, only the new classifier;
* ``acdc-atoms``: ACDC, only the atoms (and the new classifier);
* ``acdc-atoms-bn``: ACDC, atoms + BatchNorm (and the new classifier).

Each runs at a few SGD learning rates; the test accuracy on the 5000 test
images of classes 5-9 is read after each step budget (adaptation speed),
over several seeds, each seed a different support set (robustness). The
table gives mean +- std over seeds at the best learning rate of each method
(picked by the mean at the last budget, on the test set: an optimistic
choice made alike for every method) and the trainable parameter counts.

    PYTHONPATH=. python bench/acdc_fewshot.py --data-dir ../shared/datasets/cifar10
    PYTHONPATH=. python bench/acdc_fewshot.py --budget-small   # smoke run
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sb_keras  # noqa: E402
from sb_keras import data  # noqa: E402
from sb_keras import io_utils  # noqa: E402
from sb_keras.adaptation import adapt  # noqa: E402
from sb_keras.adaptation import replace_head  # noqa: E402
from sb_keras.cli_adapt import episode_test_set  # noqa: E402
from sb_keras.cli_adapt import support_set  # noqa: E402

BASE, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
METHODS = ("plain-full", "plain-head", "acdc-atoms", "acdc-atoms-bn")
FULL = dict(
    depth=20,
    pretrain_epochs=10,
    pretrain_limit=None,
    shots=(1, 5, 10),
    seeds=5,
    lrs=(0.01, 0.03, 0.1),
    budgets=(10, 30, 100),
    test_limit=None,
)
SMALL = dict(
    depth=8,
    pretrain_epochs=1,
    pretrain_limit=2000,
    shots=(1, 5),
    seeds=2,
    lrs=(0.05,),
    budgets=(5, 10),
    test_limit=500,
)


def pretrain(model, x, y, epochs, seed):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed)
        .batch(128)
        .map(lambda a, b: (tf.image.random_flip_left_right(a, seed=seed), b))
        .prefetch(2)
    )
    model.fit(ds, epochs=epochs, verbose=2)
    return model


def fresh_copy(model):
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def run_method(method, models, xs, ys, xt, yt, lr, budgets, seed):
    """Accuracy after each step budget (cumulative) of one adaptation run."""
    plain = method.startswith("plain")
    model = fresh_copy(models["plain" if plain else "acdc"])
    n = len(NEW)
    if method == "plain-full":
        model = replace_head(model, n, seed=seed)
        model.compile(
            optimizer=keras.optimizers.SGD(lr),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        ds = (
            tf.data.Dataset.from_tensor_slices((xs, ys))
            .shuffle(len(xs), seed=seed, reshuffle_each_iteration=True)
            .repeat()
            .batch(min(len(xs), 128))
        )
        fit = lambda steps: model.fit(ds, steps_per_epoch=steps, verbose=0)  # noqa: E731
        fit(budgets[0])
    else:
        model, _ = adapt(
            model,
            xs,
            ys,
            steps=budgets[0],
            learning_rate=lr,
            num_classes=n,
            atoms=not plain,
            batchnorm=method == "acdc-atoms-bn",
            seed=seed,
        )
        ds = (
            tf.data.Dataset.from_tensor_slices((xs, ys))
            .shuffle(len(xs), seed=seed + 1, reshuffle_each_iteration=True)
            .repeat()
            .batch(min(len(xs), 128))
        )
        fit = lambda steps: model.fit(ds, steps_per_epoch=steps, verbose=0)  # noqa: E731
    accuracies, done = [], budgets[0]
    for budget in budgets:
        if budget > done:
            fit(budget - done)
            done = budget
        logits = model.predict(xt, batch_size=250, verbose=0)
        accuracies.append(float(np.mean(np.argmax(logits, -1) == yt)))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    return accuracies, trainable


def table(results, cfg):
    lines = [
        "| method | trainable params | k | lr | "
        + " | ".join(f"acc @ {b} steps" for b in cfg["budgets"])
        + " |"
    ]
    lines.append("|" + "---|" * (4 + len(cfg["budgets"])))
    for method in METHODS:
        for k in cfg["shots"]:
            rows = [r for r in results if r["method"] == method and r["k"] == k]
            by_lr = {}
            for r in rows:
                by_lr.setdefault(r["lr"], []).append(r["acc"])
            lr = max(by_lr, key=lambda v: np.mean([a[-1] for a in by_lr[v]]))
            accs = np.array(by_lr[lr]) * 100
            cells = [f"{m:.1f} +- {s:.1f}" for m, s in zip(accs.mean(0), accs.std(0))]
            params = rows[0]["trainable"]
            lines.append(
                f"| {method} | {params} | {k} | {lr} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=os.path.join("..", "shared", "datasets", "cifar10")
    )
    parser.add_argument("--budget-small", action="store_true", help="smoke run")
    parser.add_argument("--output", default=None, help="JSON results file")
    args = parser.parse_args()
    cfg = SMALL if args.budget_small else FULL
    start = time.time()
    x, y = data.load_arrays("cifar10", "train", data_dir=args.data_dir)
    # The CIFAR-10 files are sorted by class: subsets are random, not prefixes.
    xb, yb = episode_test_set(x, y, BASE, limit=cfg["pretrain_limit"])
    xt, yt = data.load_arrays("cifar10", "test", data_dir=args.data_dir)
    xt, yt = episode_test_set(xt, yt, NEW, limit=cfg["test_limit"])
    keras.utils.set_random_seed(0)
    models = {
        "plain": sb_keras.ACDCResNet(depth=cfg["depth"], sharing=None, num_classes=5),
        "acdc": sb_keras.ACDCResNet(
            depth=cfg["depth"], sharing="network", num_classes=5
        ),
    }
    xv, yv = data.load_arrays("cifar10", "test", data_dir=args.data_dir)
    xv, yv = episode_test_set(xv, yv, BASE, limit=cfg["test_limit"])
    pretrained = {}
    for name, model in models.items():
        print(f"pretraining {name} on classes {BASE} ({len(xb)} images)", flush=True)
        t0 = time.time()
        pretrain(model, xb, yb, cfg["pretrain_epochs"], seed=0)
        logits = model.predict(xv, batch_size=250, verbose=0)
        pretrained[name] = dict(
            base_test_accuracy=float(np.mean(np.argmax(logits, -1) == yv)),
            params=int(model.count_params()),
            seconds=round(time.time() - t0),
        )
        print(f"pretrained {name}: {json.dumps(pretrained[name])}", flush=True)
    results = []
    for k in cfg["shots"]:
        for seed in range(cfg["seeds"]):
            xs, ys = support_set(x, y, NEW, k, seed=seed)
            for method in METHODS:
                for lr in cfg["lrs"]:
                    acc, trainable = run_method(
                        method, models, xs, ys, xt, yt, lr, cfg["budgets"], seed
                    )
                    results.append(
                        dict(
                            method=method,
                            k=k,
                            seed=seed,
                            lr=lr,
                            acc=acc,
                            trainable=trainable,
                        )
                    )
                    print(json.dumps(results[-1]), flush=True)
    print(f"\nbudget: {'small (smoke)' if args.budget_small else 'full'} {cfg}")
    print(f"wall time: {time.time() - start:.0f} s")
    for name, info in pretrained.items():
        print(
            f"pretrained {name}: {info['params']} params, "
            f"{100 * info['base_test_accuracy']:.1f} % on the test images of "
            f"classes {BASE} ({info['seconds']} s)"
        )
    print()
    print(table(results, cfg))
    if args.output:
        payload = {"config": cfg, "pretrained": pretrained, "results": results}
        io_utils.write_bytes(args.output, json.dumps(payload, indent=1).encode())


if __name__ == "__main__":
    main()
