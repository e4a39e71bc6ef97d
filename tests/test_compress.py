"""`sb_keras.compress`: the shared-basis math, the layer mapping, exactness.

The exactness tests fold an authors' shared checkpoint into its plain
ResNet (`sb_keras.unshare`) and compress it back at the same ranks: the
filters then lie exactly in a shared basis plus unique ones, so the
compressed model must reproduce the original logits.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.compression import keras_resnet
from sb_keras.compression import svd
from sb_keras.layers import BasisConv2D
from tests.conftest import shared_path

PRETRAINED = shared_path("pretrained", "net_rl2")
RESNET56 = "CIFAR10_ResNet56_S16U1_7.46err.pth.pth"
RESNET32 = "CIFAR10_ResNet32_Double_S16U1_6.93err.pth"


def _synthetic(seed, layers=8, filters=32, dim=144, shared=16, unique=2):
    """Matrices that are exactly ``A_l [B; U_l]``, unevenly weighted."""
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(dim, shared + layers * unique))
    basis = q[:, :shared].T
    scales = np.logspace(0, -2, shared + unique)
    mats = []
    for i in range(layers):
        u = q[:, shared + i * unique : shared + (i + 1) * unique].T
        mats.append(
            (rng.randn(filters, shared + unique) * scales) @ np.vstack([basis, u])
        )
    return mats, basis


def _rows_orthonormal(x, atol=1e-10):
    np.testing.assert_allclose(x @ x.T, np.eye(len(x)), atol=atol)


# ---------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_bases_exact_on_structured_matrices(seed):
    mats, true_basis = _synthetic(seed)
    basis, uniques, info = svd.shared_bases(mats, 16, 2)
    assert info["initial_relative_error"] > 1e-3  # one SVD is not exact
    assert info["relative_error"] < 1e-9
    assert info["iterations"] <= 30
    # The shared subspace is recovered.
    assert np.linalg.norm(basis.T @ basis - true_basis.T @ true_basis) < 1e-6
    _rows_orthonormal(basis)
    for v in uniques:
        _rows_orthonormal(v)
        np.testing.assert_allclose(v @ basis.T, 0.0, atol=1e-10)


def test_lbfgs_beats_the_alternation_on_trained_filters():
    path = os.path.join(PRETRAINED, RESNET56)
    if not os.path.isfile(path):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    model = sb_keras.load_authors_checkpoint(path)
    bases = [np.asarray(v) for v in model.get_layer("stage1_basis").bases]
    mats = []
    for layer in model.layers:
        if isinstance(layer, BasisConv2D) and layer.name.startswith("stage1"):
            kernel, _ = layer.fold(bases)
            mats.append(kernel.reshape(-1, kernel.shape[-1]).T.astype(np.float64))
    assert len(mats) == 16
    _, _, info = svd.shared_bases(mats, 16, 1)
    assert info["initial_relative_error"] > 0.1
    assert info["relative_error"] < 1e-7  # float32 kernels: floor near 2e-8
    assert info["iterations"] <= 100
    _, _, history = svd.alternate(mats, 16, 1, rounds=50)
    assert history[-1] > 1e-4  # linear and slow
    assert history[-1] < history[0]


def test_gradient_matches_finite_differences():
    rng = np.random.RandomState(3)
    mats = [rng.randn(12, 40) for _ in range(3)]
    basis = np.linalg.qr(rng.randn(40, 6))[0].T
    f, grad = svd.objective(mats, basis, 2)
    direction = rng.randn(6, 40)
    direction -= (direction @ basis.T) @ basis  # a tangent vector
    t = 1e-6
    moved = np.linalg.qr((basis + t * direction).T)[0].T
    numeric = (svd.objective(mats, moved, 2)[0] - f) / t
    assert numeric == pytest.approx(float(np.sum(grad * direction)), rel=1e-3)


def test_whitened_and_plain_each_win_in_their_own_metric():
    rng = np.random.RandomState(4)
    mats = [rng.randn(16, 36) @ np.diag(np.logspace(0, -1, 36)) for _ in range(4)]
    root = rng.randn(36, 36) @ np.diag(np.logspace(0, -2, 36))
    second = root @ root.T
    weighted = {}
    plain = {}
    for name, moment in (("plain", None), ("whitened", second)):
        basis, uniques, coeffs, info = svd.decompose(mats, 6, 1, second_moment=moment)
        _rows_orthonormal(basis)
        approx = [a @ np.vstack([v, basis]) for a, v in zip(coeffs, uniques)]
        err = [w - a for w, a in zip(mats, approx)]
        weighted[name] = sum(np.trace(e @ second @ e.T) for e in err)
        plain[name] = sum(np.sum(e * e) for e in err)
        assert np.sqrt(plain[name] / sum(np.sum(w * w) for w in mats)) == (
            pytest.approx(info["plain_relative_error"], rel=1e-9)
        )
    assert weighted["whitened"] < weighted["plain"]
    assert plain["plain"] < plain["whitened"]


# ---------------------------------------------------------------------------
# The model mapping and its BatchNorms
# ---------------------------------------------------------------------------


def _randomize_batchnorms(model, seed):
    """Random, non-trivial gamma, beta and statistics in every BN of ``model``."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.2, c),
                    rng.normal(0, 0.5, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
    return model


def _randomized_plain(depth=20):
    """A plain ResNet with random, non-trivial BN statistics."""
    return _randomize_batchnorms(sb_keras.ResNet(depth), seed=0)


def test_compressed_layer_is_conv_bn_of_the_approximated_kernel():
    plain = _randomized_plain()
    rng = np.random.RandomState(1)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    shared, report = sb_keras.compress(
        plain, 4, 1, sharing="double", calibration_data=images
    )
    assert report["method"] == "whitened"
    assert report["params_after"] == sb_keras.count_params(shared)
    assert report["params_after"] < report["params_before"]
    name = "stage2_block2_conv2"
    layer = shared.get_layer(name)
    assert isinstance(layer, BasisConv2D)
    bases = [np.asarray(v) for v in shared.get_layer("stage2_basis").bases]
    basis = np.concatenate([np.asarray(layer.unique_kernel), bases[1]], axis=-1)
    coeff = np.asarray(layer.coefficients, np.float64)[0, 0]
    # `rebalance` scaled each coefficient column by c and the output BN's
    # moving variance by c**2 (the same function): undo it for the kernel.
    source_bn = plain.get_layer("stage2_block2_bn2")
    c = np.sqrt(
        np.asarray(layer.bn.moving_variance, np.float64)
        / np.asarray(source_bn.moving_variance, np.float64)
    )
    kernel = np.tensordot(basis.astype(np.float64), coeff / c, axes=([3], [0]))
    x = rng.normal(0, 1, (2, 8, 8, 32)).astype("float32")
    expected = source_bn(keras.ops.conv(x, kernel.astype("float32"), padding="same"))
    got = layer([x, *bases], training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # The basis BN holds the calibration statistics of the basis responses.
    probe = keras.Model(plain.inputs, plain.get_layer(name).input)
    z = keras.ops.conv(probe([images]), basis, padding="same")
    z = np.asarray(z, np.float64).reshape(-1, basis.shape[-1])
    np.testing.assert_allclose(layer.basis_bn.moving_mean, z.mean(0), atol=1e-3)
    np.testing.assert_allclose(layer.basis_bn.moving_variance, z.var(0), rtol=1e-3)


def test_full_rank_compression_reproduces_the_model():
    plain = _randomized_plain()
    x = np.random.RandomState(2).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    # S + u = 9 C: every filter is representable, the result is exact.
    shared, report = sb_keras.compress(plain, 143, 1, method="plain")
    for group in report["groups"]:
        assert group["relative_error"] < 1e-9
    np.testing.assert_allclose(
        shared.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-4
    )


def _composed_kernel(layer, source_bn):
    """The (kh, kw, C, F) kernel of a `BasisConv2D` without shared basis,
    with `rebalance`'s per-filter factor undone (as above)."""
    coeff = np.asarray(layer.coefficients, np.float64)[0, 0]
    c = np.sqrt(
        np.asarray(layer.bn.moving_variance, np.float64)
        / np.asarray(source_bn.moving_variance, np.float64)
    )
    unique = np.asarray(layer.unique_kernel, np.float64)
    return np.tensordot(unique, coeff / c, axes=([3], [0]))


def test_per_layer_baseline_is_each_layers_truncated_svd():
    """``shared_rank=0``: the NonShared ResNet, each layer its own best
    rank-u kernel (Eckart-Young, plain metric); at full rank, exact."""
    plain = _randomized_plain()
    low, report = sb_keras.compress(plain, 0, 2, method="plain")
    assert low.shared_rank == 0 and low.unique_rank == 2
    assert report["params_after"] == sb_keras.count_params(
        sb_keras.ResNet(20, share=True, shared_rank=0, unique_rank=2)
    )
    assert not [layer for layer in low.layers if layer.name.endswith("_basis")]
    for stage, name in ((1, "stage1_block2_conv1"), (3, "stage3_block3_conv2")):
        w = np.asarray(plain.get_layer(name).kernel, np.float64)
        rank = 2 * 2 ** (stage - 1)
        bn = plain.get_layer(name.replace("conv", "bn"))
        kernel = _composed_kernel(low.get_layer(name), bn)
        m = w.reshape(-1, w.shape[-1]).T
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
        np.testing.assert_allclose(
            kernel.reshape(-1, w.shape[-1]).T, best, atol=1e-5 * np.abs(m).max()
        )
    x = np.random.RandomState(2).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    images = np.random.RandomState(3).uniform(0, 255, (8, 32, 32, 3))
    full, report = sb_keras.compress(
        plain, 0, 16, calibration_data=images.astype("float32")
    )
    assert report["method"] == "whitened"
    for group in report["groups"]:
        assert group["relative_error"] < 1e-6
    np.testing.assert_allclose(
        full.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-3
    )


def test_unshare_is_exact():
    shared = sb_keras.ResNet(20, share=True, shared_rank=4, unique_rank=1)
    rng = np.random.RandomState(5)
    for layer in shared.layers:
        if isinstance(layer, BasisConv2D):
            for bn in (layer.basis_bn, layer.bn):
                c = bn.gamma.shape[0]
                bn.set_weights(
                    [
                        rng.uniform(0.5, 1.5, c),
                        rng.normal(0, 0.2, c),
                        rng.normal(0, 0.5, c),
                        rng.uniform(0.5, 2.0, c),
                    ]
                )
    plain = sb_keras.unshare(shared)
    assert not plain.share
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        plain.predict(x, verbose=0), shared.predict(x, verbose=0), atol=1e-4
    )


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain20():
    return sb_keras.ResNet(20)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shared_rank": 145}, "shared_rank=145"),
        ({"shared_rank": 140, "unique_rank": 5}, "unique_rank=5"),
        ({"shared_rank": 0, "unique_rank": 0}, "shared_rank=0, unique_rank=0"),
        ({"shared_rank": -1}, "shared_rank=-1"),
        ({"shared_rank": 2.5}, "shared_rank=2.5"),
        ({"shared_rank": 4, "unique_rank": -1}, "unique_rank=-1"),
        ({"shared_rank": 4, "sharing": "triple"}, "sharing='triple'"),
        ({"shared_rank": 4, "method": "svd"}, "method='svd'"),
        ({"shared_rank": 4, "method": "whitened"}, "calibration_data=None"),
        (
            {"shared_rank": 4, "calibration_data": np.zeros((2, 28, 28, 3))},
            r"calibration_data of shape \(2, 28, 28, 3\)",
        ),
        (
            {"shared_rank": 4, "calibration_data": np.zeros((32, 32, 3))},
            r"calibration_data of shape \(32, 32, 3\)",
        ),
    ],
)
def test_bad_arguments(plain20, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb_keras.compress(plain20, **kwargs)


def test_unrecognized_models_are_refused():
    x = keras.Input((32, 32, 3))
    other = keras.Model(x, keras.layers.Conv2D(4, 3)(x), name="mystery")
    with pytest.raises(ValueError, match="model='mystery'"):
        sb_keras.compress(other, 4)
    shared = sb_keras.ResNet(20, share=True)
    with pytest.raises(ValueError, match="already shared"):
        sb_keras.compress(shared, 4)


# ---------------------------------------------------------------------------
# Sources other than a CIFAR sb_keras.ResNet
# ---------------------------------------------------------------------------

L = keras.layers


def _conv_bn(x, filters, kernel, strides, bias=False, same=False, bn=True, pad=False):
    """A Keras conv + BN, strided convs padded as sb_keras (or "same")."""
    explicit = (strides > 1 or pad) and kernel > 1 and not same
    if explicit:
        x = L.ZeroPadding2D(kernel // 2)(x)
    padding = "valid" if explicit else "same"
    x = L.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=bias)(x)
    return L.BatchNormalization()(x) if bn else x


def _option_a(x, filters):
    pad = (filters - x.shape[-1]) // 2
    return keras.ops.pad(x[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [pad, pad]])


def _keras_resnet(
    blocks=(3, 3, 3),
    widths=(16, 32, 64),
    shortcut="ops",
    stem="cifar",
    size=32,
    normalize=True,
    block_kw=None,
    bottleneck=False,
):
    """A functional Keras ResNet with Keras's layer names, random BN statistics."""
    block_kw = block_kw or {}
    inputs = keras.Input((size, size, 3))
    x = inputs
    if normalize:  # the CIFAR-10 statistics of sb_keras, in Keras layers
        x = L.Rescaling(1 / 255.0)(x)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        x = L.Normalization(mean=mean, variance=np.square(std))(x)
    if stem == "cifar":
        x = L.ReLU()(_conv_bn(x, widths[0], 3, 1))
    else:
        x = L.ReLU()(_conv_bn(x, widths[0], 7, 2))
        x = L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(1)(x))
    for g, (n, w) in enumerate(zip(blocks, widths)):
        for i in range(n):
            s = 2 if g > 0 and i == 0 else 1
            if bottleneck:
                y = L.ReLU()(_conv_bn(x, w // 4, 1, 1))
                y = L.ReLU()(_conv_bn(y, w // 4, 3, s))
                y = _conv_bn(y, w, 1, 1)
            else:
                y = L.ReLU()(_conv_bn(x, w, 3, s, **block_kw))
                y = _conv_bn(y, w, 3, 1, **block_kw)
            if s == 1 and x.shape[-1] == w:
                sc = x
            elif shortcut == "ops":
                sc = _option_a(x, w)
            elif shortcut == "lambda":
                sc = L.Lambda(_option_a, arguments={"filters": w})(x)
            else:
                sc = _conv_bn(x, w, 1, s)
            x = L.Activation("relu")(L.Add()([y, sc]))
    outputs = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs, name="my_resnet")
    return _randomize_batchnorms(model, seed=7)


def test_keras_resnet_compresses_exactly_and_like_its_twin():
    source = _keras_resnet(blocks=(2, 2, 2))
    rng = np.random.RandomState(8)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    reference = source.predict(x, verbose=0)
    shared, report = sb_keras.compress(source, 143, 1, method="plain")
    assert isinstance(shared, sb_keras.ResNet) and shared.share
    assert (shared.depth, shared.preprocessing) == (14, "cifar10")
    assert max(g["relative_error"] for g in report["groups"]) < 1e-9
    np.testing.assert_allclose(shared.predict(x, verbose=0), reference, atol=1e-4)
    # Rank reduced: the same result as compressing the sb_keras twin.
    twin = keras_resnet.plain_resnet(source)
    assert not twin.share and twin.name == "my_resnet"
    np.testing.assert_allclose(twin.predict(x, verbose=0), reference, atol=1e-4)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    kw = {"calibration_data": images}
    small, report = sb_keras.compress(source, 4, 1, **kw)
    expected, expected_report = sb_keras.compress(twin, 4, 1, **kw)
    assert report["params_after"] == expected_report["params_after"]
    assert report["params_after"] < report["params_before"]
    np.testing.assert_allclose(
        small.predict(x, verbose=0), expected.predict(x, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, depth, stem",
    [
        (
            {
                "shortcut": "lambda",
                "blocks": (1, 1, 1),
                "normalize": False,
                "block_kw": {"pad": True},
            },
            8,
            "cifar",
        ),
        (
            {"blocks": (2,) * 4, "widths": (64, 128, 256, 512), "shortcut": "proj"},
            18,
            "cifar",
        ),
        (
            {
                "blocks": (2,) * 4,
                "widths": (64, 128, 256, 512),
                "shortcut": "proj",
                "stem": "imagenet",
            },
            18,
            "imagenet",
        ),
    ],
)
def test_keras_resnet_layouts_map_to_their_twin(kwargs, depth, stem):
    source = _keras_resnet(**kwargs)
    twin = keras_resnet.plain_resnet(source)
    assert (twin.depth, twin.stem) == (depth, stem)
    assert twin.preprocessing == ("cifar10" if kwargs.get("normalize", True) else None)
    assert sb_keras.count_params(twin) == sb_keras.count_params(source)
    x = np.random.RandomState(9).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        twin.predict(x, verbose=0), source.predict(x, verbose=0), atol=1e-4
    )


def _sequential():
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            L.Conv2D(16, 3, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.GlobalAveragePooling2D(),
            L.Dense(10),
        ],
        name="my_resnet",
    )


@pytest.mark.parametrize(
    "build, found",
    [
        (
            lambda: _keras_resnet(bottleneck=True, widths=(64, 128, 256)),
            "kernel_size=\\(1, 1\\)",
        ),
        (
            lambda: _keras_resnet(block_kw={"bn": False}),
            "expected a BatchNormalization",
        ),
        (lambda: _keras_resnet(block_kw={"bias": True}), "use_bias=True"),
        (lambda: _keras_resnet(block_kw={"same": True}), "padding='same' at stride 2"),
        (lambda: _keras_resnet(shortcut="proj"), "first shortcuts \\(.*projection"),
        (lambda: _keras_resnet(widths=(8, 16, 32)), "stage widths \\(8, 16, 32\\)"),
        (_sequential, "no residual block"),
    ],
)
def test_unrecognized_keras_layouts_are_refused(build, found):
    with pytest.raises(
        ValueError, match=f"Found: .*{found}.*Received: model='my_resnet'"
    ):
        sb_keras.compress(build(), 4)


@pytest.mark.slow  # ~20 s: the SVDs of the 512-filter stage
def test_imagenet_stem_resnet18_round_trip_is_exact():
    shared = sb_keras.ResNet(
        18, share=True, shared_rank=4, unique_rank=1, input_shape=(32, 32, 3)
    )
    assert shared.stem == "imagenet" and shared.sharing == "double"
    rng = np.random.RandomState(10)
    for layer in shared.layers:
        for bn in getattr(layer, "basis_bn", None), getattr(layer, "bn", None):
            if bn is not None:
                c = bn.gamma.shape[0]
                bn.set_weights(
                    [
                        rng.uniform(0.5, 1.5, c),
                        rng.normal(0, 0.2, c),
                        rng.normal(0, 0.5, c),
                        rng.uniform(0.5, 2.0, c),
                    ]
                )
    plain = sb_keras.unshare(shared)
    back, report = sb_keras.compress(plain, 4, 1, sharing="double", method="plain")
    assert report["params_after"] == sb_keras.count_params(shared)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        back.predict(x, verbose=0), shared.predict(x, verbose=0), atol=1e-4
    )


def test_bottleneck_resnet_takes_no_ranks():
    # Bottleneck sources: tests/test_compress_bottleneck.py.
    model = sb_keras.ResNet(50, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="no ranks.*Received: shared_rank=4"):
        sb_keras.compress(model, 4)


# ---------------------------------------------------------------------------
# Exactness on the authors' checkpoints
# ---------------------------------------------------------------------------


def _exact_round_trip(filename, count, tol=1e-6):
    path = os.path.join(PRETRAINED, filename)
    subset = shared_path("datasets", "cifar10", "lossless_subset.npz")
    if not (os.path.isfile(path) and os.path.isfile(subset)):
        pytest.skip("the authors' checkpoints or the exact images are not here")
    with np.load(subset) as f:
        x = f["x_test"][:count].astype("float32")
    original = sb_keras.load_authors_checkpoint(path)
    reference = original.predict(x, batch_size=200, verbose=0)
    plain = sb_keras.unshare(original)
    np.testing.assert_allclose(
        plain.predict(x, batch_size=200, verbose=0), reference, atol=1e-3
    )
    back, report = sb_keras.compress(
        plain,
        original.shared_rank,
        original.unique_rank,
        sharing=original.sharing,
        method="plain",
        tol=tol,
    )
    assert report["params_before"] == sb_keras.count_params(plain)
    assert report["params_after"] == sb_keras.count_params(original)
    for group in report["groups"]:
        assert group["relative_error"] < 1e-5, group
    logits = back.predict(x, batch_size=200, verbose=0)
    np.testing.assert_allclose(logits, reference, atol=1e-3)
    return report


def test_authors_resnet56_round_trip_is_exact():
    report = _exact_round_trip(RESNET56, 100)
    # One SVD of the stack is far from exact; the iteration is.
    assert min(g["initial_relative_error"] for g in report["groups"]) > 0.1


@pytest.mark.slow
def test_authors_resnet56_round_trip_on_all_exact_images():
    _exact_round_trip(RESNET56, 1000)


@pytest.mark.slow
def test_authors_resnet32_double_round_trip_on_all_exact_images():
    # Fewer filters per layer than S + u: the exact solutions are not
    # isolated (see the plateau test below).
    _exact_round_trip(RESNET32, 1000)


@pytest.mark.slow  # 0.2-1.5 min
def test_restart_leaves_the_resnet32_plateau():
    path = os.path.join(PRETRAINED, RESNET32)
    if not os.path.isfile(path):
        pytest.skip("the authors' checkpoints are not beside this checkout")
    from sb_keras.export.folding import bn_affine

    model = sb_keras.load_authors_checkpoint(path)
    shared = np.asarray(model.get_layer("stage3_basis").bases[0], np.float64)
    mats = []  # stage 3 conv1, composed in float32 without rebalancing
    for layer in model.layers:
        if isinstance(layer, BasisConv2D) and layer.name.startswith("stage3"):
            if layer.name.endswith("conv1"):
                unique = np.asarray(layer.unique_kernel, np.float64)
                basis = np.concatenate([unique, shared], axis=-1)
                scale, _ = bn_affine(layer.basis_bn)
                coeff = scale[:, None] * np.asarray(layer.coefficients)[0, 0]
                kernel = np.tensordot(basis, coeff, axes=([3], [0]))
                kernel = kernel.astype(np.float32).astype(np.float64)
                mats.append(kernel.reshape(-1, kernel.shape[-1]).T)
    assert len(mats) == 4 and mats[0].shape == (64, 576)
    _, _, stalled = svd.shared_bases(mats, 64, 4, escapes=0)
    assert stalled["relative_error"] > 1e-4  # the plateau near 4.2e-4
    _, _, info = svd.shared_bases(mats, 64, 4)
    assert info["escapes"] >= 1
    assert info["relative_error"] < 1e-5


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def _cli_command():
    script = os.path.join(os.path.dirname(sys.executable), "sb-keras")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "sb_keras"]


