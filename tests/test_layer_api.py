"""Conv2D's API on the sb_keras layers, autocast, and QAT under mixed precision."""

import keras
import numpy as np
import pytest

from sb_keras import export
from sb_keras.layers import ACDCCoefficients
from sb_keras.layers import ACDCConv2D
from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut


def images(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype("float32")


def test_conv2d_style_arguments_are_accepted():
    """Tuples, NumPy integers and upper-case padding, as Conv2D takes them."""
    x = images((2, 9, 9, 4))
    a = BasisConv2D(
        6, unique_rank=2, kernel_size=(3, 3), strides=(2, 2), padding="SAME"
    )
    b = BasisConv2D(
        np.int64(6), unique_rank=np.int32(2), kernel_size=np.int64(3), strides=2
    )
    assert a.kernel_size == b.kernel_size == (3, 3)
    assert a.strides == b.strides == (2, 2) and a.padding == b.padding == "same"
    a(x)
    b(x)
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))
    assert BasisConv2D(4, kernel_size=(3, 1))(x).shape == (2, 9, 9, 4)
    c = ACDCConv2D(8, kernel_size=(1, 3), strides=np.int64(1), num_atoms=2)
    assert c(x).shape == (2, 9, 9, 8)
    assert c.atoms.shape[:2] == (1, 3)
    assert SharedConv2D(strides=(1, 2), padding="Valid").strides == (1, 2)


def test_basis_conv_activation_and_constraints():
    x = images((2, 6, 6, 4))
    layer = BasisConv2D(
        5,
        unique_rank=2,
        activation="relu",
        kernel_constraint=keras.constraints.MaxNorm(0.1),
        coefficient_regularizer=keras.regularizers.L2(0.5),
    )
    y = np.asarray(layer(x))
    assert y.min() >= 0 and y.max() > 0
    linear = BasisConv2D(5, unique_rank=2)
    linear(x)
    linear.set_weights(layer.get_weights())
    np.testing.assert_allclose(y, np.maximum(np.asarray(linear(x)), 0), atol=1e-6)
    coeff = np.asarray(layer.coefficients)
    assert layer.losses and np.isclose(float(layer.losses[0]), 0.5 * np.sum(coeff**2))
    assert layer.unique_kernel.constraint is layer.kernel_constraint
    config = BasisConv2D.from_config(layer.get_config()).get_config()
    assert config == layer.get_config()


def test_acdc_kernel_initializer_alias_and_conv2d_bias_default():
    init = keras.initializers.Constant(0.25)
    a = ACDCConv2D(8, num_atoms=2, kernel_initializer=init)
    b = ACDCConv2D(8, num_atoms=2, atom_initializer=init)
    x = images((1, 5, 5, 4))
    a(x)
    b(x)
    np.testing.assert_array_equal(np.asarray(a.atoms), np.asarray(b.atoms))
    assert np.all(np.asarray(a.atoms) == 0.25)
    assert a.use_bias and a.bias is not None  # Conv2D's default
    assert ACDCConv2D.from_config(b.get_config()).kernel_initializer is not None
    with pytest.raises(ValueError, match="Received: kernel_initializer"):
        ACDCConv2D(8, kernel_initializer=init, atom_initializer=init)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BasisConv2D(4, use_bias=True), "Received: use_bias=True"),
        (lambda: SharedConv2D(kernel_regularizer="l2"), "Received: kernel_regularizer"),
        (
            lambda: SharedConv2D(kernel_constraint="non_neg"),
            "Received: kernel_constraint",
        ),
        (lambda: ACDCConv2D(4, dilation_rate=2), "Received: dilation_rate=2"),
        (lambda: BasisConv2D(4, strides=2, dilation_rate=2), "Received: strides"),
        (lambda: BasisConv2D(4, padding="causal"), "Received: padding='causal'"),
        (lambda: BasisConv2D(4, kernel_size=(3, 3, 3)), "Received: kernel_size"),
        (lambda: SharedConv2D(strides=1.5), "Received: strides=1.5"),
        (lambda: ZeroPadShortcut(8, data_format="nchw"), "Received: data_format"),
    ],
)
def test_unsupported_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_input_spec_checks_rank_and_channels():
    x = keras.Input((8, 8, 4))
    basis = FilterBasis(rank=3, in_channels=4)(x)
    layer = BasisConv2D(4)
    layer([x, basis])
    with pytest.raises(
        ValueError, match="expected axis -1 of input shape to have value 4"
    ):
        layer([keras.Input((8, 8, 5)), basis])
    with pytest.raises(ValueError, match="rank-4"):
        BasisConv2D(4)(keras.Input((8, 4)))
    shared = SharedConv2D()
    with pytest.raises(ValueError, match="expected ndim=4"):
        shared([keras.Input((8, 4)), basis])
    conv = ACDCConv2D(8, num_atoms=2)
    conv(x)
    with pytest.raises(ValueError, match="expected axis -1"):
        conv(keras.Input((8, 8, 6)))
    with pytest.raises(ValueError, match="expected ndim=4"):
        ZeroPadShortcut(8)(keras.Input((8, 4)))


