"""Export of DenseNet and ResNeXt: exact folding, int8 TFLite builtin ops."""

import numpy as np
import pytest

import sb_keras
from sb_keras import export
from sb_keras import litert
from tests.test_densenet import small as small_densenet
from tests.test_resnext import small as small_resnext

MODELS = {
    "densenet": lambda: small_densenet(share=True, shared_rank=8, unique_rank=2),
    "densenet_authors": lambda: small_densenet(
        share=True, shared_rank=8, unique_rank=2, authors_layout=True
    ),
    "densenet_plain": lambda: small_densenet(),
    "resnext": lambda: small_resnext(share=True, shared_rank=8, unique_rank=4),
    "resnext_plain": lambda: small_resnext(),
}


def pixels(n, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(0, 255, (n, 16, 16, 3)).astype("float32")


def trained(name):
    model = MODELS[name]()
    x = pixels(8, seed=1)
    for _ in range(3):
        model(x, training=True)  # non-trivial BN statistics
    return model


@pytest.mark.parametrize("layout", export.LAYOUTS)
@pytest.mark.parametrize(
    "name",
    [
        "densenet",
        "resnext",
        pytest.param("densenet_authors", marks=pytest.mark.slow),
        pytest.param("densenet_plain", marks=pytest.mark.slow),
        pytest.param("resnext_plain", marks=pytest.mark.slow),
    ],
)
def test_folding_is_exact_in_inference(name, layout):
    model = trained(name)
    folded = export.fold_model(model, layout)
    x = pixels(4)
    ref = np.asarray(model(x, training=False))
    out = np.asarray(folded(x))
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
    shared_vars = [v for v in folded.weights if v.path.endswith("/basis")]
    if layout == "decomposed" and "plain" not in name:
        # Each used basis stored once; the authors' dead 4th basis is dropped.
        expected = {"densenet": 4, "densenet_authors": 3, "resnext": 2}[name]
        assert len(shared_vars) == expected


@pytest.mark.parametrize("name", ["densenet", "resnext"])
def test_int8_tflite_with_builtin_ops_only(name, tmp_path):
    model = trained(name)
    path = tmp_path / f"{name}.tflite"
    x = pixels(8)
    content = model.export(
        str(path),
        format="litert",
        quantize="int8",
        representative_data=x,
        int8_io=True,
        verbose=False,
    )
    assert path.read_bytes() == content
    names = export.op_names(content)
    assert "CONV_2D" in names and not [n for n in names if n.startswith("CUSTOM")]
    out = litert.predict(str(path), x)
    ref = np.asarray(model(x, training=False))
    assert out.shape == ref.shape and np.isfinite(out).all()
    # int8 logits track the float ones.
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.9
    assert sb_keras.count_params(model) > 0
