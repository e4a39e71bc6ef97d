"""Compress the folded authors' ResNet56, fine-tune one epoch, compare.

Issue 14's rank-reduction table, measured in one run on this machine:

1. The authors' ResNet56-S16U1 (``../shared/pretrained/net_rl2``) is folded
   into its plain ResNet-56 (`sb_keras.unshare`, 853,018 parameters).
2. Each configuration is compressed with `sb_keras.compress` (whitened with
   exact training images) and saved as ``.keras``.
3. Each is fine-tuned by the command a user types, in its own process:
   ``sb-keras train --init-from compressed.keras --epochs 1 --schedule cosine
   --lr LR`` (the training recipe: SGD momentum 0.9, weight decay 5e-4,
   orthogonality penalty on, the standard CIFAR augmentation) on the 50,000
   JPEG training images.
4. Top-1 before and after, on the 1000 exact test images and on the 10,000
   JPEG test images; beside them the plain model itself fine-tuned the same
   way (a control: what one epoch of the recipe does to an uncompressed
   model on the JPEG copy).

Usage (from the repo root, the data beside it in ../shared)::

    PYTHONPATH=. python bench/compress_finetune.py [--configs 8,1,double 4,1,double]
        [--lr 0.01] [--limit 50000] [--out bench/results/compress_finetune]
        [--source plain.keras]

A config is ``S,U[,SHARING[,METHOD]]`` (sharing ``single`` or ``double``,
method ``whitened``, the default, or ``plain``), or ``SHARING[,METHOD]`` for a
source without ranks (MobileNetV2, bottleneck ResNets); ``0,U`` is the per-layer
low-rank baseline (`sb_keras.compress` with ``shared_rank=0``: each layer's
own whitened truncated SVD in a NonShared ResNet, nothing shared), fine-tuned
the same way.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.relpath(os.path.join(ROOT, "..", "shared"))
DATA = os.path.join(SHARED, "datasets", "cifar10")

import sb_keras  # noqa: E402
from sb_keras import io_utils  # noqa: E402


def top1(model, x, y):
    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(logits.argmax(1) == y))


def _ratio(total, params):
    return "1x" if params == total else f"{total / params:.1f}x fewer"


def sb_keras_command():
    script = os.path.join(os.path.dirname(sys.executable), "sb-keras")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "sb_keras"]


def fine_tune(path, out, lr, limit, batch_size):
    cmd = sb_keras_command() + [
        "train",
        "--init-from",
        path,
        "--data-dir",
        DATA,
        "--epochs",
        "1",
        "--schedule",
        "cosine",
        "--lr",
        str(lr),
        "--batch-size",
        str(batch_size),
        "--limit",
        str(limit),
        "--test-limit",
        "1000",
        "--output",
        out,
        "--verbose",
        "2",
        "--no-tensorboard",
    ]
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(cmd, check=True, env=env)
    return os.path.join(out, "model.keras"), time.time() - t0


def build(plain, config, calib):
    """``(model, label, sharing, params)`` of one ``--configs`` entry."""
    if config == "plain":
        kind = f"ResNet-{plain.depth}" if hasattr(plain, "depth") else plain.name
        return plain, f"plain {kind} (control)", "-", sb_keras.count_params(plain)
    fields = config.split(",")
    if fields[0].isdigit():  # S,U[,SHARING[,METHOD]]: a basic-block ResNet
        (s, u), rest = fields[:2], fields[2:]
        ranks = dict(shared_rank=int(s), unique_rank=int(u))
        label = f"S{s}U{u}"
    else:  # SHARING[,METHOD]: MobileNetV2 or bottleneck (no ranks)
        rest, ranks, label = fields, {}, "whole kernels"
    sharing = rest[0] if rest else "single"
    method = rest[1] if len(rest) > 1 else "whitened"
    model, report = sb_keras.compress(
        plain, sharing=sharing, calibration_data=calib, method=method, **ranks
    )
    if method == "plain":
        label += " plain SVD" if ranks else " unweighted"
    if ranks.get("shared_rank") == 0:  # the per-layer low-rank baseline
        label, sharing = f"per-layer U{ranks['unique_rank']} (no sharing)", "none"
    return model, label, sharing, report["params_after"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=["8,1,double", "4,1,double", "plain", "8,1,single"],
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--limit", type=int, default=50000, help="training images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument(
        "--source",
        default=None,
        help="a plain sb_keras ResNet .keras file (default: the folded "
        "authors' ResNet56-S16U1)",
    )
    p.add_argument(
        "--out", default=os.path.join("bench", "results", "compress_finetune")
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    with np.load(os.path.join(DATA, "lossless_subset.npz")) as f:
        x_exact, y_exact = f["x_test"].astype("float32"), f["y_test"]
        calib = f["x_train"][: args.calibration].astype("float32")
    with np.load(os.path.join(DATA, "test.npz")) as f:
        x_jpeg, y_jpeg = f["x"].astype("float32"), f["y"].astype("int64")
    if args.source:
        plain = keras.models.load_model(args.source)
        source = f"{plain.name} from {os.path.basename(args.source)}"
    else:
        checkpoint = os.path.join(
            SHARED, "pretrained", "net_rl2", "CIFAR10_ResNet56_S16U1_7.46err.pth.pth"
        )
        plain = sb_keras.unshare(sb_keras.load_authors_checkpoint(checkpoint))
        source = "folded authors' ResNet56-S16U1"
    rows = []
    for config in args.configs:
        t0 = time.time()
        model, label, sharing, params = build(plain, config, calib)
        compress_s = time.time() - t0
        path = os.path.join(args.out, f"{config.replace(',', '_')}.keras")
        model.save(path)
        before = (top1(model, x_exact, y_exact), top1(model, x_jpeg, y_jpeg))
        run_dir = os.path.join(args.out, f"run_{config.replace(',', '_')}")
        if os.path.exists(run_dir):
            # `sb-keras train` would resume a finished run and report its
            # old accuracy as this run's.
            sys.exit(f"{run_dir} exists from an earlier run; use a new --out.")
        tuned_path, tune_s = fine_tune(
            path, run_dir, args.lr, args.limit, args.batch_size
        )
        tuned = keras.models.load_model(tuned_path)
        after = (top1(tuned, x_exact, y_exact), top1(tuned, x_jpeg, y_jpeg))
        row = dict(
            source=source,
            config=label,
            sharing=sharing,
            params=params,
            exact_before=before[0],
            jpeg_before=before[1],
            exact_after=after[0],
            jpeg_after=after[1],
            compress_s=round(compress_s),
            finetune_s=round(tune_s),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        io_utils.write_bytes(
            os.path.join(args.out, "results.json"), json.dumps(rows, indent=1)
        )
    print(
        f"\nfine-tune: 1 epoch of {args.limit} JPEG training images, lr {args.lr} "
        f"cosine, batch {args.batch_size}; plain = {source}"
    )
    print(
        "| model | sharing | params | vs plain | exact 1000 before | after "
        "| JPEG 10k before | after | fine-tune s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    total = sb_keras.count_params(plain)
    for r in rows:
        print(
            f"| {r['config']} | {r['sharing']} | {r['params']:,} | "
            f"{_ratio(total, r['params'])} | "
            f"{100 * r['exact_before']:.1f}% | {100 * r['exact_after']:.1f}% | "
            f"{100 * r['jpeg_before']:.1f}% | {100 * r['jpeg_after']:.1f}% | "
            f"{r['finetune_s']} |"
        )


if __name__ == "__main__":
    main()
