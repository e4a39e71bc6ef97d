"""The decomposed convolution of Kang & Kim: basis -> BN -> coefficients -> BN."""

import keras
import numpy as np
from keras import ops

from sb_keras import regularizers
from sb_keras.api_export import sb_export
from sb_keras.layers import initializers as sb_init
from sb_keras.layers.batch_norm import batch_normalization
from sb_keras.layers.batch_norm import check_batchnorm
from sb_keras.layers.batch_norm import fused_batch_norm
from sb_keras.layers.batch_norm import fused_batch_norm_applies
from sb_keras.layers.batch_norm import update_moving_statistics
from sb_keras.layers.batch_norm import values_per_channel
from sb_keras.layers.common import channel_axis
from sb_keras.layers.common import check_int_tuple
from sb_keras.layers.common import check_padding
from sb_keras.layers.common import check_positive_int
from sb_keras.layers.common import check_strides_dilation
from sb_keras.layers.common import conv_output_shape
from sb_keras.layers.common import image_input_spec
from sb_keras.layers.common import split_kernel_inputs
from sb_keras.layers.common import standardize_data_format


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
    bias; `fold` returns that kernel and bias (in Keras's ``(kh, kw, in,
    out)`` layout, whatever the ``data_format``).

    The arguments follow ``keras.layers.Conv2D`` where they apply to a
    decomposed convolution. ``use_bias=True`` is deliberately not supported
    (``ValueError``): the output BatchNorm's ``beta`` already is the bias.

    Args:
        filters: output channels.
        unique_rank: filters of the per-layer unique basis (``u_g``); `0`
            for the "SharedOnly" ablation.
        kernel_size: spatial size of the bases, an int or a tuple of two.
            Defaults to `3`.
        strides: strides of the basis convolution, an int or a tuple of
            two. Defaults to `1`.
        padding: `"same"` or `"valid"` (case-insensitive). Defaults to
            `"same"`.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            ``keras.config.image_data_format()``.
        dilation_rate: dilation of the basis convolution, an int or a tuple
            of two. Defaults to `1`.
        activation: applied to the output (after the BatchNorm). Defaults
            to None.
        use_bias: must be `False` (see above).
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
        kernel_regularizer: regularizer of the unique basis. Defaults to
            None (a shared basis takes its own, see `FilterBasis`).
        kernel_constraint: constraint of the unique basis. Defaults to None.
        coefficient_regularizer: regularizer of the 1x1 coefficients.
            Defaults to None.
        coefficient_constraint: constraint of the 1x1 coefficients.
            Defaults to None.
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
        data_format=None,
        dilation_rate=1,
        activation=None,
        use_bias=False,
        kernel_regularizer=None,
        kernel_constraint=None,
        coefficient_regularizer=None,
        coefficient_constraint=None,
        batchnorm="keras",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters)
        self.unique_rank = check_positive_int(
            "unique_rank", unique_rank, allow_zero=True
        )
        self.kernel_size = check_int_tuple("kernel_size", kernel_size)
        self.strides = check_int_tuple("strides", strides)
        self.padding = check_padding(padding)
        self.data_format = standardize_data_format(data_format)
        self.dilation_rate = check_int_tuple("dilation_rate", dilation_rate)
        check_strides_dilation(self.strides, self.dilation_rate)
        self.activation = keras.activations.get(activation)
        if use_bias:
            raise ValueError(
                "BasisConv2D ends with a BatchNormalization whose beta is its "
                "bias, so `use_bias=True` is not supported. "
                f"Received: use_bias={use_bias!r}"
            )
        self.use_bias = False
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.coefficient_regularizer = keras.regularizers.get(coefficient_regularizer)
        self.coefficient_constraint = keras.constraints.get(coefficient_constraint)
        self._axis = channel_axis(self.data_format)
        self._reduce_axes = [0, 1, 2] if self._axis == -1 else [0, 2, 3]
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
            axis=self._axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            name="basis_bn",
            dtype=self.dtype_policy,
        )
        self.bn = batch_normalization(
            self.batchnorm,
            axis=self._axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            name="bn",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        x_shape, basis_shapes = split_kernel_inputs(input_shape)
        if len(x_shape) != 4:
            raise ValueError(
                "BasisConv2D takes a rank-4 image (and optional bases). "
                f"Received: input_shape={input_shape}"
            )
        channels = x_shape[self._axis]
        if channels is None:
            raise ValueError(
                "BasisConv2D needs a known number of input channels. "
                f"Received: input_shape={input_shape}"
            )
        kh, kw = self.kernel_size
        self.shared_rank = 0
        self.num_shared_bases = len(basis_shapes)
        if basis_shapes:
            if self.basis_index >= len(basis_shapes):
                raise ValueError(
                    f"`basis_index` must index one of the {len(basis_shapes)} "
                    f"bases given. Received: basis_index={self.basis_index}"
                )
            for shape in basis_shapes:
                if len(shape) != 4 or tuple(shape[:3]) != (kh, kw, channels):
                    raise ValueError(
                        f"A shared basis must have shape ({kh}, {kw}, "
                        f"{channels}, rank) to match kernel_size="
                        f"{self.kernel_size} and the "
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
                shape=(kh, kw, channels, self.unique_rank),
                initializer=self.kernel_initializer,
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
            )
        self.coefficients = self.add_weight(
            name="coefficients",
            shape=(1, 1, self.rank, self.filters),
            initializer=self.coefficient_initializer,
            regularizer=self.coefficient_regularizer,
            constraint=self.coefficient_constraint,
        )
        self.basis_bn.build(self._channel_shape(self.rank))
        self.bn.build(self._channel_shape(self.filters))
        specs = [image_input_spec(self.data_format, channels)]
        specs += [keras.layers.InputSpec(shape=tuple(s)) for s in basis_shapes]
        self.input_spec = specs if basis_shapes else specs[0]
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

    def _channel_shape(self, channels):
        """A 4-D shape with only the channel axis known."""
        if self._axis == -1:
            return (None, None, None, channels)
        return (None, channels, None, None)

    def _per_channel(self, vector):
        """A per-channel vector shaped to broadcast over an image."""
        if self._axis == -1:
            return vector
        return ops.reshape(vector, (-1, 1, 1))

    def convolution_op(self, inputs, kernel):
        return ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )

    def _pointwise(self, z, coefficients):
        return ops.conv(z, coefficients, data_format=self.data_format)

    def call(self, inputs, training=None):
        x, bases = split_kernel_inputs(inputs)
        basis = self.basis_kernel(bases)
        if self._batch_statistics(training):
            y = self._train_forward(x, basis)
        elif training and (self.basis_bn.trainable or self.bn.trainable):
            # One BN frozen, the other not: the two-step definition.
            z = self.convolution_op(x, basis)
            z = _batch_norm(self.basis_bn, z, training, self.data_format)
            y = self._pointwise(z, ops.cast(self.coefficients, self.compute_dtype))
            y = _batch_norm(self.bn, y, training, self.data_format)
        else:
            kernel, bias = self._composed(basis)
            dtype = self.compute_dtype
            y = self.convolution_op(x, ops.cast(kernel, dtype))
            y = y + self._per_channel(ops.cast(bias, dtype))
        if self.orthogonality > 0 and self.unique_kernel is not None and bases:
            self.add_loss(self.penalty(bases))
        if self.activation is not None:
            y = self.activation(y)
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
        mean, variance = _moments(ops.cast(z, f32), self._reduce_axes)
        gamma_b = ops.cast(self.basis_bn.gamma, f32)
        beta_b = ops.cast(self.basis_bn.beta, f32)
        scale = gamma_b * ops.rsqrt(variance + self.basis_bn.epsilon)
        coeff = ops.cast(self.coefficients, f32)
        mixed = coeff * scale[None, None, :, None]
        y = self._pointwise(z, ops.cast(mixed, self.compute_dtype))
        # beta_b enters the output with weight zero: its exact gradient.
        offset = ops.cast(self.bn.beta, f32) + 0.0 * ops.sum(beta_b)
        # The output's batch mean is not the two-step one (the shift was
        # dropped); its moving mean is set from the exact value below.
        out, _, variance_y = _fused_training_bn(self.bn, y, offset, self.data_format)
        # z and y have the same N*H*W values per channel (y is 1x1 of z).
        count = _count(z, self.data_format) if self.batchnorm == "pytorch" else None
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
            x_shape,
            self.kernel_size,
            self.strides,
            self.padding,
            self.filters,
            self.data_format,
            self.dilation_rate,
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
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "kernel_constraint": keras.constraints.serialize(
                    self.kernel_constraint
                ),
                "coefficient_regularizer": keras.regularizers.serialize(
                    self.coefficient_regularizer
                ),
                "coefficient_constraint": keras.constraints.serialize(
                    self.coefficient_constraint
                ),
                "batchnorm": self.batchnorm,
            }
        )
        return config


