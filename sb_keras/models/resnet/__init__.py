from sb_keras.models.resnet.resnet import ResNet

__all__ = ["ResNet"]
