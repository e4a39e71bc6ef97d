"""From a trained Keras model to a ``.tflite`` file.

* `fold_model`: shared-basis layers and BatchNorms folded into plain convs
  (``"folded"``) or kept decomposed with the shared kernels stored once
  (``"decomposed"``); exact in inference.
* `convert`: float32, float16, dynamic-range int8 or full-integer int8
  ``.tflite`` with builtin ops only, written atomically.
* `quantize_aware_model` / `qat_fine_tune`: quantization-aware training
  with TF fake-quant ops the converter recognizes (no tfmot).
"""

from sb_keras.export.folding import LAYOUTS
from sb_keras.export.folding import fold_model
from sb_keras.export.graph import UnsupportedLayerError

__all__ = ["LAYOUTS", "UnsupportedLayerError", "fold_model"]
