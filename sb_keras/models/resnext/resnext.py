"""ResNeXt with shared grouped filter bases (the authors' CIFAR-100 ResNeXt-50)."""

import keras

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import FilterBasis
from sb_keras.layers import GroupedBasisConv2D
from sb_keras.layers import initializers as sb_init
from sb_keras.models import arguments as checks
from sb_keras.models.backbone import Backbone
from sb_keras.models.backbone import image_input
from sb_keras.models.resnet import blocks as rb

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@sb_export("sb_keras.models.ResNeXt")
class ResNeXt(Backbone):
    """ResNeXt (CIFAR stem) whose grouped 3x3 convs share grouped bases.

    The plain model is torchvision's ResNeXt (``width = planes *
    base_width / 64 * cardinality``, stride on the grouped 3x3, projection
    shortcuts) with the CIFAR stem (one 3x3 conv, no max-pool) and 100
    classes: ResNeXt-50 32x4d has 23,177,124 parameters.

    With ``share=True`` (the authors' ``ResNext50_SingleShared``) the first
    block of each stage stays plain; in every other block the grouped 3x3
    conv, its BN, ReLU and the last 1x1 conv become a `GroupedBasisConv2D`:
    [unique grouped 3x3 (``u_g`` filters, ``u_g / 4`` groups), shared
    grouped 3x3 (``S_g`` filters, ``s / 4`` groups)] -> BN -> ReLU -> 1x1
    (``S_g + u_g -> 4 * planes``) -> BN, with ``S_g = s * 2**(g-1)`` and
    ``u_g = u * 2**(g-1)`` and one shared basis per stage. The group counts
    (the authors' unique groups are ``u_g / base_width``: the same for 32x4d)
    need ``s`` and ``u`` to be positive multiples of 4: the README's
    "ResNeXt50-S16U1" cannot be built (``u / 4 = 0`` groups) and is the
    S64U4 model, 19,333,380 parameters (the default ranks).

    Initialization as the authors' code: PyTorch's defaults (every conv and
    the classifier ``U(+-1/sqrt(fan_in))``, BN 1 and 0), then the shared
    bases orthogonal (rows orthonormal). The
    penalty is their CIFAR-100 ``train_basis``: the pooled mean of
    ``(M M^T - I)**2`` over the shared bases (rows ``S_g`` grouped filters
    of length ``9 * width / (s / 4)``), times ``orthogonality``.

    Args:
        depth: `50` or `101`; ignored when ``blocks`` is given.
        blocks: blocks per stage (overrides ``depth``; for small models).
        widths: ``planes`` per stage. Defaults to `(64, 128, 256, 512)`.
        cardinality: groups of the plain 3x3 convs. Defaults to `32`.
        base_width: channels per group at 64 planes. Defaults to `4`.
        share: build the shared-basis model.
        shared_rank: ``s`` (stage-1 shared filters). Defaults to `64`.
        unique_rank: ``u`` (stage-1 unique filters). Defaults to `4`.
        num_classes: classes of the classifier. Defaults to `100`.
        input_shape: ``(height, width, channels)``. Defaults to `(32, 32, 3)`.
        include_top: add global pooling and the classifier.
        classifier_activation: activation of the classifier (None: logits).
        preprocessing: pixel normalization built in; `"auto"` is CIFAR-100's.
        orthogonality: lambda of the penalty. Defaults to `10`.
        name: model name.
        dtype: dtype policy of the layers (None: the global one).
        data_format: `"channels_last"` only, the layout the blocks are
            written for (None: the global
            ``keras.config.image_data_format()``, which must then be it);
            kept in the config. Other formats raise a ``ValueError``.

    Example:

    >>> import sb_keras
    >>> sb_keras.ResNeXt.resolve_config(share=True)["unique_rank"]
    4
    """

    # Its blocks concatenate / group on the last axis.
    data_formats = ("channels_last",)

    def __init__(
        self,
        depth=50,
        blocks=None,
        widths=(64, 128, 256, 512),
        cardinality=32,
        base_width=4,
        share=False,
        shared_rank=None,
        unique_rank=None,
        num_classes=100,
        input_shape=(32, 32, 3),
        include_top=True,
        classifier_activation=None,
        preprocessing="auto",
        orthogonality=10.0,
        name=None,
        dtype=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(locals(), **kwargs)

    @classmethod
    def _resolve(cls, **args):
        depth = args["depth"]
        if depth not in DEPTHS or isinstance(depth, bool):
            raise ValueError(
                f"`depth` must be one of {sorted(DEPTHS)}. "
                f"{checks.received('depth', depth)}"
            )
        blocks = args["blocks"]
        if blocks is None:
            blocks = DEPTHS[depth]
        blocks = _int_list("blocks", blocks, 1, 100)
        widths = _int_list("widths", args["widths"], 1, 4096)
        if len(widths) != len(blocks):
            raise ValueError(
                f"`widths` needs one entry per stage ({len(blocks)}). "
                f"{checks.received('widths', args['widths'])}"
            )
        card = checks.check_int("cardinality", args["cardinality"], 1, 1024)
        base = checks.check_int("base_width", args["base_width"], 1, 1024)
        inner = [w * base // 64 * card for w in widths]
        if any(c < card or (w * base) % 64 for c, w in zip(inner, widths)):
            raise ValueError(
                "`widths` times `base_width` / 64 must be whole numbers of "
                f"channels per group. {checks.received('widths', args['widths'])}"
            )
        share = checks.check_bool("share", args["share"])
        s, u = args["shared_rank"], args["unique_rank"]
        if not share:
            for arg, value in (("shared_rank", s), ("unique_rank", u)):
                if value is not None:
                    raise ValueError(
                        f"`{arg}` only applies to shared models (share=True). "
                        f"{checks.received(arg, value)}"
                    )
        else:
            s = _rank("shared_rank", 64 if s is None else s, inner)
            u = _rank("unique_rank", 4 if u is None else u, inner)
        include_top = checks.check_bool("include_top", args["include_top"])
        preprocessing = args["preprocessing"]
        if preprocessing == "auto":
            preprocessing = "cifar100"
        return {
            "depth": int(depth),
            "blocks": blocks,
            "widths": widths,
            "cardinality": card,
            "base_width": base,
            "share": share,
            "shared_rank": s,
            "unique_rank": u,
            "num_classes": checks.check_num_classes(args["num_classes"], include_top),
            "input_shape": checks.check_input_shape(args["input_shape"], 8),
            "include_top": include_top,
            "classifier_activation": checks.check_activation(
                "classifier_activation", args["classifier_activation"]
            ),
            "preprocessing": checks.check_preprocessing(preprocessing),
            "orthogonality": checks.check_number(
                "orthogonality", args["orthogonality"], 0.0
            ),
        }

    @classmethod
    def _default_name(cls, spec):
        name = f"resnext{spec['depth']}_{spec['cardinality']}x{spec['base_width']}d"
        if spec["share"]:
            name += f"_s{spec['shared_rank']}u{spec['unique_rank']}"
        return name

    @classmethod
    def _build_graph(cls, spec):
        inputs, x = image_input(spec["input_shape"], spec["preprocessing"])
        x = _conv_bn(x, 64, 3, 1, "stem_conv", "stem_bn")
        x = keras.layers.ReLU(name="stem_relu")(x)
        share = spec["share"]
        card, base = spec["cardinality"], spec["base_width"]
        normalizer = 0
        if share:
            ranks = [spec["shared_rank"] * 2**g for g, n in enumerate(spec["blocks"])]
            normalizer = sum(
                regularizers.shared_entry_count([r])  # separate bases
                for r, n in zip(ranks, spec["blocks"])
                if n > 1
            )
        for g, (n, planes) in enumerate(zip(spec["blocks"], spec["widths"])):
            stage = f"stage{g + 1}"
            width = planes * base // 64 * card
            strides = 1 if g == 0 else 2
            x = _block(x, planes, width, card, strides, f"{stage}_block1")
            basis = None
            if share and n > 1:
                groups = spec["shared_rank"] // 4
                basis = FilterBasis(
                    rank=spec["shared_rank"] * 2**g,
                    in_channels=width // groups,
                    orthogonality=spec["orthogonality"],
                    orthogonality_normalizer=normalizer,
                    name=f"{stage}_basis",
                )(x)
            for i in range(1, n):
                name = f"{stage}_block{i + 1}"
                if basis is None:
                    x = _block(x, planes, width, card, 1, name)
                else:
                    x = _shared_block(x, planes, width, spec, g, basis, name)
        if spec["include_top"]:
            x = rb.classifier(x, spec["num_classes"], spec["classifier_activation"])
        return inputs, x

    def baseline_config(self):
        """The config of the matching unshared model."""
        config = self.get_config()
        config.update(share=False, shared_rank=None, unique_rank=None, name=None)
        return config


def _int_list(name, value, low, high):
    if not (
        isinstance(value, (list, tuple))
        and 1 <= len(value) <= 8
        and all(checks._is_int(v) and low <= v <= high for v in value)
    ):
        raise ValueError(
            f"`{name}` must be a list of 1 to 8 integers in [{low}, {high}]. "
            f"{checks.received(name, value)}"
        )
    return [int(v) for v in value]


def _rank(name, value, inner):
    """A rank whose groups (``rank / 4``; unique: per stage) divide the widths."""
    value = checks.check_int(name, value, 0, 1 << 16)
    scale = name == "unique_rank"  # u_g = u * 2**g, groups u_g / 4
    groups = [value * (2**g if scale else 1) // 4 for g in range(len(inner))]
    if value % 4 or value == 0 or any(w % q for w, q in zip(inner, groups)):
        raise ValueError(
            f"`{name}` must be a positive multiple of 4 whose group counts "
            f"{groups} (the authors' rank / 4) divide the stage widths {inner}; "
            "otherwise the grouped basis convolution cannot be built. "
            f"{checks.received(name, value)}"
        )
    return value


def _conv(x, filters, kernel_size, strides, name, groups=1):
    """A bias-free conv with PyTorch's default init (the authors' ResNeXt)."""
    x, padding = rb._pad_for(x, kernel_size, strides, name)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=False,
        kernel_initializer=sb_init.dense_kernel_initializer(),
        name=name,
    )(x)


def _conv_bn(x, filters, kernel_size, strides, name, bn_name):
    return rb.batch_norm(_conv(x, filters, kernel_size, strides, name), bn_name)


def _shortcut(x, filters, strides, name):
    if strides == 1 and x.shape[-1] == filters:
        return x
    return _conv_bn(x, filters, 1, strides, name, f"{name}_bn")


def _block(x, planes, width, cardinality, strides, name):
    """1x1 - grouped 3x3 (stride) - 1x1 (x4), projection shortcut."""
    out = 4 * planes
    residual = _shortcut(x, out, strides, f"{name}_shortcut")
    y = _conv_bn(x, width, 1, 1, f"{name}_conv1", f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, width, 3, strides, f"{name}_conv2", groups=cardinality)
    y = rb.batch_norm(y, f"{name}_bn2")
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = _conv_bn(y, out, 1, 1, f"{name}_conv3", f"{name}_bn3")
    y = keras.layers.Add(name=f"{name}_add")([y, residual])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _shared_block(x, planes, width, spec, g, basis, name):
    """1x1 - [unique, shared] grouped 3x3 - BN - ReLU - 1x1 - BN, identity."""
    y = _conv_bn(x, width, 1, 1, f"{name}_conv1", f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    u = spec["unique_rank"] * 2**g
    y = GroupedBasisConv2D(
        4 * planes,
        unique_rank=u,
        unique_groups=u // 4,
        activation="relu",
        output_bn=True,
        kernel_initializer=sb_init.dense_kernel_initializer(),
        coefficient_initializer=sb_init.dense_kernel_initializer(),
        momentum=rb.BN_MOMENTUM,
        epsilon=rb.BN_EPSILON,
        name=f"{name}_conv2",
    )([y, basis])
    y = keras.layers.Add(name=f"{name}_add")([y, x])
    return keras.layers.ReLU(name=f"{name}_out")(y)
