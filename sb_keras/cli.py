"""The ``sb-keras`` command (also ``python -m sb_keras``).

Each subcommand parses its flags and calls one library function; the logic
lives in the library. Heavy imports happen inside the handlers so that
``sb-keras --help`` is instant.
"""

import argparse
import os
import sys


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low):
    """An argparse type: an integer >= ``low`` (the error names the flag)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {low}. Received: {text!r}"
            )
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_POSITIVE = _int_at_least(1)


def _json_dict(text):
    """An argparse type: a JSON object, e.g. '{"depth": 8}'."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"depth\": 8}}'. Received: {text!r}"
        )
    return value


def _cmd_list(args):
    from sb_keras import registry

    for name in registry.list_models(args.pattern):
        print(f"{name:40s} {registry.model_info(name)['description']}")


def _cmd_table(args):
    from sb_keras import counting
    from sb_keras import registry

    names = args.models or registry.list_models(args.pattern or "*")
    print(counting.count_table(names, baseline=not args.no_baseline))


def _add_list(sub):
    p = sub.add_parser("list", help="list the registered model variants")
    p.add_argument("pattern", nargs="?", default=None, help="glob, e.g. 'resnet56*'")
    p.set_defaults(func=_cmd_list)


def _add_table(sub):
    p = sub.add_parser(
        "table", help="print parameters and MACs against the unshared baselines"
    )
    p.add_argument("models", nargs="*", help="registry names (default: all)")
    p.add_argument("--pattern", default=None, help="glob over registry names")
    p.add_argument("--no-baseline", action="store_true")
    p.set_defaults(func=_cmd_table)


def _cmd_tune(args):
    import numpy as np

    from sb_keras import data
    from sb_keras import tuning

    x, y = data.load_arrays(args.dataset, "train", args.data_dir, limit=args.limit)
    if not 0 < args.val_split < 1:
        raise ValueError(
            f"`--val-split` must be in (0, 1). Received: val_split={args.val_split}"
        )
    # Validation is held out of the training split (never the test split).
    order = np.random.RandomState(args.seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * args.val_split)))
    val, train = order[:n_val], order[n_val:]
    strategy = None
    if args.mirrored:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
    tuner = tuning.tune(
        x[train],
        y[train],
        validation_data=(x[val], y[val]),
        tuner=args.tuner,
        max_trials=args.max_trials,
        epochs=args.epochs,
        batch_size=args.batch_size,
        directory=args.directory,
        project_name=args.project,
        overwrite=args.overwrite,
        strategy=strategy,
        seed=args.seed,
        verbose=args.verbose,
        depth=args.depth,
        sharings=tuple(args.sharings.split(",")),
        shared_ranks=tuple(int(v) for v in args.shared_ranks.split(",")),
        unique_ranks=tuple(int(v) for v in args.unique_ranks.split(",")),
        orthogonality=tuple(float(v) for v in args.orthogonality.split(",")),
        learning_rate=(args.lr_min, args.lr_max),
        max_params=args.max_params,
        max_macs=args.max_macs,
        budget_mode=args.budget_mode,
    )
    rows = tuning.results_table(tuner)
    table = tuning.markdown_results(rows)
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    if args.plot:
        tuning.plot_pareto(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.save_best:
        tuner.get_best_models(1)[0].save(args.save_best)
        print(f"best model: {args.save_best}")


def _add_tune(sub):
    p = sub.add_parser(
        "tune",
        help="search sharing mode, ranks, lambda and lr with keras-tuner",
    )
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None, help="folder with train.npz")
    p.add_argument("--limit", type=_POSITIVE, default=None, help="training images")
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--tuner", default="bayesian", help="bayesian, hyperband, random")
    p.add_argument("--max-trials", type=_POSITIVE, default=10)
    p.add_argument("--epochs", type=_POSITIVE, default=5)
    p.add_argument("--batch-size", type=_POSITIVE, default=128)
    p.add_argument("--sharings", default="plain,single,double")
    p.add_argument("--shared-ranks", default="8,16,32")
    p.add_argument("--unique-ranks", default="0,1,2")
    p.add_argument("--orthogonality", default="0,1,10")
    p.add_argument("--lr-min", type=float, default=0.01)
    p.add_argument("--lr-max", type=float, default=0.2)
    p.add_argument("--max-params", type=int, default=None)
    p.add_argument("--max-macs", type=int, default=None)
    p.add_argument("--budget-mode", default="penalize", help="penalize or skip")
    p.add_argument("--mirrored", action="store_true", help="MirroredStrategy")
    p.add_argument("--directory", default="sb_keras_tuning")
    p.add_argument("--project", default="search")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default=None, help="write the Markdown table here")
    p.add_argument("--plot", default=None, help="write the Pareto plot (PNG)")
    p.add_argument("--save-best", default=None, help="save the best model (.keras)")
    p.add_argument("--verbose", type=int, default=1)
    p.set_defaults(func=_cmd_tune)


