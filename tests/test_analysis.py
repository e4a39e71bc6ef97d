"""Tests of the analysis tools: gradient flow, orthogonality history, tables."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import sb_keras
from sb_keras import analysis

SHAPE = (8, 8, 3)
PNG = b"\x89PNG\r\n\x1a\n"


def _tiny(**kwargs):
    kwargs.setdefault("share", True)
    kwargs.setdefault("shared_rank", 4)
    kwargs.setdefault("unique_rank", 1)
    return sb_keras.ResNet(14, input_shape=SHAPE, **kwargs)


def _batch(n=6, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(0, 255, size=(n, *SHAPE)).astype("float32")
    return x, np.arange(n) % 10


def _perturb_bases(model, scale=0.3, seed=0):
    """Moves the bases away from orthonormal so the penalty has a gradient."""
    rng = np.random.RandomState(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, sb_keras.layers.FilterBasis):
            for v in layer.bases:
                v.assign(v + scale * rng.standard_normal(v.shape).astype("float32"))


def test_weight_gradients_of_a_dense_model_match_the_closed_form():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((5, 4)).astype("float32")
    y = np.array([0, 1, 2, 1, 0])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(inputs))
    w, b = (np.asarray(v, dtype=np.float64) for v in model.get_layer("fc").weights)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = x.T @ (p - np.eye(3)[y]) / len(x)
    (record,) = analysis.gradient_norms(model, x, y)
    assert record["layer"] == "fc" and record["kind"] == "dense"
    np.testing.assert_allclose(record["norm"], np.linalg.norm(expected), rtol=1e-5)


def test_weight_gradients_match_a_tape_on_a_shared_model():
    model = _tiny(orthogonality=10.0, orthogonality_include_unique=True)
    _perturb_bases(model)
    x, y = _batch()
    stats = [np.array(v) for v in model.non_trainable_variables]
    records = analysis.gradient_norms(model, x, y)
    # BatchNorm moving statistics are left as they were.
    for v, before in zip(model.non_trainable_variables, stats):
        np.testing.assert_array_equal(np.array(v), before)

    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        loss = tf.reduce_mean(loss) + tf.add_n(model.losses)
    variables = {v.path: v for v in model.trainable_variables}
    grads = dict(zip(variables, tape.gradient(loss, list(variables.values()))))

    def norm(prefix, names):
        sq = sum(
            float(tf.reduce_sum(tf.square(g)))
            for path, g in grads.items()
            if path.startswith(prefix + "/") and path.split("/")[-1] in names
        )
        return np.sqrt(sq)

    by_name = {r["layer"]: r for r in records}
    kinds = {r["kind"] for r in records}
    assert kinds == {"conv", "basis_conv", "basis", "dense"}
    assert records[0]["layer"] == "stem_conv"
    assert records[-1]["layer"] == "predictions"
    for r in records:
        names = {
            "conv": {"kernel"},
            "dense": {"kernel"},
            "basis_conv": {"unique_kernel", "coefficients"},
            "basis": {"basis", "basis_1", "basis_2"},
        }[r["kind"]]
        expected = norm(r["layer"], names)
        assert expected > 0, r["layer"]
        np.testing.assert_allclose(r["norm"], expected, rtol=1e-4, err_msg=r["layer"])
    # The shared basis gets the gradient of every user and of the penalty.
    assert "stage1_basis" in by_name


def test_activation_gradient_at_the_pooled_features_matches_the_closed_form():
    model = _tiny()
    x, y = _batch()
    (record,) = analysis.gradient_norms(
        model, x, y, wrt="activations", layers=["avg_pool"]
    )
    feats = keras.Model(model.input, model.get_layer("avg_pool").output)
    z = np.asarray(feats(x, training=True), dtype=np.float64)
    w, b = (
        np.asarray(v, dtype=np.float64) for v in model.get_layer("predictions").weights
    )
    logits = z @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (p - np.eye(10)[y]) @ w.T / len(x)
    np.testing.assert_allclose(record["norm"], np.linalg.norm(expected), rtol=1e-4)


def test_activation_gradients_default_to_the_residual_stream():
    model = _tiny()
    x, y = _batch()
    records = analysis.gradient_norms(model, x, y, wrt="activations")
    names = [r["layer"] for r in records]
    assert names[0] == "stem_relu"
    assert names[1:] == [f"stage{g}_block{i}_out" for g in (1, 2, 3) for i in (1, 2)]
    ratio = analysis.gradient_ratio(records)
    assert ratio == pytest.approx(records[0]["norm"] / records[-1]["norm"])


def test_history_callbacks_record_init_and_every_k_steps():
    model = _tiny(orthogonality=0.0)
    x, y = _batch(8)
    init = analysis.gradient_norms(model, x, y)
    grads = analysis.GradientNormHistory(x, y, every=2)
    ortho = analysis.OrthogonalityHistory(every=2)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[grads, ortho])
    assert [s for s, _ in grads.history] == [0, 2, 4]
    assert [s for s, _ in ortho.history] == [0, 2, 4]
    for a, b in zip(grads.history[0][1], init):
        assert a["layer"] == b["layer"]
        np.testing.assert_allclose(a["norm"], b["norm"], rtol=1e-5)
    assert ortho.history[-1][1] == pytest.approx(sb_keras.orthogonality(model))
    # lambda = 0: nothing holds the bases orthonormal, SGD moves them away.
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in ortho.history[0][1].values())
    assert all(v > 1e-8 for v in ortho.history[-1][1].values())
    assert len(grads.ratios()) == 3


def test_shared_unique_similarity_matches_numpy():
    model = _tiny()
    result = analysis.shared_unique_similarity(model)
    assert sorted(result) == sorted(
        f"stage{g}_block2_conv{c}" for g in (1, 2, 3) for c in (1, 2)
    )
    layer = model.get_layer("stage2_block2_conv1")
    basis = model.get_layer("stage2_basis").bases[0]

    def rows(k):
        k = np.asarray(k, dtype=np.float64)
        r = k.reshape(-1, k.shape[-1]).T
        return r / np.linalg.norm(r, axis=1, keepdims=True)

    cos = np.abs(rows(layer.unique_kernel) @ rows(basis).T)
    coeff = np.asarray(layer.coefficients)[0, 0]
    u = layer.unique_rank
    got = result["stage2_block2_conv1"]
    np.testing.assert_allclose(got["max_abs_cos"], cos.max(), rtol=1e-6)
    np.testing.assert_allclose(got["mean_abs_cos"], cos.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        got["shared_coefficient_energy"],
        (coeff[u:] ** 2).sum() / (coeff**2).sum(),
        rtol=1e-6,
    )


@pytest.mark.parametrize("share", [False, True])
def test_layer_table_sums_to_the_model_totals(share):
    model = sb_keras.ResNet(20, share=share)
    rows = analysis.layer_table(model)
    assert sum(r["params"] for r in rows) == sb_keras.count_params(model)
    assert sum(r["macs"] for r in rows) == sb_keras.count_macs(model)
    stages = analysis.stage_table(model)
    assert [s["part"] for s in stages] == [
        "stem",
        "stage1",
        "stage2",
        "stage3",
        "predictions",
    ]
    assert sum(s["params"] for s in stages) == sb_keras.count_params(model)
    text = analysis.markdown_table(stages)
    assert text.splitlines()[0] == "| part | params | macs |"


def test_experiment_records_init_and_steps_and_summarizes():
    x, y = _batch(16)
    builders = {"shared": lambda: _tiny(orthogonality=10.0)}
    results = analysis.gradient_flow_experiment(
        builders, x, y, x[:4], y[:4], steps=2, batch_size=4, every=1
    )
    # A plain model's record (no bases, so no orthogonality column).
    results["plain"] = {"history": results["shared"]["history"], "loss": [1.0]}
    rows = analysis.gradient_flow_summary(results)
    assert [r["model"] for r in rows] == ["shared", "plain"]
    for r, label in zip(rows, results):
        hist = results[label]["history"]
        assert [s for s, _ in hist] == [0, 1, 2]
        assert r["ratio_init"] == pytest.approx(analysis.gradient_ratio(hist[0][1]))
        assert r["ratio_end"] == pytest.approx(analysis.gradient_ratio(hist[-1][1]))
    assert "orthogonality_end" in rows[0] and "orthogonality_end" not in rows[1]
    assert rows[0]["orthogonality_end"] == pytest.approx(
        np.mean(list(results["shared"]["orthogonality"][-1][1].values()))
    )


def _records(scale):
    kinds = ["conv", "basis", "basis_conv", "basis_conv", "dense"]
    return [
        {"layer": f"l{i}", "kind": k, "depth": i, "norm": scale * (i + 1)}
        for i, k in enumerate(kinds)
    ]


def test_plots_are_written_as_png(tmp_path):
    results = {
        label: {
            "history": [(0, _records(1.0)), (5, _records(s))],
            "orthogonality": [(0, {"b": 0.0}), (5, {"b": 1e-3 * s})],
        }
        for label, s in (("plain", 1.0), ("shared", 2.0))
    }
    paths = [tmp_path / "flow.png", tmp_path / "a" / "norms.png", tmp_path / "o.png"]
    analysis.plot_gradient_flow(results, str(paths[0]))
    analysis.plot_gradient_norms(
        {k: v["history"][0][1] for k, v in results.items()}, str(paths[1])
    )
    analysis.plot_orthogonality_history(
        {k: v["orthogonality"] for k, v in results.items()}, str(paths[2])
    )
    for p in paths:
        assert p.read_bytes()[:8] == PNG
    # kinds=None leaves out the basis and the classifier.
    assert analysis.gradient_ratio(_records(1.0)) == pytest.approx(1 / 4)


def test_bad_arguments_name_the_argument():
    model = _tiny()
    x, y = _batch()
    with pytest.raises(ValueError, match="wrt='grads'"):
        analysis.gradient_norms(model, x, y, wrt="grads")
    with pytest.raises(ValueError, match="layers="):
        analysis.gradient_norms(model, x, y, layers=["nope"])
    with pytest.raises(ValueError, match="y.shape"):
        analysis.gradient_norms(model, x, y[:2])
    with pytest.raises(ValueError, match="every=0"):
        analysis.OrthogonalityHistory(every=0)
    with pytest.raises(ValueError, match="Received: 1 such records"):
        analysis.gradient_ratio([{"kind": "conv", "norm": 1.0}])
