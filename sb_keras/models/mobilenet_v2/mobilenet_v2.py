"""MobileNetV2 with shared 1x1 kernels (Kang & Kim) and its plain baseline."""

from sb_keras.api_export import sb_export
from sb_keras.layers import FilterBasis
from sb_keras.layers.common import image_shape
from sb_keras.models import arguments as checks
from sb_keras.models.backbone import Backbone
from sb_keras.models.backbone import image_input
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
MAX_ALPHA = 4.0


@sb_export("sb_keras.models.MobileNetV2")
class MobileNetV2(Backbone):
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
        dtype: the dtype policy of the layers (None: the global policy);
            kept in the config.
        data_format: `"channels_last"` or `"channels_first"` (None: the
            global ``keras.config.image_data_format()``); kept in the config.

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
        dtype=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(locals(), **kwargs)

    @classmethod
    def _resolve(cls, **args):
        return _resolve(**args)

    @classmethod
    def _build_graph(cls, spec):
        inputs, x = image_input(spec["input_shape"], spec["preprocessing"])
        x = _build(x, spec)
        if spec["include_top"]:
            x = blocks.classifier(
                x, spec["num_classes"], spec["dropout"], spec["classifier_activation"]
            )
        return inputs, x

    @classmethod
    def _default_name(cls, spec):
        return _default_name(spec)

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
    classifier_activation,
    preprocessing,
    orthogonality,
):
    share = checks.check_bool("share", share)
    include_top = checks.check_bool("include_top", include_top)
    variant = checks.check_choice("variant", variant, VARIANTS)
    sharing = checks.check_choice("sharing", sharing, SHARINGS, allow_none=True)
    if sharing is None:
        sharing = "single" if share else None
    elif not share:
        raise ValueError(
            "`sharing` only applies to shared models (share=True). "
            f"Received: sharing={sharing!r} with share={share!r}"
        )
    # Widths scale with alpha and parameters with its square: 4x is already
    # a 50M-parameter MobileNetV2.
    alpha = checks.check_number("alpha", alpha, 0.0, MAX_ALPHA, low_inclusive=False)
    if num_classes is None:
        num_classes = 1000 if variant == "imagenet" else 100
    num_classes = checks.check_num_classes(num_classes, include_top)
    if dropout == "auto":
        dropout = 0.2 if variant == "imagenet" else 0.0
    dropout = checks.check_number("dropout", dropout, 0.0, 1.0)
    if dropout == 1.0:
        raise ValueError(
            f"`dropout` must be a rate in [0, 1). Received: dropout={dropout}"
        )
    if input_shape is None:
        size = 224 if variant == "imagenet" else 32
        input_shape = image_shape(size, size, 3)  # in the global data_format
    min_size = 32 if variant == "imagenet" else 8
    if preprocessing == "auto":
        preprocessing = "imagenet" if variant == "imagenet" else "cifar100"
    return {
        "share": share,
        "sharing": sharing,
        "variant": variant,
        "alpha": alpha,
        "num_classes": num_classes,
        "input_shape": checks.check_input_shape(input_shape, min_size),
        "include_top": include_top,
        "dropout": dropout,
        "classifier_activation": checks.check_activation(
            "classifier_activation", classifier_activation
        ),
        "preprocessing": checks.check_preprocessing(preprocessing),
        "orthogonality": checks.check_number("orthogonality", orthogonality, 0.0),
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
