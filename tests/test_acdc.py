"""ACDC: atoms x shared coefficients (layers, ResNets, adaptation, export)."""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_config_round_trip
from helpers import random_images

import sb_keras
from sb_keras.layers import ACDCCoefficients
from sb_keras.layers import ACDCConv2D

SCOPES = ("network", "stage", "layer")


def composed_kernel(atoms, alpha):
    """W[:, :, a*gi + i, b*go + o] = sum_j alpha[i, o, j] atoms[:, :, j, a, b]."""
    atoms = np.asarray(atoms, np.float64)
    alpha = np.asarray(alpha, np.float64)
    k, _, m, n_in, n_out = atoms.shape
    g_in, g_out, _ = alpha.shape
    w = np.zeros((k, k, n_in * g_in, n_out * g_out))
    for a in range(n_in):
        for b in range(n_out):
            for i in range(g_in):
                for o in range(g_out):
                    w[:, :, a * g_in + i, b * g_out + o] = sum(
                        alpha[i, o, j] * atoms[:, :, j, a, b] for j in range(m)
                    )
    return w


def plain_conv(x, kernel, strides, padding):
    conv = keras.layers.Conv2D(
        kernel.shape[-1], kernel.shape[:2], strides, padding, use_bias=False
    )
    conv.build(x.shape)
    conv.set_weights([kernel.astype("float32")])
    return np.asarray(conv(x))


# (channels, filters, kernel, strides, padding, shared group or None, own group)
LAYER_CASES = [
    (32, 64, 3, 1, "same", 16, None),  # shared alpha, 2 x 4 channel blocks
    (16, 32, 3, 2, "valid", 16, None),  # strided, as after explicit padding
    (8, 16, 3, 1, "same", None, None),  # owns a (C, F, m) alpha: no groups
    (16, 16, 3, 1, "same", None, 8),  # owns a (8, 8, m) alpha
    (32, 64, 1, 2, "valid", 16, None),  # 1x1 shortcut with the shared alpha
]


@pytest.mark.parametrize("route", ["kernel", "atoms"])
@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_equals_plain_conv_with_composed_kernel(route, case):
    c, f, k, s, padding, shared, own = case
    x = np.random.RandomState(0).randn(2, 9, 9, c).astype("float32")
    if shared:
        owner = ACDCCoefficients(num_atoms=5, in_group=shared)
        conv = ACDCConv2D(f, k, s, padding, route=route)
        alpha_t = owner(x)
        y = conv([x, alpha_t])
        alpha = owner.alpha
    else:
        conv = ACDCConv2D(f, k, s, padding, num_atoms=5, group_size=own, route=route)
        y = conv(x)
        alpha = conv.coefficient_layer.alpha
    assert conv.resolved_route == route
    kernel = composed_kernel(conv.atoms.numpy(), alpha.numpy())
    np.testing.assert_allclose(
        np.asarray(conv.compose_kernel(alpha_t if shared else None)), kernel, atol=1e-6
    )
    reference = plain_conv(x, kernel, s, padding)
    assert np.abs(np.asarray(y) - reference).max() <= 1e-5
    assert np.abs(reference).max() > 0.1  # not a trivially zero comparison


def test_layer_rejects_bad_arguments():
    x = np.zeros((1, 4, 4, 24), "float32")
    alpha = ACDCCoefficients(4, 16)(x)
    with pytest.raises(ValueError, match="multiple of the channel group"):
        ACDCConv2D(32)([x, alpha])
    with pytest.raises(ValueError, match="num_atoms=None"):
        ACDCConv2D(32)(x)
    with pytest.raises(ValueError, match="num_atoms=3"):
        ACDCConv2D(32, num_atoms=3)([np.zeros((1, 4, 4, 32)), alpha])
    with pytest.raises(ValueError, match="route='fast'"):
        ACDCConv2D(32, route="fast")
    with pytest.raises(ValueError, match="sharing='block'"):
        sb_keras.ACDCResNet(depth=20, sharing="block")
    with pytest.raises(ValueError, match="group_size=24"):
        sb_keras.ACDCResNet(depth=20, group_size=24)


