"""`sb_keras.compress` / `sb_keras.unshare` of bottleneck ResNets (whole kernels).

The exactness tests unshare a shared ResNet-50 with random BN statistics,
then permute every non-first block's hidden channels (after ``conv1`` and
after ``conv2``) and rescale its ``conv2`` filters (and ``conv3`` rows)
into the BNs (the same function, checked), so that the blocks no longer
agree; compressing it back must find the shared kernels and reproduce the
original logits. Small 32x32 inputs keep ResNet-50 cheap.
"""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.compression import bottleneck
from sb_keras.compression.rebalance import _rescale_bn
from tests import cli_helpers

SHAPE = (32, 32, 3)


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


def _resnet50(seed=0, **kwargs):
    model = sb_keras.ResNet(50, input_shape=SHAPE, num_classes=10, **kwargs)
    return _randomize_batchnorms(model, seed)


def _images(seed, count=4):
    rng = np.random.RandomState(seed)
    return rng.uniform(0, 255, (count, *SHAPE)).astype("float32")


def _logits(model, x):
    return np.asarray(model(x, training=False))


def _scramble(plain, seed):
    """Permutes the hidden channels of the non-first blocks and rescales their
    conv2 filters and conv3 rows into bn2 / bn3 (in place, same function)."""
    rng = np.random.RandomState(seed)
    for _, names in bottleneck._blocks(plain):
        for b in names:
            conv1, conv2, conv3 = (plain.get_layer(f"{b}_conv{j}") for j in (1, 2, 3))
            bn1, bn2, bn3 = (plain.get_layer(f"{b}_bn{j}") for j in (1, 2, 3))
            width = conv1.kernel.shape[-1]
            p, q = rng.permutation(width), rng.permutation(width)
            conv1.kernel.assign(np.asarray(conv1.kernel)[..., p])
            bn1.set_weights([w[p] for w in bn1.get_weights()])
            scale = rng.uniform(0.5, 2.0, width) * rng.choice([-1.0, 1.0], width)
            conv2.kernel.assign(np.asarray(conv2.kernel)[:, :, p][..., q] * scale)
            bn2.set_weights([w[q] for w in bn2.get_weights()])
            _rescale_bn(bn2, scale)
            scale3 = rng.uniform(0.5, 2.0, 4 * width)
            conv3.kernel.assign(np.asarray(conv3.kernel)[:, :, q, :] * scale3)
            _rescale_bn(bn3, scale3)
    return plain


def _round_trip(sharing, method, atol=1e-4):
    shared = _resnet50(sharing=sharing, share=True)
    x = _images(1)
    expected = _logits(shared, x)
    plain = sb_keras.unshare(shared)
    assert not plain.share
    np.testing.assert_allclose(_logits(plain, x), expected, atol=1e-5)
    _scramble(plain, seed=2)
    np.testing.assert_allclose(_logits(plain, x), expected, atol=1e-4)
    data = _images(3) if method == "whitened" else None
    back, report = sb_keras.compress(
        plain, sharing=sharing, calibration_data=data, method=method
    )
    assert back.share and back.sharing == sharing
    np.testing.assert_allclose(_logits(back, x), expected, atol=atol)
    assert report["params_after"] == sb_keras.count_params(shared)
    assert report["params_before"] == sb_keras.count_params(plain)
    groups = ["conv2", "conv3"] if sharing == "double" else ["conv2"]
    assert [g["group"] for g in report["groups"]] == groups * 4
    for g in report["groups"]:
        assert g["relative_error"] < 1e-6
        assert g["initial_objective_error"] > 0.1  # the scrambled blocks disagree
        assert g["rounds"] <= 2


def test_unshare_scramble_compress_round_trip_is_exact():
    _round_trip("single", "plain")


@pytest.mark.slow  # ~1-2 min each: eigendecompositions of 4608x4608 moments
@pytest.mark.parametrize(
    "sharing, method",
    [("double", "plain"), ("single", "whitened"), ("double", "whitened")],
)
def test_round_trip_is_exact_double_and_whitened(sharing, method):
    _round_trip(sharing, method)


