"""Deployment layouts of a shared-basis ResNet: bytes, latency, partitions, top-1.

Builds every candidate ``.tflite`` file of the authors' ResNet56-S16U1 (and a
plain, unshared ResNet-56 beside it), then measures them in one process:

* bytes of the file;
* batch-1 latency with 1 and 2 threads (LiteRT ``ai_edge_litert`` with its
  default XNNPACK delegate): ``--rounds`` rounds, each timing every file
  ``--runs`` times in turn (A B C A B C ...), so that other load on the
  machine hits all candidates alike; the table shows the median over rounds
  of each round's median;
* XNNPACK partitions (``DELEGATE`` nodes of the interpreter's execution
  plan) and the ops left outside the delegate;
* top-1 on the 1000 exact CIFAR-10 test images (``lossless_subset.npz``).

Run from the repository root (the datasets and checkpoints beside it)::

    python bench/deploy_layouts.py --markdown tflite/results/deploy_layouts.md

Int8 files are full-integer with int8 input and output, calibrated on 500
training images (the ``sb-keras export`` default).
"""

import argparse
import collections
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(HERE, "..", "shared")
CHECKPOINT = os.path.join(
    SHARED, "pretrained", "net_rl2", "CIFAR10_ResNet56_S16U1_7.46err.pth.pth"
)

# name: (model, layout, quantize, extra convert kwargs, min_saving)
CANDIDATES = [
    ("plain ResNet-56, int8", "plain", "folded", "int8", {}, None),
    ("shared, folded, int8", "shared", "folded", "int8", {}, None),
    ("shared, decomposed, int8", "shared", "decomposed", "int8", {}, None),
    ("shared, mixed (stage 3), int8", "shared", "mixed", "int8", {}, None),
    ("shared, mixed (stages 2-3), int8", "shared", "mixed", "int8", {}, 20),
    (
        "shared, mixed (stage 3), int8, per-tensor, stripped",
        "shared",
        "mixed",
        "int8",
        {"per_channel": False, "strip_names": True},
        None,
    ),
    (
        "shared, decomposed, int8, per-tensor, stripped",
        "shared",
        "decomposed",
        "int8",
        {"per_channel": False, "strip_names": True},
        None,
    ),
    ("shared, mixed (stage 3), dynamic int8", "shared", "mixed", "dynamic", {}, None),
    ("shared, mixed (stage 3), float16", "shared", "mixed", "float16", {}, None),
    ("plain ResNet-56, float32", "plain", "folded", "none", {}, None),
    ("shared, folded, float32", "shared", "folded", "none", {}, None),
    ("shared, mixed (stage 3), float32", "shared", "mixed", "none", {}, None),
]


def build(models, calib, folder, only=None, reuse=False):
    """Writes every candidate file; returns ``[(name, path)]``."""
    from sb_keras import export

    out = []
    for i, (name, which, layout, quantize, kwargs, saving) in enumerate(CANDIDATES):
        if only and not any(s in name for s in only):
            continue
        path = os.path.join(folder, f"{i:02d}.tflite")
        if reuse and os.path.exists(path):
            out.append((name, path))
            continue
        t = time.time()
        export.convert(
            export.fold_model(models[which], layout, min_saving=saving),
            path,
            quantize=quantize,
            representative_data=calib if quantize == "int8" else None,
            int8_io=quantize == "int8",
            **kwargs,
        )
        print(f"built {name}: {os.path.getsize(path)} B, {time.time() - t:.0f} s")
        out.append((name, path))
    return out


def partitions(path):
    """``(XNNPACK partitions, ops outside the delegate)`` of a file.

    The interpreter lists the model's ops, then one ``DELEGATE`` node per
    partition. An op runs outside XNNPACK when its output leaves no
    delegate but feeds one (or is a model output).
    """
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    ops = it._get_ops_details()
    delegates = [d for d in ops if d["op_name"] == "DELEGATE"]
    made = {int(t) for d in delegates for t in d["outputs"]}
    needed = {int(t) for d in delegates for t in d["inputs"]}
    needed |= {d["index"] for d in it.get_output_details()}
    outside = collections.Counter()
    for d in ops:
        outs = {int(t) for t in d["outputs"]}
        if d["op_name"] != "DELEGATE" and outs & needed and not outs & made:
            outside[d["op_name"]] += 1
    return len(delegates), [f"{n} x{c}" for n, c in sorted(outside.items())]


