"""One whole kernel shared by a group of layers, each followed by its own BN.

The shared models whose layers share a complete kernel rather than a basis
(the bottleneck ResNets' 3x3 and last 1x1 convolutions, MobileNetV2's
expansion and projection 1x1s; method §1.6) keep a BatchNorm per layer after
the shared convolution. A BN absorbs any per-filter scale of its input (in
inference: moving mean x ``c``, variance x ``c**2``, gamma corrected for the
epsilon; `rebalance._rescale_bn`), and a layer's hidden channels (a filter,
its BN and the next layer's input channel) can be permuted without changing
what the block computes. So layer ``l`` with filter matrix ``W_l`` (rows:
filters) is represented exactly by a shared ``K`` when

    ``W_l[order_l] == diag(c_l) K``

for a permutation ``order_l`` and scales ``c_l`` (any sign: a negative one
flips the sign of the BN's gamma). `share_rows` finds ``K``, ``c_l`` and
``order_l`` minimising ``sum_l ||W_l[order_l] - diag(c_l) K||^2`` (in the
whitened metric ``||X L||`` with ``L L = Sigma`` when the inputs' second
moment ``Sigma`` is given: the expected squared output error):

* given the orders, each shared row is the top right singular vector of the
  ``(layers, D)`` stack of the rows matched to it (Eckart-Young, rank one),
  the scales its projections;
* given ``K``, each layer's order is a linear assignment maximising the
  energy of its rows that ``K``'s rows explain (scipy's
  ``linear_sum_assignment``);

alternated from the first layer's own rows. Neither step raises the error,
so it decreases monotonically and stops when the orders repeat (exact
solutions, e.g. a plain model unshared from a shared one with its hidden
channels permuted, are found in one round).
"""

import numpy as np


def _linear_sum_assignment(cost):
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Aligning the channels of layers that will share one kernel needs "
            "scipy: pip install 'sb_keras[compress]' (or pip install scipy)."
        ) from e
    return linear_sum_assignment(cost)


def _root(second_moment, ridge):
    from sb_keras.compression.svd import _root as root

    return root(np.asarray(second_moment, np.float64), ridge)


def gains(mat, shared):
    """Energy of each row of ``mat`` explained by each row of ``shared``.

    Args:
        mat: ``(F, D)`` a layer's rows (already in the metric's coordinates).
        shared: ``(F, D)`` the shared rows (same coordinates).

    Returns:
        ``(F, F)``: entry ``[o, j]`` is ``<K_o, W_j>**2 / ||K_o||**2``, what
        assigning layer row ``j`` to shared row ``o`` removes from the error.
    """
    norms = np.sum(shared * shared, axis=1, keepdims=True)
    return (shared @ mat.T) ** 2 / np.maximum(norms, 1e-300)


def assign(gain):
    """The order maximising the total gain: ``order[o]`` is the layer row
    matched to shared row ``o``."""
    rows, cols = _linear_sum_assignment(-np.asarray(gain, np.float64))
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return order


def fit(mats, orders=None):
    """Shared rows and per-layer scales for fixed orders (one SVD per row).

    Args:
        mats: list of ``(F, D)`` arrays, all of one shape.
        orders: list of ``(F,)`` permutations (None: identities).

    Returns:
        ``(shared, scales, residual)``: ``(F, D)`` unit rows, a list of
        ``(F,)`` scales and the squared error ``sum_l ||W_l[order_l] -
        diag(c_l) K||^2``.
    """
    f = mats[0].shape[0]
    if orders is None:
        orders = [np.arange(f)] * len(mats)
    stacked = np.stack([w[o] for w, o in zip(mats, orders)], axis=1)  # (F, n, D)
    # Top right singular vector of each (n, D) stack from its n x n Gram
    # matrix: the same vector, ~10x faster than a batched SVD for n << D.
    values, vectors = np.linalg.eigh(np.einsum("fnd,fmd->fnm", stacked, stacked))
    shared = np.einsum("fn,fnd->fd", vectors[:, :, -1], stacked)
    norms = np.linalg.norm(shared, axis=1, keepdims=True)
    shared = shared / np.where(norms > 0, norms, 1.0)
    scales = np.einsum("fnd,fd->nf", stacked, shared)
    # A deterministic sign: the scales sum to a non-negative number.
    sign = np.where(scales.sum(axis=0) < 0, -1.0, 1.0)
    shared, scales = shared * sign[:, None], scales * sign[None, :]
    residual = float(np.sum(stacked * stacked) - np.sum(scales * scales))
    return shared, list(scales), max(residual, 0.0)


