"""Keras's own layer-test harness on every sb_keras layer.

``keras.src.testing.TestCase.run_layer_test`` (private, but installed with
the pinned Keras) checks config round trips, serialization, building,
symbolic and eager calls, one ``fit`` step and, with
``run_mixed_precision_check``, that under ``mixed_float16`` the outputs have
the dtype ``compute_output_spec`` announces and every weight stays float32.
The convolutions also run under the channels_first global data format.
"""

import keras
import pytest
from keras.src import testing

from sb_keras.export import FakeQuant
from sb_keras.export import QuantAdd
from sb_keras.export import QuantConv2D
from sb_keras.export import QuantDense
from sb_keras.export import QuantDepthwiseConv2D
from sb_keras.export import QuantGlobalAveragePooling2D
from sb_keras.export import QuantSharedConv2D
from sb_keras.layers import ACDCCoefficients
from sb_keras.layers import ACDCConv2D
from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers import FusedBatchNormalization
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import TorchBatchNormalization
from sb_keras.layers import ZeroPadShortcut

X = (2, 6, 6, 4)  # channels_last image batch
X_FIRST = (2, 4, 6, 6)

# (id, layer class, init kwargs, input shape, expected output shape)
CASES = [
    ("filter_basis", FilterBasis, {"rank": 5, "in_channels": 4}, X, (3, 3, 4, 5)),
    (
        "filter_basis_double",
        FilterBasis,
        {"rank": 3, "in_channels": 4, "num_bases": 2, "kernel_size": (3, 1)},
        X,
        [(3, 1, 4, 3), (3, 1, 4, 3)],
    ),
    (
        "basis_conv_unique",
        BasisConv2D,
        {"filters": 8, "unique_rank": 3, "activation": "relu"},
        X,
        (2, 6, 6, 8),
    ),
    (
        "basis_conv_shared",
        BasisConv2D,
        {"filters": 8, "unique_rank": 1, "strides": 2, "orthogonality": 1.0},
        (X, (3, 3, 4, 5), (3, 3, 4, 5)),
        (2, 3, 3, 8),
    ),
    (
        "basis_conv_torch_bn",
        BasisConv2D,
        {"filters": 8, "unique_rank": 1, "batchnorm": "pytorch"},
        (X, (3, 3, 4, 5)),
        (2, 6, 6, 8),
    ),
    ("fused_batch_norm", FusedBatchNormalization, {}, X, X),
    ("fused_batch_norm_first", FusedBatchNormalization, {"axis": 1}, X_FIRST, X_FIRST),
    ("torch_batch_norm", TorchBatchNormalization, {}, X, X),
    (
        "shared_conv",
        SharedConv2D,
        # No dilation here: the harness's fit step batches the kernel input
        # too (shape (None, 3, 4, 5)), which a dilated TF conv refuses;
        # dilation is checked against Conv2D in test_data_format.py.
        {"use_bias": True, "activation": "relu", "padding": "Same"},
        (X, (3, 3, 4, 5)),
        (2, 6, 6, 5),
    ),
    (
        "acdc_conv_own",
        ACDCConv2D,
        {"filters": 8, "num_atoms": 3, "route": "atoms"},
        X,
        (2, 6, 6, 8),
    ),
    (
        "acdc_conv_shared",
        ACDCConv2D,
        {"filters": 8, "strides": (2, 2), "padding": "VALID"},
        (X, (2, 4, 3)),
        (2, 2, 2, 8),
    ),
    (
        "acdc_coefficients",
        ACDCCoefficients,
        {"num_atoms": 3, "in_group": 4, "out_group": 2},
        X,
        (4, 2, 3),
    ),
    ("zero_pad_shortcut", ZeroPadShortcut, {"out_channels": 8}, X, (2, 3, 3, 8)),
    (
        "pixel_normalization",
        PixelNormalization,
        {"mean": (0.1, 0.2, 0.3, 0.4), "std": (0.5, 0.5, 0.5, 0.5)},
        X,
        X,
    ),
    ("fake_quant", FakeQuant, {}, X, X),
    (
        "quant_conv",
        QuantConv2D,
        {"filters": 8, "kernel_size": 3, "padding": "same"},
        X,
        (2, 6, 6, 8),
    ),
    (
        "quant_depthwise",
        QuantDepthwiseConv2D,
        {"kernel_size": 3, "padding": "same"},
        X,
        X,
    ),
    ("quant_dense", QuantDense, {"units": 3}, (2, 4), (2, 3)),
    ("quant_shared_conv", QuantSharedConv2D, {}, (X, (3, 3, 4, 5)), (2, 6, 6, 5)),
    ("quant_add", QuantAdd, {}, (X, X), X),
    ("quant_gap", QuantGlobalAveragePooling2D, {}, X, (2, 4)),
]

# Layers with a data format, run again under global channels_first.
CHANNELS_FIRST = {
    "basis_conv_unique",
    "basis_conv_torch_bn",
    "basis_conv_shared",
    "shared_conv",
    "acdc_conv_own",
    "acdc_conv_shared",
    "zero_pad_shortcut",
    "pixel_normalization",
    "quant_conv",
}


def _first(shape):
    """A channels_last image shape, reordered as channels_first."""
    if isinstance(shape, (list, tuple)) and isinstance(shape[0], tuple):
        return type(shape)([_first(shape[0]), *shape[1:]])
    if len(shape) == 4 and shape[1] == shape[2]:
        return (shape[0], shape[3], shape[1], shape[2])
    return shape


class _Harness(testing.TestCase):
    def runTest(self):  # unittest needs a method; the tests call run()
        pass

    def run_case(self, layer_cls, kwargs, input_shape, output_shape):
        self.run_layer_test(
            layer_cls,
            init_kwargs=kwargs,
            input_shape=input_shape,
            expected_output_shape=output_shape,
            # The harness's fit step feeds (inputs, outputs) through
            # tf.data's from_generator, which cannot carry a list of outputs
            # (FilterBasis with num_bases=2); every other check runs.
            run_training_check=not isinstance(output_shape, list),
            run_mixed_precision_check=True,
        )


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_run_layer_test(case):
    _, layer_cls, kwargs, input_shape, output_shape = case
    _Harness().run_case(layer_cls, kwargs, input_shape, output_shape)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[0] in CHANNELS_FIRST],
    ids=[c[0] for c in CASES if c[0] in CHANNELS_FIRST],
)
def test_run_layer_test_channels_first(case):
    _, layer_cls, kwargs, input_shape, output_shape = case
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        _Harness().run_case(
            layer_cls, kwargs, _first(input_shape), _first(output_shape)
        )
    finally:
        keras.config.set_image_data_format(previous)