def test_cli_compress(tmp_path):
    plain = _randomized_plain()
    source = str(tmp_path / "plain.keras")
    plain.save(source)
    rng = np.random.RandomState(6)
    images = rng.randint(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=images, y=np.arange(8) % 10)
    output = str(tmp_path / "out" / "shared.keras")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    argv = [source, output, "--shared-rank", "4", "--unique-rank", "1"]
    argv += ["--sharing", "double", "--data-dir", str(tmp_path)]
    argv += ["--calibration-count", "8"]
    run = subprocess.run(
        [*_cli_command(), "compress", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr
    restored = keras.models.load_model(output)
    expected, report = sb_keras.compress(
        plain, 4, 1, sharing="double", calibration_data=images
    )
    out = run.stdout
    assert f"{sb_keras.count_params(plain):,} parameters" in out
    assert f"{sb_keras.count_params(restored):,} parameters" in out
    assert f"{sb_keras.count_macs(restored) / 1e6:.1f} M MACs" in out
    assert out.count("relative error") == len(report["groups"]) == 6
    assert out.count("in the whitened metric") == 6
    assert "method whitened" in out
    assert isinstance(restored, sb_keras.ResNet) and restored.share
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), expected.predict(x, verbose=0), atol=1e-5
    )
    assert os.listdir(tmp_path / "out") == ["shared.keras"]  # no temporary left


def test_cli_compress_bad_rank(tmp_path):
    from sb_keras import cli

    source = str(tmp_path / "plain.keras")
    sb_keras.ResNet(20).save(source)
    argv = ["compress", source, str(tmp_path / "o.keras"), "--shared-rank", "200"]
    assert cli.main(argv) == 2
    assert not os.path.exists(tmp_path / "o.keras")


@pytest.mark.slow  # a subprocess: ~20 s
def test_cli_compress_keras_model(tmp_path):
    source = _keras_resnet(blocks=(2, 2, 2))
    path = str(tmp_path / "mine.keras")
    source.save(path)
    output = str(tmp_path / "shared.keras")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    argv = ["compress", path, output, "--shared-rank", "4", "--method", "plain"]
    run = subprocess.run(
        [*_cli_command(), *argv], capture_output=True, text=True, env=env, timeout=900
    )
    assert run.returncode == 0, run.stderr
    assert f"{sb_keras.count_params(source):,} parameters" in run.stdout
    restored = keras.models.load_model(output)
    expected, _ = sb_keras.compress(source, 4, method="plain")
    x = np.random.RandomState(11).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), expected.predict(x, verbose=0), atol=1e-5
    )
