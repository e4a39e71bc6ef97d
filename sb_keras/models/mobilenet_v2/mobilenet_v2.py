"""MobileNetV2 with shared 1x1 kernels (Kang & Kim) and its plain baseline."""

import keras

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers.common import height_width_channels
from sb_keras.layers.common import image_shape
from sb_keras.layers.preprocessing import get_normalization
from sb_keras.models.mobilenet_v2 import blocks

# (expansion t, out channels c, blocks n, stride s) per stage, ImageNet.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# The authors' CIFAR-100 model keeps the 6th stage at stride 1.
CIFAR_STRIDES = (1, 2, 2, 2, 1, 1, 1)
# Stages (0-based) whose non-first blocks share their 1x1 kernels: the
# stages of out widths 32, 64, 96 and 160.
SHARED_STAGES = (2, 3, 4, 5)
VARIANTS = ("imagenet", "cifar")
SHARINGS = ("single", "double")


@sb_export("sb_keras.models.MobileNetV2")
class MobileNetV2(keras.Model):
    """MobileNetV2 whose 1x1 kernels are shared within a stage.

    The layout is the authors' (``ssregibility/Net_RL2``): ReLU inside the
    inverted-residual blocks, ReLU6 after the stem and the head, a stem
    convolution with a bias, a 1x1 expansion even in the ``t = 1`` block,
    dropout 0.2 before the classifier (ImageNet). The CIFAR variant is the
    authors' CIFAR-100 model: a 1x1 stem with padding 1, stride 1 in the
    first and sixth stages, and residual connections on every stride-1
    block (a 1x1 conv + BN projection when the widths differ).

    With ``share=True``, in the stages of out widths 32, 64, 96 and 160 the
    expansion 1x1 kernel (C -> 6C) of every non-first block is one tensor
    per stage, owned by a `FilterBasis` and applied by `SharedConv2D`
    layers (``sharing="single"``, the authors' "MobileNetV2-Shared");
    ``sharing="double"`` also shares the projection 1x1 kernel (6C -> C)
    ("SharedDouble"). Depthwise convolutions and every BatchNorm stay per
    block. The orthogonality penalty is the authors' pooled mean over the
    rows of the shared expansion kernels (``lambda * R``); SharedDouble adds
    a separate pooled mean over the projection kernels (``lambda * (R1 +
    R2)``). The shared kernels keep PyTorch's default initialization, as in
    the authors' code.

    Parameter counts equal the authors' models exactly: ImageNet 3,507,272
    (plain), 3,243,080 (Shared), 2,978,888 (SharedDouble); CIFAR-100
    2,428,004, 2,163,812, 1,899,620.

    Args:
        share: build the shared model instead of the plain one.
        sharing: `"single"` (expansion kernels) or `"double"` (expansion
            and projection kernels). Defaults to `"single"`.
        variant: `"imagenet"` (224x224, 1000 classes) or `"cifar"`
            (32x32, 100 classes).
        alpha: width multiplier (torchvision's rounding to multiples of 8;
            the head keeps 1280 channels for ``alpha <= 1``).
        num_classes: classes of the classifier.
        input_shape: ``(height, width, channels)``; spatial sizes may be
            None.
        include_top: add pooling, dropout and the classifier; without it the
            model returns the head's feature map.
        dropout: dropout rate before the classifier. `"auto"` is 0.2 on
            ImageNet and 0 on CIFAR, as the authors.
        classifier_activation: activation of the classifier (None: logits).
        preprocessing: the pixel normalization built into the model (a name
            of `sb_keras.layers.preprocessing.NORMALIZATIONS`, or None).
            `"auto"`: ImageNet statistics for the ImageNet variant, CIFAR-100
            statistics for the CIFAR variant.
        orthogonality: lambda of the orthogonality penalty. Defaults to `10`.
        name: model name.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.MobileNetV2(share=True, variant="cifar")
    >>> sb_keras.count_params(model)
    2163812

    Reference: Woochul Kang and Daeyeon Kim, *Learning Deeply Shared Filter
    Bases for Efficient ConvNets* (arXiv 2006.05066); Sandler et al.,
    *MobileNetV2: Inverted Residuals and Linear Bottlenecks* (CVPR 2018).
    """

    def __init__(
        self,
        share=False,
        sharing=None,
        variant="imagenet",
        alpha=1.0,
        num_classes=None,
        input_shape=None,
        include_top=True,
        dropout="auto",
        classifier_activation=None,
        preprocessing="auto",
        orthogonality=10.0,
        name=None,
        **kwargs,
    ):
        spec = _resolve(
            share,
            sharing,
            variant,
            alpha,
            num_classes,
            input_shape,
            include_top,
            dropout,
            orthogonality,
        )
        if preprocessing == "auto":
            preprocessing = "imagenet" if variant == "imagenet" else "cifar100"
        inputs = keras.Input(spec["input_shape"], name="image")
        x = inputs
        if preprocessing is not None:
            mean, std = get_normalization(preprocessing)
            x = PixelNormalization(mean, std, name="preprocessing")(x)
        x = _build(x, spec)
        if include_top:
            x = blocks.classifier(
                x, spec["num_classes"], spec["dropout"], classifier_activation
            )
        if name is None:
            name = _default_name(spec)
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)

        self.share = spec["share"]
        self.sharing = spec["sharing"]
        self.variant = variant
        self.alpha = spec["alpha"]
        self.num_classes = spec["num_classes"]
        self.image_shape = spec["input_shape"]
        self.include_top = include_top
        self.dropout = spec["dropout"]
        self.classifier_activation = classifier_activation
        self.preprocessing = preprocessing
        self.orthogonality = spec["orthogonality"]

    def get_config(self):
        return {
            "share": self.share,
            "sharing": self.sharing,
            "variant": self.variant,
            "alpha": self.alpha,
            "num_classes": self.num_classes,
            "input_shape": self.image_shape,
            "include_top": self.include_top,
            "dropout": self.dropout,
            "classifier_activation": self.classifier_activation,
            "preprocessing": self.preprocessing,
            "orthogonality": self.orthogonality,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def baseline_config(self):
        """The config of the matching unshared model."""
        config = self.get_config()
        config.update(share=False, sharing=None, name=None)
        return config


def _resolve(
    share,
    sharing,
    variant,
    alpha,
    num_classes,
    input_shape,
    include_top,
    dropout,
    orthogonality,
):
    if variant not in VARIANTS:
        raise ValueError(
            f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}"
        )
    if sharing is None:
        sharing = "single" if share else None
    elif sharing not in SHARINGS:
        raise ValueError(
            f"`sharing` must be one of {SHARINGS}. Received: sharing={sharing!r}"
        )
    elif not share:
        raise ValueError(
            "`sharing` only applies to shared models (share=True). "
            f"Received: sharing={sharing!r} with share={share!r}"
        )
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        alpha = -1.0
    if not alpha > 0:
        raise ValueError(f"`alpha` must be a positive number. Received: alpha={alpha}")
    if num_classes is None:
        num_classes = 1000 if variant == "imagenet" else 100
    if include_top and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer. "
            f"Received: num_classes={num_classes!r}"
        )
    if dropout == "auto":
        dropout = 0.2 if variant == "imagenet" else 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(
            f"`dropout` must be a rate in [0, 1). Received: dropout={dropout!r}"
        )
    if input_shape is None:
        size = 224 if variant == "imagenet" else 32
        input_shape = image_shape(size, size, 3)  # in the global data_format
    min_size = 32 if variant == "imagenet" else 8
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    hwc = height_width_channels(shape) if len(shape) == 3 else ()
    if not (
        len(hwc) == 3
        and isinstance(hwc[2], int)
        and hwc[2] >= 1
        and all(d is None or (isinstance(d, int) and d >= min_size) for d in hwc[:2])
    ):
        raise ValueError(
            "`input_shape` must be (height, width, channels) (channels first "
            "under the channels_first data format) with known "
            f"channels and spatial sizes >= {min_size} (or None). "
            f"Received: input_shape={input_shape!r}"
        )
    return {
        "share": bool(share),
        "sharing": sharing,
        "variant": variant,
        "alpha": alpha,
        "num_classes": num_classes,
        "input_shape": shape,
        "dropout": float(dropout),
        "orthogonality": regularizers.validate_lambda(orthogonality),
    }


