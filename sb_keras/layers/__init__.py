"""Layers of sb_keras: shared filter bases and the convolutions that use them."""

from sb_keras.layers.acdc_coefficients import ACDCCoefficients
from sb_keras.layers.acdc_conv import ACDCConv2D
from sb_keras.layers.basis_conv import BasisConv2D
from sb_keras.layers.batch_norm import FusedBatchNormalization
from sb_keras.layers.batch_norm import TorchBatchNormalization
from sb_keras.layers.filter_basis import FilterBasis
from sb_keras.layers.grouped_basis_conv import GroupedBasisConv2D
from sb_keras.layers.preprocessing import PixelNormalization
from sb_keras.layers.shared_conv import SharedConv2D
from sb_keras.layers.shared_conv import ZeroPadShortcut

__all__ = [
    "BasisConv2D",
    "FilterBasis",
    "GroupedBasisConv2D",
    "PixelNormalization",
    "SharedConv2D",
    "ZeroPadShortcut",
    "ACDCCoefficients",
    "ACDCConv2D",
    "FusedBatchNormalization",
    "TorchBatchNormalization",
]
