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


def _cmd_convert(args):
    from sb_keras import checkpoints
    from sb_keras import counting

    if not args.output.endswith(".keras"):
        raise ValueError(
            f"The output must be a .keras file. Received: output={args.output!r}"
        )
    model = checkpoints.load_authors_checkpoint(args.checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model.save(args.output)
    print(
        f"{args.checkpoint} -> {args.output}: {model.name} "
        f"({counting.count_params(model):,} parameters)"
    )


def _cmd_evaluate(args):
    from sb_keras import evaluate

    result = evaluate.evaluate(
        args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
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
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--dataset", default="cifar10", help="default: cifar10")
    p.set_defaults(func=_cmd_evaluate)


# Subcommand builders, in help order. Each adds one parser.
COMMANDS = [_add_list, _add_table, _add_convert, _add_evaluate]


def build_parser():
    parser = argparse.ArgumentParser(
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
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
