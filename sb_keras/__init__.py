"""sb_keras: Keras 3 ConvNets whose filters are built from shared bases.

Example:

>>> import sb_keras
>>> model = sb_keras.ResNet(depth=20, share=True)
>>> sb_keras.count_params(model) < sb_keras.count_params(sb_keras.ResNet(20))
True
"""

from sb_keras import _quiet  # noqa: F401  (first: TensorFlow's import logs)
from sb_keras import export
from sb_keras import layers
from sb_keras import regularizers
from sb_keras import saving
from sb_keras import training  # registers PyTorchSGD, saved in model files
from sb_keras.analysis import orthogonality
from sb_keras.analysis import orthogonality_loss
from sb_keras.checkpoints import load_authors_checkpoint
from sb_keras.compression import compress
from sb_keras.compression import unshare
from sb_keras.counting import count_macs
from sb_keras.counting import count_params
from sb_keras.counting import count_table
from sb_keras.models import ACDCResNet
from sb_keras.models import DenseNet
from sb_keras.models import MobileNetV2
from sb_keras.models import ResNet
from sb_keras.models import ResNeXt
from sb_keras.models import freeze_all_but_atoms
from sb_keras.presets import from_preset
from sb_keras.presets import list_presets
from sb_keras.presets import save_to_preset
from sb_keras.registry import get_model
from sb_keras.registry import list_models
from sb_keras.registry import model_info
from sb_keras.version import __version__

__all__ = [
    "ResNet",
    "count_macs",
    "count_params",
    "count_table",
    "get_model",
    "layers",
    "list_models",
    "model_info",
    "orthogonality",
    "orthogonality_loss",
    "regularizers",
    "saving",
    "__version__",
    "load_authors_checkpoint",
    "ACDCResNet",
    "freeze_all_but_atoms",
    "MobileNetV2",
    "export",
    "training",
    "from_preset",
    "list_presets",
    "save_to_preset",
    "DenseNet",
    "ResNeXt",
    "compress",
    "unshare",
]
