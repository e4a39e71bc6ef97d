from sb_keras.models.acdc_resnet.acdc_resnet import ACDCResNet
from sb_keras.models.acdc_resnet.adaptation import freeze_all_but_atoms

__all__ = ["ACDCResNet", "freeze_all_but_atoms"]
