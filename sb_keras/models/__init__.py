"""Model families of sb_keras."""

from sb_keras.models.mobilenet_v2 import MobileNetV2
from sb_keras.models.resnet import ResNet

__all__ = ["ResNet", "MobileNetV2"]
