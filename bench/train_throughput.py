"""Training throughput (images/s) of plain and shared ResNet-56, side by side.

Every model is built and compiled first; then the timed rounds interleave
them (A B C A B C ...), so machine load drifts hit every model alike. Each
timing is one compiled ``train_on_batch`` step (forward, backward, SGD with
momentum and weight decay, and the model's orthogonality loss) on a batch of
random pixels.

With ``--torch-python PATH`` (a Python with torch; torch is never a
dependency of sb_keras) the authors' PyTorch models, written from the method
spec in ``bench/torch_reference.py``, run in a worker process with the same
thread count and are timed in the same rounds, so the ratio is measured side
by side. ``--keras-bn`` adds the plain ResNet-56 with Keras's own
BatchNormalization (sb_keras's models use `FusedBatchNormalization`).

Usage::

    PYTHONPATH=. python bench/train_throughput.py --batch-size 128 --rounds 5 \\
        [--torch-python ../torch-venv/bin/python] [--keras-bn]

Reference: Kang & Kim, *Learning Deeply Shared Filter Bases for Efficient
ConvNets* (arXiv 2006.05066).
"""

import argparse
import json
import os
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sb_keras  # noqa: E402
from sb_keras import io_utils  # noqa: E402
from sb_keras.layers import FusedBatchNormalization  # noqa: E402

MODELS = ("resnet56", "resnet56_s16u1", "resnet56_s16u1_double")
KERAS_BN = "resnet56 (Keras BN)"


def with_keras_batchnorm(model):
    """The model with every `FusedBatchNormalization` a Keras BatchNormalization."""

    def clone(layer):
        cls = layer.__class__
        if isinstance(layer, FusedBatchNormalization):
            cls = keras.layers.BatchNormalization
        return cls.from_config(layer.get_config())

    twin = keras.models.clone_model(
        keras.Model(model.inputs, model.outputs), clone_function=clone
    )
    twin.set_weights(model.get_weights())
    return twin


def build(name, precision, jit_compile=False):
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        if name == KERAS_BN:
            model = with_keras_batchnorm(sb_keras.get_model("resnet56"))
        else:
            model = sb_keras.get_model(name)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model


class TorchWorker:
    """The PyTorch reference models in a worker process (bench/torch_reference.py)."""

    def __init__(self, python, threads, batch_size):
        script = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "torch_reference.py"
        )
        self.proc = subprocess.Popen(
            [python, script, str(threads), str(batch_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.version = None

    def steps(self, model, steps):
        self.proc.stdin.write(json.dumps({"model": model, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited (code {self.proc.poll()})")
        answer = json.loads(line)
        self.version = answer["torch"]
        return answer["times"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--precisions", nargs="*", default=["float32", "mixed_bfloat16"])
    p.add_argument("--keras-bn", action="store_true", help="add " + KERAS_BN)
    p.add_argument("--jit-compile", action="store_true", help="XLA (slow on CPU)")
    p.add_argument(
        "--torch-python", help="a Python with torch: time the authors' models"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    names = list(args.models) + ([KERAS_BN] if args.keras_bn else [])
    runs = {}
    for precision in args.precisions:
        for name in names:
            model = build(name, precision, args.jit_compile)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                model.train_on_batch(x, y)
            print(
                f"built {name} {precision}: warm-up {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            runs[("sb_keras", name, precision)] = (model, [])
    worker = None
    if args.torch_python:
        worker = TorchWorker(args.torch_python, args.threads, args.batch_size)
        for name in args.models:
            worker.steps(name, args.warmup)
            runs[("pytorch", name, "float32")] = (name, [])
    for r in range(args.rounds):
        for (framework, _, _), (model, times) in runs.items():
            if framework == "pytorch":
                times.extend(worker.steps(model, args.steps))
                continue
            for _ in range(args.steps):
                t0 = time.perf_counter()
                model.train_on_batch(x, y)
                times.append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    if worker:
        worker.close()

    torch_note = (
        f", PyTorch {worker.version} ({args.threads} threads)" if worker else ""
    )
    print(
        f"\nbatch {args.batch_size}, median of {args.rounds * args.steps} steps, "
        f"TensorFlow/Keras {keras.__version__}{torch_note}"
    )
    print(
        "| framework | model | precision | step (s) | images/s | vs plain "
        "| vs PyTorch |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    speeds = {k: args.batch_size / float(np.median(t)) for k, (_, t) in runs.items()}
    rows = []
    for (framework, name, precision), speed in speeds.items():
        base = speeds.get((framework, "resnet56", precision))
        torch_speed = speeds.get(("pytorch", name.split(" ")[0], "float32"))
        vs_plain = f"{speed / base:.2f}x" if base else "-"
        vs_torch = (
            f"{speed / torch_speed:.2f}x"
            if torch_speed and framework == "sb_keras"
            else "-"
        )
        print(
            f"| {framework} | {name} | {precision} | {args.batch_size / speed:.3f} "
            f"| {speed:.0f} | {vs_plain} | {vs_torch} |"
        )
        rows.append(
            dict(
                framework=framework, model=name, precision=precision, images_per_s=speed
            )
        )
    if args.json:
        io_utils.write_bytes(args.json, json.dumps(rows, indent=1).encode())


if __name__ == "__main__":
    main()
