"""The decomposed convolution of Kang & Kim: basis -> BN -> coefficients -> BN."""

import keras
import numpy as np
from keras import ops

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import initializers as sb_init
from sb_keras.layers.batch_norm import batch_normalization
from sb_keras.layers.batch_norm import check_batchnorm
from sb_keras.layers.batch_norm import update_moving_statistics
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import conv_output_shape
from sb_keras.layers.common import split_kernel_inputs


@sb_export("sb_keras.layers.BasisConv2D")
class BasisConv2D(keras.layers.Layer):
    """A convolution decomposed into filter bases and 1x1 coefficients.

    The layer computes, on an input ``x`` with ``C`` channels::

        z = conv(x, [unique_kernel, shared_basis])  # k x k, C -> u + S
        z = basis_bn(z)                             # BN over u + S channels
        y = conv1x1(z, coefficients)                # u + S -> filters
        y = bn(y)                                   # BN over filters

    with no non-linearity in between (Kang & Kim, method §1.1). The unique
    basis (``unique_rank`` filters) belongs to this layer; the shared basis
    comes in as a tensor produced by a `FilterBasis` layer, so one variable
    serves every layer of a stage. Unique responses come first in the
    concatenation, as in the authors' code (the first ``unique_rank`` rows of
    ``coefficients`` multiply them).

    For speed the two bases are concatenated as *kernels* (a few thousand
    numbers) and applied in one convolution, instead of running two
    convolutions and concatenating their activations.

    Call it on ``x`` alone (no shared basis: the authors' "NonShared"
    ablation) or on ``[x, *bases]``; ``basis_index`` picks the basis this
    layer convolves with. The other bases of the list only take part in the
    CIFAR-10 variant of the orthogonality penalty, which decorrelates this
    layer's unique filters from *every* shared filter of the stage. That
    penalty is added here (once per call) when ``orthogonality > 0``; it
    covers the entries of this layer's unique rows only, the shared block
    is added by the `FilterBasis`.

    In inference mode the whole layer is one ``k x k`` convolution with a
    bias; `fold` returns that kernel and bias.

    Args:
        filters: output channels.
        unique_rank: filters of the per-layer unique basis (``u_g``); `0`
            for the "SharedOnly" ablation.
        kernel_size: spatial size of the bases. Defaults to `3`.
        strides: strides of the basis convolution. Defaults to `1`.
        padding: `"same"` or `"valid"`. Defaults to `"same"`.
        basis_index: which tensor of the ``bases`` inputs to convolve with.
        kernel_initializer: initializer of the unique basis. Defaults to
            Kaiming normal (fan-out), as the authors' code.
        coefficient_initializer: initializer of the 1x1 coefficients.
            Defaults to Kaiming normal (fan-out).
        momentum: BatchNorm momentum (Keras convention). Defaults to `0.9`,
            PyTorch's `0.1`.
        epsilon: BatchNorm epsilon. Defaults to `1e-5`, as PyTorch.
        orthogonality: weight ``lambda`` of the unique-row penalty (the
            CIFAR-10 variant); `0` disables it. Defaults to `0.0`.
        orthogonality_normalizer: denominator of the pooled mean (the
            model passes the total entry count). Defaults to this layer's own
            entry count.
        batchnorm: `"keras"` (default) or `"pytorch"`: the moving-statistics
            convention of both BNs (see `TorchBatchNormalization`: the
            unbiased batch variance and ``num_batches_tracked``, as the
            authors' PyTorch model).

    Example:

    >>> import keras, numpy as np, sb_keras
    >>> x = keras.Input((8, 8, 16))
    >>> basis = sb_keras.layers.FilterBasis(rank=16, in_channels=16)(x)
    >>> conv = sb_keras.layers.BasisConv2D(16, unique_rank=1)
    >>> model = keras.Model(x, conv([x, basis]))
    >>> model(np.zeros((2, 8, 8, 16))).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(
        self,
        filters,
        unique_rank=1,
        kernel_size=3,
        strides=1,
        padding="same",
        basis_index=0,
        kernel_initializer=None,
        coefficient_initializer=None,
        momentum=0.9,
        epsilon=1e-5,
        orthogonality=0.0,
        orthogonality_normalizer=None,
        batchnorm="keras",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters)
        self.unique_rank = check_positive_int(
            "unique_rank", unique_rank, allow_zero=True
        )
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.strides = check_positive_int("strides", strides)
        if padding not in ("same", "valid"):
            raise ValueError(
                f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}"
            )
        self.padding = padding
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
        self.orthogonality = regularizers.validate_lambda(orthogonality)
        self.orthogonality_normalizer = (
            None
            if orthogonality_normalizer is None
            else float(orthogonality_normalizer)
        )
        self.batchnorm = check_batchnorm(batchnorm)
        self.basis_bn = batch_normalization(
            self.batchnorm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            name="basis_bn",
            dtype=self.dtype_policy,
        )
        self.bn = batch_normalization(
            self.batchnorm,
            momentum=self.momentum,
            epsilon=self.epsilon,
            name="bn",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        x_shape, basis_shapes = split_kernel_inputs(input_shape)
        channels = x_shape[-1]
        if channels is None:
            raise ValueError(
                "BasisConv2D needs a known number of input channels. "
                f"Received: input_shape={input_shape}"
            )
        k = self.kernel_size
        self.shared_rank = 0
        self.num_shared_bases = len(basis_shapes)
        if basis_shapes:
            if self.basis_index >= len(basis_shapes):
                raise ValueError(
                    f"`basis_index` must index one of the {len(basis_shapes)} "
                    f"bases given. Received: basis_index={self.basis_index}"
                )
            for shape in basis_shapes:
                if tuple(shape[:3]) != (k, k, channels):
                    raise ValueError(
                        f"A shared basis must have shape ({k}, {k}, "
                        f"{channels}, rank) to match kernel_size={k} and the "
                        f"{channels} input channels. Received: basis shape "
                        f"{tuple(shape)}"
                    )
            self.shared_rank = int(basis_shapes[self.basis_index][-1])
        self.rank = self.unique_rank + self.shared_rank
        if self.rank == 0:
            raise ValueError(
                "BasisConv2D needs a unique basis or a shared basis. "
                "Received: unique_rank=0 and no shared basis."
            )
        self.unique_kernel = None
        if self.unique_rank:
            self.unique_kernel = self.add_weight(
                name="unique_kernel",
                shape=(k, k, channels, self.unique_rank),
                initializer=self.kernel_initializer,
            )
        self.coefficients = self.add_weight(
            name="coefficients",
            shape=(1, 1, self.rank, self.filters),
            initializer=self.coefficient_initializer,
        )
        self.basis_bn.build((None, None, None, self.rank))
        self.bn.build((None, None, None, self.filters))
        if self.orthogonality_normalizer is None:
            shared = [int(s[-1]) for s in basis_shapes]
            self.orthogonality_normalizer = float(
                max(1, regularizers.unique_entry_count(shared, self.unique_rank))
            )

    def basis_kernel(self, bases=()):
        """The concatenated basis ``[unique, shared]``, shape ``(k,k,C,R)``."""
        parts = []
        if self.unique_kernel is not None:
            parts.append(ops.cast(self.unique_kernel, self.compute_dtype))
        if bases:
            parts.append(ops.cast(bases[self.basis_index], self.compute_dtype))
        if len(parts) == 1:
            return parts[0]
        return ops.concatenate(parts, axis=-1)

    def convolution_op(self, inputs, kernel):
        return ops.conv(inputs, kernel, strides=self.strides, padding=self.padding)

    def call(self, inputs, training=None):
        x, bases = split_kernel_inputs(inputs)
        basis = self.basis_kernel(bases)
        if self._batch_statistics(training):
            y = self._train_forward(x, basis)
        elif training and (self.basis_bn.trainable or self.bn.trainable):
            # One BN frozen, the other not: the two-step definition.
            z = _batch_norm(self.basis_bn, self.convolution_op(x, basis), training)
            y = ops.conv(z, ops.cast(self.coefficients, self.compute_dtype))
            y = _batch_norm(self.bn, y, training)
        else:
            kernel, bias = self._composed(basis)
            dtype = self.compute_dtype
            y = self.convolution_op(x, ops.cast(kernel, dtype)) + ops.cast(bias, dtype)
        if self.orthogonality > 0 and self.unique_kernel is not None and bases:
            self.add_loss(self.penalty(bases))
        return y

    def _batch_statistics(self, training):
        return bool(training) and self.basis_bn.trainable and self.bn.trainable

    def _train_forward(self, x, basis):
        """Training mode, computed with one normalization pass instead of two.

        With batch statistics, ``bn(conv1x1(basis_bn(z)))`` only depends on
        ``z = conv(x, basis)`` through its per-channel scale: the basis BN
        is ``z * s + t`` with ``s = gamma_b / sqrt(var_b + eps)`` and
        ``t = beta_b - mean_b * s``, the 1x1 convolution is linear and the
        output BN subtracts its own batch mean, so the shift ``t @ A``
        cancels. The layer therefore computes the batch moments of ``z``,
        convolves ``z`` with ``diag(s) @ A`` and applies the output BN: the
        same output and gradients as the two-step definition (tested
        against it), without writing and re-reading the normalized ``z``.
        This and an aligned fused BN on the output are what make a shared
        ResNet train at close to the speed of a plain one on CPU
        (``bench/profile_block.py``).

        ``beta_b`` gets its exact gradient, zero (the output BN cancels it),
        so coupled weight decay treats it as PyTorch does. The moving
        statistics are those of the two-step definition: the basis BN's
        from the moments of ``z``, the output BN's mean from the exact mean
        of ``(z * s + t) @ A``, which is ``beta_b @ A``.
        """
        f32 = "float32"
        z = self.convolution_op(x, basis)
        mean, variance = _moments(ops.cast(z, f32))
        gamma_b = ops.cast(self.basis_bn.gamma, f32)
        beta_b = ops.cast(self.basis_bn.beta, f32)
        scale = gamma_b * ops.rsqrt(variance + self.basis_bn.epsilon)
        coeff = ops.cast(self.coefficients, f32)
        mixed = coeff * scale[None, None, :, None]
        y = ops.conv(z, ops.cast(mixed, self.compute_dtype))
        # beta_b enters the output with weight zero: its exact gradient.
        offset = ops.cast(self.bn.beta, f32) + 0.0 * ops.sum(beta_b)
        # The output's batch mean is not the two-step one (the shift was
        # dropped); its moving mean is set from the exact value below.
        out, _, variance_y = _fused_training_bn(self.bn, y, offset)
        # z and y have the same N*H*W values per channel (y is 1x1 of z).
        count = _count(z) if self.batchnorm == "pytorch" else None
        update_moving_statistics(self.basis_bn, mean, variance, count)
        update_moving_statistics(
            self.bn, ops.matmul(beta_b, coeff[0, 0]), variance_y, count
        )
        return ops.cast(out, self.compute_dtype)

    def _composed(self, basis, dtype="float32"):
        """Inference-mode kernel and bias, composed in ``dtype`` (tensors)."""
        s_b, t_b = _bn_affine_tensors(self.basis_bn, dtype)
        s, t = _bn_affine_tensors(self.bn, dtype)
        coeff = ops.cast(self.coefficients, dtype)[0, 0]
        mix = (s_b[:, None] * coeff) * s[None, :]  # (R, F)
        kernel = ops.tensordot(ops.cast(basis, dtype), mix, axes=([3], [0]))
        bias = ops.matmul(t_b, coeff) * s + t
        return kernel, bias

    def penalty(self, bases):
        """This layer's unique-row term of the CIFAR-10 penalty."""
        total = regularizers.unique_penalty_sum(bases, self.unique_kernel)
        return self.orthogonality * total / self.orthogonality_normalizer

    def fold(self, bases=()):
        """The equivalent plain convolution in inference mode.

        Args:
            bases: the shared basis tensors this layer is called with (NumPy
                arrays or tensors), in the same order as in the call.

        Returns:
            ``(kernel, bias)`` NumPy float32 arrays of shapes
            ``(k, k, C, filters)`` and ``(filters,)`` such that
            ``conv(x, kernel) + bias`` equals the layer's inference output.
        """
        basis = ops.cast(self.basis_kernel(list(bases)), "float32")
        kernel, bias = self._composed(basis, dtype="float64")
        return (
            ops.convert_to_numpy(kernel).astype(np.float32),
            ops.convert_to_numpy(bias).astype(np.float32),
        )

    def compute_output_shape(self, input_shape):
        x_shape, _ = split_kernel_inputs(input_shape)
        return conv_output_shape(
            x_shape, self.kernel_size, self.strides, self.padding, self.filters
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "unique_rank": self.unique_rank,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "basis_index": self.basis_index,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "coefficient_initializer": keras.initializers.serialize(
                    self.coefficient_initializer
                ),
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "orthogonality": self.orthogonality,
                "orthogonality_normalizer": self.orthogonality_normalizer,
                "batchnorm": self.batchnorm,
            }
        )
        return config