def _cmd_convert(args):
    from sb_keras import checkpoints
    from sb_keras import counting
    from sb_keras import paths

    if not args.output.endswith(".keras"):
        raise ValueError(
            f"The output must be a .keras file. Received: output={args.output!r}"
        )
    paths.check_output_file(args.output, "output")
    model = checkpoints.load_authors_checkpoint(args.checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model.save(args.output)
    print(
        f"{args.checkpoint} -> {args.output}: {model.name} "
        f"({counting.count_params(model):,} parameters)"
    )


def _cmd_evaluate(args):
    from sb_keras import evaluate

    if args.model.lower().endswith(".tflite") and not args.save_logits:
        # The deployment table: top-1, size and batch-1 latency (LiteRT).
        from sb_keras import litert

        litert.evaluate_files(
            [args.model],
            data_dir=args.data_dir,
            dataset=args.dataset,
            limit=args.limit,
        )
        return
    result = evaluate.evaluate(
        args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        logits_path=args.save_logits,
    )
    print(
        f"{args.model}: top-1 {result['top1']:.2f}% "
        f"({result['correct']}/{result['total']}) on {args.dataset} test"
    )


def _add_convert(sub):
    p = sub.add_parser(
        "convert",
        help="convert an authors' PyTorch checkpoint (.pth) to a .keras model",
        description="Reads the checkpoint without torch (no code from the file "
        "runs), infers the ResNet and writes it with all weights placed.",
    )
    p.add_argument("checkpoint", help="an authors' CIFAR-10 .pth file")
    p.add_argument("output", help="the .keras file to write")
    p.set_defaults(func=_cmd_convert)


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate",
        help="print the top-1 accuracy of a .keras model or a .pth checkpoint",
    )
    p.add_argument("model", help="a .keras file or an authors' .pth checkpoint")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with test.npz (x uint8 [N,32,32,3], y [N]) or a "
        "tensorflow-datasets data dir (default: $SB_KERAS_DATA_DIR, then tfds)",
    )
    p.add_argument("--limit", type=_POSITIVE, default=None, help="first N images only")
    p.add_argument("--batch-size", type=_POSITIVE, default=200)
    p.add_argument("--dataset", default="cifar10", help="default: cifar10")
    p.add_argument(
        "--save-logits",
        default=None,
        metavar="FILE.npy",
        help="also write the model's outputs [N, classes] (float32) here",
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args):
    import json

    from sb_keras.training import NonFiniteLossError
    from sb_keras.training import TrainConfig
    from sb_keras.training import train

    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS})
    try:
        metrics = train(config)
    except NonFiniteLossError as e:
        print(f"sb-keras train: error: {e}", file=sys.stderr)
        return 3
    keep = ("model", "test_accuracy", "test_loss", "train_images_per_second")
    print(json.dumps({k: metrics[k] for k in keep}))
    print(f"model and metrics written to {config.output}")


