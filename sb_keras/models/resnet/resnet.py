"""ResNets with shared filter bases (Kang & Kim) and their plain baselines."""

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import FilterBasis
from sb_keras.layers.batch_norm import check_batchnorm
from sb_keras.layers.common import image_shape
from sb_keras.models import arguments as checks
from sb_keras.models.backbone import Backbone
from sb_keras.models.backbone import image_input
from sb_keras.models.resnet import blocks

# depth -> (block kind, blocks per stage)
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
SHARINGS = ("single", "double")
STEMS = ("cifar", "imagenet")


def _is_cifar_depth(depth):
    # 50 and 152 are also 6n+2; the ImageNet family takes those names.
    return depth >= 8 and (depth - 2) % 6 == 0 and depth not in IMAGENET_DEPTHS


@sb_export("sb_keras.models.ResNet")
class ResNet(Backbone):
    """ResNet whose 3x3 convolutions are built from shared filter bases.

    One class covers the family of Kang & Kim's code:

    * ``depth = 6n + 2`` (20, 32, 44, 56, 110, ...; 50 and 152 excepted,
      which name the bottleneck models): the CIFAR ResNets of He
      et al. (16/32/64 channels, option-A shortcuts, 10 classes).
    * ``depth`` 18 or 34: basic-block ResNets with projection shortcuts, with
      the ImageNet stem (7x7/2 + max-pool, 1000 classes) or the CIFAR stem
      (one 3x3 conv, 100 classes, as the authors' CIFAR-100 models).
    * ``depth`` 50, 101 or 152: bottleneck ResNets (torchvision layout).

    With ``share=True`` the non-first blocks of every stage change (so a
    depth-8 CIFAR ResNet, one block per stage, has nothing to share):

    * basic blocks: each 3x3 conv becomes a `BasisConv2D` (per-layer unique
      basis of ``unique_rank * 2**(g-1)`` filters and a stage-wide shared
      basis of ``shared_rank * 2**(g-1)`` filters, BN, 1x1 coefficients,
      BN). ``sharing="single"`` uses one basis for both convs of all those
      blocks; ``"double"`` one basis per conv position, initialized jointly
      orthogonal. ``unique_rank=0`` is the "SharedOnly" ablation and
      ``shared_rank=0`` the "NonShared" one.
    * bottleneck blocks (the authors' ResNet50/101 "Shared"): the 3x3 conv
      kernel is one tensor for all those blocks (``"single"``, the final
      README's "ResNet50-Shared"); ``"double"`` also shares the last 1x1
      ("Shared++").

    What ``share=True`` picks by default is the authors' training-script
    default for that setting: CIFAR ResNets S16U1 double sharing (their
    CIFAR-10 default and best model), CIFAR-stem ResNet-18/34 S16U1 single
    sharing (their CIFAR-100 default), ImageNet ResNet-18/34 S32U1 double
    sharing (their ILSVRC default) and bottleneck ResNets single sharing.

    The orthogonality penalty ``orthogonality * R`` (the authors' pooled mean
    over all stages, lambda 10) is added to the model's losses by the layers
    that own the entries, once per forward pass. With
    ``orthogonality_include_unique=True`` it also covers the unique filters
    (the authors' CIFAR-10 variant). The bottleneck "double" model pools its
    3x3 and 1x1 kernels separately (``R1 + R2``), as the authors did.

    The model is a functional `keras.Model` (an `sb_keras.models.Backbone`)
    whose config is its constructor arguments and dtype policy:
    ``keras.models.load_model`` rebuilds it with this class,
    which recreates the sharing by construction (the bases are graph edges).

    Args:
        depth: network depth (see above).
        share: build the shared-basis model instead of the plain one.
        shared_rank: ``s`` of "S{s}U{u}" (stage-1 shared filters).
        unique_rank: ``u`` of "S{s}U{u}" (stage-1 unique filters per layer).
        sharing: `"single"` or `"double"`.
        stem: `"cifar"` or `"imagenet"` (18/34/50/101/152 only).
        num_classes: classes of the classifier.
        input_shape: ``(height, width, channels)``; spatial sizes may be
            None.
        include_top: add global pooling and the classifier. Without it the
            model returns the last feature map.
        classifier_activation: activation of the classifier; None (the
            default) returns logits.
        preprocessing: the pixel normalization built into the model: a name
            of `sb_keras.layers.preprocessing.NORMALIZATIONS` (the model then
            takes raw RGB pixels in [0, 255]) or None (the model takes inputs
            normalized elsewhere). `"auto"` (default) picks the authors'
            choice: ImageNet statistics for the CIFAR ResNets (as their
            CIFAR-10 code) and ImageNet models, CIFAR-100 statistics for the
            CIFAR-stem ResNet-18/34.
        orthogonality: lambda of the orthogonality penalty. Defaults to `10`.
        orthogonality_include_unique: use the CIFAR-10 variant of the penalty.
        batchnorm: `"keras"` (default) or `"pytorch"`: how every BatchNorm
            updates its running statistics in training. `"pytorch"` (the
            default of the models converted from the authors' checkpoints)
            averages the unbiased batch variance and counts
            ``num_batches_tracked``, as ``torch.nn.BatchNorm2d``; see
            `sb_keras.layers.TorchBatchNormalization`.
        name: model name.
        dtype: the dtype policy the layers are built under (e.g.
            `"mixed_bfloat16"`); None (default) takes the global policy. It
            is part of the config, so a saved model loads under its policy.
        data_format: `"channels_last"` or `"channels_first"`, the layout of
            the layers and of ``input_shape``; None (default) takes
            ``keras.config.image_data_format()``. It is part of the config,
            so a saved model loads in its format.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=56, share=True)
    >>> model.count_params() - sb_keras.count_params(model)  # BN statistics
    11776
    >>> sb_keras.count_params(model)
    319226

    Reference: Woochul Kang and Daeyeon Kim, *Learning Deeply Shared Filter
    Bases for Efficient ConvNets* (arXiv 2006.05066); official code
    ``ssregibility/Net_RL2``.
    """

    def __init__(
        self,
        depth=56,
        share=False,
        shared_rank=None,
        unique_rank=None,
        sharing=None,
        stem=None,
        num_classes=None,
        input_shape=None,
        include_top=True,
        classifier_activation=None,
        preprocessing="auto",
        orthogonality=10.0,
        orthogonality_include_unique=False,
        batchnorm="keras",
        name=None,
        dtype=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(locals(), **kwargs)

    @classmethod
    def _resolve(cls, **args):
        share = checks.check_bool("share", args["share"])
        include_top = checks.check_bool("include_top", args["include_top"])
        spec = _resolve(
            args["depth"],
            share,
            args["shared_rank"],
            args["unique_rank"],
            args["sharing"],
            args["stem"],
            args["num_classes"],
            args["input_shape"],
            include_top,
            args["orthogonality"],
        )
        preprocessing = args["preprocessing"]
        if preprocessing == "auto":
            preprocessing = _default_preprocessing(spec)
        return {
            **spec,
            "include_top": include_top,
            "preprocessing": checks.check_preprocessing(preprocessing),
            "classifier_activation": checks.check_activation(
                "classifier_activation", args["classifier_activation"]
            ),
            "orthogonality_include_unique": checks.check_bool(
                "orthogonality_include_unique", args["orthogonality_include_unique"]
            ),
            "batchnorm": check_batchnorm(args["batchnorm"]),
        }

    @classmethod
    def _build_graph(cls, spec):
        inputs, x = image_input(spec["input_shape"], spec["preprocessing"])
        builder = _build_cifar if spec["family"] == "cifar" else _build_imagenet
        with blocks.batchnorm_convention(spec["batchnorm"]):
            outputs = builder(x, spec, spec["orthogonality_include_unique"])
        if spec["include_top"]:
            outputs = blocks.classifier(
                outputs, spec["num_classes"], spec["classifier_activation"]
            )
        return inputs, outputs

    @classmethod
    def _default_name(cls, spec):
        return _default_name(spec)

    def baseline_config(self):
        """The config of the matching unshared model (same depth and head)."""
        config = self.get_config()
        config.update(
            share=False,
            shared_rank=None,
            unique_rank=None,
            sharing=None,
            name=None,
        )
        return config


def _default_preprocessing(spec):
    if spec["family"] != "cifar" and spec["stem"] == "cifar":
        return "cifar100"
    return "imagenet"


def _resolve(
    depth,
    share,
    shared_rank,
    unique_rank,
    sharing,
    stem,
    num_classes,
    input_shape,
    include_top,
    orthogonality,
):
    """Validates the arguments and fills in the paper's defaults."""
    depth = checks.check_int("depth", depth, 8, checks.MAX_CIFAR_DEPTH)
    if _is_cifar_depth(depth):
        family = "cifar"
        if stem is not None and stem != "cifar":
            raise ValueError(
                f"CIFAR ResNet-{depth} (depth 6n+2) only has the 'cifar' stem. "
                f"Received: stem={stem!r}"
            )
        stem = "cifar"
    elif depth in IMAGENET_DEPTHS:
        family = IMAGENET_DEPTHS[depth][0]
        stem = checks.check_choice("stem", "imagenet" if stem is None else stem, STEMS)
    else:
        raise ValueError(
            "`depth` must be 6n+2 (20, 32, 44, 56, 110, ..., "
            f"{checks.MAX_CIFAR_DEPTH}) for the CIFAR ResNets or one of 18, 34, "
            f"50, 101, 152. Received: depth={depth}"
        )
    sharing = checks.check_choice("sharing", sharing, SHARINGS, allow_none=True)
    if not share:
        for arg, value in (
            ("shared_rank", shared_rank),
            ("unique_rank", unique_rank),
            ("sharing", sharing),
        ):
            if value is not None:
                raise ValueError(
                    f"`{arg}` only applies to shared models (share=True). "
                    f"Received: {arg}={value!r} with share=False"
                )
    elif family == "bottleneck":
        for arg, value in (("shared_rank", shared_rank), ("unique_rank", unique_rank)):
            if value is not None:
                raise ValueError(
                    f"Bottleneck ResNet-{depth} shares whole kernels and has no "
                    f"ranks. Received: {arg}={value!r}"
                )
        sharing = sharing or "single"
    else:
        c1 = CIFAR_WIDTHS[0] if family == "cifar" else IMAGENET_WIDTHS[0]
        limit = 9 * c1  # the dimension of a stage-1 filter
        default_s = 32 if stem == "imagenet" else 16
        shared_rank = default_s if shared_rank is None else shared_rank
        unique_rank = 1 if unique_rank is None else unique_rank
        shared_rank = checks.check_int("shared_rank", shared_rank, 0, limit)
        unique_rank = checks.check_int("unique_rank", unique_rank, 0, limit)
        if shared_rank + unique_rank == 0:
            raise ValueError(
                "A decomposed layer needs at least one basis filter. "
                "Received: shared_rank=0, unique_rank=0"
            )
        if sharing is None:
            sharing = "single" if (family == "basic" and stem == "cifar") else "double"
    if num_classes is None:
        num_classes = 10 if family == "cifar" else (100 if stem == "cifar" else 1000)
    num_classes = checks.check_num_classes(num_classes, include_top)
    if input_shape is None:
        size = 224 if stem == "imagenet" else 32
        input_shape = image_shape(size, size, 3)  # in the global data_format
    input_shape = checks.check_input_shape(input_shape, 32 if stem == "imagenet" else 8)
    return {
        "family": family,
        "depth": depth,
        "share": bool(share),
        "shared_rank": shared_rank,
        "unique_rank": unique_rank,
        "sharing": sharing,
        "stem": stem,
        "num_classes": num_classes,
        "input_shape": input_shape,
        "orthogonality": checks.check_number("orthogonality", orthogonality, 0.0),
    }


def _default_name(spec):
    name = f"resnet{spec['depth']}"
    if spec["share"]:
        if spec["family"] == "bottleneck":
            name += "_shared"
        else:
            name += f"_s{spec['shared_rank']}u{spec['unique_rank']}"
        if spec["sharing"] == "double":
            name += "_double"
    if spec["family"] != "cifar":
        name += f"_{spec['stem']}"
    return name


def _decomposed_stages(spec, blocks_per_stage, widths, include_unique):
    """Per-stage basis plans and the pooled-mean normalizer of the model."""
    nb = 2 if spec["sharing"] == "double" else 1
    plans, total = [], 0
    if not spec["share"]:
        return plans, total
    for g, (n, c) in enumerate(zip(blocks_per_stage, widths)):
        s = spec["shared_rank"] * 2**g
        u = spec["unique_rank"] * 2**g
        layers = 2 * (n - 1)
        plans.append({"channels": c, "shared": s, "unique": u, "num_bases": nb})
        if n > 1 and s > 0:
            total += regularizers.shared_entry_count([s] * nb)
            if include_unique and u > 0:
                total += layers * regularizers.unique_entry_count([s] * nb, u)
    return plans, total


def _basic_stages(
    x, spec, blocks_per_stage, widths, first_strides, shortcut_kind, include_unique
):
    lam = spec["orthogonality"]
    plans, normalizer = _decomposed_stages(
        spec, blocks_per_stage, widths, include_unique
    )
    for g, (n, c) in enumerate(zip(blocks_per_stage, widths)):
        stage = f"stage{g + 1}"
        x = blocks.basic_block(x, c, first_strides[g], f"{stage}_block1", shortcut_kind)
        decomposed = None
        if plans and n > 1:
            plan = plans[g]
            bases = []
            if plan["shared"] > 0:
                bases = FilterBasis(
                    rank=plan["shared"],
                    in_channels=c,
                    num_bases=plan["num_bases"],
                    orthogonality=lam,
                    orthogonality_normalizer=normalizer,
                    name=f"{stage}_basis",
                )(x)
                bases = bases if isinstance(bases, list) else [bases]
            unique_lam = lam if (include_unique and bases) else 0.0
            decomposed = {
                "bases": bases,
                "unique_rank": plan["unique"],
                "penalty": (unique_lam, normalizer if unique_lam else None),
            }
        for i in range(1, n):
            x = blocks.basic_block(
                x, c, 1, f"{stage}_block{i + 1}", shortcut_kind, decomposed
            )
    return x


def _build_cifar(inputs, spec, include_unique):
    x = blocks.cifar_stem(inputs, CIFAR_WIDTHS[0])
    n = (spec["depth"] - 2) // 6
    return _basic_stages(
        x, spec, (n, n, n), CIFAR_WIDTHS, (1, 2, 2), "zero_pad", include_unique
    )


def _build_imagenet(inputs, spec, include_unique):
    kind, blocks_per_stage = IMAGENET_DEPTHS[spec["depth"]]
    if spec["stem"] == "imagenet":
        x = blocks.imagenet_stem(inputs, IMAGENET_WIDTHS[0])
    else:
        x = blocks.cifar_stem(inputs, IMAGENET_WIDTHS[0])
    strides = (1, 2, 2, 2)
    if kind == "basic":
        return _basic_stages(
            x,
            spec,
            blocks_per_stage,
            IMAGENET_WIDTHS,
            strides,
            "projection",
            include_unique,
        )
    return _bottleneck_stages(x, spec, blocks_per_stage, strides)


def _bottleneck_stages(x, spec, blocks_per_stage, strides):
    lam = spec["orthogonality"]
    double = spec["sharing"] == "double"
    # Separate pooled means for the 3x3 and the 1x1 kernels (R1 + R2).
    norm3 = sum(w * w for w, n in zip(IMAGENET_WIDTHS, blocks_per_stage) if n > 1)
    norm1 = sum(
        (4 * w) ** 2 for w, n in zip(IMAGENET_WIDTHS, blocks_per_stage) if n > 1
    )
    for g, (n, w) in enumerate(zip(blocks_per_stage, IMAGENET_WIDTHS)):
        stage = f"stage{g + 1}"
        x = blocks.bottleneck_block(x, w, strides[g], f"{stage}_block1")
        kernels = None
        if spec["share"] and n > 1:
            kernels = {
                "conv2": FilterBasis(
                    rank=w,
                    in_channels=w,
                    kernel_size=3,
                    orthogonality=lam,
                    orthogonality_normalizer=norm3,
                    name=f"{stage}_basis",
                )(x)
            }
            if double:
                kernels["conv3"] = FilterBasis(
                    rank=4 * w,
                    in_channels=w,
                    kernel_size=1,
                    orthogonality=lam,
                    orthogonality_normalizer=norm1,
                    name=f"{stage}_basis_1x1",
                )(x)
        for i in range(1, n):
            x = blocks.bottleneck_block(x, w, 1, f"{stage}_block{i + 1}", kernels)
    return x
