"""ResNets whose convolutions are ACDC atoms x shared coefficients."""

import math

import keras

from sb_keras.api_export import sb_export
from sb_keras.layers import ACDCCoefficients
from sb_keras.layers import ACDCConv2D
from sb_keras.layers.acdc_conv import ROUTES
from sb_keras.models import arguments as checks
from sb_keras.models.backbone import Backbone
from sb_keras.models.backbone import image_input
from sb_keras.models.resnet import blocks
from sb_keras.models.resnet import resnet as plain

SCOPES = ("layer", "stage", "network")
MAX_ATOMS = 64


@sb_export("sb_keras.models.ACDCResNet")
class ACDCResNet(Backbone):
    """ResNet with ACDC convolutions: per-layer atoms, shared coefficients.

    Every 3x3 convolution of every residual block (the strided first ones
    included) is an `ACDCConv2D`: ``m`` 2-D atoms per channel block mixed by
    coefficients ``alpha`` that belong to the sharing scope:

    * ``"layer"``: each convolution owns a ``(C, F, m)`` alpha (ACDC without
      sharing, ``m k^2 + C F m`` parameters per layer);
    * ``"stage"``: one ``(g, g, m)`` alpha per stage;
    * ``"network"``: one ``(g, g, m)`` alpha for the whole network.

    Layers of different widths share alpha through channel groups of size
    ``g`` (``group_size``): a ``C -> F`` layer is a grid of ``(C/g) x
    (F/g)`` sub-convolutions, each with its own ``m`` atoms and all mixing
    with the one alpha (see `ACDCConv2D`). The stem (3 input channels) and
    the classifier stay plain; the 1x1 projection shortcuts become 1x1 ACDC
    convolutions with the same alpha when alpha is shared
    (``decompose_shortcuts``). The blocks keep the plain ResNet layout (BN
    after every convolution, ReLU, identity/option-A/projection shortcut),
    so ``sharing=None`` builds exactly the plain `sb_keras.ResNet`, the
    baseline of the parameter table.

    Choices where the paper (method §6) is silent, each a parameter:
    ``num_atoms`` 6 (DCFNet's ``Conv_DCF`` default), the group size (the
    largest common divisor of the widths in the scope: 64 for ResNet-18, 16
    for the CIFAR ResNets), decomposed shortcuts, BN after each ACDC
    convolution, and an initialization giving every composed kernel the
    Kaiming fan-out variance of the plain model. ACDC has no orthogonality
    penalty.

    The model is a functional `keras.Model` whose config is its constructor
    arguments; alpha is the output tensor of an `ACDCCoefficients` layer fed
    to every user, so sharing survives save/load, cloning, distribution and
    TFLite conversion.

    Args:
        depth: 18 or 34 (ImageNet or CIFAR stem) or 6n+2 (CIFAR ResNets,
            option-A shortcuts).
        sharing: `"layer"`, `"stage"`, `"network"`, or None for the plain
            model.
        num_atoms: atoms ``m`` per channel block. Defaults to `6`.
        group_size: channel group ``g`` of alpha. Defaults to the greatest
            common divisor of the channels of the scope's layers (stage,
            network) or no groups (layer: one ``(C, F, m)`` alpha each).
        stem: `"cifar"` or `"imagenet"` (depth 18/34 only).
        num_classes: classes of the classifier (10, 100 or 1000 by family).
        input_shape: ``(height, width, channels)``.
        include_top: add global pooling and the classifier.
        classifier_activation: activation of the classifier (None: logits).
        preprocessing: pixel normalization (as `sb_keras.ResNet`).
        decompose_shortcuts: make 1x1 projection shortcuts ACDC too. None
            (default): when alpha is shared (``"stage"``, ``"network"``).
        batchnorm: BN after every ACDC convolution (else a bias). Defaults
            to `True`.
        route: `ACDCConv2D` route: `"auto"`, `"atoms"` or `"kernel"`.
        atom_initializer: initializer of the atoms (None: the default of
            `ACDCConv2D`).
        coefficient_initializer: initializer of alpha (None: the default of
            `ACDCCoefficients`).
        name: model name.
        dtype: the dtype policy of the layers (None: the global policy);
            kept in the config.
        data_format: `"channels_last"` or `"channels_first"` (None: the
            global ``keras.config.image_data_format()``); kept in the config.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ACDCResNet(depth=18, sharing="network")
    >>> sb_keras.count_params(model)
    572928
    >>> round(sb_keras.count_params(model) / 11_689_512, 3)
    0.049

    Reference: Ze Wang, Xiuyuan Cheng, Guillermo Sapiro and Qiang Qiu,
    *ACDC: Weight Sharing in Atom-Coefficient Decomposed Convolution*
    (arXiv 2009.02386).
    """

    def __init__(
        self,
        depth=18,
        sharing="network",
        num_atoms=6,
        group_size=None,
        stem=None,
        num_classes=None,
        input_shape=None,
        include_top=True,
        classifier_activation=None,
        preprocessing="auto",
        decompose_shortcuts=None,
        batchnorm=True,
        route="auto",
        atom_initializer=None,
        coefficient_initializer=None,
        name=None,
        dtype=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(locals(), **kwargs)

    @classmethod
    def _resolve(cls, **args):
        include_top = checks.check_bool("include_top", args["include_top"])
        spec = plain._resolve(
            args["depth"], False, None, None, None, args["stem"],
            args["num_classes"], args["input_shape"], include_top, 0.0,
        )  # fmt: skip
        depth = spec["depth"]
        if spec["family"] == "bottleneck":
            raise ValueError(
                "ACDCResNet builds basic-block ResNets: depth 6n+2, 18 or 34. "
                f"Received: depth={depth}"
            )
        sharing = checks.check_choice(
            "sharing", args["sharing"], SCOPES, allow_none=True
        )
        num_atoms = checks.check_int("num_atoms", args["num_atoms"], 1, MAX_ATOMS)
        route = checks.check_choice("route", args["route"], ROUTES)
        decompose = checks.check_optional_bool(
            "decompose_shortcuts", args["decompose_shortcuts"]
        )
        if decompose is None:
            decompose = sharing in ("stage", "network")
        group_size = args["group_size"]
        if sharing is None and group_size is not None:
            raise ValueError(
                "`group_size` only applies to ACDC models (sharing not None). "
                f"Received: group_size={group_size!r} with sharing=None"
            )
        if group_size is not None:
            widths = plain.CIFAR_WIDTHS
            if spec["family"] != "cifar":
                widths = plain.IMAGENET_WIDTHS
            group_sizes({"group_size": group_size, "sharing": sharing}, widths)
        preprocessing = args["preprocessing"]
        if preprocessing == "auto":
            preprocessing = plain._default_preprocessing(spec)
        return {
            **spec,
            "sharing": sharing,
            "num_atoms": num_atoms,
            "include_top": include_top,
            "classifier_activation": checks.check_activation(
                "classifier_activation", args["classifier_activation"]
            ),
            "preprocessing": checks.check_preprocessing(preprocessing),
            "decompose_shortcuts": decompose,
            "batchnorm": checks.check_bool("batchnorm", args["batchnorm"]),
            "route": route,
            "atom_initializer": checks.check_initializer(
                "atom_initializer", args["atom_initializer"]
            ),
            "coefficient_initializer": checks.check_initializer(
                "coefficient_initializer", args["coefficient_initializer"]
            ),
        }

    @classmethod
    def _build_graph(cls, spec):
        acdc = None
        if spec["sharing"] is not None:
            acdc = {
                "sharing": spec["sharing"],
                "num_atoms": spec["num_atoms"],
                "group_size": spec["group_size"],
                "shortcuts": spec["decompose_shortcuts"],
                "batchnorm": spec["batchnorm"],
                "route": spec["route"],
                "atom_initializer": spec["atom_initializer"],
                "coefficient_initializer": spec["coefficient_initializer"],
            }
        inputs, x = image_input(spec["input_shape"], spec["preprocessing"])
        if spec["family"] == "cifar":
            x = blocks.cifar_stem(x, plain.CIFAR_WIDTHS[0])
            n = (spec["depth"] - 2) // 6
            plan = ((n, n, n), plain.CIFAR_WIDTHS, (1, 2, 2), "zero_pad")
        else:
            widths = plain.IMAGENET_WIDTHS
            if spec["stem"] == "imagenet":
                x = blocks.imagenet_stem(x, widths[0])
            else:
                x = blocks.cifar_stem(x, widths[0])
            blocks_per_stage = plain.IMAGENET_DEPTHS[spec["depth"]][1]
            plan = (blocks_per_stage, widths, (1, 2, 2, 2), "projection")
        outputs = _stages(x, acdc, *plan)
        if spec["include_top"]:
            outputs = blocks.classifier(
                outputs, spec["num_classes"], spec["classifier_activation"]
            )
        return inputs, outputs

    @classmethod
    def _default_name(cls, spec):
        return _default_name(spec, spec["sharing"], spec["num_atoms"])

    def baseline_config(self):
        """The config of the matching plain ResNet (``sharing=None``)."""
        config = self.get_config()
        config.update(
            sharing=None,
            group_size=None,
            decompose_shortcuts=False,
            atom_initializer=None,
            coefficient_initializer=None,
            name=None,
        )
        return config


def _default_name(spec, sharing, num_atoms):
    name = f"resnet{spec['depth']}"
    if sharing is not None:
        name = f"acdc_{name}_{sharing}_m{num_atoms}"
    if spec["family"] != "cifar":
        name += f"_{spec['stem']}"
    return name


def group_sizes(acdc, widths):
    """The channel group of each stage's alpha (one value per stage)."""
    per_stage = [{widths[max(g - 1, 0)], widths[g]} for g in range(len(widths))]
    if acdc["group_size"] is not None:
        g = acdc["group_size"]
        channels = sorted(set().union(*per_stage))
        if (
            isinstance(g, bool)
            or not isinstance(g, int)
            or g < 1
            or any(c % g for c in channels)
        ):
            raise ValueError(
                "`group_size` must be a positive integer dividing the channels "
                f"of every ACDC convolution {channels}. Received: group_size={g!r}"
            )
        return [g] * len(widths)
    if acdc["sharing"] == "network":
        g = math.gcd(*set().union(*per_stage))
        return [g] * len(widths)
    return [math.gcd(*s) for s in per_stage]


def _conv_bn(x, filters, kernel_size, strides, name, bn_name, acdc, alpha):
    x, padding = blocks._pad_for(x, kernel_size, strides, name)
    own = alpha is None
    y = ACDCConv2D(
        filters,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        num_atoms=acdc["num_atoms"] if own else None,
        group_size=acdc["group_size"] if own else None,
        route=acdc["route"],
        use_bias=not acdc["batchnorm"],
        atom_initializer=acdc["atom_initializer"],
        coefficient_initializer=acdc["coefficient_initializer"] if own else None,
        name=name,
    )(x if own else [x, alpha])
    return blocks.batch_norm(y, bn_name) if acdc["batchnorm"] else y


def _block(x, filters, strides, name, shortcut_kind, acdc, alpha):
    """The basic block with ACDC 3x3 convolutions (and 1x1 shortcut)."""
    sc = f"{name}_shortcut"
    needs_projection = strides != 1 or blocks.channels(x) != filters
    if needs_projection and shortcut_kind == "projection" and acdc["shortcuts"]:
        residual = _conv_bn(x, filters, 1, strides, sc, f"{sc}_bn", acdc, alpha)
    else:
        residual = blocks.shortcut(x, filters, strides, shortcut_kind, sc)
    y = _conv_bn(x, filters, 3, strides, f"{name}_conv1", f"{name}_bn1", acdc, alpha)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_conv2", f"{name}_bn2", acdc, alpha)
    y = keras.layers.Add(name=f"{name}_add")([y, residual])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _stages(x, acdc, blocks_per_stage, widths, first_strides, shortcut_kind):
    if acdc is None:
        for g, (n, c) in enumerate(zip(blocks_per_stage, widths)):
            for i in range(n):
                strides = first_strides[g] if i == 0 else 1
                name = f"stage{g + 1}_block{i + 1}"
                x = blocks.basic_block(x, c, strides, name, shortcut_kind)
        return x
    groups = group_sizes(acdc, widths)
    m = acdc["num_atoms"]
    init = acdc["coefficient_initializer"]
    alpha = None
    if acdc["sharing"] == "network":
        alpha = ACDCCoefficients(
            m, groups[0], coefficient_initializer=init, name="coefficients"
        )(x)
    for g, (n, c) in enumerate(zip(blocks_per_stage, widths)):
        stage = f"stage{g + 1}"
        if acdc["sharing"] == "stage":
            alpha = ACDCCoefficients(
                m, groups[g], coefficient_initializer=init, name=f"{stage}_coefficients"
            )(x)
        for i in range(n):
            strides = first_strides[g] if i == 0 else 1
            x = _block(
                x, c, strides, f"{stage}_block{i + 1}", shortcut_kind, acdc, alpha
            )
    return x
