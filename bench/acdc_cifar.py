"""ResNet-18-ACDC (network and stage scopes) vs plain ResNet-18 on CIFAR-10.

Trains each model from scratch with the same budget (same images, steps,
optimizer and seed) on the real CIFAR-10 arrays on this CPU, then prints one
Markdown table: test accuracy, parameters (and ratio to plain), MACs per
image, training and inference throughput. The models are the CIFAR-stem
ResNet-18 (3x3 stem, projection shortcuts, 10 classes).

    PYTHONPATH=. python bench/acdc_cifar.py --steps 60 --test-subset 2000

A short budget on a shared 2-core CPU measures relative speed and the start
of learning, not final accuracy (the paper trains for hundreds of epochs).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sb_keras  # noqa: E402
from sb_keras import data  # noqa: E402

DEFAULT_DATA = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets"
)
VARIANTS = {"plain": None, "network": "network", "stage": "stage", "layer": "layer"}


class _Timer(keras.callbacks.Callback):
    """Wall time of the training batches after ``skip`` warm-up batches."""

    def __init__(self, skip=2):
        super().__init__()
        self.skip, self.seen, self.start, self.end = skip, 0, None, None

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def timed_batches(self):
        return self.seen - self.skip


def run(variant, args, train, test):
    keras.utils.set_random_seed(args.seed)
    model = sb_keras.ACDCResNet(
        depth=18,
        stem="cifar",
        num_classes=10,
        sharing=VARIANTS[variant],
        num_atoms=args.num_atoms,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(args.lr, momentum=0.9, weight_decay=5e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = train
    ds = data.make_dataset(x, y, args.batch_size, training=True, seed=args.seed)
    timer = _Timer()
    model.fit(ds.take(args.steps), callbacks=[timer], shuffle=False, verbose=0)
    train_ips = timer.timed_batches() * args.batch_size / (timer.end - timer.start)
    xt, yt = test
    test_ds = data.make_dataset(xt, yt, 250)
    model.evaluate(test_ds.take(1), verbose=0)  # trace
    start = time.perf_counter()
    _, acc = model.evaluate(test_ds, verbose=0)
    infer_ips = len(xt) / (time.perf_counter() - start)
    return {
        "name": model.name,
        "params": sb_keras.count_params(model),
        "macs": sb_keras.count_macs(model),
        "train_ips": train_ips,
        "infer_ips": infer_ips,
        "acc": acc,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--models", default="plain,network,stage")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--num-atoms", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    variants = args.models.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--models: unknown {v!r}; choose from {sorted(VARIANTS)}")
    train = data.load_arrays("cifar10", "train", args.data_dir, args.train_subset)
    xt, yt = data.load_arrays("cifar10", "test", args.data_dir)
    # test.npz is sorted by class: take a random, hence stratified-ish, subset.
    keep = np.random.RandomState(args.seed).permutation(len(xt))[: args.test_subset]
    test = (xt[keep], yt[keep])
    print(
        f"CIFAR-10, ResNet-18 (CIFAR stem), {args.steps} steps x {args.batch_size} "
        f"images, SGD lr {args.lr} momentum 0.9 wd 5e-4, test on {len(keep)} images, "
        f"m = {args.num_atoms}, CPU threads: {os.cpu_count()}, "
        f"load average: {os.getloadavg()[0]:.1f}"
    )
    rows = [run(v, args, train, test) for v in variants]
    plain = next((r for r in rows if r["name"].startswith("resnet")), rows[0])
    print("| model | test acc | params | params ratio | MACs (M) | train img/s "
          "| infer img/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['acc']:.3f} | {r['params']:,} | "
            f"{r['params'] / plain['params']:.3f} | {r['macs'] / 1e6:.1f} | "
            f"{r['train_ips']:.1f} | {r['infer_ips']:.1f} |"
        )


if __name__ == "__main__":
    main()
