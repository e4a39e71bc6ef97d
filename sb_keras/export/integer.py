"""The int8 arithmetic of LiteRT's default CPU kernels, in TensorFlow ops.

A quantization-aware model (`sb_keras.export.quantize_aware_model`) trains
with fake-quant ops: float32 convolutions whose outputs are rounded to the
int8 grid. In inference its layers instead compute what the converted
``.tflite`` file computes with LiteRT's default CPU kernels (XNNPACK), bit
for bit:

* convolutions, depthwise convolutions, fully-connected layers: the int32
  accumulator ``sum((q_x - z_x) * q_w) + q_bias`` (exact: integer sums in
  float64), then XNNPACK's fp32 requantization
  ``rint(float32(acc) * float32(float32(s_x * s_w) / s_y)) + z_y``;
* ``ADD``: XNNPACK's fixed-point addition (two integer multipliers with
  20-bit precision, a rounding bias, an arithmetic shift);
* ``MEAN`` (global average pooling): the integer sum, requantized as above.

The float simulation alone rounds the same values but computes them in
float32: about 1e-5 of a layer's outputs sit so close to a rounding boundary
that they round the other way, and in a deep network these one-step
differences spread (the authors' ResNet56 after QAT: 89.7 % of the outputs
within one step, up to 9 steps apart). The scales and zero points here are
derived from the fake-quant ranges exactly as the TFLite converter derives
them, and the constants were checked against the kernels on random int8
inputs (0 differences in ~1e5 outputs per op; `tests/test_export.py`).
"""

import tensorflow as tf

QMIN, QMAX = -128.0, 127.0


def _f64(x):
    return tf.cast(x, tf.float64)


def mul32(a, b):
    """The float32 product ``a * b``, computed in float64 and rounded once.

    Equal to an IEEE float32 multiply (the exact product of two float32
    numbers fits in float64), and immune to graph rewrites: in a
    ``tf.function`` TensorFlow's optimizers may change float32 arithmetic
    by an ulp (measured: a float32 ``(a * b) / c`` one ulp off in graph
    mode), which moves a near-tie to the other int8 code.
    """
    return tf.cast(_f64(a) * _f64(b), tf.float32)


def div32(a, b):
    """The float32 quotient ``a / b`` (float64 division, rounded once)."""
    return tf.cast(_f64(a) / _f64(b), tf.float32)


def grid(fake_quant):
    """``(scale, zero_point)`` of a `FakeQuant` as the converter stores them.

    The converter reads the fake quant's float32 ``[min, max]`` and computes
    in float64: ``scale = (max - min) / 255`` (stored as float32) and the
    zero point from whichever end has the smaller rounding error, rounded
    and clamped to int8.

    Returns:
        A float32 scalar scale and a float64 scalar (integral) zero point.
    """
    lo32 = tf.convert_to_tensor(fake_quant.range_min, tf.float32)
    hi32 = tf.convert_to_tensor(fake_quant.range_max, tf.float32)
    hi32 = tf.maximum(hi32, lo32 + 1e-6)
    lo, hi = tf.cast(lo32, tf.float64), tf.cast(hi32, tf.float64)
    scale = (hi - lo) / (QMAX - QMIN)
    from_min = QMIN - lo / scale
    from_max = QMAX - hi / scale
    use_min = abs(QMIN) + tf.abs(lo / scale) < abs(QMAX) + tf.abs(hi / scale)
    zero = tf.where(use_min, from_min, from_max)
    zero = tf.clip_by_value(tf.round(zero), QMIN, QMAX)
    return tf.cast(scale, tf.float32), zero


def to_int(x, scale):
    """The integers ``q - z`` of on-grid float values, as float64.

    Also the int8 codes of a fake-quantized (symmetric) weight tensor for
    its float32 ``scale`` (broadcast over the last axis).
    """
    return tf.round(tf.cast(x, tf.float64) / tf.cast(scale, tf.float64))


def from_int(q, scale, zero):
    """Float32 values of int8 codes ``q`` (float64) on a grid."""
    return mul32(q - zero, scale)


def bias_scale(input_scale, w_scale):
    """The int32 bias step ``s_x * s_w`` (float32)."""
    return mul32(input_scale, w_scale)


def int_bias(bias, input_scale, w_scale):
    """The int32 bias codes ``round(b / (s_x * s_w))`` (float32, as float64).

    Computed in float32 like the QAT graph's rounded bias
    (`sb_keras.export.qat`), which is what the converter stores: a bias
    within float32 error of a half-step rounds the same way in both.
    """
    b = div32(tf.cast(bias, tf.float32), bias_scale(input_scale, w_scale))
    return tf.round(_f64(b))


def requantize(acc, input_scale, w_scale, out_scale, out_zero):
    """XNNPACK's fp32 requantization of an int32 accumulator (float64).

    ``rint(float32(acc) * float32(float32(s_x * s_w) / s_y)) + z_y``, clamped
    to int8; ``rint`` rounds half to even like the kernels.
    """
    multiplier = div32(mul32(input_scale, w_scale), out_scale)
    v = mul32(tf.cast(acc, tf.float32), multiplier)
    q = tf.round(_f64(v)) + out_zero
    return tf.clip_by_value(q, QMIN, QMAX)


def add(a, b, grid_a, grid_b, grid_out):
    """XNNPACK's int8 ``ADD`` on on-grid float inputs; float32 output.

    Each input's scale relative to the output's becomes an integer
    multiplier with 20 bits for the larger one; the sum of the multiplied
    codes plus a rounding bias is shifted right (floor division by a power
    of two, exact in float64).
    """
    (sa, za), (sb, zb), (so, zo) = grid_a, grid_b, grid_out
    qa = to_int(a, sa) + za
    qb = to_int(b, sb) + zb
    ra, rb = div32(sa, so), div32(sb, so)  # float32, as the kernel's
    largest = tf.maximum(tf.abs(ra), tf.abs(rb))
    exponent = tf.bitwise.right_shift(tf.bitcast(largest, tf.int32), 23) - 127
    shift = tf.cast(20 - exponent, tf.float64)
    power = tf.pow(tf.constant(2.0, tf.float64), shift)
    ma = tf.round(tf.cast(ra, tf.float64) * power)
    mb = tf.round(tf.cast(rb, tf.float64) * power)
    bias = power / 2.0 - ma * za - mb * zb
    acc = bias + qa * ma + qb * mb
    q = tf.clip_by_value(tf.floor(acc / power) + zo, QMIN, QMAX)
    return from_int(q, so, zo)


def mean(x, axes, keepdims, grid_in, grid_out):
    """Int8 ``MEAN`` over ``axes``: the integer sum, requantized; float32."""
    (sx, _), (so, zo) = grid_in, grid_out
    acc = tf.reduce_sum(to_int(x, sx), axis=axes, keepdims=keepdims)
    count = 1
    for a in axes:
        count *= x.shape[a]
    multiplier = div32(div32(sx, so), float(count))
    v = mul32(tf.cast(acc, tf.float32), multiplier)
    q = tf.clip_by_value(tf.round(_f64(v)) + zo, QMIN, QMAX)
    return from_int(q, so, zo)
