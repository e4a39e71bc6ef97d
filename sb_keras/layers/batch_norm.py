"""BatchNorm with PyTorch's running statistics, for models that came from PyTorch.

Keras and PyTorch normalize a training batch identically (with the biased
batch variance) and their momenta are the same rule written two ways
(Keras ``momentum=0.9`` is PyTorch's ``momentum=0.1``:
``moving = 0.9 * moving + 0.1 * batch``). They differ in what the moving
variance averages: Keras the biased batch variance, PyTorch the unbiased
one, ``var * n / (n - 1)`` with ``n`` the values per channel (``N*H*W``).
PyTorch also counts the training batches of each BN
(``num_batches_tracked``). A model converted from the authors' PyTorch
checkpoints keeps training as their code does with
`TorchBatchNormalization` (and ``BasisConv2D(batchnorm="pytorch")``, whose
hand-written BN shares `update_moving_statistics`).

``BATCHNORMS`` names the two conventions the layers and models accept as
their ``batchnorm`` argument.
"""

import keras
from keras import ops

from sb_keras.api_export import sb_export

BATCHNORMS = ("keras", "pytorch")


def check_batchnorm(value):
    """Validates a ``batchnorm`` argument and returns it."""
    if not isinstance(value, str) or value not in BATCHNORMS:
        raise ValueError(
            f"`batchnorm` must be one of {BATCHNORMS}. Received: batchnorm={value!r}"
        )
    return value


def batch_normalization(batchnorm, **kwargs):
    """A new BN layer of the ``batchnorm`` convention (`BATCHNORMS`)."""
    if check_batchnorm(batchnorm) == "pytorch":
        return TorchBatchNormalization(**kwargs)
    return FusedBatchNormalization(**kwargs)


def fused_batch_norm(x, gamma, beta, epsilon, data_format="channels_last"):
    """Batch-statistics BN of a 4-D ``x``: ``(y, mean, biased variance)``.

    One TensorFlow ``FusedBatchNormV3`` kernel, forward and backward. ``y``
    has ``x``'s dtype (float32, float16 or bfloat16: the kernel computes in
    float32 inside, so a mixed-precision input needs no float32 copy); the
    statistics are float32. ``gamma``/``beta`` may be ``None`` (1 and 0).
    Call it only where `fused_batch_norm_applies`.
    """
    import tensorflow as tf

    first = data_format == "channels_first"
    channels = x.shape[1 if first else -1]
    gamma = tf.ones((channels,)) if gamma is None else ops.cast(gamma, "float32")
    beta = tf.zeros((channels,)) if beta is None else ops.cast(beta, "float32")
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x,
        gamma,
        beta,
        epsilon=epsilon,
        is_training=True,
        data_format="NCHW" if first else "NHWC",
    )[:3]
    # The fused op returns the unbiased variance; Keras averages the biased.
    n = ops.cast(ops.size(x) // channels, "float32")
    return y, mean, variance * (n - 1.0) / ops.maximum(n, 1.0)


def fused_batch_norm_applies(x, channel_axis):
    """Whether `fused_batch_norm` serves a 4-D ``x`` normalized on ``channel_axis``.

    TensorFlow backend, channels last or first, and a channel count that is a
    multiple of 4: TF's CPU kernel is 2-3x faster than the moments path there
    and up to 10x slower for other counts (17 channels, measured by
    ``bench/profile_block.py``).
    """
    if keras.backend.backend() != "tensorflow" or len(x.shape) != 4:
        return False
    axis = channel_axis % 4
    channels = x.shape[axis]
    return axis in (1, 3) and bool(channels) and channels % 4 == 0


@sb_export("sb_keras.layers.FusedBatchNormalization")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step is one fused kernel.

    Keras 3's BatchNormalization computes a training batch's moments and the
    normalization as separate element-wise ops (several passes over the
    activations forward and backward, and a float32 copy of every
    mixed-precision input). On TensorFlow this layer runs
    ``tf.nn.fused_batch_norm`` instead for 4-D inputs whose channel count is
    a multiple of 4 (2-3x faster per BN on CPU, also in bfloat16), with the
    same outputs, gradients and moving statistics as Keras's layer (tested
    against it). Other inputs, masks, ``synchronized=True``, ``renorm`` and
    inference take Keras's own path. It is what sb_keras's models use for
    their BatchNorms (``batchnorm="keras"``).

    Args:
        **kwargs: the arguments of `keras.layers.BatchNormalization`.

    Example:

    >>> import numpy as np, sb_keras, keras
    >>> x = np.random.default_rng(0).normal(size=(8, 4, 4, 16)).astype("float32")
    >>> fast = sb_keras.layers.FusedBatchNormalization()
    >>> plain = keras.layers.BatchNormalization()
    >>> bool(np.allclose(fast(x, training=True), plain(x, training=True), atol=1e-5))
    True
    """

    def call(self, inputs, training=None, mask=None):
        if self._fused_applies(inputs, training, mask):
            return self._fused_call(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _fused_applies(self, inputs, training, mask):
        return (
            bool(training and self.trainable)
            and mask is None
            and not self.synchronized
            and not self.renorm
            and keras.backend.standardize_dtype(inputs.dtype) != "float64"
            and fused_batch_norm_applies(inputs, self.axis)
        )

    def _fused_call(self, inputs):
        data_format = "channels_first" if self.axis % 4 == 1 else "channels_last"
        y, mean, variance = fused_batch_norm(
            inputs, self.gamma, self.beta, self.epsilon, data_format
        )
        count = values_per_channel(inputs, self.axis)
        update_moving_statistics(self, mean, variance, count)
        return ops.cast(y, self.compute_dtype)


def values_per_channel(x, axis):
    """Values per channel of a 4-D tensor (``N*H*W``) as a float32 scalar."""
    return ops.cast(ops.size(x) // ops.shape(x)[axis % 4], "float32")


@sb_export("sb_keras.layers.TorchBatchNormalization")
class TorchBatchNormalization(FusedBatchNormalization):
    """`keras.layers.BatchNormalization` with PyTorch's running statistics.

    The output and gradients are Keras's (a training batch is normalized
    with its biased variance). Two things follow ``torch.nn.BatchNorm2d``:

    * the moving variance averages the *unbiased* batch variance
      ``var * n / (n - 1)``, ``n`` the values per channel the moments were
      computed from (``N*H*W`` of the replica's batch; the global count with
      ``synchronized=True``; the unmasked count with a mask);
    * the non-trainable int64 ``num_batches_tracked`` counts the training
      steps of the layer, as PyTorch's buffer of that name (read from and
      written to the authors' checkpoints).

    The momentum is Keras's: ``momentum=0.9`` is PyTorch's default
    ``momentum=0.1``. Batch renormalization has no PyTorch counterpart and
    is refused.

    Args:
        **kwargs: the arguments of `keras.layers.BatchNormalization`.

    Example:

    >>> import numpy as np, sb_keras
    >>> bn = sb_keras.layers.TorchBatchNormalization(momentum=0.0)
    >>> x = np.array([[0.0], [2.0]], "float32")  # biased var 1, unbiased 2
    >>> _ = bn(x, training=True)
    >>> float(bn.moving_variance[0]), int(bn.num_batches_tracked)
    (2.0, 1)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.renorm:
            raise ValueError(
                "TorchBatchNormalization follows torch.nn.BatchNorm2d, which has "
                "no batch renormalization. Received: renorm=True"
            )
        self.num_batches_tracked = None

    def build(self, input_shape):
        super().build(input_shape)
        self.num_batches_tracked = self.add_weight(
            shape=(),
            name="num_batches_tracked",
            initializer="zeros",
            dtype="int64",
            trainable=False,
            autocast=False,
        )

    def call(self, inputs, training=None, mask=None):
        if self._fused_applies(inputs, training, mask):
            return self._fused_call(inputs)  # the update below, fused
        if not (training and self.trainable):
            return keras.layers.BatchNormalization.call(
                self, inputs, training=training, mask=mask
            )
        # Keras's training branch, with PyTorch's moving variance.
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(x, mask)
        update_moving_statistics(self, mean, variance, _count(self, x, mask))
        gamma = None if self.gamma is None else ops.cast(self.gamma, x.dtype)
        beta = None if self.beta is None else ops.cast(self.beta, x.dtype)
        outputs = ops.batch_normalization(
            x,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)


