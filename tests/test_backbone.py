"""The Backbone base class: dtype policy in the config, LiteRT export."""

import os

import keras
import numpy as np
import pytest

import sb_keras
from sb_keras import export
from sb_keras import litert
from sb_keras.layers import ACDCCoefficients
from sb_keras.layers import FilterBasis
from tests.test_export import pixels
from tests.test_export import randomize_batchnorm


def _policies(model):
    return [layer.dtype_policy.name for layer in model.layers if layer.weights]


def _computing_policies(model):
    """Policies of the layers that compute (the bases are float32 by design)."""
    owners = (FilterBasis, ACDCCoefficients)
    return {
        layer.dtype_policy.name
        for layer in model.layers
        if layer.weights and not isinstance(layer, owners)
    }


@pytest.mark.parametrize(
    "build",
    [
        lambda: sb_keras.ResNet(depth=14, share=True),
        lambda: sb_keras.ACDCResNet(depth=14, sharing="stage"),
    ],
    ids=["resnet", "acdc_resnet"],
)
def test_mixed_bfloat16_model_keeps_its_policy_through_keras_file(build, tmp_path):
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build()
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert model.get_config()["dtype"] == "mixed_bfloat16"
    assert _computing_policies(model) == {"mixed_bfloat16"}
    x = pixels()
    reference = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    # Loaded where the global policy is float32: the layers keep bfloat16.
    restored = keras.models.load_model(path)
    assert type(restored) is type(model)
    assert restored.dtype_policy.name == "mixed_bfloat16"
    assert _policies(restored) == _policies(model)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), reference)
    # The float32 model computes something else (bfloat16 rounding).
    as_float32 = type(model).from_config({**model.get_config(), "dtype": "float32"})
    as_float32.set_weights(model.get_weights())
    assert _computing_policies(as_float32) == {"float32"}
    assert np.abs(as_float32.predict(x, verbose=0) - reference).max() > 0


def test_dtype_argument_does_not_touch_the_global_policy():
    model = sb_keras.MobileNetV2(variant="cifar", alpha=0.25, dtype="mixed_float16")
    assert keras.config.dtype_policy().name == "float32"
    assert _computing_policies(model) == {"mixed_float16"}
    assert sb_keras.MobileNetV2.resolve_config(variant="cifar")["dtype"] == "float32"


def test_old_configs_without_dtype_still_load():
    model = sb_keras.ResNet(depth=8)
    config = model.get_config()
    del config["dtype"]
    assert sb_keras.ResNet.from_config(config).get_config() == model.get_config()


def _buffers(content):
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.Model.GetRootAsModel(content, 0)
    data = [
        m.Buffers(i).DataAsNumpy().tobytes() if m.Buffers(i).DataLength() else b""
        for i in range(m.BuffersLength())
    ]
    graph = m.Subgraphs(0)
    users = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        for j in range(op.InputsLength()):
            if op.Inputs(j) >= 0:
                buffer = graph.Tensors(op.Inputs(j)).Buffer()
                users[buffer] = users.get(buffer, 0) + 1
    return data, users


def test_model_export_litert_stores_each_basis_once(tmp_path):
    model = randomize_batchnorm(sb_keras.get_model("resnet56_s16u1_double"))
    path = str(tmp_path / "m.tflite")
    content = model.export(path, format="litert", verbose=False)
    with open(path, "rb") as f:
        assert f.read() == content
    baked = export.convert(export.fold_model(model, "folded"))

    data, users = _buffers(content)
    baked_data, _ = _buffers(baked)
    bases = [layer for layer in model.layers if isinstance(layer, FilterBasis)]
    bases = [np.asarray(v) for layer in bases for v in layer.bases]
    assert len(bases) == 6  # 3 stages x 2 conv positions
    for basis in bases:
        # TFLite stores conv weights (out, h, w, in); match either order.
        ohwi = np.ascontiguousarray(basis.transpose(3, 0, 1, 2))
        forms = {basis.tobytes(), ohwi.tobytes()}
        where = [i for i, d in enumerate(data) if d in forms]
        assert len(where) == 1  # stored once ...
        assert users.get(where[0]) == 8  # ... used by the 8 blocks' convs
        assert not any(d in forms for d in baked_data)  # baked away there
    stored = sum(len(d) for d in data)
    assert stored < 0.45 * sum(len(d) for d in baked_data)
    assert len(content) < 0.45 * len(baked)

    x = pixels(8)
    reference = np.asarray(model(x, training=False))
    out = litert.predict(path, x)
    assert np.abs(out - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_model_export_options(tmp_path, capsys):
    model = sb_keras.ResNet(depth=8)
    path = str(tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="Received: optimizations="):
        model.export(path, format="litert", optimizations=["DEFAULT"])
    with pytest.raises(ValueError, match="Received: layout='tiny'"):
        model.export(path, format="litert", layout="tiny")
    with pytest.raises(ValueError, match="Received: input_signature="):
        model.export(path, format="litert", input_signature=[None])
    assert not os.path.exists(path)
    # "auto" measures both layouts and says which one it wrote.
    content = model.export(path, format="litert", layout="auto")
    said = capsys.readouterr().out
    assert any(f"(layout {layout!r})" in said for layout in export.LAYOUTS), said
    assert "CONV_2D" in export.op_names(content)
