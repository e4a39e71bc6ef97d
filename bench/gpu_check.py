"""One prepared check of sb_keras on the machine at hand, GPU or not.

Run by ``bench/gpu_check.sh``. In about 8 minutes on a machine with an
NVIDIA GPU it records, in one JSON file and one markdown table:

1. **Environment**: TensorFlow/Keras versions, the GPUs TensorFlow sees,
   ``nvidia-smi``.
2. **Checks on the device's kernels** (each a pass/fail with numbers):
   `BasisConv2D` against its composed plain convolution, inference and
   training (the two-step definition), `FusedBatchNormalization` against
   Keras's BatchNormalization, each in float32, mixed_float16 and
   mixed_bfloat16 and with XLA off and on; a shared ResNet-20 trained a few
   steps under `tf.distribute.MirroredStrategy` over every GPU, compared
   with the same steps on one device.
3. **The tests that matter there**: the layer reference, BatchNorm,
   mixed-precision and distribution test files (pytest, default suite).
4. **Throughput**: `bench/train_throughput.py`'s models (plain and shared
   ResNet-56) in float32 / mixed_float16 / mixed_bfloat16, XLA off and on,
   batch 128 and 512.
5. **A short real-data training run** (``sb-keras train``, ResNet-20
   S16U1*, real CIFAR-10 from ``--data-dir``) with its test accuracy.

On a CPU-only machine it runs the same checks where they make sense and
says what it skipped: no MirroredStrategy over GPUs, no mixed_float16
(emulated on CPU) and no XLA in the throughput table, batch 128 only, one
tiny training run. ``--quick`` shrinks everything further (CI's slow step).

Usage::

    bash bench/gpu_check.sh [--out DIR] [--data-dir DIR] [--quick]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sb_keras  # noqa: E402
from sb_keras import io_utils  # noqa: E402
from sb_keras.layers import BasisConv2D  # noqa: E402
from sb_keras.layers import FilterBasis  # noqa: E402
from sb_keras.layers import FusedBatchNormalization  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import train_throughput  # noqa: E402


def environment():
    gpus = tf.config.list_physical_devices("GPU")
    smi = None
    if shutil.which("nvidia-smi"):
        run = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        smi = run.stdout.strip() or run.stderr.strip()
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "gpus": [g.name for g in gpus],
        "gpu_details": [tf.config.experimental.get_device_details(g) for g in gpus],
        "nvidia_smi": smi,
        "cpu_count": os.cpu_count(),
        "built_with_cuda": tf.test.is_built_with_cuda(),
    }


def _policy(name):
    class Scope:
        def __enter__(self):
            self.previous = keras.config.dtype_policy()
            keras.config.set_dtype_policy(name)

        def __exit__(self, *exc):
            keras.config.set_dtype_policy(self.previous)

    return Scope()


def check_layers(precisions, xla_modes):
    """BasisConv2D and FusedBatchNormalization on this device's kernels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 16, 32)).astype("float32")
    rows = []
    for precision in precisions:
        for xla in xla_modes:
            with _policy(precision):
                basis = FilterBasis(rank=32, in_channels=32)
                layer = BasisConv2D(32, unique_rank=2, padding="same")
                fused = FusedBatchNormalization()
                plain_bn = keras.layers.BatchNormalization()
            bases = basis(x)
            layer([x, bases])
            fused.build(x.shape)
            plain_bn.build(x.shape)
            # Non-trivial statistics for the inference check.
            for bn in (layer.basis_bn, layer.bn):
                bn.moving_variance.assign(rng.uniform(0.5, 2, bn.moving_variance.shape))
                bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape))

            def infer(v, layer=layer, basis=basis):
                return layer([v, basis(v)], training=False)

            def train_bn(v, fused=fused, plain_bn=plain_bn):
                return fused(v, training=True), plain_bn(v, training=True)

            if xla:
                infer = tf.function(infer, jit_compile=True)
                train_bn = tf.function(train_bn, jit_compile=True)
            kernel, bias = layer.fold([np.asarray(bases)])
            reference = tf.nn.conv2d(x, kernel, 1, "SAME") + bias
            y = np.asarray(infer(x), "float32")
            scale = float(np.abs(reference).max())
            conv_err = float(np.abs(y - reference).max()) / scale
            a, b = train_bn(x)
            bn_err = float(
                np.abs(np.asarray(a, "float32") - np.asarray(b, "float32")).max()
            )
            tol = 1e-4 if precision == "float32" else 3e-2
            rows.append(
                {
                    "check": "layers",
                    "precision": precision,
                    "xla": xla,
                    "basis_conv_vs_composed_rel": conv_err,
                    "fused_bn_vs_keras_abs": bn_err,
                    "ok": conv_err <= tol and bn_err <= tol * 10,
                }
            )
            print(
                f"layers {precision} xla={xla}: basis conv rel err {conv_err:.2e}, "
                f"fused BN err {bn_err:.2e}",
                flush=True,
            )
    return rows