def _count(bn, x, mask):
    """Values per channel behind the batch moments of ``bn`` (float32)."""
    if mask is not None:
        n = ops.sum(ops.cast(mask, "float32"))
    else:
        shape = ops.shape(x)
        n = ops.cast(1.0, "float32")
        for axis in bn._reduction_axes:
            n = n * ops.cast(shape[axis], "float32")
    if bn.synchronized:
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            n = context.all_reduce(tf.distribute.ReduceOp.SUM, n)
    return n


def update_moving_statistics(bn, mean, variance, count=None):
    """The moving-average update of a BN layer's statistics, in its convention.

    Args:
        bn: a `keras.layers.BatchNormalization` (Keras's update) or a
            `TorchBatchNormalization` (PyTorch's: unbiased variance,
            ``num_batches_tracked`` incremented).
        mean: the batch mean per channel.
        variance: the *biased* batch variance per channel.
        count: the values per channel behind the moments (a scalar tensor);
            needed for a `TorchBatchNormalization` only.
    """
    m = bn.momentum
    mean = ops.stop_gradient(ops.cast(mean, bn.moving_mean.dtype))
    variance = ops.stop_gradient(ops.cast(variance, bn.moving_variance.dtype))
    if isinstance(bn, TorchBatchNormalization):
        n = ops.cast(count, variance.dtype)
        # n == 1 (PyTorch refuses it) has variance 0: keep it 0, not NaN.
        variance = variance * (n / ops.maximum(n - 1.0, 1.0))
        bn.num_batches_tracked.assign_add(ops.cast(1, "int64"))
    bn.moving_mean.assign(bn.moving_mean * m + mean * (1.0 - m))
    bn.moving_variance.assign(bn.moving_variance * m + variance * (1.0 - m))
