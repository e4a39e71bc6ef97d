"""DenseNet-BC with shared filter bases (the authors' CIFAR-100 DenseNet-121)."""

import keras

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import FilterBasis
from sb_keras.layers import GroupedBasisConv2D
from sb_keras.layers import initializers as sb_init
from sb_keras.models import arguments as checks
from sb_keras.models.backbone import Backbone
from sb_keras.models.backbone import image_input

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
BN_EPSILON = 1e-5


@sb_export("sb_keras.models.DenseNet")
class DenseNet(Backbone):
    """DenseNet-BC for CIFAR whose bottleneck 3x3 convs share filter bases.

    The plain model is the authors' CIFAR DenseNet-121: a 3x3 stem conv
    (3 -> 2 * growth), dense blocks of BN-ReLU-1x1 (-> 4 * growth)-BN-ReLU-3x3
    (-> growth) bottleneck layers whose output is appended after their input
    channels, transitions BN-1x1 (compression 0.5)-avg-pool 2 (no ReLU, as
    their code), then BN-ReLU, global pooling and the classifier: 7,048,548
    parameters with 100 classes.

    With ``share=True`` every bottleneck's 3x3 conv (4g -> g) becomes a
    `GroupedBasisConv2D`: [unique 3x3 4g -> u, shared 3x3 4g -> s] -> BN ->
    1x1 (s + u -> g), with one shared basis per dense block (s and u are not
    scaled per block). S16U1 (the paper's row mislabelled "S64U4") has
    5,084,504 parameters, S64U4 5,606,708.

    The authors' code has a bug: dense block 4 uses block 3's basis, while
    a fourth basis is allocated, counted and orthogonality-regularized but
    never used. ``authors_layout=True`` reproduces it (to match their counts
    and checkpoints); the default builds the intended model, where block 4
    uses its own basis. Both have the same parameter count (four bases
    either way: 5,084,504 for S16U1) and the same MACs; they differ in
    which basis block 4 convolves with.

    Initialization follows the authors' DenseNet code: PyTorch's defaults
    (every conv, basis and the classifier ``U(+-1/sqrt(fan_in))``; BN 1, 0).
    The orthogonality penalty is their CIFAR-100 ``train_basis``: the pooled
    mean of ``(M M^T - I)**2`` over the four shared bases, unique bases not
    included, times ``orthogonality``.

    Args:
        blocks: layers per dense block. Defaults to `(6, 12, 24, 16)`.
        growth_rate: channels each layer adds. Defaults to `32`.
        compression: channel reduction of the transitions, in (0, 1].
        share: build the shared-basis model.
        shared_rank: shared filters per basis (``s``). Defaults to `16`.
        unique_rank: unique filters per layer (``u``). Defaults to `1`.
        authors_layout: reproduce the authors' block-4 basis bug.
        num_classes: classes of the classifier. Defaults to `100`.
        input_shape: ``(height, width, channels)``. Defaults to
            `(32, 32, 3)`.
        include_top: add global pooling and the classifier.
        classifier_activation: activation of the classifier (None: logits).
        preprocessing: pixel normalization built in; `"auto"` is the
            CIFAR-100 statistics, None takes normalized inputs.
        orthogonality: lambda of the penalty. Defaults to `10`.
        name: model name.
        dtype: dtype policy of the layers (None: the global one).
        data_format: `"channels_last"` only, the layout the blocks are
            written for (None: the global
            ``keras.config.image_data_format()``, which must then be it);
            kept in the config. Other formats raise a ``ValueError``.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.DenseNet(blocks=(2, 2), growth_rate=8, share=True)
    >>> sb_keras.count_params(model) < sb_keras.count_params(
    ...     sb_keras.DenseNet(blocks=(2, 2), growth_rate=8))
    True
    """

    # Its blocks concatenate / group on the last axis.
    data_formats = ("channels_last",)

    def __init__(
        self,
        blocks=(6, 12, 24, 16),
        growth_rate=32,
        compression=0.5,
        share=False,
        shared_rank=None,
        unique_rank=None,
        authors_layout=False,
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
        blocks = args["blocks"]
        if not (
            isinstance(blocks, (list, tuple))
            and 1 <= len(blocks) <= 8
            and all(checks._is_int(n) and 1 <= n <= 200 for n in blocks)
        ):
            raise ValueError(
                "`blocks` must be a list of 1 to 8 layer counts in [1, 200]. "
                f"{checks.received('blocks', blocks)}"
            )
        blocks = [int(n) for n in blocks]
        growth = checks.check_int("growth_rate", args["growth_rate"], 1, 512)
        share = checks.check_bool("share", args["share"])
        authors = checks.check_bool("authors_layout", args["authors_layout"])
        s, u = args["shared_rank"], args["unique_rank"]
        if not share:
            for arg, value in (("shared_rank", s), ("unique_rank", u)):
                if value is not None:
                    raise ValueError(
                        f"`{arg}` only applies to shared models (share=True). "
                        f"{checks.received(arg, value)}"
                    )
            if authors:
                raise ValueError(
                    "`authors_layout` only applies to shared models (share=True). "
                    "Received: authors_layout=True"
                )
        else:
            limit = 9 * 4 * growth  # the dimension of a filter
            s = checks.check_int("shared_rank", 16 if s is None else s, 1, limit)
            u = checks.check_int("unique_rank", 1 if u is None else u, 0, limit)
            if authors and len(blocks) < 4:
                raise ValueError(
                    "The authors' layout (block 4 reusing block 3's basis) needs "
                    f"at least four dense blocks. {checks.received('blocks', blocks)}"
                )
        include_top = checks.check_bool("include_top", args["include_top"])
        preprocessing = args["preprocessing"]
        if preprocessing == "auto":
            preprocessing = "cifar100"
        return {
            "blocks": blocks,
            "growth_rate": growth,
            "compression": checks.check_number(
                "compression", args["compression"], 0.0, 1.0, low_inclusive=False
            ),
            "share": share,
            "shared_rank": s,
            "unique_rank": u,
            "authors_layout": authors,
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
        name = f"densenet{_depth(spec['blocks'])}"
        if spec["share"]:
            name += f"_s{spec['shared_rank']}u{spec['unique_rank']}"
            if spec["authors_layout"]:
                name += "_authors"
        return name

    @classmethod
    def _build_graph(cls, spec):
        inputs, x = image_input(spec["input_shape"], spec["preprocessing"])
        growth = spec["growth_rate"]
        x = _conv(x, 2 * growth, 3, "stem_conv")
        bases = _bases(x, spec)
        for b, n in enumerate(spec["blocks"]):
            shared = None
            if spec["share"]:
                shared = [bases[b]]
                if spec["authors_layout"] and b == 3:
                    # The bug: block 4 convolves with block 3's basis; its
                    # own (still counted and penalized) rides along unused.
                    shared = [bases[2], bases[3]]
            for i in range(n):
                x = _dense_layer(x, spec, shared, f"block{b + 1}_layer{i + 1}")
            if b < len(spec["blocks"]) - 1:
                out = int(x.shape[-1] * spec["compression"])
                name = f"transition{b + 1}"
                # The authors' transition has no ReLU: BN - 1x1 - pool.
                x = keras.layers.BatchNormalization(
                    momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn"
                )(x)
                x = _conv(x, out, 1, f"{name}_conv")
                x = keras.layers.AveragePooling2D(2, name=f"{name}_pool")(x)
        x = _bn_relu(x, "final")
        if spec["include_top"]:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
            x = keras.layers.Dense(
                spec["num_classes"],
                activation=spec["classifier_activation"],
                kernel_initializer=sb_init.dense_kernel_initializer(),
                bias_initializer=sb_init.dense_bias_initializer(x.shape[-1]),
                name="predictions",
            )(x)
        return inputs, x

    def baseline_config(self):
        """The config of the matching unshared model."""
        config = self.get_config()
        config.update(
            share=False,
            shared_rank=None,
            unique_rank=None,
            authors_layout=False,
            name=None,
        )
        return config


def _depth(blocks):
    # Two convs per layer, the stem, the transitions and the classifier.
    return 2 * sum(blocks) + len(blocks) + 1


def _bases(anchor, spec):
    """One `FilterBasis` per dense block (4g -> s), pooled-mean penalty."""
    if not spec["share"]:
        return []
    s, n = spec["shared_rank"], len(spec["blocks"])
    channels = 4 * spec["growth_rate"]
    normalizer = n * regularizers.shared_entry_count([s])  # separate bases
    return [
        FilterBasis(
            rank=s,
            in_channels=channels,
            kernel_initializer=sb_init.dense_kernel_initializer(),
            orthogonality=spec["orthogonality"],
            orthogonality_normalizer=normalizer,
            name=f"block{b + 1}_basis",
        )(anchor)
        for b in range(n)
    ]


def _conv(x, filters, kernel_size, name):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        use_bias=False,
        kernel_initializer=sb_init.dense_kernel_initializer(),
        name=name,
    )(x)


def _bn_relu(x, name):
    x = keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn"
    )(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _dense_layer(x, spec, shared, name):
    """BN-ReLU-1x1-BN-ReLU-3x3 (or decomposed), appended to the input."""
    growth = spec["growth_rate"]
    y = _bn_relu(x, f"{name}_1")
    y = _conv(y, 4 * growth, 1, f"{name}_conv1")
    y = _bn_relu(y, f"{name}_2")
    if shared is None:
        y = _conv(y, growth, 3, f"{name}_conv2")
    else:
        y = GroupedBasisConv2D(
            growth,
            unique_rank=spec["unique_rank"],
            kernel_initializer=sb_init.dense_kernel_initializer(),
            coefficient_initializer=sb_init.dense_kernel_initializer(),
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            name=f"{name}_conv2",
        )([y, *shared])
    return keras.layers.Concatenate(name=f"{name}_concat")([x, y])