def test_auto_route_follows_the_measured_rule():
    def resolved(c, size, group, m):
        conv = ACDCConv2D(c)
        conv.build([(None, size, size, c), (group, group, m)])
        return conv.resolved_route

    assert resolved(512, 4, 64, 8) == "atoms"  # 4.2x fewer MACs, 4x4 map
    assert resolved(512, 32, 64, 8) == "kernel"  # map too large
    assert resolved(64, 4, 64, 8) == "kernel"  # no MAC saving
    assert resolved(512, None, 64, 8) == "kernel"  # unknown map size


def _convs(widths, blocks, first_in, projection):
    """(c_in, c_out, k, stage) of every residual-block convolution."""
    convs, prev = [], first_in
    for stage, (w, n) in enumerate(zip(widths, blocks)):
        convs += [(prev, w, 3, stage), (w, w, 3, stage)]
        if projection and prev != w:
            convs.append((prev, w, 1, stage))
        convs += [(w, w, 3, stage)] * (2 * n - 2)
        prev = w
    return convs


def _acdc_params(convs, scope, m, groups):
    """Decomposed parameters by the formulas of method §6.2.

    ``groups[stage]`` is the channel group of the stage's alpha.
    """
    if scope == "layer":  # own (C, F, m) alpha + m k^2 atoms; 1x1 stay plain
        return sum(
            c * f * m + m * k * k if k == 3 else c * f * k * k for c, f, k, _ in convs
        )
    atoms = sum((c // groups[s]) * (f // groups[s]) * m * k * k for c, f, k, s in convs)
    if scope == "network":
        return atoms + groups[0] ** 2 * m
    return atoms + sum(g * g * m for g in groups)


@pytest.mark.parametrize("scope", SCOPES)
def test_resnet18_parameter_formula(scope):
    m = 6
    plain = sb_keras.count_params(sb_keras.ResNet(depth=18))
    convs = _convs((64, 128, 256, 512), (2, 2, 2, 2), 64, projection=True)
    conv_params = sum(c * f * k * k for c, f, k, _ in convs)
    # network: one 64 x 64 x m alpha; stage: gcd of the stage's widths
    groups = [64] * 4 if scope == "network" else [64, 64, 128, 256]
    expected = plain - conv_params + _acdc_params(convs, scope, m, groups)
    model = sb_keras.ACDCResNet(depth=18, sharing=scope, num_atoms=m)
    assert sb_keras.count_params(model) == expected
    ratio = expected / plain
    if scope == "network":
        # ImageNet ResNet-18, m = 6, groups of 64, 1x1 shortcuts ACDC:
        # 572,928 of 11,689,512 parameters (4.9 %), most of it the classifier.
        assert 0.045 < ratio < 0.055
    if scope == "stage":
        assert 0.08 < ratio < 0.1


@pytest.mark.parametrize("scope", SCOPES)
def test_cifar_resnet_parameter_formula(scope):
    m = 4
    plain = sb_keras.count_params(sb_keras.ResNet(depth=20))
    convs = _convs((16, 32, 64), (3, 3, 3), 16, projection=False)
    conv_params = sum(c * f * k * k for c, f, k, _ in convs)
    groups = [16] * 3 if scope == "network" else [16, 16, 32]
    expected = plain - conv_params + _acdc_params(convs, scope, m, groups)
    model = sb_keras.ACDCResNet(depth=20, sharing=scope, num_atoms=m)
    assert sb_keras.count_params(model) == expected
    if scope == "layer":  # each layer owns a (16, 16, m) alpha
        grouped = sb_keras.ACDCResNet(
            depth=20, sharing=scope, num_atoms=m, group_size=16
        )
        per_layer = [
            16 * 16 * m + (c // 16) * (f // 16) * m * 9 for c, f, _, _ in convs
        ]
        assert sb_keras.count_params(grouped) == plain - conv_params + sum(per_layer)


def test_batchnorm_switch():
    with_bn = _tiny("network")
    without = _tiny("network", batchnorm=False)
    convs = [layer for layer in without.layers if isinstance(layer, ACDCConv2D)]
    assert all(c.bias is not None for c in convs)
    for conv in convs:  # the ACDC output goes straight to ReLU / Add
        (user,) = [
            layer
            for layer in without.layers
            if any(t is conv.output for t in _flat(layer.input))
        ]
        assert isinstance(user, (keras.layers.ReLU, keras.layers.Add))
    # each ACDC conv: BN (2 F params) replaced by a bias (F params)
    saved = sum(c.filters for c in convs)
    assert sb_keras.count_params(with_bn) - sb_keras.count_params(without) == saved


def _flat(tensors):
    return tensors if isinstance(tensors, (list, tuple)) else [tensors]


def test_plain_baseline_and_macs():
    acdc = sb_keras.ACDCResNet(depth=20, sharing="network", route="kernel")
    base = sb_keras.counting.baseline_of(acdc)
    plain = sb_keras.ResNet(depth=20)
    assert sb_keras.count_params(base) == sb_keras.count_params(plain)
    # The kernel route runs the same convolutions as the plain model.
    assert sb_keras.count_macs(acdc) == sb_keras.count_macs(plain)
    atoms = sb_keras.ACDCResNet(depth=20, sharing="network", route="atoms")
    # Per position: C (F/16) m 9 + F 16 m MACs instead of 9 C F.
    saved = 0
    for c, f, size in [(16, 16, 32)] * 6 + [(16, 32, 16)] + [(32, 32, 16)] * 5:
        saved += size * size * (9 * c * f - (c * (f // 16) * 6 * 9 + f * 16 * 6))
    for c, f, size in [(32, 64, 8)] + [(64, 64, 8)] * 5:
        saved += size * size * (9 * c * f - (c * (f // 16) * 6 * 9 + f * 16 * 6))
    assert sb_keras.count_macs(plain) - sb_keras.count_macs(atoms) == saved


def _tiny(scope, **kwargs):
    return sb_keras.ACDCResNet(
        depth=8, sharing=scope, num_atoms=3, input_shape=(16, 16, 3), **kwargs
    )


def _alpha_variables(model):
    return {
        id(v): v
        for layer in model._flatten_layers()
        if isinstance(layer, ACDCCoefficients)
        for v in layer.weights
    }


def _acdc_outputs(model):
    convs = [layer for layer in model.layers if isinstance(layer, ACDCConv2D)]
    return keras.Model(model.input, [c.output for c in convs])


EXPECTED_ALPHAS = {"network": 1, "stage": 3, "layer": 6}


@pytest.mark.parametrize("scope", SCOPES)
def test_save_load_and_clone_keep_one_alpha(scope):
    model = _tiny(scope)
    x = random_images(model, batch=2) * 127 + 128
    assert len(_alpha_variables(model)) == EXPECTED_ALPHAS[scope]
    assert_config_round_trip(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        restored = keras.models.load_model(path)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    expected = model.predict(x, verbose=0)
    # load_model rebuilds the class; clone_model copies the graph (a plain
    # Functional); both keep the alpha edges.
    assert type(restored) is type(model)
    for other in (restored, clone):
        assert len(_alpha_variables(other)) == EXPECTED_ALPHAS[scope]
        np.testing.assert_allclose(other.predict(x, verbose=0), expected, atol=1e-5)
    if scope == "network":  # one variable feeds all 6 users
        (alpha,) = _alpha_variables(restored).values()
        alpha.assign(np.zeros(alpha.shape, "float32"))
        for y in _acdc_outputs(restored).predict(x, verbose=0):
            assert np.all(y == 0)


@pytest.fixture
def strategy(mirrored_strategy):
    return mirrored_strategy


def _freeze_batchnorm(model):
    # Per-replica BN statistics differ from global ones; in inference mode
    # BN is the same function on 1 and 2 devices.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _fit_steps(model, x, y):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)


@pytest.mark.slow  # 30-45 s each on the shared 2-core machine (tracing)
@pytest.mark.parametrize("scope", SCOPES)
def test_mirrored_strategy_matches_one_device(scope, strategy):
    rng = np.random.RandomState(1)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    y = rng.randint(0, 10, 16)
    with strategy.scope():
        mirrored = _tiny(scope)
        _freeze_batchnorm(mirrored)
        initial = mirrored.get_weights()
        alphas = list(_alpha_variables(mirrored).values())
        assert len(alphas) == EXPECTED_ALPHAS[scope]
        assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in alphas)
        _fit_steps(mirrored, x, y)
    single = _tiny(scope)
    _freeze_batchnorm(single)
    single.set_weights(initial)
    _fit_steps(single, x, y)
    for a, b in zip(mirrored.get_weights(), single.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for v, w0 in zip(mirrored.weights, initial):  # alpha, atoms, stem, head
        assert v.trainable != np.allclose(v.numpy(), w0), v.path


def _int8_tflite(model, x):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i : i + 1]] for i in range(len(x)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.mark.parametrize(
    "scope,route",
    [("network", "auto"), ("network", "atoms")]
    + [pytest.param(scope, "auto", marks=pytest.mark.slow) for scope in SCOPES[1:]],
)
def test_full_int8_tflite_builtin_ops(scope, route):
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    model = _tiny(scope, route=route)
    rng = np.random.RandomState(2)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    flatbuffer = _int8_tflite(model, x)
    interpreter = interpreter_mod.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "CONV_2D" in ops
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    s_in, z_in = inp["quantization"]
    s_out, z_out = out["quantization"]
    got = []
    for image in x:
        q = np.clip(np.round(image / s_in + z_in), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q[None])
        interpreter.invoke()
        got.append(interpreter.get_tensor(out["index"])[0].astype(float) - z_out)
    got = np.array(got) * s_out
    expected = model.predict(x, verbose=0)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 0.1, error


def test_freeze_all_but_atoms_trains_only_atoms():
    model = _tiny("network")
    trainable = sb_keras.freeze_all_but_atoms(model)
    convs = [layer for layer in model.layers if isinstance(layer, ACDCConv2D)]
    assert {id(v) for v in trainable} == {id(c.atoms) for c in convs}
    before = {v.path: v.numpy().copy() for v in model.weights}
    x = random_images(model, batch=4) * 127 + 128
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, np.arange(4) % 10, batch_size=4, verbose=0)
    atoms = {c.atoms.path for c in convs}
    for v in model.weights:
        changed = not np.array_equal(before[v.path], v.numpy())
        assert changed == (v.path in atoms), v.path

    with_bn = sb_keras.freeze_all_but_atoms(_tiny("layer"), batchnorm=True)
    names = {v.name for v in with_bn}
    assert names == {"atoms", "gamma", "beta"}
    head = sb_keras.freeze_all_but_atoms(_tiny("stage"), classifier=True)
    assert {v.name for v in head} == {"atoms", "kernel", "bias"}
    with pytest.raises(ValueError, match="model='resnet20'"):
        sb_keras.freeze_all_but_atoms(sb_keras.ResNet(depth=20))


def test_registry_names():
    names = sb_keras.list_models("acdc_*")
    for scope in SCOPES:
        assert f"acdc_resnet18_{scope}_imagenet" in names
        assert f"acdc_resnet18_{scope}_cifar" in names
        assert f"acdc_resnet56_{scope}" in names
    model = sb_keras.get_model("acdc_resnet20_stage", num_atoms=2)
    assert model.name == "acdc_resnet20_stage" and model.num_atoms == 2
