"""The orthogonality penalty equals an independent NumPy version of the
authors' formula (train_basis / train_basis_single in Net_RL2), and is added
exactly once per forward pass."""

import keras
import numpy as np
import pytest

import sb_keras


def _torch_rows(kernel):
    """Keras (kh, kw, in, out) -> PyTorch (out, in, kh, kw) -> (out, -1)."""
    k = np.transpose(np.array(kernel, np.float64), (3, 2, 0, 1))
    return k.reshape(k.shape[0], -1)


def authors_penalty(model, depth, include_unique):
    """R as in the authors' training loop, summed over the 3 CIFAR stages."""
    n = (depth - 2) // 6
    sim, cnt = 0.0, 0
    for g in (1, 2, 3):
        owner = model.get_layer(f"stage{g}_basis")
        shared = [_torch_rows(b) for b in owner.bases]
        n_shared = sum(len(s) for s in shared)
        rows = list(shared)
        uniques = []
        if include_unique:
            for i in range(2, n + 1):
                for j in (1, 2):
                    conv = model.get_layer(f"stage{g}_block{i}_conv{j}")
                    uniques.append(_torch_rows(conv.unique_kernel))
            rows += uniques
        b = np.concatenate(rows, axis=0)
        d = (b @ b.T - np.eye(len(b))) ** 2
        if include_unique:
            sim += d[:n_shared, :].sum()
            cnt += n_shared * len(b)
            start = n_shared
            for u in uniques:
                sim += d[start : start + len(u), start : start + len(u)].sum()
                cnt += len(u) ** 2
                start += len(u)
        else:
            sim += d[:n_shared, :n_shared].sum()
            cnt += n_shared**2
    return sim / cnt


def _perturb(model, rng):
    for w in model.trainable_weights:
        if w.path.endswith(("basis", "basis_1", "basis_2", "unique_kernel")):
            w.assign(np.array(w) + rng.normal(0, 0.05, w.shape).astype("float32"))


@pytest.mark.parametrize("sharing", ["single", "double"])
@pytest.mark.parametrize("include_unique", [False, True])
def test_penalty_equals_authors_formula(sharing, include_unique):
    rng = np.random.RandomState(0)
    model = sb_keras.ResNet(
        depth=14,
        share=True,
        shared_rank=8,
        unique_rank=2,
        sharing=sharing,
        orthogonality=10.0,
        orthogonality_include_unique=include_unique,
    )
    _perturb(model, rng)
    expected = 10.0 * authors_penalty(model, 14, include_unique)
    assert expected > 1e-3  # the perturbation makes the test meaningful

    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    model(x)
    added = sum(float(v) for v in model.losses)
    np.testing.assert_allclose(added, expected, rtol=1e-5)
    np.testing.assert_allclose(sb_keras.orthogonality_loss(model), expected, rtol=1e-5)
    # One term per owner: the 3 bases, plus one per decomposed layer with
    # unique rows in the CIFAR-10 variant.
    owners = 3 + (3 * 2 * 1 if include_unique else 0)
    assert len(model.losses) == owners


def test_penalty_added_once_per_step_in_evaluate_and_fit():
    """evaluate() loss == cross entropy + lambda * R exactly once, whatever
    the number of layers that use each basis."""
    rng = np.random.RandomState(1)
    model = sb_keras.ResNet(depth=20, share=True, sharing="single")
    _perturb(model, rng)
    # Small logits keep the cross entropy near log(10), so float32 rounding
    # of the CE stays far below the size of the penalty.
    head = model.get_layer("predictions")
    head.kernel.assign(np.array(head.kernel) * 1e-4)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = rng.randint(0, 10, 8)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    logits = np.array(model(x, training=False), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[np.arange(8), y].mean()
    penalty = 10.0 * authors_penalty(model, 20, False)
    assert penalty > 1e-2
    loss = model.evaluate(x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(loss, ce + penalty, rtol=1e-5)

    # In fit (lr 0): the logged loss minus the training-mode CE is the penalty.
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    logits_t = np.array(model(x, training=True), np.float64)
    logp_t = logits_t - np.log(np.exp(logits_t).sum(-1, keepdims=True))
    ce_t = -logp_t[np.arange(8), y].mean()
    np.testing.assert_allclose(history.history["loss"][0], ce_t + penalty, rtol=1e-5)


def test_lambda_zero_adds_nothing():
    model = sb_keras.ResNet(depth=14, share=True, orthogonality=0.0)
    model(np.zeros((1, 32, 32, 3), "float32"))
    assert model.losses == []


def test_orthogonality_report_per_basis():
    model = sb_keras.ResNet(depth=14, share=True, sharing="double")
    report = sb_keras.orthogonality(model)
    assert sorted(report) == ["stage1_basis", "stage2_basis", "stage3_basis"]
    assert max(report.values()) < 1e-10  # orthogonal at init
    layer = model.get_layer("stage2_basis")
    layer.bases[0].assign(2.0 * np.array(layer.bases[0]))
    rows = np.concatenate([_torch_rows(b) for b in layer.bases], axis=0)
    expected = ((rows @ rows.T - np.eye(len(rows))) ** 2).mean()
    np.testing.assert_allclose(
        sb_keras.orthogonality(model)["stage2_basis"], expected, rtol=1e-5
    )


def test_regularizer_function_docstring_case():
    q, _ = np.linalg.qr(np.random.RandomState(0).normal(size=(36, 4)))
    basis = q.reshape(3, 3, 4, 4).astype("float32")
    assert float(sb_keras.regularizers.orthogonality_penalty([basis])) < 1e-10
    assert float(sb_keras.regularizers.orthogonality_penalty([2 * basis])) > 1.0
