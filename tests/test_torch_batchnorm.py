"""PyTorch's BatchNorm statistics: the authors' training step, exactly.

The references are PyTorch's formulas written in NumPy (float64):
``running = (1 - 0.1) * running + 0.1 * batch`` with the *unbiased* batch
variance ``sum((v - mean)**2) / (n - 1)``, ``n = N*H*W``, and
``num_batches_tracked += 1`` per training step (``torch.nn.BatchNorm2d``,
momentum 0.1, which is Keras's 0.9).
"""

import keras
import numpy as np
import pytest
from keras import ops

import sb_keras
from sb_keras import checkpoints as ck
from sb_keras import saving
from sb_keras.layers import BasisConv2D
from sb_keras.layers import TorchBatchNormalization

TORCH_MOMENTUM = 0.1
EPS = 1e-5


def _torch_update(running_mean, running_var, values, unbiased=True):
    """PyTorch's running statistics after one batch of ``values`` (N,H,W,C)."""
    v = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
    n = len(v)
    mean = v.mean(axis=0)
    var = ((v - mean) ** 2).sum(axis=0) / (n - 1 if unbiased else n)
    m = TORCH_MOMENTUM
    return (1 - m) * running_mean + m * mean, (1 - m) * running_var + m * var


def _randomize_statistics(bn, rng):
    c = bn.moving_mean.shape[0]
    bn.moving_mean.assign(rng.normal(size=c).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=c).astype("float32"))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=c).astype("float32"))
    bn.beta.assign(rng.normal(size=c).astype("float32"))


def _step(model, x, rng):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    y = rng.normal(size=(len(x), *model.output_shape[1:])).astype("float32")
    model.train_on_batch(x, y)


@pytest.mark.parametrize("channels", [5, 8])  # moments path, fused kernel
@pytest.mark.parametrize("batchnorm", ["pytorch", "keras", "fused"])
def test_plain_batchnorm_training_step(batchnorm, channels):
    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
    h = conv(inputs)
    layer_class = {
        "pytorch": TorchBatchNormalization,
        "keras": keras.layers.BatchNormalization,
        "fused": sb_keras.layers.FusedBatchNormalization,
    }[batchnorm]
    bn = layer_class(momentum=0.9, epsilon=EPS)
    y = keras.layers.GlobalAveragePooling2D()(bn(h))
    model = keras.Model(inputs, keras.layers.Dense(2)(y))
    _randomize_statistics(bn, rng)
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    before = (np.array(bn.moving_mean), np.array(bn.moving_variance))
    h_value = np.asarray(conv(x))  # the BN's input, with pre-step weights
    _step(model, x, rng)
    mean, var = _torch_update(*before, h_value, unbiased=batchnorm == "pytorch")
    np.testing.assert_allclose(bn.moving_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, var, rtol=1e-5, atol=1e-6)
    if batchnorm == "pytorch":
        assert int(bn.num_batches_tracked) == 1
        assert bn.num_batches_tracked.dtype == "int64"
    else:
        assert not hasattr(bn, "num_batches_tracked")


def _basis_conv_reference(layer, x, before):
    """Both BNs' PyTorch updates from the two-step definition, in NumPy."""
    z = np.asarray(layer.convolution_op(x, layer.basis_kernel()), np.float64)
    flat = z.reshape(-1, z.shape[-1])
    gamma_b = np.asarray(layer.basis_bn.gamma, np.float64)
    beta_b = np.asarray(layer.basis_bn.beta, np.float64)
    normalized = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + EPS) * gamma_b + beta_b
    y = normalized @ np.asarray(layer.coefficients, np.float64)[0, 0]
    return (
        _torch_update(*before[0], z),
        _torch_update(*before[1], y.reshape(*z.shape[:3], -1)),
    )