def interleaved_latency(paths, threads, rounds, runs):
    """Per file: (median over rounds of the round medians, fastest run), ms.

    The fastest run estimates the uncontended latency on a shared machine.
    """
    from ai_edge_litert.interpreter import Interpreter

    its = []
    for p in paths:
        it = Interpreter(model_path=p, num_threads=threads)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        for _ in range(5):
            it.invoke()
        its.append(it)
    medians = [[] for _ in paths]
    fastest = [np.inf for _ in paths]
    for _ in range(rounds):
        for i, it in enumerate(its):
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                it.invoke()
                times.append(time.perf_counter() - t)
            medians[i].append(np.median(times))
            fastest[i] = min(fastest[i], min(times))
    return [(1000 * float(np.median(m)), 1000 * f) for m, f in zip(medians, fastest)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=CHECKPOINT)
    p.add_argument("--plain-depth", type=int, default=56, help="the plain ResNet")
    p.add_argument("--data-dir", default=os.path.join(SHARED, "datasets", "cifar10"))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--only", nargs="*", help="substrings of candidate names")
    p.add_argument("--keep", help="folder to keep the files in")
    p.add_argument(
        "--reuse", action="store_true", help="measure the files already in --keep"
    )
    p.add_argument("--markdown", help="write the table here too")
    args = p.parse_args(argv)

    import sb_keras
    from sb_keras import litert
    from sb_keras.export import pipeline

    shared = sb_keras.load_authors_checkpoint(args.checkpoint)
    models = {"shared": shared, "plain": sb_keras.ResNet(depth=args.plain_depth)}
    calib = pipeline.calibration_images(shared, args.data_dir)
    with np.load(os.path.join(args.data_dir, "lossless_subset.npz")) as f:
        x, y = f["x_test"].astype(np.float32), f["y_test"].reshape(-1)
    float_top1 = float(np.mean(np.argmax(shared.predict(x, verbose=0), -1) == y))
    folder = args.keep or tempfile.mkdtemp()
    os.makedirs(folder, exist_ok=True)
    files = build(models, calib, folder, args.only, args.reuse)
    paths = [p for _, p in files]
    lat = {n: interleaved_latency(paths, n, args.rounds, args.runs) for n in (1, 2)}
    plain = next((i for i, (n, _) in enumerate(files) if n.startswith("plain")), 0)
    rows = [
        "| file | bytes | x plain int8 | 1 thread ms | x plain | 1 thread fastest "
        "ms | x plain | 2 threads ms | XNNPACK partitions | ops outside | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for i, (name, path) in enumerate(files):
        size = os.path.getsize(path)
        parts, outside = partitions(path)
        top1 = "-"
        if name.startswith("shared"):
            pred = litert.predict(path, x).argmax(-1)
            top1 = f"{100 * np.mean(pred == y):.1f} %"
        rows.append(
            f"| {name} | {size:,} | {size / os.path.getsize(paths[plain]):.2f} "
            f"| {lat[1][i][0]:.2f} | {lat[1][i][0] / lat[1][plain][0]:.2f} "
            f"| {lat[1][i][1]:.2f} | {lat[1][i][1] / lat[1][plain][1]:.2f} "
            f"| {lat[2][i][0]:.2f} "
            f"| {parts} | {', '.join(outside) or '-'} | {top1} |"
        )
    rows.append(
        f"\nFloat Keras model: top-1 {100 * float_top1:.1f} % on the same "
        f"{len(y)} images; latency: median of {args.rounds} interleaved rounds "
        f"of {args.runs} runs."
    )
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
