"""From a trained Keras model to a ``.tflite`` file.

* `fold_model`: shared-basis layers and BatchNorms folded into plain convs
  (``"folded"``) or kept decomposed with the shared kernels stored once
  (``"decomposed"``),
  or ``"mixed"`` (decomposed where that saves many bytes per output
  position; the default of `export_tflite`, chosen in
  ``bench/deploy_layouts.py``); exact in inference.
* `convert`: float32, float16, dynamic-range int8 or full-integer int8
  ``.tflite`` with builtin ops only, written atomically.
* `export_tflite`: model or path -> ``.tflite`` in the default layout, with
  TFLite Metadata (`metadata`) when MediaPipe's writer is available.
* `quantize_aware_model` / `calibrate`: quantization-aware training
  with TF fake-quant ops the converter recognizes (no tfmot); in inference
  the QAT layers compute like LiteRT's int8 kernels (`integer`).
* `correct_bias`: empirical bias correction for int8 weights;
  `recalibrate`: activation ranges measured with every tensor preserved.
"""

from sb_keras.export import integer
from sb_keras.export import metadata
from sb_keras.export.bias_correction import correct_bias
from sb_keras.export.folding import LAYOUTS
from sb_keras.export.folding import fold_model
from sb_keras.export.graph import UnsupportedLayerError
from sb_keras.export.pipeline import choose_layout
from sb_keras.export.pipeline import export_tflite
from sb_keras.export.pipeline import load_float_model
from sb_keras.export.qat import calibrate
from sb_keras.export.qat import link_ranges
from sb_keras.export.qat import quantize_aware_model
from sb_keras.export.qat_layers import FakeQuant
from sb_keras.export.qat_layers import QuantAdd
from sb_keras.export.qat_layers import QuantConv2D
from sb_keras.export.qat_layers import QuantDense
from sb_keras.export.qat_layers import QuantDepthwiseConv2D
from sb_keras.export.qat_layers import QuantGlobalAveragePooling2D
from sb_keras.export.qat_layers import QuantSharedConv2D
from sb_keras.export.qat_layers import simulated
from sb_keras.export.tflite import QUANTIZE_MODES
from sb_keras.export.tflite import RANGE_METHODS
from sb_keras.export.tflite import NonBuiltinOpError
from sb_keras.export.tflite import convert
from sb_keras.export.tflite import op_names
from sb_keras.export.tflite import recalibrate

__all__ = [
    "LAYOUTS",
    "NonBuiltinOpError",
    "QUANTIZE_MODES",
    "RANGE_METHODS",
    "UnsupportedLayerError",
    "FakeQuant",
    "integer",
    "metadata",
    "QuantAdd",
    "QuantConv2D",
    "QuantDense",
    "QuantDepthwiseConv2D",
    "QuantGlobalAveragePooling2D",
    "QuantSharedConv2D",
    "calibrate",
    "link_ranges",
    "choose_layout",
    "export_tflite",
    "load_float_model",
    "quantize_aware_model",
    "convert",
    "correct_bias",
    "recalibrate",
    "simulated",
    "fold_model",
    "op_names",
]