def _batch_norm(bn, x, training, data_format="channels_last"):
    """``bn(x, training)``, with a fused kernel on TensorFlow when it pays.

    Used when only one of the two BNs is frozen; the usual training path is
    `BasisConv2D._train_forward`, inference uses the composed kernel.
    """
    if keras.backend.backend() != "tensorflow" or len(x.shape) != 4:
        return bn(x, training=training)
    if training and bn.trainable:
        beta = ops.cast(bn.beta, "float32")
        y, mean, variance = _fused_training_bn(bn, x, beta, data_format)
        update_moving_statistics(bn, mean, variance, _count(x, data_format))
        return ops.cast(y, bn.compute_dtype)
    scale, shift = _bn_affine_tensors(bn)
    if data_format == "channels_first":
        scale, shift = ops.reshape(scale, (-1, 1, 1)), ops.reshape(shift, (-1, 1, 1))
    return ops.cast(ops.cast(x, "float32") * scale + shift, bn.compute_dtype)


def _fused_training_bn(bn, x, offset, data_format="channels_last"):
    """Batch-statistics BN of ``x`` in float32: ``(y, mean, biased variance)``.

    TF's fused kernel where it pays (`fused_batch_norm_applies`): it takes a
    mixed-precision ``x`` as it is and computes in float32 inside, ``y`` in
    ``x``'s dtype. Else the moments path, in float32 as Keras's BN.
    """
    gamma = ops.cast(bn.gamma, "float32")
    first = data_format == "channels_first"
    if fused_batch_norm_applies(x, 1 if first else 3) and (
        keras.backend.standardize_dtype(x.dtype) != "float64"
    ):
        return fused_batch_norm(x, gamma, offset, bn.epsilon, data_format)
    x = ops.cast(x, "float32")
    mean, variance = ops.moments(x, axes=[0, 2, 3] if first else [0, 1, 2])
    scale = gamma * ops.rsqrt(variance + bn.epsilon)
    shift = offset - mean * scale
    if first:
        scale, shift = ops.reshape(scale, (-1, 1, 1)), ops.reshape(shift, (-1, 1, 1))
    return x * scale + shift, mean, variance


