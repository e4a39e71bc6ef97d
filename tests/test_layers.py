"""Layer correctness against plain Keras/NumPy computations."""

import keras
import numpy as np
import pytest

from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.layers import PixelNormalization
from sb_keras.layers import SharedConv2D
from sb_keras.layers import ZeroPadShortcut


def _randomize_bn(bn, rng):
    c = bn.gamma.shape[0]
    bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
    bn.beta.assign(rng.normal(0, 0.5, c).astype("float32"))
    bn.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def _decomposed(channels, shared, unique, num_bases, basis_index):
    x = keras.Input((9, 9, channels))
    inputs = x
    if shared:
        bases = FilterBasis(rank=shared, in_channels=channels, num_bases=num_bases)(x)
        bases = bases if isinstance(bases, list) else [bases]
        inputs = [x, *bases]
    else:
        bases = []
    conv = BasisConv2D(5, unique_rank=unique, basis_index=basis_index)
    y = conv(inputs)
    return keras.Model(x, y), conv


@pytest.mark.parametrize(
    "channels,shared,unique,num_bases,basis_index",
    [
        (6, 4, 1, 1, 0),  # S4U1 single
        (6, 4, 2, 2, 1),  # double sharing, second conv position
        (6, 4, 0, 1, 0),  # SharedOnly ablation
        (6, 0, 3, 1, 0),  # NonShared ablation
    ],
)
def test_basis_conv_equals_composed_plain_conv(
    channels, shared, unique, num_bases, basis_index
):
    """Inference output == Conv2D(kernel, bias) composed independently."""
    rng = np.random.RandomState(0)
    model, conv = _decomposed(channels, shared, unique, num_bases, basis_index)
    _randomize_bn(conv.basis_bn, rng)
    _randomize_bn(conv.bn, rng)
    x = rng.normal(size=(3, 9, 9, channels)).astype("float32")

    # Independent composition in NumPy from the raw weights.
    parts = []
    if unique:
        parts.append(np.array(conv.unique_kernel))
    if shared:
        owner = model.get_layer(index=1)
        parts.append(np.array(owner.bases[basis_index]))
    basis = np.concatenate(parts, axis=-1).astype(np.float64)
    g_b, b_b, m_b, v_b = (np.array(w, np.float64) for w in conv.basis_bn.weights)
    g, b, m, v = (np.array(w, np.float64) for w in conv.bn.weights)
    a = np.array(conv.coefficients, np.float64)[0, 0]
    sb = g_b / np.sqrt(v_b + 1e-5)
    s = g / np.sqrt(v + 1e-5)
    kernel = np.einsum("hwcr,r,rf,f->hwcf", basis, sb, a, s)
    bias = ((b_b - m_b * sb) @ a - m) * s + b

    plain = keras.layers.Conv2D(5, 3, padding="same")
    plain.build((None, 9, 9, channels))
    plain.set_weights([kernel.astype("float32"), bias.astype("float32")])
    expected = np.array(plain(x))
    got = np.array(model(x, training=False))
    assert np.abs(got - expected).max() <= 1e-5

    # fold() gives the same kernel and bias.
    bases = [np.array(w) for w in model.get_layer(index=1).bases] if shared else []
    k2, b2 = conv.fold(bases)
    np.testing.assert_allclose(k2, kernel, atol=1e-5)
    np.testing.assert_allclose(b2, bias, atol=1e-5)


def test_unique_responses_come_first():
    """Coefficient rows 0..u-1 multiply the unique basis (authors' order)."""
    x = keras.Input((5, 5, 4))
    basis = FilterBasis(rank=3, in_channels=4)(x)
    conv = BasisConv2D(2, unique_rank=1)
    model = keras.Model(x, conv([x, basis]))
    coeff = np.zeros((1, 1, 4, 2), "float32")
    coeff[0, 0, 0, :] = 1.0  # only the unique response
    conv.coefficients.assign(coeff)
    for bn in (conv.basis_bn, conv.bn):
        bn.moving_variance.assign(np.full(bn.moving_variance.shape, 1 - 1e-5))
    data = np.random.RandomState(1).normal(size=(1, 5, 5, 4)).astype("float32")
    expected = keras.ops.conv(data, conv.unique_kernel, padding="same")
    np.testing.assert_allclose(
        np.array(model(data))[..., 0], np.array(expected)[..., 0], atol=1e-5
    )