def fixed_order_error(mats, second_moment=None):
    """`share_rows`'s ``objective_error`` with the given orders, no alignment.

    Computed without a square root of ``second_moment`` (each filter's
    ``(layers, layers)`` Gram matrix in the metric, its top eigenvalue being
    what one shared row explains), so it is cheap for large filters; it
    differs from `share_rows` only by the ridge there.

    Args:
        mats: list of ``(F, D)`` filter matrices, rows in their given order.
        second_moment: optional ``(D, D)`` second moment of the inputs.

    Returns:
        The relative error ``sqrt(min sum_l ||(W_l - diag(c_l) K) L||^2 /
        sum_l ||W_l L||^2)`` (``L L = second_moment``; identity if None).
    """
    stacked = np.stack([np.asarray(w, np.float64) for w in mats], axis=1)
    weighted = stacked if second_moment is None else stacked @ second_moment
    gram = np.einsum("fnd,fmd->fnm", stacked, weighted)
    gram = 0.5 * (gram + np.swapaxes(gram, 1, 2))
    total = float(np.trace(gram, axis1=1, axis2=2).sum())
    explained = float(np.linalg.eigvalsh(gram)[:, -1].sum())
    return float(np.sqrt(max(total - explained, 0.0) / (total or 1.0)))


def share_rows(mats, second_moment=None, align=True, max_rounds=100, ridge=1e-6):
    """One shared kernel for a group: shared rows, scales and orders.

    Args:
        mats: list of ``(F, D)`` filter matrices (rows: filters) of the
            layers that will share, all of one shape.
        second_moment: optional ``(D, D)`` second moment of the layers'
            inputs (pooled); the error is then weighted by it.
        align: search each layer's row order (its hidden channels are
            permutable); False keeps the given order.
        max_rounds: most alternations of fit and assignment.
        ridge: relative eigenvalue floor of ``second_moment``.

    Returns:
        ``(shared, scales, orders, info)`` with ``W_l[orders[l]] ~=
        scales[l][:, None] * shared``; ``shared`` has unit rows (plain
        metric), ``info`` holds ``relative_error`` (plain metric),
        ``objective_error`` (the method's metric), ``rounds`` and
        ``initial_objective_error`` (identity orders).
    """
    mats = [np.asarray(w, np.float64) for w in mats]
    shapes = {w.shape for w in mats}
    if len(shapes) != 1:
        raise ValueError(
            "Layers that share one kernel need one kernel shape. "
            f"Received: shapes {sorted(shapes)}"
        )
    inv = None
    work = mats
    if second_moment is not None:
        root, inv = _root(second_moment, ridge)
        work = [w @ root for w in mats]
    total = sum(float(np.sum(w * w)) for w in work) or 1.0
    orders = [np.arange(mats[0].shape[0]) for _ in mats]
    shared, scales, residual = fit(work, orders)
    initial = residual
    rounds = 0
    while align and rounds < max_rounds:
        rounds += 1
        new = [assign(gains(w, shared)) for w in work]
        if all(np.array_equal(a, b) for a, b in zip(new, orders)):
            break
        candidate = fit(work, new)
        if candidate[2] > residual * (1 + 1e-12):
            break  # cannot happen in exact arithmetic; guards round-off
        orders = new
        shared, scales, residual = candidate
    if inv is not None:
        shared = shared @ inv
    norms = np.linalg.norm(shared, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    shared = shared / norms[:, None]
    scales = [c * norms for c in scales]
    num = sum(
        float(np.sum((w[o] - c[:, None] * shared) ** 2))
        for w, o, c in zip(mats, orders, scales)
    )
    den = sum(float(np.sum(w * w)) for w in mats) or 1.0
    info = {
        "relative_error": float(np.sqrt(num / den)),
        "objective_error": float(np.sqrt(residual / total)),
        "initial_objective_error": float(np.sqrt(initial / total)),
        "rounds": rounds,
    }
    return shared, scales, orders, info


def copy_into_plain(model, target):
    """Sets ``target`` (a plain twin) from a shared ``model``; exact.

    Every layer is copied by name; a `SharedConv2D` user of ``model`` gives
    its twin `Conv2D` a copy of the kernel it is fed (the `FilterBasis`
    upstream of its second input in the graph).
    """
    from sb_keras.layers import SharedConv2D

    for layer in target.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        if isinstance(source, SharedConv2D):
            owner = source._inbound_nodes[0].input_tensors[1]._keras_history.operation
            layer.set_weights([np.asarray(owner.bases[0])])
        else:
            layer.set_weights(source.get_weights())
    return target
