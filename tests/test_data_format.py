"""``channels_first``: every layer and model follows Keras's global data format.

Under ``keras.config.set_image_data_format("channels_first")`` each sb_keras
layer must equal a reference computation (``keras.layers.Conv2D`` with the
composed kernel, or the ``channels_last`` layer on transposed inputs) and
each model must build with a ``(3, H, W)`` input and give the
``channels_last`` logits on transposed images.
"""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.layers import ACDCCoefficients
from sb_keras.layers import ACDCConv2D
from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut

TOL = 1e-5


@pytest.fixture
def channels_first():
    """Sets the global data format to channels_first, then restores it."""
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    yield
    keras.config.set_image_data_format(previous)


def nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def reference_conv(x, kernel, bias=None, **kwargs):
    """``keras.layers.Conv2D`` (global data format) with given weights."""
    conv = keras.layers.Conv2D(
        kernel.shape[-1], kernel.shape[:2], use_bias=bias is not None, **kwargs
    )
    conv.build(x.shape)
    conv.set_weights([kernel] if bias is None else [kernel, bias])
    return np.asarray(conv(x))


def images(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype("float32")


def check_close(y, reference):
    assert np.abs(reference).max() > 0.1  # not a trivially zero comparison
    assert np.abs(np.asarray(y) - reference).max() <= TOL


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"strides": (2, 1), "padding": "VALID"},
        {"dilation_rate": 2, "use_bias": True, "bias_initializer": "ones"},
    ],
)
def test_shared_conv_equals_conv2d(channels_first, kwargs):
    x = images((2, 8, 9, 7))
    basis = FilterBasis(rank=5, in_channels=8)
    kernel = basis(x)
    layer = SharedConv2D(**kwargs)
    assert layer.data_format == "channels_first"
    y = layer([x, kernel])
    bias = layer.get_weights()[0] if kwargs.get("use_bias") else None
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "bias_initializer"}
    conv_kwargs.pop("use_bias", None)
    conv_kwargs.setdefault("padding", "same")
    reference = reference_conv(x, np.asarray(kernel), bias, **conv_kwargs)
    assert tuple(y.shape) == reference.shape
    check_close(y, reference)


@pytest.mark.parametrize("shared", [False, True])
def test_basis_conv_equals_conv2d_with_folded_kernel(channels_first, shared):
    x = images((2, 6, 7, 7))
    layer = BasisConv2D(8, unique_rank=2, strides=2, padding="valid")
    bases = [FilterBasis(rank=3, in_channels=6)(x)] if shared else []
    inputs = [x, *bases] if shared else x
    layer(inputs)  # build
    rng = np.random.RandomState(1)
    for bn in (layer.basis_bn, layer.bn):
        n = bn.gamma.shape[0]
        bn.set_weights(
            [rng.uniform(0.5, 2, n), rng.randn(n), rng.randn(n), rng.uniform(0.5, 2, n)]
        )
    y = layer(inputs, training=False)
    kernel, bias = layer.fold(bases)
    check_close(y, reference_conv(x, kernel, bias, strides=2))


