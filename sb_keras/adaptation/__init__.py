"""Task adaptation of ACDC models: in Keras and on the device.

`adapt` fine-tunes only the atoms of an ACDC model (optionally BatchNorm and
a new classifier) on a small support set; `export_ondevice_training` writes a
`.tflite` with LiteRT's on-device training signatures (``train``, ``infer``,
``save``, ``restore``) that does the same update on a phone.
"""

from sb_keras.adaptation.core import adapt
from sb_keras.adaptation.core import replace_head
from sb_keras.adaptation.ondevice import export_ondevice_training
from sb_keras.models.acdc_resnet.adaptation import freeze_all_but_atoms

__all__ = [
    "adapt",
    "export_ondevice_training",
    "freeze_all_but_atoms",
    "replace_head",
]