@pytest.mark.parametrize(
    "filters, frozen",
    [
        (8, None),  # fused output BN (channels % 4 == 0)
        (6, None),  # moments path
        (8, "bn"),  # one BN frozen: the two-step path, basis BN trained
    ],
)
def test_basis_conv_batchnorms_training_step(filters, frozen):
    rng = np.random.default_rng(1)
    inputs = keras.Input((6, 6, 4))
    layer = BasisConv2D(filters, unique_rank=3, batchnorm="pytorch")
    y = keras.layers.GlobalAveragePooling2D()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(y))
    for bn in (layer.basis_bn, layer.bn):
        assert isinstance(bn, TorchBatchNormalization)
        _randomize_statistics(bn, rng)
    if frozen:
        getattr(layer, frozen).trainable = False
    x = rng.normal(size=(4, 6, 6, 4)).astype("float32")
    before = [
        (np.array(bn.moving_mean), np.array(bn.moving_variance))
        for bn in (layer.basis_bn, layer.bn)
    ]
    references = _basis_conv_reference(layer, x, before)
    _step(model, x, rng)
    for bn, (mean, var), old in zip((layer.basis_bn, layer.bn), references, before):
        if not bn.trainable:  # frozen: untouched, not counted
            np.testing.assert_array_equal(bn.moving_variance, old[1])
            assert int(bn.num_batches_tracked) == 0
            continue
        np.testing.assert_allclose(bn.moving_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.moving_variance, var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 1


def test_basis_conv_keras_default_keeps_the_biased_update():
    rng = np.random.default_rng(2)
    layer = BasisConv2D(8, unique_rank=3)
    x = rng.normal(size=(4, 6, 6, 4)).astype("float32")
    layer(x)
    assert isinstance(layer.bn, keras.layers.BatchNormalization)
    assert not isinstance(layer.bn, TorchBatchNormalization)
    before = [
        (np.array(bn.moving_mean), np.array(bn.moving_variance))
        for bn in (layer.basis_bn, layer.bn)
    ]
    z = np.asarray(layer.convolution_op(x, layer.basis_kernel()))
    layer(x, training=True)
    _, var = _torch_update(*before[0], z, unbiased=False)
    np.testing.assert_allclose(
        layer.basis_bn.moving_variance, var, rtol=1e-5, atol=1e-6
    )


def test_option_is_validated_and_serialized():
    with pytest.raises(ValueError, match=r"Received: batchnorm='torch'"):
        BasisConv2D(8, batchnorm="torch")
    with pytest.raises(ValueError, match=r"Received: batchnorm=True"):
        sb_keras.ResNet(depth=8, batchnorm=True)
    layer = BasisConv2D(8, unique_rank=1, batchnorm="pytorch")
    clone = BasisConv2D.from_config(layer.get_config())
    assert clone.batchnorm == "pytorch"
    assert isinstance(clone.bn, TorchBatchNormalization)
    with pytest.raises(ValueError, match="renorm=True"):
        TorchBatchNormalization(renorm=True)


def test_moving_variance_of_a_single_value_per_channel_stays_finite():
    bn = TorchBatchNormalization(momentum=0.5)
    bn(np.ones((1, 3), "float32"), training=True)
    np.testing.assert_array_equal(bn.moving_variance, [0.5, 0.5, 0.5])


def _authors_file(path, counter, rng):
    """An authors' ResNet-14 S4U1 checkpoint whose BNs have counted batches."""
    model = sb_keras.ResNet(depth=14, share=True, shared_rank=4, unique_rank=1)
    for v in model.weights:
        v.assign(rng.normal(scale=0.1, size=v.shape).astype("float32"))
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.5, 2.0, size=v.shape).astype("float32"))
    state = ck.authors_state_dict(model)
    for key in state:
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(counter, np.int64)
    ck.write_checkpoint({"net_state_dict": state}, str(path))
    return state


def test_num_batches_tracked_round_trip(tmp_path):
    """read -> .keras -> load -> train one step -> write -> read: count + 1."""
    rng = np.random.default_rng(3)
    original = _authors_file(tmp_path / "authors.pth", 49588, rng)
    model = ck.load_authors_checkpoint(str(tmp_path / "authors.pth"))
    assert model.batchnorm == "pytorch"
    model.save(str(tmp_path / "converted.keras"))
    loaded = saving.load_model(str(tmp_path / "converted.keras"))
    assert loaded.batchnorm == "pytorch"
    counters = [v for v in loaded.weights if v.path.endswith("num_batches_tracked")]
    assert len(counters) == sum(k.endswith("tracked") for k in original)
    assert {int(v) for v in counters} == {49588}
    # A training step; the stem BN's statistics against PyTorch's formula.
    stem_bn = loaded.get_layer("stem_bn")
    before = (np.array(stem_bn.moving_mean), np.array(stem_bn.moving_variance))
    x = rng.uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    stem_in = keras.Model(loaded.input, loaded.get_layer("stem_conv").output)
    h = np.asarray(stem_in(x))
    loaded.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    loaded.train_on_batch(x, np.zeros((4, 10), "float32"))
    mean, var = _torch_update(*before, h)
    np.testing.assert_allclose(stem_bn.moving_variance, var, rtol=1e-5, atol=1e-6)
    ck.save_authors_state_dict(loaded, str(tmp_path / "written.pth"))
    written = ck.read_state_dict(str(tmp_path / "written.pth"))
    assert list(written) == list(original)
    for key, value in written.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == np.int64 and int(value) == 49588 + 1, key
    np.testing.assert_allclose(written["bn1.running_var"], var, rtol=1e-5, atol=1e-6)


def test_checkpoint_without_counters_starts_at_zero(tmp_path):
    rng = np.random.default_rng(4)
    state = _authors_file(tmp_path / "authors.pth", 7, rng)
    state = {k: v for k, v in state.items() if not k.endswith("tracked")}
    model = ck.convert_state_dict(state)
    assert {
        int(v) for v in model.weights if v.path.endswith("num_batches_tracked")
    } == {0}
    keras_model = ck.convert_state_dict(state, batchnorm="keras")
    assert keras_model.batchnorm == "keras"
    assert not any(v.path.endswith("tracked") for v in keras_model.weights)
    assert sb_keras.count_params(keras_model) == sb_keras.count_params(model)


def test_negative_counter_is_refused(tmp_path):
    state = _authors_file(tmp_path / "authors.pth", 7, np.random.default_rng(5))
    state["bn1.num_batches_tracked"] = np.array(-3, np.int64)
    with pytest.raises(ck.CheckpointError, match="'bn1.num_batches_tracked'"):
        ck.convert_state_dict(state)


def test_mirrored_training_counts_each_step_once(mirrored_strategy):
    """Each replica counts the step; the counters stay equal to PyTorch's."""
    rng = np.random.default_rng(6)
    with mirrored_strategy.scope():
        inputs = keras.Input((6, 6, 4))
        layer = BasisConv2D(8, unique_rank=2, batchnorm="pytorch")
        bn = TorchBatchNormalization()
        y = keras.layers.GlobalAveragePooling2D()(bn(layer(inputs)))
        model = keras.Model(inputs, keras.layers.Dense(2)(y))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.normal(size=(8, 6, 6, 4)).astype("float32")
    model.fit(x, np.zeros((8, 2), "float32"), batch_size=8, epochs=2, verbose=0)
    for counter in (bn.num_batches_tracked, layer.bn.num_batches_tracked):
        assert int(ops.convert_to_numpy(counter)) == 2
