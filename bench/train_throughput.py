"""Training throughput (images/s) of plain and shared ResNet-56 on this CPU.

Every model is built and compiled first; then the timed rounds interleave
them (A B C A B C ...), so machine load drifts hit every model alike. Each
timing is one compiled ``train_on_batch`` step (forward, backward, SGD with
momentum and the model's orthogonality loss) on a batch of random pixels.
The table reports the median step of each model and its speed relative to
the plain ResNet-56 of the same precision (the issue's bar: >= 0.75x).

Usage::

    PYTHONPATH=. python bench/train_throughput.py --batch-size 128 --rounds 5

Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
ConvNets* (arXiv 2006.05066).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sb_keras  # noqa: E402

MODELS = ("resnet56", "resnet56_s16u1", "resnet56_s16u1_double")


def build(name, precision):
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        model = sb_keras.get_model(name)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,  # XLA trains ~3x slower on CPU
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--precisions", nargs="*", default=["float32", "mixed_bfloat16"])
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    runs = {}
    for precision in args.precisions:
        for name in args.models:
            model = build(name, precision)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                model.train_on_batch(x, y)
            print(
                f"built {name} {precision}: warm-up {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            runs[(name, precision)] = (model, [])
    for r in range(args.rounds):
        for model, times in runs.values():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                model.train_on_batch(x, y)
                times.append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\nbatch {args.batch_size}, median of {args.rounds * args.steps} steps")
    print("| model | precision | step (s) | images/s | vs plain |")
    print("|---|---|---:|---:|---:|")
    for precision in args.precisions:
        base = None
        for name in args.models:
            _, times = runs[(name, precision)]
            step = float(np.median(times))
            speed = args.batch_size / step
            if name == "resnet56":
                base = speed
            ratio = f"{speed / base:.2f}x" if base else "-"
            print(f"| {name} | {precision} | {step:.3f} | {speed:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
