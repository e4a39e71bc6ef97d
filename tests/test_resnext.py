"""ResNeXt-50 32x4d (CIFAR-100) plain and with shared grouped bases."""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.layers import FilterBasis
from sb_keras.layers import GroupedBasisConv2D


def small(**kwargs):
    args = dict(
        blocks=(2, 2),
        widths=(16, 32),
        cardinality=4,
        base_width=16,
        input_shape=(16, 16, 3),
    )
    args.update(kwargs)
    return sb_keras.ResNeXt(**args)


def pixels(n, size=16, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32")


COUNTS = [
    pytest.param("resnext50_32x4d", 23_177_124, 1.344e9, marks=pytest.mark.slow),
    ("resnext50_32x4d_s64u4", 19_333_380, 1.179e9),
]


@pytest.mark.parametrize("name, params, macs", COUNTS)
def test_counts_match_the_paper(name, params, macs):
    model = sb_keras.get_model(name)
    assert sb_keras.count_params(model) == params
    assert abs(sb_keras.count_macs(model) - macs) <= 0.01 * macs


@pytest.mark.parametrize(
    "arg, value", [("unique_rank", 1), ("unique_rank", 0), ("shared_rank", 6)]
)
def test_impossible_ranks_are_refused(arg, value):
    with pytest.raises(ValueError, match=f"Received: {arg}={value}$"):
        sb_keras.ResNeXt.resolve_config(share=True, **{arg: value})


def test_grouped_decomposed_layer_equals_grouped_convs():
    """Inference: [unique grouped, shared grouped] -> BN -> ReLU -> 1x1 -> BN
    equals grouped Conv2Ds with the BN-composed kernels, and the basis part
    equals one dense Conv2D with the block-diagonal composed kernel."""
    rng = np.random.RandomState(0)
    c = 32
    x = keras.Input((6, 6, c))
    basis = FilterBasis(rank=16, in_channels=c // 4)(x)
    layer = GroupedBasisConv2D(
        24, unique_rank=8, unique_groups=2, activation="relu", output_bn=True
    )
    model = keras.Model(x, layer([x, basis]))
    for bn in (layer.basis_bn, layer.bn):
        n = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 2, n))
        bn.beta.assign(rng.normal(size=n))
        bn.moving_mean.assign(rng.normal(size=n))
        bn.moving_variance.assign(rng.uniform(0.5, 2, n))
    z = rng.normal(size=(3, 6, 6, c)).astype("float32")
    y = np.asarray(model(z, training=False))

    def conv(kernel, bias, groups, inputs):
        layer = keras.layers.Conv2D(
            kernel.shape[-1], kernel.shape[0], padding="same", groups=groups
        )
        layer.build(inputs.shape)
        layer.set_weights([kernel.astype("float32"), bias.astype("float32")])
        return np.asarray(layer(inputs))

    def affine(bn):
        g, b, m, v = (np.asarray(w, np.float64) for w in bn.weights)
        s = g / np.sqrt(v + bn.epsilon)
        return s, b - m * s

    s, t = affine(layer.basis_bn)
    unique = np.asarray(layer.unique_kernel, np.float64)
    shared = np.asarray(basis_layer_kernel(model), np.float64)
    zu = conv(unique * s[:8], t[:8], 2, z)
    zs = conv(shared * s[8:], t[8:], 4, z)
    h = np.maximum(np.concatenate([zu, zs], -1), 0)
    so, to = affine(layer.bn)
    coeff = np.asarray(layer.coefficients, np.float64)
    ref = conv(coeff * so, to, 1, h)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    # fold_basis: one dense conv with the block-diagonal kernel.
    k, b = layer.fold_basis([shared.astype("float32")])
    dense = conv(k, b, 1, z)
    np.testing.assert_allclose(dense, np.concatenate([zu, zs], -1), atol=1e-5)


def basis_layer_kernel(model):
    return next(
        layer.bases[0] for layer in model.layers if isinstance(layer, FilterBasis)
    )


def test_structure_and_orthogonal_bases():
    model = small(share=True, shared_rank=8, unique_rank=4)
    bases = [layer for layer in model.layers if isinstance(layer, FilterBasis)]
    # stage g: S_g = 8 * 2**g filters of width / (8 / 4) channels.
    assert [tuple(b.kernel_shape) for b in bases] == [(3, 3, 8, 8), (3, 3, 16, 16)]
    for b in bases:
        k = np.asarray(b.bases[0], np.float64)
        rows = k.reshape(-1, k.shape[-1]).T
        np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-5)
    convs = [layer for layer in model.layers if isinstance(layer, GroupedBasisConv2D)]
    assert [(c.unique_rank, c.unique_groups, c.shared_groups) for c in convs] == [
        (4, 1, 2),
        (8, 2, 2),
    ]
    # Pooled mean over both bases (unique bases not included).
    for b in bases:
        b.bases[0].assign(np.asarray(b.bases[0]) * 1.5)
    total, entries = 0.0, 0
    for b in bases:
        k = np.asarray(b.bases[0], np.float64)
        rows = k.reshape(-1, k.shape[-1]).T
        d = (rows @ rows.T - np.eye(len(rows))) ** 2
        total, entries = total + d.sum(), entries + d.size
    expected = 10.0 * total / entries
    assert sb_keras.orthogonality_loss(model) == pytest.approx(expected, rel=1e-5)
    model(pixels(1), training=True)
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)


def test_keras_round_trip_keeps_each_basis_one_variable(tmp_path):
    model = small(share=True, shared_rank=8, unique_rank=4)
    x = pixels(2)
    model(x, training=True)
    path = tmp_path / "resnext.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is sb_keras.ResNeXt
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)),
        np.asarray(model(x, training=False)),
        atol=1e-5,
    )
    assert sb_keras.count_params(loaded) == sb_keras.count_params(model)
    assert len([v for v in loaded.weights if v.path.endswith("/basis")]) == 2


def test_pytorch_default_initialization_of_the_convs():
    model = small(share=True, shared_rank=8, unique_rank=4)
    for layer in model.layers:
        if isinstance(layer, GroupedBasisConv2D):
            w = np.asarray(layer.unique_kernel)
        elif isinstance(layer, keras.layers.Conv2D):
            w = np.asarray(layer.kernel)
        else:
            continue
        bound = 1.0 / np.sqrt(np.prod(w.shape[:3]))  # fan_in, grouped too
        assert np.abs(w).max() <= bound + 1e-7, layer.name
        assert np.abs(w).max() > 0.5 * bound, layer.name
