"""`sb_keras.compress` / `unshare` for MobileNetV2 (whole shared 1x1 kernels)."""

import os

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.compression import mobilenet_v2 as mb
from sb_keras.compression.rebalance import _rescale_bn
from tests import cli_helpers

SMALL = {"variant": "cifar", "alpha": 0.35, "num_classes": 10}


def _randomize_batchnorms(model, rng):
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


def _logits(model, x):
    return np.asarray(model(x, training=False))


def _scramble(plain, rng):
    """Permutes every block's hidden channels and scales every expansion
    filter by a random factor of either sign (moved into its BN)."""
    for layer in plain.layers:
        if not layer.name.endswith("_depthwise"):
            continue
        block = layer.name[: -len("_depthwise")]
        n = layer.kernel.shape[2]
        mb.permute_hidden(plain, block, rng.permutation(n))
        expand = plain.get_layer(f"{block}_expand")
        c = rng.uniform(0.3, 3.0, n) * rng.choice([-1.0, 1.0], n)
        expand.kernel.assign(np.asarray(expand.kernel) * c)
        _rescale_bn(plain.get_layer(f"{block}_expand_bn"), c)


IMAGENET = {"variant": "imagenet", "input_shape": (32, 32, 3)}
CHANNELS_FIRST = {"data_format": "channels_first"}


@pytest.mark.parametrize(
    "sharing, method, extra",
    [
        ("single", "whitened", {}),
        ("double", "plain", {}),
        pytest.param("single", "plain", {}, marks=pytest.mark.slow),
        pytest.param("double", "whitened", {}, marks=pytest.mark.slow),
        pytest.param("double", "whitened", IMAGENET, marks=pytest.mark.slow),
        pytest.param("single", "whitened", CHANNELS_FIRST, marks=pytest.mark.slow),
    ],
)
def test_round_trip_through_a_scrambled_plain_model_is_exact(sharing, method, extra):
    rng = np.random.RandomState(0)
    shared = sb_keras.MobileNetV2(share=True, sharing=sharing, **{**SMALL, **extra})
    _randomize_batchnorms(shared, rng)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    if extra.get("data_format") == "channels_first":
        x = x.transpose(0, 3, 1, 2)
    expected = _logits(shared, x)

    plain = sb_keras.unshare(shared)
    assert isinstance(plain, sb_keras.MobileNetV2) and not plain.share
    np.testing.assert_allclose(_logits(plain, x), expected, atol=1e-5)
    _scramble(plain, rng)  # the same function, no longer visibly shared
    np.testing.assert_allclose(_logits(plain, x), expected, atol=1e-4)
    kernels = [
        np.asarray(plain.get_layer(f"stage3_block{i}_expand").kernel) for i in (2, 3)
    ]
    assert np.abs(kernels[0] - kernels[1]).max() > 0.1

    data = x if method == "whitened" else None
    compressed, report = sb_keras.compress(
        plain, sharing=sharing, calibration_data=data, method=method
    )
    assert compressed.share and compressed.sharing == sharing
    np.testing.assert_allclose(_logits(compressed, x), expected, atol=1e-4)
    groups = 4 if sharing == "single" else 8
    assert len(report["groups"]) == groups and report["method"] == method
    for g in report["groups"]:
        assert g["relative_error"] < 1e-5, g
        if g["group"] == "expand":
            assert g["initial_objective_error"] > 0.1  # scrambled: far off
    assert report["params_after"] == sb_keras.count_params(shared)
    # The shared kernels come back with unit rows (filters).
    basis = np.asarray(compressed.get_layer("stage4_expand_basis").bases[0])
    np.testing.assert_allclose(np.linalg.norm(basis[0, 0], axis=0), 1.0, rtol=1e-5)


