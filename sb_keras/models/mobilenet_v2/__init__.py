from sb_keras.models.mobilenet_v2.mobilenet_v2 import MobileNetV2

__all__ = ["MobileNetV2"]