def _batch_norm(bn, x, training):
    """``bn(x, training)``, with a fused kernel on TensorFlow when it pays.

    Used when only one of the two BNs is frozen; the usual training path is
    `BasisConv2D._train_forward`, inference uses the composed kernel.
    """
    if keras.backend.backend() != "tensorflow" or len(x.shape) != 4:
        return bn(x, training=training)
    if training and bn.trainable:
        y, mean, variance = _fused_training_bn(bn, x, ops.cast(bn.beta, "float32"))
        update_moving_statistics(bn, mean, variance, _count(x))
        return ops.cast(y, bn.compute_dtype)
    scale, shift = _bn_affine_tensors(bn)
    return ops.cast(ops.cast(x, "float32") * scale + shift, bn.compute_dtype)


def _fused_training_bn(bn, x, offset):
    """Batch-statistics BN of ``x`` in float32: ``(y, mean, biased variance)``.

    Keras's BatchNormalization computes moments and normalization as
    separate element-wise ops (several passes over the activations, forward
    and backward); ``tf.nn.fused_batch_norm`` does it in one pass and is
    2-3x faster on CPU, but only when the channel count is a multiple of 4
    (17 channels: 10x slower than 16, measured by
    ``bench/profile_block.py``). Other channel counts and backends take the
    moments path. In float32 even under mixed precision, as Keras's BN.
    """
    x = ops.cast(x, "float32")
    gamma = ops.cast(bn.gamma, "float32")
    channels = x.shape[-1]
    if keras.backend.backend() == "tensorflow" and channels and channels % 4 == 0:
        import tensorflow as tf

        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, offset, epsilon=bn.epsilon, is_training=True
        )[:3]
        # The fused op returns the unbiased variance; Keras averages the
        # biased one.
        n = ops.cast(ops.prod(ops.shape(x)[:3]), "float32")
        variance = variance * (n - 1.0) / ops.maximum(n, 1.0)
        return y, mean, variance
    mean, variance = ops.moments(x, axes=[0, 1, 2])
    scale = gamma * ops.rsqrt(variance + bn.epsilon)
    return x * scale + (offset - mean * scale), mean, variance


