"""Post-training compression of plain ConvNets into shared filter bases."""

from sb_keras.compression.rebalance import rebalance
from sb_keras.compression.resnet import compress
from sb_keras.compression.resnet import unshare

__all__ = ["compress", "rebalance", "unshare"]
