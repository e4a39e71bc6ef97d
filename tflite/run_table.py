"""Builds the deployment table of tflite/README.md from a real run.

For one trained model: float Keras top-1, then every .tflite variant
(folded / decomposed x float32 / float16 / dynamic / int8, the small
decomposed int8 files, and a QAT int8 file), each evaluated with the LiteRT
interpreter on the real CIFAR-10 test set (top-1, top-1 agreement with the
float Keras model, file size, batch-1 latency with 1 and 2 threads).

Usage (from the repository root; the table of tflite/README.md):

    python tflite/run_table.py --data-dir ../shared/datasets/cifar10 \
        --model ../shared/pretrained/net_rl2/CIFAR10_ResNet56_S16U1_7.46err.pth.pth \
        --out tflite/results

--model takes a .keras file or an authors' checkpoint (converted with
sb_keras.checkpoints). Without it, a ResNet-20 S16U1 stand-in is trained
briefly on the real training set.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sb_keras  # noqa: E402
from sb_keras import data  # noqa: E402
from sb_keras import export  # noqa: E402
from sb_keras import litert  # noqa: E402


def train_stand_in(x, y, epochs, images, batch_size=128, seed=0):
    keras.utils.set_random_seed(seed)
    model = sb_keras.ResNet(depth=20, share=True, sharing="single")
    x, y = x[:images], y[:images]
    steps = epochs * (len(x) // batch_size)
    lr = keras.optimizers.schedules.CosineDecay(0.1, steps)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9, weight_decay=5e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ds = data.make_dataset(x, y, batch_size, training=True, seed=seed)
    model.fit(ds, epochs=epochs, verbose=2)
    return model


def qat_fine_tune(folded, x, y, epochs=1, images=8000, batch_size=64, lr=1e-5):
    qat = export.quantize_aware_model(folded)
    export.calibrate(qat, x[:512], batch_size=64)
    qat.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ds = data.make_dataset(x[:images], y[:images], batch_size, training=True, seed=1)
    qat.fit(ds, epochs=epochs, verbose=2)
    return qat


# The .tflite variants of the table: (file suffix, layout, convert() options).
# `int8` uses the converter's defaults (per-channel weights, min/max ranges);
# `int8_small` adds the two size options; `int8_small_bc` is the smallest
# file with the two accuracy options (the 0.35 MB file of tflite/README.md).
SMALL = {"per_channel": False, "strip_names": True}
ACCURATE = {"activation_range": "batch_mean", "bias_correction": True}
VARIANTS = [
    *[
        (f"{layout}_{q}", layout, {"quantize": q})
        for layout in ("folded", "decomposed")
        for q in ("none", "float16", "dynamic", "int8")
    ],
    ("folded_int8_bc", "folded", {"quantize": "int8", **ACCURATE}),
    ("decomposed_int8_small", "decomposed", {"quantize": "int8", **SMALL}),
    (
        "decomposed_int8_small_bc",
        "decomposed",
        {"quantize": "int8", **SMALL, **ACCURATE},
    ),
]


def stride_subset(x, y, limit):
    """Every k-th image (test.npz is sorted by class: never a prefix)."""
    if not limit:
        return x, y
    stride = max(1, len(x) // limit)
    return x[::stride], y[::stride]


def qat_step(args, model, folded, x_train, y_train, x_test, y_test):
    """QAT fine-tune, its int8 file, and how the two compare.

    Returns the table row of the QAT Keras model (whose inference computes
    like the int8 kernels) and the ``extra.json`` entry (with the file path).
    """
    t = time.time()
    qat = qat_fine_tune(
        folded, x_train, y_train, images=args.qat_images, lr=args.qat_lr
    )
    path = os.path.join(args.out, f"{model.name}_folded_qat_int8.tflite")
    export.convert(qat, path, quantize="int8", int8_io=True)
    print(f"wrote {path} (QAT, {time.time() - t:.0f} s)", flush=True)
    qat_out = qat.predict(x_test, batch_size=250, verbose=0)
    with export.simulated():  # the float fake-quant graph of training
        qat.predict_function = None  # retrace under the context
        sim_out = qat.predict(x_test, batch_size=250, verbose=0)
    qat.predict_function = None
    tfl_qat = litert.predict(path, x_test)
    step = export.qat.output_quant_step(qat)
    diff = np.abs(tfl_qat - qat_out) / step
    sim_diff = np.abs(tfl_qat - sim_out) / step
    row = {
        "file": f"{model.name} QAT (Keras, int8 inference)",
        "top1": float(np.mean(qat_out.argmax(-1) == y_test)),
        "n": len(x_test),
    }
    extra = {
        "path": path,
        "images": args.qat_images,
        "lr": args.qat_lr,
        "output_step": step,
        "max_abs_diff_steps": float(diff.max()),
        "fraction_equal": float(np.mean(diff < 0.01)),
        "top1_agreement_with_qat_keras": float(
            np.mean(tfl_qat.argmax(-1) == qat_out.argmax(-1))
        ),
        "float_simulation": {
            "top1": float(np.mean(sim_out.argmax(-1) == y_test)),
            "max_abs_diff_steps": float(sim_diff.max()),
            "fraction_within_one_step": float(np.mean(sim_diff <= 1.001)),
            "top1_agreement": float(np.mean(tfl_qat.argmax(-1) == sim_out.argmax(-1))),
        },
    }
    return row, extra


def write_results(out, rows, extra):
    """``table.json``, ``table.md`` and ``extra.json`` in ``out``."""
    litert.write_table(
        rows, os.path.join(out, "table.json"), os.path.join(out, "table.md")
    )
    print(json.dumps(extra, indent=2))
    with open(os.path.join(out, "extra.json"), "w") as f:
        json.dump(extra, f, indent=2)


def qat_only(args, model, x_train, y_train, x_test, y_test, keras_out):
    """Redoes the QAT rows of an existing table (``--qat-only``)."""
    with open(os.path.join(args.out, "table.json")) as f:
        rows = [r for r in json.load(f) if "qat" not in r["file"].lower()]
    with open(os.path.join(args.out, "extra.json")) as f:
        extra = json.load(f)
    row, extra["qat"] = qat_step(
        args, model, export.fold_model(model), x_train, y_train, x_test, y_test
    )
    path = extra["qat"].pop("path")
    rows.insert(1, row)
    rows.append(
        litert.evaluate_path(
            path, x_test, y_test, runs=args.runs, keras_outputs=keras_out
        )
    )
    write_results(args.out, rows, extra)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument(
        "--model",
        default=None,
        help="a .keras file or an authors' checkpoint (.pth); without it a "
        "ResNet-20 S16U1 stand-in is trained",
    )
    p.add_argument("--out", default="tflite/results")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=50000)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--calibration-count", type=int, default=500)
    p.add_argument("--qat-images", type=int, default=8000)
    p.add_argument("--qat-lr", type=float, default=1e-5)
    p.add_argument(
        "--qat-only",
        action="store_true",
        help="redo only the QAT rows of the table already in --out",
    )
    p.add_argument(
        "--evaluate-existing",
        action="store_true",
        help="only evaluate the .keras/.tflite files already in --out",
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.evaluate_existing:
        return evaluate_existing(args)

    x_train, y_train = data.load_arrays("cifar10", "train", data_dir=args.data_dir)
    x_test, y_test = data.load_arrays("cifar10", "test", data_dir=args.data_dir)
    x_test, y_test = stride_subset(x_test, y_test, args.test_limit)
    x_test = x_test.astype(np.float32)
    if args.model:
        model = export.load_float_model(args.model)
        source = os.path.basename(args.model)
    else:
        t = time.time()
        model = train_stand_in(x_train, y_train, args.train_epochs, args.train_images)
        source = (
            f"ResNet-20 S16U1 trained {args.train_epochs} epochs on "
            f"{args.train_images} real CIFAR-10 images ({time.time() - t:.0f} s)"
        )
        model.save(os.path.join(args.out, "stand_in.keras"))
    t = time.time()
    keras_out = model.predict(x_test, batch_size=250, verbose=0)
    keras_top1 = float(np.mean(keras_out.argmax(-1) == y_test))
    print(f"Keras float32 top-1 {keras_top1:.4f} ({time.time() - t:.0f} s)", flush=True)
    if args.qat_only:
        return qat_only(args, model, x_train, y_train, x_test, y_test, keras_out)
    rows = [
        {
            "file": f"{model.name} (Keras float32)",
            "params": sb_keras.count_params(model),
            "top1": keras_top1,
            "n": len(x_test),
        }
    ]
    rep = export.pipeline.calibration_images(
        model, args.data_dir, count=args.calibration_count
    )
    inference = {layout: export.fold_model(model, layout) for layout in export.LAYOUTS}
    files = []
    for suffix, layout, options in VARIANTS:
        path = os.path.join(args.out, f"{model.name}_{suffix}.tflite")
        t = time.time()
        int8 = options["quantize"] == "int8"
        export.convert(
            inference[layout],
            path,
            representative_data=rep if int8 else None,
            int8_io=int8,
            **options,
        )
        print(f"wrote {path} ({time.time() - t:.0f} s)", flush=True)
        files.append(path)
    qat_keras_row, qat_extra = qat_step(
        args, model, inference["folded"], x_train, y_train, x_test, y_test
    )
    files.append(qat_extra.pop("path"))
    rows.append(qat_keras_row)
    for path in files:
        rows.append(
            litert.evaluate_path(
                path, x_test, y_test, runs=args.runs, keras_outputs=keras_out
            )
        )
        print(rows[-1], flush=True)
    extra = {
        "source": source,
        "test_images": len(x_test),
        "calibration_images": len(rep),
        "qat": qat_extra,
    }
    write_results(args.out, rows, extra)


def evaluate_existing(args):
    x_test, y_test = data.load_arrays("cifar10", "test", data_dir=args.data_dir)
    x_test, y_test = stride_subset(x_test, y_test, args.test_limit)
    x_test = x_test.astype(np.float32)
    model = export.load_float_model(
        args.model or os.path.join(args.out, "stand_in.keras")
    )
    keras_out = model.predict(x_test, batch_size=250, verbose=0)
    rows = [
        {
            "file": f"{model.name} (Keras float32)",
            "top1": float(np.mean(keras_out.argmax(-1) == y_test)),
            "n": len(x_test),
        }
    ]
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".tflite") and name.startswith(model.name):
            rows.append(
                litert.evaluate_path(
                    os.path.join(args.out, name),
                    x_test,
                    y_test,
                    runs=args.runs,
                    keras_outputs=keras_out,
                )
            )
    litert.write_table(
        rows,
        os.path.join(args.out, "table.json"),
        os.path.join(args.out, "table.md"),
    )


if __name__ == "__main__":
    main()