def test_non_positive_output_size_is_keras_error():
    x = keras.Input((2, 2, 4))
    basis = FilterBasis(rank=3, in_channels=4, kernel_size=5)(x)
    for layer, inputs in (
        (BasisConv2D(4, kernel_size=5, padding="valid"), [x, basis]),
        (SharedConv2D(padding="valid"), [x, basis]),
        (ACDCConv2D(4, kernel_size=5, padding="valid", num_atoms=2), x),
    ):
        with pytest.raises(ValueError, match="Computed output size would be zero"):
            layer(inputs)


def test_shared_conv_compute_output_shape():
    layer = SharedConv2D(strides=2)
    with pytest.raises(ValueError, match="kernel's shape"):
        layer.compute_output_shape((None, 8, 8, 4))
    assert layer.compute_output_shape([(None, 8, 8, 4), (3, 3, 4, 6)]) == (
        None,
        4,
        4,
        6,
    )
    layer.build([(None, 8, 8, 4), (3, 3, 4, 6)])
    assert layer.compute_output_shape((None, 8, 8, 4)) == (None, 4, 4, 6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_filter_basis_and_coefficients_autocast(policy):
    compute = policy.split("_")[1]
    x = images((1, 4, 4, 3))
    basis = FilterBasis(rank=4, in_channels=3, dtype=policy)
    alpha = ACDCCoefficients(num_atoms=2, in_group=3, dtype=policy)
    for layer in (basis, alpha):
        y = layer(x)
        assert keras.backend.standardize_dtype(y.dtype) == compute
        assert layer.compute_output_spec(x).dtype == compute
        assert all(w.dtype == "float32" for w in layer.weights)
    # The penalty stays float32 and equals the float32 layer's.
    ref = FilterBasis(rank=4, in_channels=3)
    ref(x)
    ref.set_weights(basis.get_weights())
    assert np.isclose(float(basis.losses[0]), float(ref.penalty()), rtol=1e-6)
    # The float32 default is unchanged.
    assert FilterBasis(rank=4, in_channels=3)(x).dtype == "float32"


def _op_model():
    x = keras.Input((6, 6, 8))
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    y = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(x, keras.layers.Dense(4)(y))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_qat_under_mixed_precision_matches_float32(policy):
    """QAT of a mixed-precision model is float32 by default, and exact.

    Under a global mixed policy, `quantize_aware_model` builds float32
    layers by default: the same int8 codes as the float32 model on every
    output. With the mixed policy kept (``dtype=policy``) the layers run
    fake quant in float32 and cast back: exact under mixed_float16;
    bfloat16 (8 significant bits) cannot carry every int8 value between
    layers, so codes may differ by one step.
    """
    rng = np.random.RandomState(0)
    x = rng.normal(0.3, 1.0, (64, 6, 6, 8)).astype("float32")
    previous = keras.config.dtype_policy()
    outputs = {}
    try:
        keras.config.set_dtype_policy("float32")
        model = _op_model()
        model.set_weights([rng.normal(0, 0.3, w.shape) for w in model.weights])
        qat = export.quantize_aware_model(model)
        for i in range(0, 64, 8):
            qat(x[i : i + 8], training=True)
        ranges, step = qat.get_weights(), export.qat.output_quant_step(qat)
        outputs["float32"] = np.asarray(qat(x, training=False))
        keras.config.set_dtype_policy(policy)
        mixed = _op_model()
        assert mixed.layers[-1].dtype_policy.name == policy
        mixed.set_weights(model.get_weights())
        for key, dtype in (("default", None), ("kept", policy)):
            qat = export.quantize_aware_model(mixed, dtype=dtype)
            expected = dtype or "float32"
            assert {layer.dtype_policy.name for layer in qat.layers} == {expected}
            qat.set_weights(ranges)
            outputs[key] = np.asarray(qat(x, training=False)).astype("float32")
        y = qat(x[:8], training=True)  # the mixed fake-quant training graph runs
        assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
        assert all(w.dtype == "float32" for w in qat.weights)
    finally:
        keras.config.set_dtype_policy(previous)
    # The outputs are int8 values (q - z) * step: compare their codes.
    codes = {k: np.round(v / step) for k, v in outputs.items()}
    assert np.abs(codes["float32"]).max() > 10
    np.testing.assert_array_equal(outputs["default"], outputs["float32"])
    diff = np.abs(codes["kept"] - codes["float32"])
    if policy == "mixed_float16":
        assert diff.max() == 0
    else:
        assert diff.max() <= 1 and np.mean(diff == 0) >= 0.95


@pytest.mark.parametrize("dtype", ["int8", "int8_from_float32", 3, "nope"])
def test_qat_dtype_must_be_a_float_policy(dtype):
    with pytest.raises(ValueError, match="Received: dtype="):
        export.quantize_aware_model(_op_model(), dtype=dtype)