def check_mirrored(gpus, steps=3):
    """A shared ResNet-20 on all GPUs vs one device: same weights after SGD."""
    if len(gpus) < 1:
        return [{"check": "mirrored", "skipped": "no GPU"}]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (64, 32, 32, 3)).astype("uint8")
    y = rng.integers(0, 10, 64)
    results = {}
    devices = {"one": [gpus[0]], "all": list(gpus)}
    weights = None
    for key, devs in devices.items():
        strategy = tf.distribute.MirroredStrategy(devs)
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = sb_keras.ResNet(20, share=True)
            model.compile(
                optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        model.fit(x, y, batch_size=32, epochs=steps, verbose=0, shuffle=False)
        results[key] = model.get_weights()
    diff = max(
        float(np.abs(a - b).max()) / (float(np.abs(b).max()) + 1e-12)
        for a, b in zip(results["all"], results["one"])
    )
    return [
        {
            "check": "mirrored",
            "gpus": len(gpus),
            "max_rel_weight_diff": diff,
            "ok": diff < 1e-3,
        }
    ]


def run_tests(quick):
    files = ["tests/test_fused_batchnorm.py", "tests/test_torch_batchnorm.py"]
    if not quick:
        files += [
            "tests/test_layers.py",
            "tests/test_layer_api.py",
            "tests/test_distribute.py",
        ]
    t0 = time.time()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "not slow",
            "-p",
            "no:cacheprovider",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = run.stdout.strip().splitlines()[-1:] if run.stdout else []
    return [
        {
            "check": "pytest",
            "files": files,
            "returncode": run.returncode,
            "summary": tail[0] if tail else run.stderr[-500:],
            "seconds": round(time.time() - t0),
            "ok": run.returncode == 0,
        }
    ]


def throughput(models, precisions, xla_modes, batches, rounds, budget_s):
    """The table, most important configurations first, within ``budget_s``."""
    rows = []
    start = time.time()
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.uniform(0, 255, (batch, 32, 32, 3)).astype("float32")
        y = rng.integers(0, 10, batch)
        for xla in xla_modes:
            for precision in precisions:
                for name in models:
                    if time.time() - start > budget_s:
                        rows.append(
                            {
                                "model": name,
                                "precision": precision,
                                "xla": xla,
                                "batch": batch,
                                "images_per_s": None,
                                "skipped": "time budget",
                            }
                        )
                        continue
                    model = train_throughput.build(name, precision, jit_compile=xla)
                    for _ in range(2):
                        model.train_on_batch(x, y)
                    times = []
                    for _ in range(rounds):
                        t0 = time.perf_counter()
                        model.train_on_batch(x, y)
                        times.append(time.perf_counter() - t0)
                    speed = batch / float(np.median(times))
                    rows.append(
                        {
                            "model": name,
                            "precision": precision,
                            "xla": xla,
                            "batch": batch,
                            "images_per_s": round(speed, 1),
                        }
                    )
                    print(
                        f"throughput {name} {precision} xla={xla} batch {batch}: "
                        f"{speed:.0f} img/s",
                        flush=True,
                    )
    return rows


def training_run(data_dir, out, gpu, quick):
    if not data_dir or not os.path.isdir(data_dir):
        return {"skipped": f"no data dir: {data_dir}"}
    script = os.path.join(os.path.dirname(sys.executable), "sb-keras")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "sb_keras"]
    limit, epochs = (50000, 3) if gpu else ((512, 1) if quick else (5000, 1))
    run_dir = os.path.join(out, "train_run")
    cmd += [
        "train",
        "--model",
        "resnet20_s16u1_double",
        "--data-dir",
        data_dir,
        "--epochs",
        str(epochs),
        "--limit",
        str(limit),
        "--test-limit",
        "2000" if not quick else "500",
        "--batch-size",
        "128",
        "--schedule",
        "cosine",
        "--output",
        run_dir,
        "--verbose",
        "2",
        "--no-tensorboard",
    ]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    metrics = {}
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            metrics = json.load(f)
    return {
        "command": " ".join(cmd[1:] if cmd[0] == script else cmd[2:]),
        "returncode": run.returncode,
        "seconds": round(time.time() - t0),
        "train_images": limit,
        "epochs": epochs,
        "metrics": metrics,
        "ok": run.returncode == 0,
        "stderr_tail": run.stderr[-800:],
    }