def test_double_bases_are_jointly_orthonormal():
    x = keras.Input((4, 4, 8))
    layer = FilterBasis(rank=10, in_channels=8, num_bases=2)
    layer(x)
    rows = np.concatenate(
        [np.array(b).reshape(-1, 10).T for b in layer.bases], axis=0
    )  # (20, 72)
    np.testing.assert_allclose(rows @ rows.T, np.eye(20), atol=1e-5)


def test_shared_conv_equals_conv2d():
    rng = np.random.RandomState(2)
    x = keras.Input((7, 7, 3))
    kernel = FilterBasis(rank=4, in_channels=3, kernel_size=3)(x)
    model = keras.Model(x, SharedConv2D(strides=2, padding="valid")([x, kernel]))
    data = rng.normal(size=(2, 7, 7, 3)).astype("float32")
    ref = keras.layers.Conv2D(4, 3, strides=2, use_bias=False)
    ref.build((None, 7, 7, 3))
    ref.set_weights([np.array(model.get_layer(index=1).bases[0])])
    np.testing.assert_allclose(np.array(model(data)), np.array(ref(data)), atol=1e-6)


def test_zero_pad_shortcut_matches_numpy():
    data = np.random.RandomState(3).normal(size=(2, 8, 8, 16)).astype("float32")
    out = np.array(ZeroPadShortcut(32)(data))
    expected = np.pad(data[:, ::2, ::2, :], [(0, 0), (0, 0), (0, 0), (8, 8)])
    np.testing.assert_array_equal(out, expected)


def test_pixel_normalization():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    data = np.random.RandomState(4).uniform(0, 255, (2, 3, 3, 3)).astype("float32")
    out = np.array(PixelNormalization(mean, std)(data))
    np.testing.assert_allclose(
        out, (data / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=-1, in_channels=4), "rank=-1"),
        (dict(rank=4, in_channels=0), "in_channels=0"),
        (dict(rank=4, in_channels=4, num_bases=0), "num_bases=0"),
        (dict(rank=4, in_channels=4, orthogonality=-1.0), "orthogonality=-1.0"),
    ],
)
def test_filter_basis_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FilterBasis(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(filters=0), "filters=0"),
        (dict(filters=4, unique_rank=-1), "unique_rank=-1"),
        (dict(filters=4, padding="full"), "padding='full'"),
    ],
)
def test_basis_conv_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BasisConv2D(**kwargs)


def test_basis_conv_rejects_mismatched_basis():
    x = keras.Input((5, 5, 4))
    basis = FilterBasis(rank=3, in_channels=6)(x)
    with pytest.raises(ValueError, match="basis shape"):
        BasisConv2D(4)([x, basis])


def test_basis_conv_needs_some_basis():
    with pytest.raises(ValueError, match="unique_rank=0"):
        BasisConv2D(4, unique_rank=0)(keras.Input((5, 5, 4)))


def test_layer_config_round_trip():
    for layer in (
        FilterBasis(rank=3, in_channels=4, num_bases=2, orthogonality=2.0),
        BasisConv2D(4, unique_rank=2, basis_index=1, orthogonality=3.0),
        SharedConv2D(strides=2),
        ZeroPadShortcut(32),
        PixelNormalization((0.5,) * 3, (0.2,) * 3),
    ):
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config