def _moments(z):
    """Per-channel batch mean and biased variance of an NHWC tensor.

    Only the variance is differentiated (the training computation does not
    use the mean but for the moving statistics). On TensorFlow its gradient
    ``2 (z - mean) / n * upstream`` is written by hand: autodiff of
    ``tf.nn.moments`` makes three extra passes over ``z`` (broadcasts and
    the squared difference's gradient), one pass is enough.
    """
    if keras.backend.backend() != "tensorflow":
        mean, variance = ops.moments(z, axes=[0, 1, 2])
        return ops.stop_gradient(mean), variance
    import tensorflow as tf

    mean = tf.reduce_mean(z, axis=[0, 1, 2])

    @tf.custom_gradient
    def variance(z):
        centered = z - tf.stop_gradient(mean)
        value = tf.reduce_mean(tf.square(centered), axis=[0, 1, 2])

        def grad(upstream):
            n = tf.cast(tf.reduce_prod(tf.shape(z)[:3]), z.dtype)
            return centered * (2.0 * upstream / n)

        return value, grad

    return tf.stop_gradient(mean), variance(z)


def _count(x):
    """Values per channel of an NHWC tensor, ``N*H*W``, as a float32 scalar."""
    return ops.cast(ops.prod(ops.shape(x)[:3]), "float32")


def _bn_affine_tensors(bn, dtype="float32"):
    """Inference-mode BN as tensors ``(scale, shift)`` in ``dtype``."""
    gamma = ops.cast(bn.gamma, dtype)
    beta = ops.cast(bn.beta, dtype)
    mean = ops.cast(bn.moving_mean, dtype)
    variance = ops.cast(bn.moving_variance, dtype)
    scale = gamma / ops.sqrt(variance + bn.epsilon)
    return scale, beta - mean * scale