def _moments(z, axes=(0, 1, 2)):
    """Per-channel batch mean and biased variance (reduced over ``axes``).

    Only the variance is differentiated (the training computation does not
    use the mean but for the moving statistics). On TensorFlow its gradient
    ``2 (z - mean) / n * upstream`` is written by hand: autodiff of
    ``tf.nn.moments`` makes three extra passes over ``z`` (broadcasts and
    the squared difference's gradient), one pass is enough.
    """
    axes = list(axes)
    if keras.backend.backend() != "tensorflow":
        mean, variance = ops.moments(z, axes=axes)
        return ops.stop_gradient(mean), variance
    import tensorflow as tf

    mean = tf.reduce_mean(z, axis=axes, keepdims=True)

    @tf.custom_gradient
    def variance(z):
        centered = z - tf.stop_gradient(mean)
        value = tf.reduce_mean(tf.square(centered), axis=axes)

        def grad(upstream):
            n = tf.cast(tf.size(z) // tf.shape(z)[_kept_axis(axes)], z.dtype)
            return centered * (2.0 * tf.reshape(upstream, tf.shape(mean)) / n)

        return value, grad

    return tf.stop_gradient(tf.reshape(mean, [-1])), variance(z)


def _kept_axis(axes):
    """The one axis of a 4-D tensor not in ``axes`` (the channel axis)."""
    return ({0, 1, 2, 3} - set(axes)).pop()


def _count(x, data_format="channels_last"):
    """Values per channel of a 4-D tensor, ``N*H*W``, as a float32 scalar."""
    return values_per_channel(x, 1 if data_format == "channels_first" else 3)


def _bn_affine_tensors(bn, dtype="float32"):
    """Inference-mode BN as tensors ``(scale, shift)`` in ``dtype``."""
    gamma = ops.cast(bn.gamma, dtype)
    beta = ops.cast(bn.beta, dtype)
    mean = ops.cast(bn.moving_mean, dtype)
    variance = ops.cast(bn.moving_variance, dtype)
    scale = gamma / ops.sqrt(variance + bn.epsilon)
    return scale, beta - mean * scale