def test_user_built_functional_model_keeps_sharing(tmp_path):
    """Sharing is a graph edge: a plain keras.Model built from the layers
    keeps one basis through save/load and clone_model."""
    x = keras.Input((8, 8, 6))
    basis = FilterBasis(rank=4, in_channels=6, name="basis")(x)
    y = BasisConv2D(6, unique_rank=1, name="c1")([x, basis])
    y = keras.layers.ReLU()(y)
    y = BasisConv2D(6, unique_rank=1, name="c2")([y, basis])
    model = keras.Model(x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    data = np.random.RandomState(5).normal(size=(2, 8, 8, 6)).astype("float32")
    for other in (keras.models.load_model(path), keras.models.clone_model(model)):
        other.set_weights(model.get_weights())
        assert len({id(v) for v in other.weights}) == len(model.weights)
        owner = other.get_layer("basis")
        assert len(owner.bases) == 1
        np.testing.assert_allclose(other(data), model(data), atol=1e-6)
        owner.bases[0].assign(np.zeros(owner.bases[0].shape))
        assert np.abs(np.array(other(data)) - np.array(model(data))).max() > 1e-3


def test_mixed_bfloat16_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        x = keras.Input((8, 8, 6))
        owner = FilterBasis(rank=4, in_channels=6)
        basis = owner(x)
        conv = BasisConv2D(6, unique_rank=1, orthogonality=1.0)
        model = keras.Model(x, conv([x, basis]))
        out = model(np.ones((1, 8, 8, 6), "float32"))
        assert owner.bases[0].dtype == "float32"
        assert conv.coefficients.dtype == "float32"
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
        assert all(
            keras.backend.standardize_dtype(v.dtype) == "float32" for v in model.losses
        )
    finally:
        keras.config.set_dtype_policy("float32")


def _two_step_reference(conv, model, x, training):
    """conv -> Keras BN -> 1x1 -> Keras BN, on copies of the layer's weights."""
    import tensorflow as tf

    owner = model.get_layer(index=1)
    bases = list(owner.bases) if isinstance(owner, FilterBasis) else []
    bns = []
    for sub in (conv.basis_bn, conv.bn):
        bn = keras.layers.BatchNormalization(momentum=sub.momentum, epsilon=1e-5)
        bn.build((None, None, None, sub.gamma.shape[0]))
        bn.set_weights(sub.get_weights())
        bns.append(bn)
    swap = {}
    for sub, bn in zip((conv.basis_bn, conv.bn), bns):
        swap[id(sub.gamma)], swap[id(sub.beta)] = bn.gamma, bn.beta
    weights = [swap.get(id(w), w) for w in conv.trainable_weights]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        basis = conv.basis_kernel([b for b in bases])
        z = bns[0](tf.nn.conv2d(xt, basis, 1, "SAME"), training=training)
        y = bns[1](tf.nn.conv2d(z, conv.coefficients, 1, "SAME"), training=training)
        loss = tf.reduce_sum(y * tf.cos(y))  # a non-trivial upstream gradient
    sources = [xt, *(v.value for v in [*weights, *bases])]
    grads = tape.gradient(loss, sources, unconnected_gradients="zero")
    return y, grads, bns


@pytest.mark.parametrize(
    "channels,shared,unique,num_bases,basis_index",
    [
        (16, 16, 1, 1, 0),  # S16U1: 17 basis channels (the moments path)
        (8, 8, 0, 1, 0),  # SharedOnly: 8 channels (the fused path)
        (6, 4, 2, 2, 1),  # double sharing, second position
        (6, 0, 3, 1, 0),  # NonShared
    ],
)
def test_training_mode_equals_two_step_definition(
    channels, shared, unique, num_bases, basis_index
):
    """Outputs, gradients of every weight and the input, and the moving
    statistics of the one-pass training computation equal the paper's
    two-step definition with Keras's own BatchNormalization."""
    import tensorflow as tf

    rng = np.random.RandomState(1)
    model, conv = _decomposed(channels, shared, unique, num_bases, basis_index)
    _randomize_bn(conv.basis_bn, rng)
    _randomize_bn(conv.bn, rng)
    x = rng.normal(1.0, 2.0, size=(4, 9, 9, channels)).astype("float32")
    owner = model.get_layer(index=1)
    bases = list(owner.bases) if isinstance(owner, FilterBasis) else []

    ref_y, ref_grads, ref_bns = _two_step_reference(conv, model, x, training=True)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt, training=True)
        loss = tf.reduce_sum(y * tf.cos(y))
    sources = [xt, *(v.value for v in [*conv.trainable_weights, *bases])]
    grads = tape.gradient(loss, sources, unconnected_gradients="zero")

    np.testing.assert_allclose(np.array(y), np.array(ref_y), rtol=1e-4, atol=1e-4)
    names = ["x", *(w.path for w in conv.trainable_weights), "bases"]
    for name, g, r in zip(names, grads, ref_grads):
        r = np.array(r)
        tol = 1e-4 * max(1.0, np.abs(r).max())
        np.testing.assert_allclose(np.array(g), r, atol=tol, err_msg=name)
    beta_b = [id(w) for w in conv.trainable_weights].index(id(conv.basis_bn.beta))
    assert np.abs(np.array(grads[1 + beta_b])).max() == 0  # exactly, as in theory
    for sub, ref in zip((conv.basis_bn, conv.bn), ref_bns):
        for a, b in (
            (sub.moving_mean, ref.moving_mean),
            (sub.moving_variance, ref.moving_variance),
        ):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
