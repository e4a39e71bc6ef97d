from sb_keras.models.densenet.densenet import DenseNet

__all__ = ["DenseNet"]