_TRAIN_FIELDS = (
    "model dataset epochs batch_size lr momentum schedule weight_decay "
    "orthogonality precision strategy devices seed data_dir output limit "
    "test_limit image_size deterministic verbose tensorboard model_args init_from qat"
).split()


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a model with the paper's recipe (resumes after a crash)",
        description="Train a registered model. Defaults are Kang & Kim's CIFAR "
        "recipe. Running the same command again resumes an interrupted run.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="registry name (default: resnet56_s16u1_double, or the model in "
        "--init-from)",
    )
    p.add_argument(
        "--model-args",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="constructor arguments over the registry's, e.g. '{\"depth\": 8}'",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="FILE",
        help="fine-tune: start from a .keras model of sb_keras or an authors' "
        ".pth checkpoint (the model comes from the file)",
    )
    p.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware training: fold the model and train its int8 "
        "fake-quant twin (then: sb-keras export --quantize int8); use a tiny "
        "--lr such as 1e-5",
    )
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, imagenet")
    p.add_argument("--epochs", type=_POSITIVE, default=300)
    p.add_argument(
        "--batch-size", type=_POSITIVE, default=256, help="global batch (all replicas)"
    )
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument(
        "--schedule",
        default="step",
        help="step (x0.1 at 50%% and 75%% of the epochs), step:E1,E2, cosine, constant",
    )
    p.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2")
    p.add_argument("--orthogonality", type=float, default=10.0, help="lambda")
    p.add_argument(
        "--precision", default="float32", choices=["float32", "mixed_bfloat16"]
    )
    p.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", "mirrored", "multiworker", "none"],
    )
    p.add_argument(
        "--devices", type=_POSITIVE, default=None, help="logical CPU devices or GPUs"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with train/test .npz, or a tensorflow-datasets data dir "
        "(ImageNet: imagenet2012 prepared there, streamed)",
    )
    p.add_argument("--output", default="runs/train", help="folder of the run")
    p.add_argument("--limit", type=_POSITIVE, default=None, help="first N train images")
    p.add_argument(
        "--test-limit", type=_POSITIVE, default=None, help="N test images (spread)"
    )
    p.add_argument(
        "--image-size", type=_POSITIVE, default=None, help="ImageNet crop side (224)"
    )
    p.add_argument("--deterministic", action="store_true", help="deterministic ops")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.set_defaults(func=_cmd_train)


def _cmd_export(args):
    from sb_keras.export import pipeline

    layout = args.layout or pipeline.DEFAULT_LAYOUT
    model = args.model
    if layout == "auto":
        model = pipeline.load_float_model(model)
        layout, stats = pipeline.choose_layout(model)
        measured = ", ".join(
            f"{k} {size:,} B {ms:.2f} ms" for k, (size, ms) in stats.items()
        )
        print(f"auto layout: {layout} (float32 files, batch 1: {measured})")
    content = pipeline.export_tflite(
        model,
        args.output,
        quantize=args.quantize,
        layout=layout,
        data_dir=args.data_dir,
        dataset=args.dataset,
        int8_io=args.int8_io,
        calibration_count=args.calibration_count,
        per_channel=not args.per_tensor,
        strip_names=args.strip_names,
        activation_range=args.activation_range,
        bias_correction=args.bias_correction,
        labels=args.labels,
        metadata_python=args.metadata_python,
    )
    from sb_keras.export import metadata

    if metadata.writer_python(args.metadata_python) is None:
        print(f"no TFLite Metadata written. {metadata.INSTALL_HINT}")
    print(f"wrote {args.output} ({len(content):,} bytes, {args.quantize}, {layout})")