@pytest.mark.parametrize(
    "frozen_basis_bn, batchnorm",
    [(False, "keras"), (True, "keras"), (False, "pytorch")],
)
def test_basis_conv_training_matches_channels_last(
    channels_first, frozen_basis_bn, batchnorm
):
    """Batch statistics, moving averages and gradients in both layouts.

    With the basis BN frozen the layer takes its two-step path.
    """
    import tensorflow as tf

    x = images((4, 8, 6, 6))
    weights = images((4, 8, 6, 6), seed=2)  # a loss that is not symmetric
    layers, outputs, grads = {}, {}, {}
    for fmt in ("channels_first", "channels_last"):
        data = x if fmt == "channels_first" else nhwc(x)
        basis = FilterBasis(rank=4, in_channels=8, orthogonality=0.0)
        layer = BasisConv2D(8, unique_rank=1, data_format=fmt, batchnorm=batchnorm)
        layer([data, basis(data)])
        layer.basis_bn.trainable = not frozen_basis_bn
        if layers:  # the same weights in both layouts
            first = layers["channels_first"]
            basis.set_weights(first[0].get_weights())
            layer.set_weights(first[1].get_weights())
        layers[fmt] = (basis, layer)
    for fmt, (basis, layer) in layers.items():
        data, w = (x, weights) if fmt == "channels_first" else (nhwc(x), nhwc(weights))
        variables = [*basis.trainable_weights, *layer.trainable_weights]
        with tf.GradientTape() as tape:
            y = layer([data, basis(data)], training=True)
            loss = tf.reduce_sum(y * w)
        outputs[fmt] = np.asarray(y)
        grads[fmt] = [np.asarray(g) for g in tape.gradient(loss, variables)]
    check_close(outputs["channels_first"], nchw(outputs["channels_last"]))
    cf, cl = layers["channels_first"][1], layers["channels_last"][1]
    for a, b in zip(cf.non_trainable_weights, cl.non_trainable_weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
    for a, b in zip(grads["channels_first"], grads["channels_last"]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("route", ["kernel", "atoms"])
@pytest.mark.parametrize("shared", [False, True])
def test_acdc_conv_equals_conv2d_with_composed_kernel(channels_first, route, shared):
    x = images((2, 16, 7, 7))
    if shared:
        alpha = ACDCCoefficients(num_atoms=4, in_group=8)(x)
        layer = ACDCConv2D(16, strides=2, route=route, bias_initializer="ones")
        y = layer([x, alpha])
    else:
        alpha = None
        layer = ACDCConv2D(16, num_atoms=4, group_size=8, route=route)
        y = layer(x)
    assert layer.resolved_route == route
    kernel = np.asarray(layer.compose_kernel(alpha))
    bias = np.asarray(layer.bias)
    reference = reference_conv(
        x, kernel, bias, strides=2 if shared else 1, padding="same"
    )
    check_close(y, reference)


def test_shortcut_and_normalization_match_channels_last(channels_first):
    x = images((2, 4, 7, 7))
    y = ZeroPadShortcut(8, strides=2)(x)
    ref = ZeroPadShortcut(8, strides=2, data_format="channels_last")(nhwc(x))
    assert tuple(y.shape) == (2, 8, 4, 4)
    np.testing.assert_array_equal(np.asarray(y), nchw(np.asarray(ref)))
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)
    y = PixelNormalization(mean, std)(x)
    ref = PixelNormalization(mean, std, data_format="channels_last")(nhwc(x))
    check_close(y, nchw(np.asarray(ref)))


MODELS = {
    "resnet20_shared": lambda: sb_keras.ResNet(20, share=True),
    "resnet20_plain": lambda: sb_keras.ResNet(20),
    "mobilenet_v2_shared": lambda: sb_keras.MobileNetV2(
        share=True, variant="cifar", alpha=0.35, num_classes=10
    ),
    "acdc_resnet20": lambda: sb_keras.ACDCResNet(20, sharing="stage", num_atoms=4),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_channels_last_on_transposed_inputs(name):
    build = MODELS[name]
    reference = build()
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = build()
    finally:
        keras.config.set_image_data_format(previous)
    assert tuple(model.input_shape) == (None, 3, 32, 32)
    model.set_weights(reference.get_weights())
    x = np.random.RandomState(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = np.asarray(reference(x, training=False))
    got = np.asarray(model(nchw(x), training=False))
    assert np.abs(expected).max() > 1e-3  # freshly initialized: small logits
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_qat_integer_path_matches_channels_last():
    """QAT layers under channels_first: the same int8 codes as channels_last."""
    from sb_keras import export

    def op_model(shape):
        x = keras.Input(shape)
        y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        y = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(y)
        y = keras.layers.Conv2D(6, 1)(y)
        return keras.Model(x, keras.layers.GlobalAveragePooling2D()(y))

    rng = np.random.RandomState(0)
    x = rng.normal(0.3, 1.0, (32, 6, 6, 4)).astype("float32")
    reference = export.quantize_aware_model(op_model((6, 6, 4)))
    reference.set_weights([rng.normal(0, 0.3, w.shape) for w in reference.weights])
    for i in range(0, 32, 8):
        reference(x[i : i + 8], training=True)
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        qat = export.quantize_aware_model(op_model((4, 6, 6)))
    finally:
        keras.config.set_image_data_format(previous)
    qat.set_weights(reference.get_weights())
    step = export.qat.output_quant_step(reference)
    expected = np.round(np.asarray(reference(x, training=False)) / step)
    got = np.round(np.asarray(qat(nchw(x), training=False)) / step)
    assert np.abs(expected).max() > 5
    np.testing.assert_array_equal(got, expected)


SAVED = {
    "resnet8_shared": lambda: sb_keras.ResNet(8, share=True),
    "acdc_resnet8": lambda: sb_keras.ACDCResNet(8, sharing="stage", num_atoms=4),
    "mobilenet_v2_shared": lambda: sb_keras.MobileNetV2(
        share=True, variant="cifar", alpha=0.25, num_classes=10
    ),
}


@pytest.mark.parametrize("name", sorted(SAVED))
def test_model_keeps_its_data_format_through_keras_file(name, tmp_path):
    """Saved under channels_first, loaded under channels_last: still NCHW."""
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = SAVED[name]()
        path = str(tmp_path / "model.keras")
        model.save(path)
    finally:
        keras.config.set_image_data_format(previous)
    assert model.data_format == model.get_config()["data_format"] == "channels_first"
    restored = keras.models.load_model(path)
    assert keras.config.image_data_format() == "channels_last"
    assert type(restored) is type(model)
    assert restored.get_config() == model.get_config()
    assert tuple(restored.input_shape) == (None, 3, 32, 32)
    x = nchw(np.random.RandomState(0).uniform(0, 255, (2, 32, 32, 3)).astype("f4"))
    expected = np.asarray(model(x, training=False))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(restored(x, training=False)), expected)


def test_data_format_argument_and_old_configs():
    model = sb_keras.ResNet(8, data_format="Channels_First")
    assert keras.config.image_data_format() == "channels_last"  # untouched
    assert model.data_format == "channels_first"
    assert tuple(model.input_shape) == (None, 3, 32, 32)
    config = sb_keras.ResNet.resolve_config(8, data_format="channels_first")
    assert config["input_shape"] == (3, 32, 32)
    assert config == model.get_config()
    # A config written before data_format was stored: the global format.
    del config["data_format"], config["input_shape"]
    assert sb_keras.ResNet.from_config(config).data_format == "channels_last"
    with pytest.raises(ValueError, match="Received: data_format='NCHW'"):
        sb_keras.ResNet(8, data_format="NCHW")


@pytest.mark.parametrize("cls", [sb_keras.DenseNet, sb_keras.ResNeXt])
def test_channels_last_only_families_refuse_channels_first(cls, channels_first):
    """Their blocks are written for NHWC: a clear error, not a wrong model."""
    for kwargs in ({}, {"data_format": "channels_first"}):
        with pytest.raises(ValueError, match="Received: data_format='channels_first'"):
            cls(**kwargs)
    assert cls.resolve_config(data_format="channels_last")["data_format"] == (
        "channels_last"
    )


COUNTED = {
    "resnet20_shared": lambda **k: sb_keras.ResNet(20, share=True, **k),
    "mobilenet_v2_shared": lambda **k: sb_keras.MobileNetV2(
        share=True, variant="cifar", alpha=0.35, num_classes=10, **k
    ),
    "acdc_resnet8": lambda **k: sb_keras.ACDCResNet(
        8, sharing="stage", num_atoms=4, **k
    ),
}


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_macs_and_params_do_not_depend_on_the_data_format(name):
    build = COUNTED[name]
    last = build(data_format="channels_last")
    first = build(data_format="channels_first")
    assert sb_keras.count_macs(last) > 1e6
    assert sb_keras.count_macs(first) == sb_keras.count_macs(last)
    assert sb_keras.count_params(first) == sb_keras.count_params(last)


def test_layer_macs_reads_the_layer_data_format():
    """A Conv2D on a non-square NCHW map counts as on the NHWC one."""
    from sb_keras.counting import layer_macs

    last = keras.layers.Conv2D(6, 3, data_format="channels_last")
    first = keras.layers.Conv2D(6, 3, data_format="channels_first")
    macs = layer_macs(last, [(1, 9, 7, 4)], (1, 7, 5, 6))
    assert macs == 7 * 5 * 3 * 3 * 4 * 6  # out positions x kernel x cin x cout
    assert layer_macs(first, [(1, 4, 9, 7)], (1, 6, 7, 5)) == macs
