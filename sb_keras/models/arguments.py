"""Checks of model constructor arguments, each naming the argument.

Every check raises ``ValueError`` whose message ends in
``"Received: name=value"``, and returns the value in canonical form (a
Python ``int``, ``float`` or ``bool``). Bounds on sizes keep absurd
arguments (a depth of 12002, a billion classes) from building for minutes
or exhausting memory before anything is reported.
"""

import math
import numbers

import keras
import numpy as np

# Bounds on sizes: generous for real use, small enough to fail fast.
MAX_CIFAR_DEPTH = 1202  # He et al.'s deepest CIFAR ResNet (200 blocks a stage)
MAX_CLASSES = 100_000
MAX_CHANNELS = 1024
MAX_SPATIAL = 65_536


def received(name, value):
    """The ``"Received: name=value"`` tail of every message."""
    return f"Received: {name}={value!r}"


def check_bool(name, value):
    """A flag: ``True`` or ``False`` (NumPy booleans accepted)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"`{name}` must be True or False. {received(name, value)}")


def check_optional_bool(name, value):
    """A flag or None (None means "pick the default")."""
    return None if value is None else check_bool(name, value)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )


def check_int(name, value, low, high=None):
    """An integer in ``[low, high]`` (NumPy integers accepted)."""
    if _is_int(value) and value >= low and (high is None or value <= high):
        return int(value)
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"`{name}` must be an integer {bound}. {received(name, value)}")


def check_number(name, value, low, high=None, low_inclusive=True):
    """A finite real number in ``[low, high]`` (or ``(low, high]``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
        ok = ok and (high is None or value <= high)
    if ok:
        return value
    left = "[" if low_inclusive else "("
    bound = (
        f"in {left}{low}, {high}]"
        if high is not None
        else (f"{'>=' if low_inclusive else '>'} {low}")
    )
    raise ValueError(
        f"`{name}` must be a finite number {bound}. {received(name, value)}"
    )


def check_choice(name, value, choices, allow_none=False):
    """One of ``choices`` (compared only with strings, so never a TypeError)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value in choices:
        return value
    extra = " or None" if allow_none else ""
    raise ValueError(
        f"`{name}` must be one of {tuple(choices)}{extra}. {received(name, value)}"
    )


def check_activation(name, value):
    """None, a Keras activation name or a callable."""
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        try:
            keras.activations.get(value)
            return value
        except (ValueError, TypeError):
            pass
    raise ValueError(
        f"`{name}` must be None, the name of a Keras activation or a callable. "
        f"{received(name, value)}"
    )


def check_initializer(name, value):
    """None or anything `keras.initializers.get` accepts, in config form."""
    if value is None:
        return None
    try:
        initializer = keras.initializers.get(value)
    except (ValueError, TypeError):
        initializer = None
    if initializer is None:
        raise ValueError(
            f"`{name}` must be None, the name or config of a Keras initializer "
            f"or an initializer. {received(name, value)}"
        )
    if isinstance(value, (str, dict)):
        return value
    return keras.initializers.serialize(initializer)


def check_input_shape(value, min_size):
    """``(height, width, channels)`` with known channels; returns a tuple.

    Spatial sizes may be None; known ones lie in ``[min_size,
    MAX_SPATIAL]``; channels in ``[1, MAX_CHANNELS]``.
    """
    shape = tuple(value) if isinstance(value, (tuple, list)) else None
    ok = shape is not None and len(shape) == 3
    if ok:
        h, w, c = shape
        ok = _is_int(c) and 1 <= c <= MAX_CHANNELS
        ok = ok and all(
            d is None or (_is_int(d) and min_size <= d <= MAX_SPATIAL) for d in (h, w)
        )
    if not ok:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels in "
            f"[1, {MAX_CHANNELS}] and spatial sizes in [{min_size}, "
            f"{MAX_SPATIAL}] (or None). {received('input_shape', value)}"
        )
    return tuple(None if d is None else int(d) for d in shape)


def check_num_classes(value, include_top):
    """Classes of the classifier; None allowed without a classifier."""
    if value is None and not include_top:
        return None
    return check_int("num_classes", value, 1, MAX_CLASSES)


def check_preprocessing(value):
    """None or a name of `sb_keras.layers.preprocessing.NORMALIZATIONS`."""
    from sb_keras.layers.preprocessing import NORMALIZATIONS

    if value is None or (isinstance(value, str) and value in NORMALIZATIONS):
        return value
    raise ValueError(
        f"`preprocessing` must be one of {sorted(NORMALIZATIONS)}, 'auto' or "
        f"None. {received('preprocessing', value)}"
    )
