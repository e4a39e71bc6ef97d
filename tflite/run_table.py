"""Builds the deployment table of tflite/README.md from a real run.

For one trained model: float Keras top-1, then every .tflite variant
(folded / decomposed x float32 / float16 / dynamic / int8, plus QAT int8),
each evaluated with the LiteRT interpreter on the real CIFAR-10 test set
(top-1, file size, batch-1 latency with 1 and 2 threads). Also the size of
the decomposed int8 ResNet56-S16U1 file.

Usage (from the repository root):

    python tflite/run_table.py --data-dir ../shared/datasets/cifar10 \
        --model MODEL.keras --out tflite/results

Without --model it trains a ResNet-20 S16U1 briefly on the real training
set (a stand-in until the authors' checkpoints convert to Keras; pass the
converted checkpoint with --model then: `--model CHECKPOINT.pth`).
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


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="tflite/results")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=50000)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--runs", type=int, default=100)
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
    if args.test_limit:  # test.npz is sorted by class: take a stride
        stride = max(1, len(x_test) // args.test_limit)
        x_test, y_test = x_test[::stride], y_test[::stride]
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
    keras_out = model.predict(x_test, batch_size=250, verbose=0)
    keras_top1 = float(np.mean(keras_out.argmax(-1) == y_test))
    rows = [
        {
            "file": f"{model.name} (Keras float32)",
            "params": sb_keras.count_params(model),
            "top1": keras_top1,
            "n": len(x_test),
        }
    ]
    rep = export.pipeline.calibration_images(model, args.data_dir, count=500)
    files = []
    for layout in export.LAYOUTS:
        inference = export.fold_model(model, layout)
        for q in export.QUANTIZE_MODES:
            path = os.path.join(args.out, f"{model.name}_{layout}_{q}.tflite")
            export.convert(
                inference,
                path,
                quantize=q,
                representative_data=rep if q == "int8" else None,
                int8_io=q == "int8",
            )
            files.append(path)
    # The smallest file: decomposed, int8 weights per tensor, no names.
    path = os.path.join(args.out, f"{model.name}_decomposed_int8_small.tflite")
    export.convert(
        export.fold_model(model, "decomposed"),
        path,
        quantize="int8",
        representative_data=rep,
        int8_io=True,
        per_channel=False,
        strip_names=True,
    )
    files.append(path)
    qat = qat_fine_tune(export.fold_model(model, "folded"), x_train, y_train)
    qat_path = os.path.join(args.out, f"{model.name}_folded_qat_int8.tflite")
    export.convert(qat, qat_path, quantize="int8", int8_io=True)
    files.append(qat_path)
    qat_out = qat.predict(x_test, batch_size=250, verbose=0)
    rows.append(
        {
            "file": f"{model.name} QAT (Keras fake-quant)",
            "top1": float(np.mean(qat_out.argmax(-1) == y_test)),
            "n": len(x_test),
        }
    )
    for path in files:
        rows.append(
            litert.evaluate_path(
                path, x_test, y_test, runs=args.runs, keras_outputs=keras_out
            )
        )
    tfl_qat = litert.predict(qat_path, x_test)
    step = export.qat.output_quant_step(qat)
    diff = np.abs(tfl_qat - qat_out)
    extra = {
        "source": source,
        "qat_output_step": step,
        "qat_max_abs_diff": float(diff.max()),
        "qat_fraction_within_one_step": float(np.mean(diff <= step * 1.0001)),
    }
    # Size of the decomposed int8 ResNet56-S16U1 (size does not need training).
    r56 = sb_keras.get_model("resnet56_s16u1")
    r56_path = os.path.join(args.out, "resnet56_s16u1_decomposed_int8.tflite")
    r56_decomposed = export.fold_model(r56, "decomposed")
    for suffix, kwargs in (
        ("", {}),
        ("_small", {"per_channel": False, "strip_names": True}),
    ):
        path = r56_path.replace(".tflite", f"{suffix}.tflite")
        export.convert(
            r56_decomposed,
            path,
            quantize="int8",
            representative_data=rep[:100],
            int8_io=True,
            **kwargs,
        )
        key = f"resnet56_s16u1_decomposed_int8{suffix}_bytes"
        extra[key] = os.path.getsize(path)
    litert.write_table(
        rows,
        os.path.join(args.out, "table.json"),
        os.path.join(args.out, "table.md"),
    )
    print(json.dumps(extra, indent=2))
    with open(os.path.join(args.out, "extra.json"), "w") as f:
        json.dump(extra, f, indent=2)


def evaluate_existing(args):
    x_test, y_test = data.load_arrays("cifar10", "test", data_dir=args.data_dir)
    if args.test_limit:  # test.npz is sorted by class: take a stride
        stride = max(1, len(x_test) // args.test_limit)
        x_test, y_test = x_test[::stride], y_test[::stride]
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
