"""Decomposed convolution with grouped bases (the authors' DenseNet/ResNeXt)."""

import keras
import numpy as np
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.layers import initializers as sb_init
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import conv_output_shape
from sb_keras.layers.common import split_kernel_inputs


@sb_export("sb_keras.layers.GroupedBasisConv2D")
class GroupedBasisConv2D(keras.layers.Layer):
    """[unique grouped k x k, shared grouped k x k] -> BN [-> ReLU] -> 1x1 [-> BN].

    The decomposed layer of the authors' CIFAR-100 DenseNet-121 and
    ResNeXt-50 (method §1.6). On an input with ``C`` channels::

        z = concat(conv(x, unique_kernel, groups=unique_groups),   # C -> u
                   conv(x, shared_basis, groups=shared_groups))    # C -> S
        z = basis_bn(z)             # BN over u + S channels
        z = relu(z)                 # ResNeXt only (``activation="relu"``)
        y = conv1x1(z, coefficients)  # u + S -> filters
        y = bn(y)                   # ResNeXt only (``output_bn=True``)

    Unique responses come first, as in the authors' code. The shared basis
    is the tensor of a `FilterBasis` with ``in_channels = C / shared_groups``
    (Keras's grouped-kernel layout ``(k, k, C / groups, S)``), so one
    variable serves every layer that uses it.

    Args:
        filters: output channels of the 1x1 coefficients.
        unique_rank: unique filters of this layer (``u``); `0` for none.
        unique_groups: groups of the unique convolution (the authors'
            ResNeXt: ``u / 4``). Defaults to `1`.
        kernel_size: spatial size of the bases. Defaults to `3`.
        activation: None (DenseNet, as ResNet) or `"relu"` (ResNeXt)
            between the basis BN and the coefficients.
        output_bn: add a BN after the coefficients. Defaults to `False`.
        basis_index: which basis of the inputs to convolve with.
        kernel_initializer: initializer of the unique kernel. Defaults to
            Kaiming normal (fan-out).
        coefficient_initializer: initializer of the coefficients. Defaults
            to Kaiming normal (fan-out).
        momentum: BatchNorm momentum (Keras convention). Defaults to `0.9`.
        epsilon: BatchNorm epsilon. Defaults to `1e-5`.

    Example:

    >>> import keras, numpy as np, sb_keras
    >>> x = keras.Input((8, 8, 32))
    >>> basis = sb_keras.layers.FilterBasis(rank=16, in_channels=8)(x)
    >>> y = sb_keras.layers.GroupedBasisConv2D(
    ...     64, unique_rank=8, unique_groups=2, activation="relu",
    ...     output_bn=True)([x, basis])
    >>> keras.Model(x, y)(np.zeros((1, 8, 8, 32))).shape
    TensorShape([1, 8, 8, 64])
    """

    def __init__(
        self,
        filters,
        unique_rank=1,
        unique_groups=1,
        kernel_size=3,
        activation=None,
        output_bn=False,
        basis_index=0,
        kernel_initializer=None,
        coefficient_initializer=None,
        momentum=0.9,
        epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters)
        self.unique_rank = check_positive_int(
            "unique_rank", unique_rank, allow_zero=True
        )
        self.unique_groups = check_positive_int("unique_groups", unique_groups)
        if self.unique_rank % self.unique_groups:
            raise ValueError(
                "`unique_groups` must divide `unique_rank` "
                f"({self.unique_rank}). Received: unique_groups={unique_groups!r}"
            )
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if activation not in (None, "relu"):
            raise ValueError(
                "`activation` must be None or 'relu'. "
                f"Received: activation={activation!r}"
            )
        self.activation = activation
        if not isinstance(output_bn, bool):
            raise ValueError(
                f"`output_bn` must be True or False. Received: output_bn={output_bn!r}"
            )
        self.output_bn = output_bn
        self.basis_index = check_positive_int(
            "basis_index", basis_index, allow_zero=True
        )
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or sb_init.conv_kernel_initializer()
        )
        self.coefficient_initializer = keras.initializers.get(
            coefficient_initializer or sb_init.conv_kernel_initializer()
        )
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        bn = {"momentum": self.momentum, "epsilon": self.epsilon}
        self.basis_bn = keras.layers.BatchNormalization(
            name="basis_bn", dtype=self.dtype_policy, **bn
        )
        self.bn = None
        if output_bn:
            self.bn = keras.layers.BatchNormalization(
                name="bn", dtype=self.dtype_policy, **bn
            )

    def build(self, input_shape):
        x_shape, basis_shapes = split_kernel_inputs(input_shape)
        channels = x_shape[-1]
        k = self.kernel_size
        self.shared_rank, self.shared_groups = 0, 1
        if basis_shapes:
            if self.basis_index >= len(basis_shapes):
                raise ValueError(
                    f"`basis_index` must index one of the {len(basis_shapes)} "
                    f"bases given. Received: basis_index={self.basis_index}"
                )
            shape = tuple(basis_shapes[self.basis_index])
            if shape[:2] != (k, k) or not shape[2] or channels % shape[2]:
                raise ValueError(
                    f"A shared basis must have shape ({k}, {k}, C / groups, "
                    f"rank) for the {channels} input channels. Received: "
                    f"basis shape {shape}"
                )
            self.shared_groups = channels // shape[2]
            self.shared_rank = int(shape[3])
        if channels % self.unique_groups:
            raise ValueError(
                f"`unique_groups` must divide the {channels} input channels. "
                f"Received: unique_groups={self.unique_groups}"
            )
        self._channels = channels
        self.rank = self.unique_rank + self.shared_rank
        if self.rank == 0:
            raise ValueError(
                "GroupedBasisConv2D needs a unique basis or a shared basis. "
                "Received: unique_rank=0 and no shared basis."
            )
        self.unique_kernel = None
        if self.unique_rank:
            self.unique_kernel = self.add_weight(
                name="unique_kernel",
                shape=(k, k, channels // self.unique_groups, self.unique_rank),
                initializer=self.kernel_initializer,
            )
        self.coefficients = self.add_weight(
            name="coefficients",
            shape=(1, 1, self.rank, self.filters),
            initializer=self.coefficient_initializer,
        )
        self.basis_bn.build((None, None, None, self.rank))
        if self.bn is not None:
            self.bn.build((None, None, None, self.filters))

    def basis_kernels(self, bases=()):
        """``[(kernel, groups), ...]``: unique then shared, as used."""
        parts = []
        if self.unique_kernel is not None:
            parts.append((self.unique_kernel, self.unique_groups))
        if bases:
            parts.append((bases[self.basis_index], self.shared_groups))
        return parts

    def call(self, inputs, training=None):
        x, bases = split_kernel_inputs(inputs)
        dtype = self.compute_dtype
        parts = self.basis_kernels(bases)
        if len(parts) == 2 and parts[0][1] == parts[1][1] == 1:
            # Ungrouped: one convolution with the concatenated kernels.
            kernel = ops.concatenate([ops.cast(k, dtype) for k, _ in parts], axis=-1)
            z = ops.conv(x, kernel, padding="same")
        else:
            z = [ops.conv(x, ops.cast(k, dtype), padding="same") for k, _ in parts]
            z = z[0] if len(z) == 1 else ops.concatenate(z, axis=-1)
        z = self.basis_bn(z, training=training)
        if self.activation == "relu":
            z = ops.relu(z)
        y = ops.conv(z, ops.cast(self.coefficients, dtype))
        if self.bn is not None:
            y = self.bn(y, training=training)
        return y

    def macs_per_position(self):
        """MACs per output position: every basis filter and the coefficients."""
        k2 = self.kernel_size**2
        c = self._channels
        unique = k2 * (c // self.unique_groups) * self.unique_rank
        shared = k2 * (c // self.shared_groups) * self.shared_rank
        return unique + shared + self.rank * self.filters

    def fold_basis(self, bases=()):
        """The basis convolutions and basis BN as one dense ``k x k`` conv.

        Returns ``(kernel, bias)`` float32 arrays, ``kernel`` of shape
        ``(k, k, C, u + S)`` (the grouped kernels expanded block-diagonally)
        such that ``conv(x, kernel) + bias`` equals ``basis_bn(z)`` in
        inference mode.
        """
        blocks = []
        for kernel, groups in self.basis_kernels(list(bases)):
            blocks.append(expand_grouped(ops.convert_to_numpy(kernel), groups))
        kernel = np.concatenate(blocks, axis=-1).astype(np.float64)
        scale, shift = bn_affine(self.basis_bn)
        return (kernel * scale).astype(np.float32), shift.astype(np.float32)

    def fold_coefficients(self):
        """The coefficients and output BN as ``(kernel (1,1,R,F), bias)``."""
        coeff = ops.convert_to_numpy(self.coefficients).astype(np.float64)
        if self.bn is None:
            return coeff.astype(np.float32), np.zeros(self.filters, np.float32)
        scale, shift = bn_affine(self.bn)
        return (coeff * scale).astype(np.float32), shift.astype(np.float32)

    def compute_output_shape(self, input_shape):
        x_shape, _ = split_kernel_inputs(input_shape)
        k = self.kernel_size
        return conv_output_shape(x_shape, k, 1, "same", self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "unique_rank": self.unique_rank,
                "unique_groups": self.unique_groups,
                "kernel_size": self.kernel_size,
                "activation": self.activation,
                "output_bn": self.output_bn,
                "basis_index": self.basis_index,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "coefficient_initializer": keras.initializers.serialize(
                    self.coefficient_initializer
                ),
                "momentum": self.momentum,
                "epsilon": self.epsilon,
            }
        )
        return config


def expand_grouped(kernel, groups):
    """A grouped kernel ``(k, k, C/g, F)`` as the dense ``(k, k, C, F)`` one."""
    kernel = np.asarray(kernel)
    kh, kw, cin, filters = kernel.shape
    out = np.zeros((kh, kw, cin * groups, filters), kernel.dtype)
    per = filters // groups
    for g in range(groups):
        out[:, :, g * cin : (g + 1) * cin, g * per : (g + 1) * per] = kernel[
            ..., g * per : (g + 1) * per
        ]
    return out


def bn_affine(bn):
    """Inference-mode BN as float64 ``(scale, shift)`` arrays."""
    gamma = ops.convert_to_numpy(bn.gamma).astype(np.float64)
    beta = ops.convert_to_numpy(bn.beta).astype(np.float64)
    mean = ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    var = ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale
