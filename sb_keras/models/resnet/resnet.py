"""ResNets with shared filter bases (Kang & Kim) and their plain baselines."""

import keras

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers.common import height_width_channels
from sb_keras.layers.common import image_shape
from sb_keras.layers.preprocessing import get_normalization
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
class ResNet(keras.Model):
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

    The model is a functional `keras.Model` whose config is its constructor
    arguments: ``keras.models.load_model`` rebuilds it with this class,
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
        **kwargs,
    ):
        spec = _resolve(
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
        )
        if preprocessing == "auto":
            preprocessing = _default_preprocessing(spec)
        inputs = keras.Input(spec["input_shape"], name="image")
        x = inputs
        if preprocessing is not None:
            mean, std = get_normalization(preprocessing)
            x = PixelNormalization(mean, std, name="preprocessing")(x)
        builder = _build_cifar if spec["family"] == "cifar" else _build_imagenet
        with blocks.batchnorm_convention(batchnorm):
            outputs = builder(x, spec, orthogonality_include_unique)
        if include_top:
            outputs = blocks.classifier(
                outputs, spec["num_classes"], classifier_activation
            )
        if name is None:
            name = _default_name(spec)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        self.depth = depth
        self.share = bool(share)
        self.shared_rank = spec["shared_rank"]
        self.unique_rank = spec["unique_rank"]
        self.sharing = spec["sharing"]
        self.stem = spec["stem"]
        self.num_classes = spec["num_classes"]
        self.image_shape = spec["input_shape"]
        self.include_top = include_top
        self.classifier_activation = classifier_activation
        self.preprocessing = preprocessing
        self.orthogonality = spec["orthogonality"]
        self.orthogonality_include_unique = bool(orthogonality_include_unique)
        self.batchnorm = batchnorm

    def get_config(self):
        return {
            "depth": self.depth,
            "share": self.share,
            "shared_rank": self.shared_rank,
            "unique_rank": self.unique_rank,
            "sharing": self.sharing,
            "stem": self.stem,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "include_top": self.include_top,
            "classifier_activation": self.classifier_activation,
            "preprocessing": self.preprocessing,
            "orthogonality": self.orthogonality,
            "orthogonality_include_unique": self.orthogonality_include_unique,
            "batchnorm": self.batchnorm,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

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


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )


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
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"`depth` must be an integer. Received: depth={depth!r}")
    if _is_cifar_depth(depth):
        family = "cifar"
        if stem not in (None, "cifar"):
            raise ValueError(
                f"CIFAR ResNet-{depth} (depth 6n+2) only has the 'cifar' stem. "
                f"Received: stem={stem!r}"
            )
        stem = "cifar"
    elif depth in IMAGENET_DEPTHS:
        family = IMAGENET_DEPTHS[depth][0]
        if stem is None:
            stem = "imagenet"
        if stem not in STEMS:
            raise ValueError(f"`stem` must be one of {STEMS}. Received: stem={stem!r}")
    else:
        raise ValueError(
            "`depth` must be 6n+2 (20, 32, 44, 56, 110, ...) for the CIFAR "
            "ResNets or one of 18, 34, 50, 101, 152. "
            f"Received: depth={depth}"
        )
    if sharing is not None and sharing not in SHARINGS:
        raise ValueError(
            f"`sharing` must be one of {SHARINGS}. Received: sharing={sharing!r}"
        )
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
        default_s = 32 if stem == "imagenet" else 16
        shared_rank = default_s if shared_rank is None else shared_rank
        unique_rank = 1 if unique_rank is None else unique_rank
        _check_int("shared_rank", shared_rank, 0)
        _check_int("unique_rank", unique_rank, 0)
        c1 = CIFAR_WIDTHS[0] if family == "cifar" else IMAGENET_WIDTHS[0]
        limit = 9 * c1
        if shared_rank + unique_rank == 0:
            raise ValueError(
                "A decomposed layer needs at least one basis filter. "
                "Received: shared_rank=0, unique_rank=0"
            )
        for arg, value in (("shared_rank", shared_rank), ("unique_rank", unique_rank)):
            if value > limit:
                raise ValueError(
                    f"`{arg}` can be at most {limit} = 3*3*{c1}, the dimension "
                    f"of a stage-1 filter of ResNet-{depth}. "
                    f"Received: {arg}={value}"
                )
        if sharing is None:
            sharing = "single" if (family == "basic" and stem == "cifar") else "double"
    if num_classes is None:
        num_classes = 10 if family == "cifar" else (100 if stem == "cifar" else 1000)
    if include_top:
        _check_int("num_classes", num_classes, 1)
    if input_shape is None:
        size = 224 if stem == "imagenet" else 32
        input_shape = image_shape(size, size, 3)  # in the global data_format
    input_shape = _check_input_shape(input_shape, 32 if stem == "imagenet" else 8)
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
        "orthogonality": regularizers.validate_lambda(orthogonality),
    }


def _check_input_shape(input_shape, min_size):
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    ok = shape is not None and len(shape) == 3
    if ok:
        h, w, c = height_width_channels(shape)
        ok = (
            isinstance(c, int)
            and c >= 1
            and all(d is None or (isinstance(d, int) and d >= min_size) for d in (h, w))
        )
    if not ok:
        raise ValueError(
            "`input_shape` must be (height, width, channels) (channels first "
            "under the channels_first data format) with known "
            f"channels and spatial sizes >= {min_size} (or None). "
            f"Received: input_shape={input_shape!r}"
        )
    return shape


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
