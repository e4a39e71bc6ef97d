"""CIFAR ResNet-20 plain vs shared (S16U1) on real CIFAR-10, fixed budget.

Both models are trained by `sb_keras.training.train` with the same recipe
(PyTorch-semantics SGD, momentum 0.9, weight decay 5e-4, lr 0.1 with step
decay at 50 % and 75 % of the epochs, lambda 10) and the same seed, data
and number of steps, then evaluated on the test split. The table gives the
test accuracy of each and the gap (the issue's bar: the shared model within
1 point of the plain one).

Usage (the data folder holds ``train.npz`` and ``test.npz``)::

    PYTHONPATH=. python bench/train_cifar.py --data-dir ../shared/datasets/cifar10 \\
        --epochs 15 --batch-size 128

``--limit`` trains on the first N training images when the budget is
short; ``--test-limit`` evaluates on N evenly spaced test images.

Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
ConvNets* (arXiv 2006.05066).
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", nargs="*", default=["resnet20", "resnet20_s16u1"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", default="step")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--precision", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/train_cifar")
    p.add_argument("--verbose", type=int, default=2)
    args = p.parse_args(argv)

    import keras

    from sb_keras.training import TrainConfig
    from sb_keras.training import train

    results = {}
    for name in args.models:
        config = TrainConfig(
            model=name,
            dataset="cifar10",
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            schedule=args.schedule,
            precision=args.precision,
            seed=args.seed,
            data_dir=args.data_dir,
            output=os.path.join(args.output, name),
            limit=args.limit,
            test_limit=args.test_limit,
            verbose=args.verbose,
        )
        metrics = train(config)
        results[name] = metrics
        keras.backend.clear_session()
        print(json.dumps({name: metrics["test_accuracy"]}), flush=True)

    base = results[args.models[0]]["test_accuracy"]
    print(
        f"\nCIFAR-10, {args.epochs} epochs, batch {args.batch_size}, "
        f"{results[args.models[0]]['train_images']} train / "
        f"{results[args.models[0]]['test_images']} test images, "
        f"schedule {args.schedule}, {args.precision}"
    )
    print("| model | params | test accuracy | vs first | train img/s |")
    print("|---|---:|---:|---:|---:|")
    import sb_keras

    for name, m in results.items():
        params = sb_keras.count_params(sb_keras.get_model(name))
        print(
            f"| {name} | {params:,} | {100 * m['test_accuracy']:.2f} % | "
            f"{100 * (m['test_accuracy'] - base):+.2f} | "
            f"{m['train_images_per_second']} |"
        )


if __name__ == "__main__":
    main()