def markdown(report):
    env = report["environment"]
    lines = [
        "# sb_keras device check ("
        + ("GPU: " + ", ".join(env["gpus"]) if env["gpus"] else "CPU only")
        + ")",
        "",
        f"TensorFlow {env['tensorflow']}, Keras {env['keras']}; "
        f"nvidia-smi: {env['nvidia_smi']}",
        "",
    ]
    if report["skipped"]:
        lines += ["Skipped: " + "; ".join(report["skipped"]), ""]
    lines += ["| check | details | ok |", "|---|---|---|"]
    for row in report["checks"]:
        details = ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("check", "ok")
        )
        lines.append(f"| {row['check']} | {details} | {row.get('ok', '-')} |")
    lines += [
        "",
        "| model | precision | XLA | batch | images/s |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["throughput"]:
        speed = r["images_per_s"]
        speed = f"{speed:.0f}" if speed else r.get("skipped", "-")
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['xla']} | {r['batch']} | {speed} |"
        )
    t = report["training"]
    lines += [
        "",
        "Training run: "
        + json.dumps({k: v for k, v in t.items() if k != "stderr_tail"}),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default=os.path.join(ROOT, "bench", "results", "device_check")
    )
    p.add_argument(
        "--data-dir",
        default=os.path.relpath(
            os.path.join(ROOT, "..", "shared", "datasets", "cifar10")
        ),
    )
    p.add_argument("--quick", action="store_true", help="smallest sizes (CI)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    env = environment()
    gpus = tf.config.list_physical_devices("GPU")
    gpu = bool(gpus)
    skipped = []
    if gpu:
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        precisions = ["float32", "mixed_float16", "mixed_bfloat16"]
        xla_modes, batches, rounds = [False, True], [128, 512], 5
        models = list(train_throughput.MODELS)
    else:
        skipped += [
            "no GPU: MirroredStrategy over GPUs",
            "mixed_float16 (emulated on CPU)",
            "XLA in the throughput table",
            "batch 512",
        ]
        precisions = ["float32", "mixed_bfloat16"]
        xla_modes, batches = [False], [128]
        rounds = 2 if args.quick else 4
        models = ["resnet56", "resnet56_s16u1"] if not args.quick else ["resnet56"]
    checks = check_layers(
        ["float32", "mixed_float16", "mixed_bfloat16"]
        if gpu
        else ["float32", "mixed_bfloat16"],
        [False, True],
    )
    checks += check_mirrored(gpus)
    checks += run_tests(args.quick)
    table = throughput(
        models, precisions, xla_modes, batches, rounds, budget_s=240 if gpu else 600
    )
    training = training_run(args.data_dir, args.out, gpu, args.quick)
    report = {
        "environment": env,
        "skipped": skipped,
        "checks": checks,
        "throughput": table,
        "training": training,
        "seconds": round(time.time() - t0),
    }
    ok = all(c.get("ok", True) for c in checks) and training.get("ok", True)
    report["ok"] = ok
    io_utils.write_bytes(
        os.path.join(args.out, "device_check.json"),
        json.dumps(report, indent=1, default=str),
    )
    io_utils.write_bytes(os.path.join(args.out, "device_check.md"), markdown(report))
    print(markdown(report))
    print(f"device check {'passed' if ok else 'FAILED'} in {report['seconds']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
