"""Model families of sb_keras."""

from sb_keras.models.acdc_resnet import ACDCResNet
from sb_keras.models.acdc_resnet import freeze_all_but_atoms
from sb_keras.models.backbone import Backbone
from sb_keras.models.mobilenet_v2 import MobileNetV2
from sb_keras.models.resnet import ResNet

__all__ = ["Backbone", "ResNet", "ACDCResNet", "MobileNetV2", "freeze_all_but_atoms"]
