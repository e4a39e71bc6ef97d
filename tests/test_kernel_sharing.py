"""`compression.kernel_sharing`: one whole kernel for a group of layers."""

import numpy as np
import pytest

from sb_keras.compression import kernel_sharing


def _group(rng, filters=24, dim=40, layers=4, noise=0.0):
    """Layers whose rows are a permuted, per-row scaled copy of one kernel."""
    shared = rng.normal(size=(filters, dim))
    mats = []
    for _ in range(layers):
        scales = rng.normal(size=filters)
        perm = rng.permutation(filters)
        w = np.empty((filters, dim))
        w[perm] = scales[:, None] * shared
        mats.append(w + noise * rng.normal(size=w.shape))
    return mats


@pytest.mark.parametrize("whitened", [False, True])
def test_recovers_permuted_scaled_copies_exactly(whitened):
    rng = np.random.default_rng(0)
    mats = _group(rng)
    second = None
    if whitened:
        a = rng.normal(size=(40, 40))
        second = a @ a.T / 40
    shared, scales, orders, info = kernel_sharing.share_rows(mats, second)
    assert info["initial_objective_error"] > 0.3  # identity orders are far off
    for w, order, c in zip(mats, orders, scales):
        np.testing.assert_allclose(w[order], c[:, None] * shared, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(shared, axis=1), 1.0)
    assert info["relative_error"] < 1e-12


def test_error_is_optimal_for_fixed_orders_and_decreases():
    rng = np.random.default_rng(1)
    mats = _group(rng, noise=0.3)
    shared, scales, orders, info = kernel_sharing.share_rows(mats)
    unaligned = kernel_sharing.share_rows(mats, align=False)[3]
    assert info["objective_error"] < unaligned["objective_error"]
    # Given the orders, no other unit row / scale does better (rank-one SVD):
    # perturbing the shared rows raises the error.
    base = sum(
        np.sum((w[o] - c[:, None] * shared) ** 2)
        for w, o, c in zip(mats, orders, scales)
    )
    moved = shared + 1e-3 * rng.normal(size=shared.shape)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    worse = sum(
        np.sum((w[o] - np.sum(w[o] * moved, 1, keepdims=True) * moved) ** 2)
        for w, o in zip(mats, orders)
    )
    assert worse > base
    np.testing.assert_allclose(
        np.sqrt(base / sum(np.sum(w * w) for w in mats)),
        info["relative_error"],
        rtol=1e-9,
    )


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="Received: shapes"):
        kernel_sharing.share_rows([np.ones((4, 9)), np.ones((4, 8))])


@pytest.mark.parametrize("whitened", [False, True])
def test_fixed_order_error_is_share_rows_without_alignment(whitened):
    rng = np.random.default_rng(5)
    mats = _group(rng, noise=0.2)
    second = None
    if whitened:
        a = rng.normal(size=(40, 40))
        second = a @ a.T / 40
    expected = kernel_sharing.share_rows(mats, second, align=False)[3]
    np.testing.assert_allclose(
        kernel_sharing.fixed_order_error(mats, second),
        expected["objective_error"],
        rtol=1e-6,
    )
    aligned = kernel_sharing.share_rows(mats, second)
    assert kernel_sharing.fixed_order_error(
        [w[o] for w, o in zip(mats, aligned[2])], second
    ) == pytest.approx(aligned[3]["objective_error"], rel=1e-6)
