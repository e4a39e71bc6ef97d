"""MobileNetV2 family: exact counts, sharing, round trip, orthogonality."""

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras.layers import FilterBasis
from sb_keras.layers import SharedConv2D
from tests import helpers

# method.md §3.3 (the authors' code, recomputed).
COUNTS = {
    ("imagenet", None): 3_507_272,
    ("imagenet", "single"): 3_243_080,
    ("imagenet", "double"): 2_978_888,
    ("cifar", None): 2_428_004,
    ("cifar", "single"): 2_163_812,
    ("cifar", "double"): 1_899_620,
}


@pytest.mark.parametrize("variant,sharing", sorted(COUNTS, key=str))
def test_parameter_counts_match_the_authors(variant, sharing):
    model = sb_keras.MobileNetV2(
        share=sharing is not None, sharing=sharing, variant=variant
    )
    assert sb_keras.count_params(model) == COUNTS[(variant, sharing)]


def test_registry_names_build_the_paper_models():
    names = sb_keras.list_models("mobilenet_v2*")
    assert "mobilenet_v2_shared_double_cifar" in names
    model = sb_keras.get_model("mobilenet_v2_shared_cifar")
    assert sb_keras.count_params(model) == COUNTS[("cifar", "single")]


def _users(model):
    """Maps each FilterBasis name to the SharedConv2D layers fed by it."""
    users = {}
    for layer in model.layers:
        if isinstance(layer, SharedConv2D):
            owner = layer._inbound_nodes[0].input_tensors[1]._keras_history.operation
            users.setdefault(owner.name, []).append(layer.name)
    return users


def test_shared_expansion_and_projection_per_stage():
    model = sb_keras.MobileNetV2(share=True, sharing="double", variant="cifar")
    users = _users(model)
    # Non-first blocks of the stages of widths 32, 64, 96, 160: 2, 3, 2, 2.
    expected = {"stage3": 2, "stage4": 3, "stage5": 2, "stage6": 2}
    for stage, n in expected.items():
        assert len(users[f"{stage}_expand_basis"]) == n
        assert len(users[f"{stage}_project_basis"]) == n
    assert len(helpers.basis_variables(model)) == 8
    shapes = {
        layer.name: tuple(layer.bases[0].shape)
        for layer in model.layers
        if isinstance(layer, FilterBasis)
    }
    assert shapes["stage4_expand_basis"] == (1, 1, 64, 384)
    assert shapes["stage4_project_basis"] == (1, 1, 384, 64)


@pytest.mark.slow
def test_model_checklist_with_a_fit_step():
    model = sb_keras.MobileNetV2(
        share=True, sharing="double", variant="cifar", alpha=0.35, num_classes=10
    )
    helpers.run_model_test(model, num_classes=10)


def test_keras_round_trip_keeps_shared_tensors_shared():
    model = sb_keras.MobileNetV2(
        share=True, sharing="double", variant="cifar", alpha=0.35, num_classes=10
    )
    restored = helpers.assert_save_load(model, helpers.random_images(model))
    assert len(helpers.basis_variables(restored)) == 8
    assert _users(restored) == _users(model)
    # One variable per basis: changing it changes every user's output.
    x = helpers.random_images(restored)
    basis = next(
        layer for layer in restored.layers if layer.name == "stage4_expand_basis"
    )
    before = restored.predict(x, verbose=0)
    basis.bases[0].assign(np.zeros(basis.bases[0].shape, "float32"))
    probe = keras.Model(
        restored.inputs,
        [restored.get_layer(n).output for n in _users(restored)[basis.name]],
    )
    assert all(np.abs(np.asarray(o)).max() == 0 for o in probe.predict(x, verbose=0))
    assert not np.allclose(before, restored.predict(x, verbose=0))


def _pooled(kernels):
    num = sum(
        (
            (k.reshape(-1, k.shape[-1]).T @ k.reshape(-1, k.shape[-1]).T.T)
            - np.eye(k.shape[-1])
        )
        .__pow__(2)
        .sum()
        for k in kernels
    )
    den = sum(k.shape[-1] ** 2 for k in kernels)
    return num / den


@pytest.mark.parametrize("sharing", ["single", "double"])
def test_orthogonality_is_the_pooled_mean_per_kind(sharing):
    model = sb_keras.MobileNetV2(
        share=True, sharing=sharing, variant="cifar", alpha=0.35, orthogonality=10.0
    )
    model(np.zeros((1, 32, 32, 3), "float32"))
    bases = {
        layer.name: np.asarray(layer.bases[0], np.float64)
        for layer in model.layers
        if isinstance(layer, FilterBasis)
    }
    expand = [v for k, v in bases.items() if "expand" in k]
    project = [v for k, v in bases.items() if "project" in k]
    expected = 10.0 * _pooled(expand)
    if sharing == "double":
        expected += 10.0 * _pooled(project)  # R1 + R2, separate pooled means
    else:
        assert not project
    total = float(sum(np.asarray(v) for v in model.losses))
    np.testing.assert_allclose(total, expected, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"variant": "tiny"}, "variant"),
        ({"share": True, "sharing": "triple"}, "sharing"),
        ({"sharing": "single"}, "sharing"),
        ({"alpha": 0}, "alpha"),
        ({"num_classes": 0}, "num_classes"),
        ({"dropout": 1.5}, "dropout"),
        ({"input_shape": (4, 4, 3), "variant": "cifar"}, "input_shape"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        sb_keras.MobileNetV2(**kwargs)


def test_width_multiplier_and_headless():
    model = sb_keras.MobileNetV2(variant="cifar", alpha=0.5, include_top=False)
    assert model.output_shape == (None, 5, 5, 1280)
    conv = model.get_layer("stage7_block1_project")
    assert conv.filters == 160  # 320 * 0.5
