"""Pixel normalization kept inside the model (no variables)."""

import keras
from keras import ops

from sb_keras.api_export import sb_export
from sb_keras.layers.common import standardize_data_format

# Per-channel (mean, std) of pixels / 255.
NORMALIZATIONS = {
    # The authors normalize CIFAR-10 with the ImageNet statistics.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def get_normalization(name):
    """``(mean, std)`` of a named normalization; raises on unknown names."""
    if name not in NORMALIZATIONS:
        raise ValueError(
            f"`preprocessing` must be one of {sorted(NORMALIZATIONS)} or None. "
            f"Received: preprocessing={name!r}"
        )
    return NORMALIZATIONS[name]


@sb_export("sb_keras.layers.PixelNormalization")
class PixelNormalization(keras.layers.Layer):
    """``(pixels / 255 - mean) / std`` per channel, with constants only.

    Models of sb_keras take raw RGB pixels in ``[0, 255]`` and normalize them
    with this layer, so a saved or exported model needs no extra knowledge
    about its preprocessing. It holds no variables (parameter counts are
    unchanged) and exports to two element-wise ops.

    Args:
        mean: per-channel mean of ``pixels / 255``.
        std: per-channel standard deviation of ``pixels / 255``.
        data_format: `"channels_last"` or `"channels_first"`: where the
            channel axis is (the last axis, or axis 1). Defaults to
            ``keras.config.image_data_format()``.

    Example:

    >>> import numpy as np, sb_keras
    >>> layer = sb_keras.layers.PixelNormalization((0.5,) * 3, (0.25,) * 3)
    >>> np.asarray(layer(np.full((1, 1, 1, 3), 255.0)))[0, 0, 0]
    array([2., 2., 2.], dtype=float32)
    """

    def __init__(self, mean, std, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.data_format = standardize_data_format(data_format)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(
                "`mean` and `std` need one value per channel and std > 0. "
                f"Received: mean={mean}, std={std}"
            )
        axis = -1 if self.data_format == "channels_last" else 1
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={axis: len(self.mean)}
        )

    def call(self, inputs):
        scale = [1.0 / (255.0 * s) for s in self.std]
        offset = [-m / s for m, s in zip(self.mean, self.std)]
        x = ops.cast(inputs, self.compute_dtype)
        scale = ops.convert_to_tensor(scale, self.compute_dtype)
        offset = ops.convert_to_tensor(offset, self.compute_dtype)
        if self.data_format == "channels_first":
            shape = (-1,) + (1,) * (len(x.shape) - 2)
            scale, offset = ops.reshape(scale, shape), ops.reshape(offset, shape)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "mean": list(self.mean),
                "std": list(self.std),
                "data_format": self.data_format,
            }
        )
        return config
