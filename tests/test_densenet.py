"""DenseNet-121-BC (CIFAR-100) plain and with shared bases (method §1.6, §3.3)."""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.layers import FilterBasis
from sb_keras.layers import GroupedBasisConv2D


def small(**kwargs):
    args = dict(blocks=(2, 1, 1, 2), growth_rate=8, input_shape=(16, 16, 3))
    args.update(kwargs)
    return sb_keras.DenseNet(**args)


def pixels(n, size=16, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32")


# method §3.3: params exactly, MACs [calc] within 1 %.
COUNTS = [
    ("densenet121", 7_048_548, 0.888e9),
    ("densenet121_s16u1_authors", 5_084_504, 0.704e9),
    # The intended model: block 4 uses its own basis; four bases either way,
    # so the same count and MACs as the authors' layout.
    ("densenet121_s16u1", 5_084_504, 0.704e9),
    pytest.param("densenet121_s64u4", 5_606_708, 1.369e9, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, params, macs", COUNTS)
def test_counts_match_the_paper(name, params, macs):
    model = sb_keras.get_model(name)
    assert sb_keras.count_params(model) == params
    assert abs(sb_keras.count_macs(model) - macs) <= 0.01 * macs
    bases = [layer for layer in model.layers if isinstance(layer, FilterBasis)]
    assert len(bases) == (4 if "_s" in name else 0)


def _layers_of(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


def _basis_of(layer):
    """The FilterBasis whose output the layer convolves with (basis_index)."""
    node = layer._inbound_nodes[0]
    t = node.input_tensors[1 + layer.basis_index]
    return t._keras_history.operation


@pytest.mark.parametrize("authors_layout", [False, True])
def test_block4_basis_use(authors_layout):
    model = small(
        share=True, shared_rank=8, unique_rank=2, authors_layout=authors_layout
    )
    bases = {b.name: b for b in _layers_of(model, FilterBasis)}
    assert sorted(bases) == [f"block{i}_basis" for i in range(1, 5)]
    used = {
        layer.name: _basis_of(layer).name
        for layer in _layers_of(model, GroupedBasisConv2D)
    }
    expected4 = "block3_basis" if authors_layout else "block4_basis"
    assert used["block4_layer1_conv2"] == expected4
    assert used["block1_layer2_conv2"] == "block1_basis"
    # Behaviour, not wiring: perturbing the 4th basis changes the output
    # only in the intended model, and changes the penalty in both.
    x = pixels(2)
    before = np.asarray(model(x, training=False))
    penalty = sb_keras.orthogonality_loss(model)
    b4 = bases["block4_basis"].bases[0]
    b4.assign(np.asarray(b4) * 2.0 + 0.1)
    after = np.asarray(model(x, training=False))
    assert sb_keras.orthogonality_loss(model) != pytest.approx(penalty)
    if authors_layout:
        np.testing.assert_array_equal(after, before)
    else:
        assert np.abs(after - before).max() > 1e-4
    # Same parameter count either way (the unused basis is counted).
    other = small(share=True, shared_rank=8, unique_rank=2)
    assert sb_keras.count_params(other) == sb_keras.count_params(model)


def test_penalty_is_the_authors_pooled_mean():
    model = small(share=True, shared_rank=8, unique_rank=2, authors_layout=True)
    for b in _layers_of(model, FilterBasis):
        b.bases[0].assign(np.asarray(b.bases[0]) * 3.0)
    total, entries = 0.0, 0
    for b in _layers_of(model, FilterBasis):
        k = np.asarray(b.bases[0], np.float64)
        rows = k.reshape(-1, k.shape[-1]).T
        d = (rows @ rows.T - np.eye(len(rows))) ** 2
        total, entries = total + d.sum(), entries + d.size
    expected = 10.0 * total / entries
    assert sb_keras.orthogonality_loss(model) == pytest.approx(expected, rel=1e-5)
    model(pixels(1), training=True)
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)


def test_pytorch_default_initialization():
    model = sb_keras.DenseNet(blocks=(4,), growth_rate=32, share=True)
    for layer in model.layers:
        if isinstance(layer, FilterBasis):
            w = np.asarray(layer.bases[0])
        elif isinstance(layer, GroupedBasisConv2D):
            w = np.asarray(layer.unique_kernel)
        elif isinstance(layer, keras.layers.Conv2D):
            w = np.asarray(layer.kernel)
        else:
            continue
        bound = 1.0 / np.sqrt(np.prod(w.shape[:3]))
        assert np.abs(w).max() <= bound + 1e-7, layer.name
        assert np.abs(w).max() > 0.8 * bound, layer.name


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="Received: shared_rank=8"):
        sb_keras.DenseNet.resolve_config(shared_rank=8)
    with pytest.raises(ValueError, match="Received: authors_layout=True"):
        sb_keras.DenseNet.resolve_config(authors_layout=True)
    with pytest.raises(ValueError, match="Received: blocks="):
        sb_keras.DenseNet.resolve_config(share=True, blocks=(2, 2), authors_layout=True)
    with pytest.raises(ValueError, match="Received: compression=0"):
        sb_keras.DenseNet.resolve_config(compression=0)
    with pytest.raises(ValueError, match="Received: unique_rank=-1"):
        sb_keras.DenseNet.resolve_config(share=True, unique_rank=-1)


def test_inference_equals_the_folded_layer():
    """Each decomposed layer in inference is one 3x3 conv with a bias."""
    model = small(share=True, shared_rank=8, unique_rank=2)
    x = pixels(4)
    for _ in range(3):
        model(x, training=True)  # move the BN statistics
    for layer in _layers_of(model, GroupedBasisConv2D):
        basis = np.asarray(_basis_of(layer).bases[0])
        c = basis.shape[2]
        z = np.random.RandomState(1).normal(size=(2, 6, 6, c)).astype("float32")
        y = np.asarray(layer([z, basis], training=False))
        k, b = layer.fold_basis([basis])
        a, b2 = layer.fold_coefficients()
        h = keras.ops.conv(z, k, padding="same") + b
        ref = np.asarray(keras.ops.conv(h, a) + b2)
        np.testing.assert_allclose(y, ref, atol=1e-5)


def test_keras_round_trip_keeps_each_basis_one_variable(tmp_path):
    model = small(share=True, shared_rank=8, unique_rank=2, authors_layout=True)
    x = pixels(2)
    model(x, training=True)
    path = tmp_path / "densenet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is sb_keras.DenseNet and loaded.authors_layout
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)),
        np.asarray(model(x, training=False)),
        atol=1e-5,
    )
    assert sb_keras.count_params(loaded) == sb_keras.count_params(model)
    names = [v.path for v in loaded.weights if v.path.endswith("/basis")]
    assert len(names) == len(set(names)) == 4
