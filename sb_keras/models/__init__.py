"""Model families of sb_keras."""

from sb_keras.models.resnet import ResNet

__all__ = ["ResNet"]