@pytest.fixture(scope="module")
def plain50():
    return _resnet50(seed=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shared_rank": 8}, "Received: shared_rank=8"),
        ({"unique_rank": 1}, "Received: unique_rank=1"),
        ({"sharing": "triple"}, "Received: sharing='triple'"),
        ({"method": "svd"}, "Received: method='svd'"),
        ({"method": "whitened"}, "Received: calibration_data=None"),
        (
            {"calibration_data": np.zeros((2, 16, 16, 3))},
            r"Received: calibration_data of shape \(2, 16, 16, 3\)",
        ),
    ],
)
def test_bad_arguments(plain50, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb_keras.compress(plain50, **kwargs)


def test_shared_and_plain_models_are_refused_where_they_do_not_apply(plain50):
    shared = sb_keras.ResNet(50, share=True, input_shape=SHAPE, num_classes=10)
    with pytest.raises(ValueError, match="already shared.*Received: model="):
        sb_keras.compress(shared)
    with pytest.raises(ValueError, match="shared .*bottleneck.*Received: model="):
        sb_keras.unshare(plain50)
    with pytest.raises(ValueError, match="Received: shared_rank=None"):
        sb_keras.compress(sb_keras.ResNet(20))


def test_random_plain_resnet50_compresses_with_aligned_channels(plain50):
    shared, report = sb_keras.compress(plain50, sharing="double")
    fresh = sb_keras.ResNet(
        50, share=True, sharing="double", input_shape=SHAPE, num_classes=10
    )
    assert report["params_after"] == sb_keras.count_params(fresh)
    assert report["params_after"] == sb_keras.count_params(shared)
    assert report["params_before"] == sb_keras.count_params(plain50)
    for g in report["groups"]:
        assert 0 < g["relative_error"] < 1
        if g["group"] == "conv2":  # aligned, against the source orders
            assert g["relative_error"] < g["initial_objective_error"]
            assert g["rounds"] >= 1
        else:  # conv3's columns follow conv2's order; its rows stay
            assert g["rounds"] == 0
    assert np.all(np.isfinite(_logits(shared, _images(5))))


@pytest.mark.slow  # two more compressions of a ResNet-50
def test_alignment_lowers_the_error_versus_none(plain50):
    _, aligned = sb_keras.compression.bottleneck.compress_bottleneck(plain50)
    _, unaligned = sb_keras.compression.bottleneck.compress_bottleneck(
        plain50, align=False
    )
    for a, u in zip(aligned["groups"], unaligned["groups"]):
        assert u["rounds"] == 0
        np.testing.assert_allclose(
            u["relative_error"], u["initial_objective_error"], rtol=1e-6
        )
        np.testing.assert_allclose(
            a["initial_objective_error"], u["initial_objective_error"], rtol=1e-9
        )
        assert a["relative_error"] < u["relative_error"]


def test_align_kernels_error_does_not_rise():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(16, 9 * 16)) for _ in range(4)]
    outputs, inputs, info = bottleneck.align_kernels(mats, 16)
    errors = info["errors"]
    assert len(errors) == info["rounds"] >= 1
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))
    for q, p in zip(outputs, inputs):
        assert sorted(q) == list(range(16)) and sorted(p) == list(range(16))


@pytest.mark.slow  # a subprocess that builds and compresses a ResNet-50
def test_cli_compress_bottleneck(tmp_path, plain50):
    source = str(tmp_path / "plain.keras")
    plain50.save(source)
    output = str(tmp_path / "out.keras")
    run = cli_helpers.sb_keras("compress", source, output, "--sharing", "double")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("relative error") == 8
    assert f"{sb_keras.count_params(plain50):,} parameters" in run.stdout
    restored = keras.models.load_model(output)
    expected, _ = sb_keras.compress(plain50, sharing="double")
    x = _images(6)
    np.testing.assert_allclose(_logits(restored, x), _logits(expected, x), atol=1e-5)


@pytest.mark.slow  # saves and loads a ResNet-50 (~7 s)
def test_cli_rank_flags_are_refused_for_a_bottleneck(tmp_path, plain50, capsys):
    from sb_keras import cli

    source = str(tmp_path / "plain.keras")
    plain50.save(source)
    output = tmp_path / "out.keras"
    assert cli.main(["compress", source, str(output), "--shared-rank", "8"]) == 2
    assert "Received: shared_rank=8" in capsys.readouterr().err
    assert not output.exists()


def test_absorb_moves_any_scale_into_the_batchnorm():
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    bn.build((None, 5))
    rng = np.random.RandomState(7)
    bn.set_weights(
        [rng.uniform(0.5, 1.5, 5), rng.normal(size=5), rng.normal(size=5)]
        + [rng.uniform(0.5, 2.0, 5)]
    )
    y = rng.normal(size=(6, 5)).astype("float32")
    s = np.array([2.0, -0.5, 0.0, 1.0, -3.0])
    expected = np.asarray(bn(s * y, training=False))
    bottleneck._absorb(bn, s)
    np.testing.assert_allclose(np.asarray(bn(y, training=False)), expected, atol=1e-5)