def _add_export(sub):
    p = sub.add_parser(
        "export", help="fold and convert a .keras model to .tflite (builtin ops)"
    )
    p.add_argument("model", help="a .keras file (or an authors' checkpoint)")
    p.add_argument("output", help="the .tflite file to write")
    p.add_argument(
        "--quantize", default="none", choices=("none", "float16", "dynamic", "int8")
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--folded",
        dest="layout",
        action="store_const",
        const="folded",
        help="one plain conv per decomposed conv: fewest ops",
    )
    group.add_argument(
        "--decomposed",
        dest="layout",
        action="store_const",
        const="decomposed",
        help="keep shared kernels once: fewest bytes",
    )
    group.add_argument(
        "--mixed",
        dest="layout",
        action="store_const",
        const="mixed",
        help="decomposed where it saves many bytes, folded elsewhere (default)",
    )
    group.add_argument(
        "--auto-layout",
        dest="layout",
        action="store_const",
        const="auto",
        help="pick the layout by measured size and latency (prints the choice)",
    )
    p.add_argument("--data-dir", default=None, help="real dataset (int8 calibration)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--int8-io", action="store_true", help="int8 input/output tensors")
    p.add_argument("--calibration-count", type=_POSITIVE, default=500)
    p.add_argument(
        "--per-tensor", action="store_true", help="int8 weights: one scale per tensor"
    )
    p.add_argument(
        "--strip-names", action="store_true", help="drop tensor names and signatures"
    )
    p.add_argument(
        "--activation-range",
        default="minmax",
        choices=("minmax", "batch_mean"),
        help="int8 activation ranges: min/max over all calibration images, or "
        "the mean of per-batch min/max (finer steps)",
    )
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="int8: correct biases for the mean shift of int8 weights",
    )
    p.add_argument(
        "--labels", default=None, help="label file for the metadata (one per line)"
    )
    p.add_argument(
        "--metadata-python",
        default=None,
        help="a Python with mediapipe==0.10.21 that writes TFLite Metadata "
        "(default: $SB_KERAS_METADATA_PYTHON)",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_compress(args):
    import tempfile

    import keras

    from sb_keras import compression
    from sb_keras import counting
    from sb_keras import data

    if not args.output.endswith(".keras"):
        raise ValueError(
            f"The output must be a .keras file. Received: output={args.output!r}"
        )
    model = keras.models.load_model(args.model)
    images = None
    if args.data_dir is not None or args.calibration_count is not None:
        count = args.calibration_count or 256
        if count < 1:
            raise ValueError(
                "`--calibration-count` must be >= 1. "
                f"Received: calibration_count={count}"
            )
        images, _ = data.load_arrays(args.dataset, "train", args.data_dir, limit=count)
    shared, report = compression.compress(
        model,
        args.shared_rank,
        args.unique_rank,
        sharing=args.sharing,
        calibration_data=images,
        method=args.method,
    )
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=folder)
    os.close(fd)
    try:
        shared.save(tmp)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for label, m in (("before", model), ("after", shared)):
        print(
            f"{label}: {m.name}: {counting.count_params(m):,} parameters, "
            f"{counting.count_macs(m) / 1e6:.1f} M MACs"
        )
    print(f"method {report['method']}, sharing {report['sharing']}")
    from sb_keras.compression import mobilenet_v2

    for g in report["groups"]:
        if mobilenet_v2.is_mobilenet_v2(model):  # whole shared 1x1 kernels
            print(mobilenet_v2.format_group(g))
            continue
        if "rounds" in g:  # a bottleneck source: whole shared kernels
            print(
                f"stage {g['stage']} {g['group']:5s} shared x{g['layers']}: "
                f"relative error {g['relative_error']:.3e} (source orders "
                f"{g['initial_objective_error']:.3e}, {g['rounds']} rounds)"
            )
            continue
        print(
            f"stage {g['stage']} {g['group']:5s} S{g['shared_rank']}U{g['unique_rank']}"
            f" x{g['layers']}: relative error {g['relative_error']:.3e} "
            f"(in the {report['method']} metric {g['objective_error']:.3e}, "
            f"one SVD {g['initial_relative_error']:.3e}; "
            f"{g['iterations']} iterations)"
        )
    print(f"wrote {args.output}")


def _add_compress(sub):
    p = sub.add_parser(
        "compress",
        help="compress a trained plain ResNet or MobileNetV2 (.keras) into "
        "shared filter bases",
        description="Approximates the 3x3 filters of each stage by a shared "
        "basis plus unique ones (sb_keras.compress) and writes the shared "
        "model; fine-tune it afterwards. A bottleneck ResNet (50/101/152) "
        "gets whole shared kernels instead: no rank flags. A MobileNetV2 "
        "likewise (whole shared 1x1 kernels).",
    )
    p.add_argument(
        "model",
        help="a plain sb_keras ResNet or MobileNetV2, or a functional Keras "
        "ResNet of the same layout (.keras file)",
    )
    p.add_argument("output", help="the .keras file to write")
    p.add_argument(
        "--shared-rank",
        type=int,
        default=None,
        help="S (stage 1), required for basic-block ResNets; 0: per-layer low "
        "rank, nothing shared (a baseline)",
    )
    p.add_argument(
        "--unique-rank", type=int, default=None, help="u (stage 1; default 1)"
    )
    p.add_argument("--sharing", default="single", help="single or double")
    p.add_argument(
        "--method",
        default=None,
        help="whitened or plain (default: whitened with calibration data)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with train.npz for calibration images (default: none)",
    )
    p.add_argument(
        "--calibration-count",
        type=int,
        default=None,
        help="calibration images from the training split (default 256)",
    )
    p.add_argument("--dataset", default="cifar10", help="default: cifar10")
    p.set_defaults(func=_cmd_compress)


# Subcommand builders, in help order. Each adds one parser.
COMMANDS = [
    _add_list,
    _add_table,
    _add_train,
    _add_convert,
    _add_evaluate,
    _add_export,
    _add_tune,
    _add_compress,
]
from sb_keras.cli_adapt import add_parser as _add_adapt  # noqa: E402

COMMANDS.append(_add_adapt)


def build_parser():
    parser = _Parser(
        prog="sb-keras",
        description="ConvNets with shared filter bases (Keras 3).",
    )
    from sb_keras.version import __version__

    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None):
    _quiet_tf()
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sb-keras {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: one line, no traceback
        print(f"sb-keras {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
