from sb_keras.models.resnext.resnext import ResNeXt

__all__ = ["ResNeXt"]
