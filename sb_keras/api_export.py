"""One decorator that makes a class public *and* serializable.

Every public layer, model, initializer and regularizer of sb_keras is
registered with Keras under the package name ``sb_keras`` so that
``keras.models.load_model`` finds it without ``custom_objects``.
"""

import keras

PACKAGE = "sb_keras"


def sb_export(path):
    """Register ``cls`` as ``sb_keras>ClassName`` and record its public path.

    Args:
        path: the public dotted path of the symbol, e.g.
            ``"sb_keras.layers.BasisConv2D"`` (documentation only).
    """

    def decorator(cls):
        cls = keras.saving.register_keras_serializable(package=PACKAGE)(cls)
        cls._sb_public_path = path
        return cls

    return decorator