def _default_name(spec):
    name = "mobilenet_v2"
    if spec["alpha"] != 1.0:
        name += f"_{spec['alpha']:g}".replace(".", "")
    if spec["share"]:
        name += "_shared" + ("_double" if spec["sharing"] == "double" else "")
    return f"{name}_{spec['variant']}"


def _build(x, spec):
    alpha, variant = spec["alpha"], spec["variant"]
    strides = [s for (_, _, _, s) in STAGES]
    if variant == "cifar":
        strides = list(CIFAR_STRIDES)
    widths = [blocks.scaled(c, alpha) for (_, c, _, _) in STAGES]
    x = blocks.stem(x, blocks.scaled(32, alpha), variant)
    lam = spec["orthogonality"]
    shared = [g for g in SHARED_STAGES if STAGES[g][2] > 1] if spec["share"] else []
    # Pooled means: R1 over the expansion kernels, R2 over the projections.
    norm_expand = sum((STAGES[g][0] * widths[g]) ** 2 for g in shared)
    norm_project = sum(widths[g] ** 2 for g in shared)
    for g, (t, _, n, _) in enumerate(STAGES):
        stage, c = f"stage{g + 1}", widths[g]
        x = blocks.inverted_residual(
            x, c, t, strides[g], f"{stage}_block1", shortcut=variant
        )
        kernels = None
        if g in shared:
            kernels = {
                "expand": FilterBasis(
                    rank=t * c,
                    in_channels=c,
                    kernel_size=1,
                    kernel_initializer=blocks.torch_default_initializer(),
                    orthogonality=lam,
                    orthogonality_normalizer=norm_expand,
                    name=f"{stage}_expand_basis",
                )(x)
            }
            if spec["sharing"] == "double":
                kernels["project"] = FilterBasis(
                    rank=c,
                    in_channels=t * c,
                    kernel_size=1,
                    kernel_initializer=blocks.torch_default_initializer(),
                    orthogonality=lam,
                    orthogonality_normalizer=norm_project,
                    name=f"{stage}_project_basis",
                )(x)
        for i in range(1, n):
            x = blocks.inverted_residual(
                x, c, t, 1, f"{stage}_block{i + 1}", variant, kernels
            )
    return blocks.head(x, blocks.head_channels(alpha))
