"""The shared filter basis: one owner of kernels used by many layers."""

import keras
from keras import ops

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import initializers as sb_init
from sb_keras.layers.common import check_int_tuple
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import float32_value


@sb_export("sb_keras.layers.FilterBasis")
class FilterBasis(keras.layers.Layer):
    """A bank of shared convolution filters, owned once, used by many layers.

    Kang & Kim share a basis of ``rank`` 3-D filters (``kernel_size`` x
    ``kernel_size`` x ``in_channels``) among all decomposed convolutions of a
    ResNet stage. This layer owns those filters as ``num_bases`` variables of
    shape ``(kernel_size, kernel_size, in_channels, rank)`` and *returns them
    as tensors*: the layers that use the basis take that tensor as an input
    (see `BasisConv2D` and `SharedConv2D`). Sharing is therefore an edge of
    the functional graph, which Keras serializes, clones, distributes and
    exports like any other edge: after ``keras.models.load_model`` the basis
    is still one variable read by every user.

    The layer is called on any tensor of the graph (an "anchor" that only
    places it in the graph; its value is ignored). With ``num_bases=2`` (the
    authors' double sharing) the two kernels are initialized jointly, as
    one orthogonal ``(2 * rank, k * k * in_channels)`` matrix split in two.

    The layer adds the orthogonality penalty of its rows with ``add_loss``
    exactly once per forward pass: ``orthogonality * sum(D) / normalizer``
    with ``D = (M M^T - I) ** 2`` over the stacked rows ``M`` of its kernels
    and ``normalizer`` the number of entries of the authors' pooled mean
    (defaults to this basis's own entries, i.e. a plain mean).

    The variables and the penalty are always float32. The layer's default
    dtype is float32 (users cast the basis to their compute dtype); under a
    mixed policy (``dtype="mixed_float16"``) it returns the basis autocast to
    the compute dtype, as ``compute_output_spec`` says.

    The kernels are in Keras's ``(kh, kw, in, out)`` layout whatever the
    ``data_format`` of the layers that use them, as ``Conv2D.kernel``.

    Args:
        rank: number of filters per basis (``S_g`` in the paper).
        in_channels: input channels of the filters (``C_g``).
        kernel_size: spatial size of the filters, an int or a tuple of two
            ints. Defaults to `3`.
        num_bases: how many kernels this owner holds; `2` for double sharing.
        kernel_initializer: initializer of the joint kernel. Defaults to
            orthogonal, as the authors' code.
        orthogonality: weight ``lambda`` of the penalty. `0` disables it.
            Defaults to `10.0`.
        orthogonality_normalizer: the denominator of the pooled mean. A
            model that owns several bases passes the total entry count of
            the whole pooled mean. Defaults to ``(num_bases * rank) ** 2``.

    Example:

    >>> import keras, sb_keras
    >>> x = keras.Input((8, 8, 16))
    >>> basis = sb_keras.layers.FilterBasis(rank=16, in_channels=16)(x)
    >>> y = sb_keras.layers.BasisConv2D(16, unique_rank=1)([x, basis])
    >>> y = sb_keras.layers.BasisConv2D(16, unique_rank=1)([y, basis])
    >>> model = keras.Model(x, y)
    >>> len([w for w in model.weights if "basis" in w.name])
    1

    Reference: Woochul Kang and Daeyeon Kim, *Learning Deeply Shared Filter
    Bases for Efficient ConvNets* (arXiv 2006.05066).
    """

    def __init__(
        self,
        rank,
        in_channels,
        kernel_size=3,
        num_bases=1,
        kernel_initializer="orthogonal",
        orthogonality=10.0,
        orthogonality_normalizer=None,
        kernel_regularizer=None,
        kernel_constraint=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.rank = check_positive_int("rank", rank)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.kernel_size = check_int_tuple("kernel_size", kernel_size)
        self.num_bases = check_positive_int("num_bases", num_bases)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        if kernel_initializer == "orthogonal":
            kernel_initializer = sb_init.basis_initializer()
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.orthogonality = regularizers.validate_lambda(orthogonality)
        if orthogonality_normalizer is None:
            orthogonality_normalizer = regularizers.shared_entry_count(
                [rank] * num_bases
            )
        self.orthogonality_normalizer = float(orthogonality_normalizer)
        if self.orthogonality_normalizer <= 0:
            raise ValueError(
                "`orthogonality_normalizer` must be positive. Received: "
                f"orthogonality_normalizer={orthogonality_normalizer}"
            )

    @property
    def kernel_shape(self):
        return (*self.kernel_size, self.in_channels, self.rank)

    def build(self, input_shape=None):
        joint_shape = (*self.kernel_size, self.in_channels, self.rank * self.num_bases)
        joint = None
        if self.num_bases > 1:
            joint = self.kernel_initializer(joint_shape, dtype="float32")
        self.bases = []
        for i in range(self.num_bases):
            if joint is None:
                init = self.kernel_initializer
            else:
                part = joint[..., i * self.rank : (i + 1) * self.rank]
                init = _Constant(part)
            name = "basis" if self.num_bases == 1 else f"basis_{i + 1}"
            self.bases.append(
                self.add_weight(
                    name=name,
                    shape=self.kernel_shape,
                    initializer=init,
                    trainable=True,
                    dtype=self.variable_dtype,
                    regularizer=self.kernel_regularizer,
                    constraint=self.kernel_constraint,
                )
            )

    def call(self, inputs):
        del inputs  # the anchor only places the basis in the graph
        kernels = [float32_value(b) for b in self.bases]
        if self.orthogonality > 0:
            self.add_loss(self.penalty(kernels))
        kernels = [ops.cast(k, self.compute_dtype) for k in kernels]
        if self.num_bases == 1:
            return kernels[0]
        return kernels

    def penalty(self, kernels=None):
        """This basis's term of the model loss: ``lambda * sum(D) / N``."""
        if kernels is None:
            kernels = self.bases
        total = regularizers.shared_penalty_sum(kernels)
        return self.orthogonality * total / self.orthogonality_normalizer

    def deviation(self):
        """Mean of ``(M M^T - I) ** 2`` over this basis's own rows.

        A scale-free measure of how far the basis is from orthonormal; the
        analysis helpers report it per basis.
        """
        ranks = [self.rank] * self.num_bases
        total = regularizers.shared_penalty_sum(self.bases)
        return total / float(regularizers.shared_entry_count(ranks))

    def compute_output_shape(self, input_shape):
        if self.num_bases == 1:
            return self.kernel_shape
        return [self.kernel_shape] * self.num_bases

    def compute_output_spec(self, inputs):
        spec = keras.KerasTensor(self.kernel_shape, dtype=self.compute_dtype)
        if self.num_bases == 1:
            return spec
        return [
            keras.KerasTensor(self.kernel_shape, dtype=self.compute_dtype)
            for _ in range(self.num_bases)
        ]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "rank": self.rank,
                "in_channels": self.in_channels,
                "kernel_size": self.kernel_size,
                "num_bases": self.num_bases,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "orthogonality": self.orthogonality,
                "orthogonality_normalizer": self.orthogonality_normalizer,
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "kernel_constraint": keras.constraints.serialize(
                    self.kernel_constraint
                ),
            }
        )
        return config


class _Constant:
    """Initializer returning a precomputed slice (joint initialization)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return ops.cast(self.value, dtype or "float32")