def test_random_plain_model_compresses_with_aligned_channels():
    plain = sb_keras.MobileNetV2(**SMALL)
    shared, report = sb_keras.compress(plain, sharing="double")
    _, unaligned = mb.compress_mobilenet_v2(plain, sharing="double", align=False)
    fresh = sb_keras.MobileNetV2(share=True, sharing="double", **SMALL)
    assert report["params_before"] == sb_keras.count_params(plain)
    assert report["params_after"] == sb_keras.count_params(fresh)
    assert report["params_after"] < report["params_before"]
    assert [g["stage"] for g in report["groups"]] == [3, 3, 4, 4, 5, 5, 6, 6]
    for g, u in zip(report["groups"], unaligned["groups"]):
        assert 0 < g["relative_error"] < 1, g
        if g["group"] == "expand":
            # Matching the blocks' hidden channels lowers the error.
            assert g["objective_error"] < u["objective_error"], (g, u)
            assert u["objective_error"] == pytest.approx(g["initial_objective_error"])
            assert u["rounds"] == 0 and g["rounds"] >= 1
    x = np.random.RandomState(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert np.all(np.isfinite(_logits(shared, x)))


def _cli_journey(tmp_path, capture, whitened):
    rng = np.random.RandomState(3)
    plain = _randomize_batchnorms(sb_keras.MobileNetV2(**SMALL), rng)
    source, output = str(tmp_path / "plain.keras"), str(tmp_path / "o" / "out.keras")
    plain.save(source)
    argv = ["compress", source, output, "--sharing", "double"]
    images = None
    if whitened:
        images = rng.randint(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        np.savez(tmp_path / "train.npz", x=images, y=np.arange(8) % 10)
        argv += ["--data-dir", str(tmp_path), "--calibration-count", "8"]
    out = capture(argv)
    restored = keras.models.load_model(output)
    expected, report = sb_keras.compress(
        plain, sharing="double", calibration_data=images
    )
    assert f"method {'whitened' if whitened else 'plain'}, sharing double" in out
    assert isinstance(restored, sb_keras.MobileNetV2) and restored.sharing == "double"
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(_logits(restored, x), _logits(expected, x), atol=1e-5)
    assert f"{report['params_before']:,} parameters" in out
    assert f"{report['params_after']:,} parameters" in out
    assert out.count("relative error") == len(report["groups"]) == 8
    last = report["groups"][-1]["relative_error"]
    assert f"stage 6 project x2: relative error {last:.3e}" in out
    assert os.listdir(tmp_path / "o") == ["out.keras"]


def test_cli_compress_in_process(tmp_path, capsys):
    from sb_keras import cli

    def capture(argv):
        assert cli.main(argv) == 0
        return capsys.readouterr().out

    _cli_journey(tmp_path, capture, whitened=False)


@pytest.mark.slow  # a subprocess (TensorFlow start-up) and two model builds
def test_cli_compress_journey(tmp_path):
    def capture(argv):
        return cli_helpers.ok(cli_helpers.sb_keras(*argv))

    _cli_journey(tmp_path, capture, whitened=True)


@pytest.fixture(scope="module")
def plain_small():
    return sb_keras.MobileNetV2(**SMALL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shared_rank": 8}, "Received: shared_rank=8$"),
        ({"unique_rank": 1}, "Received: unique_rank=1$"),
        ({"shared_rank": 4, "unique_rank": 1}, "shared_rank=4, unique_rank=1"),
        ({"sharing": "triple"}, "Received: sharing='triple'"),
        ({"method": "svd"}, "Received: method='svd'"),
        ({"method": "whitened"}, "Received: calibration_data=None"),
        (
            {"calibration_data": np.zeros((2, 28, 28, 3))},
            r"Received: calibration_data of shape \(2, 28, 28, 3\)",
        ),
    ],
)
def test_bad_arguments(plain_small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb_keras.compress(plain_small, **kwargs)


def test_bad_models(plain_small):
    shared = sb_keras.MobileNetV2(share=True, **SMALL)
    with pytest.raises(ValueError, match="already shared.*Received: model="):
        sb_keras.compress(shared)
    with pytest.raises(ValueError, match="shared.*MobileNetV2. Received: model="):
        sb_keras.unshare(plain_small)
    # A ResNet still needs its ranks.
    with pytest.raises(ValueError, match="Received: shared_rank=None"):
        sb_keras.compress(sb_keras.ResNet(8))


def test_cli_ranks_for_a_mobilenet_v2_are_refused(tmp_path, plain_small):
    from sb_keras import cli

    source = str(tmp_path / "plain.keras")
    plain_small.save(source)
    argv = ["compress", source, str(tmp_path / "o.keras"), "--shared-rank", "8"]
    assert cli.main(argv) == 2
    assert not os.path.exists(tmp_path / "o.keras")
