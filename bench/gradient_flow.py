"""Gradient flow of a CIFAR ResNet: plain vs shared with lambda 0 and 10.

Trains each model briefly on CIFAR-10 and records per-layer weight-gradient
norms on a fixed probe batch (`sb_keras.analysis.gradient_flow_experiment`),
then prints the first-to-last layer ratio and saves the figure.

    python bench/gradient_flow.py --data-dir ../shared/datasets/cifar10 \
        --depth 56 --steps 150 --out docs/gradient_flow.png
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import sb_keras  # noqa: E402
from sb_keras import analysis  # noqa: E402
from sb_keras import data  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probe-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=None, help="training images")
    p.add_argument("--out", default="docs/gradient_flow.png")
    p.add_argument("--json", default=None, help="also write the records here")
    args = p.parse_args(argv)

    x, y = data.load_arrays("cifar10", "train", args.data_dir, limit=args.limit)
    xt, yt = data.load_arrays("cifar10", "test", args.data_dir)
    # test.npz is sorted by class: probe with a random sample.
    idx = np.random.RandomState(0).choice(len(xt), args.probe_size, replace=False)
    xp, yp = xt[idx].astype("float32"), yt[idx]

    d = args.depth
    builders = {
        f"ResNet-{d} plain": lambda: sb_keras.ResNet(d),
        f"ResNet-{d} shared, lambda=0": lambda: sb_keras.ResNet(
            d, share=True, orthogonality=0.0
        ),
        f"ResNet-{d} shared, lambda=10": lambda: sb_keras.ResNet(
            d, share=True, orthogonality=10.0
        ),
    }
    results = {}
    if args.json and os.path.exists(args.json):  # resume a partial run
        with open(args.json) as f:
            results = json.load(f)
    for label, build in builders.items():
        if label in results:
            continue
        start = time.time()
        results.update(
            analysis.gradient_flow_experiment(
                {label: build},
                x,
                y,
                xp,
                yp,
                steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                every=args.every,
            )
        )
        print(f"{label}: {time.time() - start:.0f} s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, default=float)
    rows = analysis.gradient_flow_summary(results)
    print(analysis.markdown_table(rows))
    analysis.plot_gradient_flow(results, args.out)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
