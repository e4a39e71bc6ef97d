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


def _cmd_export(args):
    from sb_keras.export import pipeline

    layout = args.layout or "folded"
    content = pipeline.export_tflite(
        args.model,
        args.output,
        quantize=args.quantize,
        layout=layout,
        data_dir=args.data_dir,
        dataset=args.dataset,
        int8_io=args.int8_io,
        calibration_count=args.calibration_count,
        per_channel=not args.per_tensor,
        strip_names=args.strip_names,
    )
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
        help="one plain conv per decomposed conv: fewer ops (default)",
    )
    group.add_argument(
        "--decomposed",
        dest="layout",
        action="store_const",
        const="decomposed",
        help="keep shared kernels once: fewer bytes",
    )
    group.add_argument(
        "--auto-layout",
        dest="layout",
        action="store_const",
        const="auto",
        help="pick folded or decomposed by measured size and latency",
    )
    p.add_argument("--data-dir", default=None, help="real dataset (int8 calibration)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--int8-io", action="store_true", help="int8 input/output tensors")
    p.add_argument("--calibration-count", type=int, default=500)
    p.add_argument(
        "--per-tensor", action="store_true", help="int8 weights: one scale per tensor"
    )
    p.add_argument(
        "--strip-names", action="store_true", help="drop tensor names and signatures"
    )
    p.set_defaults(func=_cmd_export)


# Subcommand builders, in help order. Each adds one parser.
COMMANDS = [_add_list, _add_table, _add_export]


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
