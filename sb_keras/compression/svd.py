"""Shared plus unique low-rank bases of a group of weight matrices (NumPy).

The problem: given the matrices ``W_l`` (``F_l x D``, one filter per row) of
the layers of a group, find a shared basis ``B`` (``S x D``, orthonormal
rows) and per-layer unique bases ``U_l`` (``u x D``) minimising

    f(B) = sum_l || W_l (I - P_[B; U_l]) ||_F^2,

where ``P_X`` is the orthogonal projector onto the row space of ``X``; the
coefficients are then the projections ``A_l = W_l [U_l; B]^T``.

For a fixed ``B`` the best ``U_l`` is exact and cheap: the top-``u`` right
singular vectors of the residual ``W_l (I - P_B)`` (Eckart-Young), which are
orthogonal to ``B``. So ``f`` is a function of the subspace ``span(B)`` alone
(a point of the Grassmann manifold) and its gradient has a closed form: with
``U_l`` at its optimum (envelope theorem), moving ``B`` along a tangent
``Delta`` (``Delta B^T = 0``) changes ``f`` by ``<Delta, G>``, with

    G = -2 sum_l (W_l B^T)^T R_l,    R_l = W_l (I - P_B - P_U_l),

which is already a tangent vector. `shared_bases` minimises ``f`` with a
Riemannian L-BFGS (two-loop recursion, vector transport by projection,
polar retraction, Armijo backtracking), started from the top-``S`` right
singular vectors of the stacked ``W_l``.

Why not alternate: "``U_l`` from the residual, then ``B`` = top-``S`` of the
stack minus the unique parts" is a majorise-minimise scheme, monotone but
linearly convergent with a rate set by how unevenly the layers use the basis
directions; on trained filters it needs hundreds of rounds (`alternate` is
kept as the reference: on the folded authors' ResNet56-S16U1, stage 1, it is
at 6e-4 relative error after 100 rounds, stage 2 at 5e-2). The L-BFGS,
preconditioned by the ``B``-block of the Hessian and run in the numerical
row space of the stack, reaches the float32 floor of those kernels (2e-8)
in 47-66 iterations per stage; on exactly structured float64 matrices it
reaches 1e-9 in under 30 (tested). Where the layers have fewer filters
than ``S + u`` (the authors' double-sharing ResNet32: 16 filters, S16U1)
the exact solutions are not isolated and it is slower.

Stopping: a stall (``patience`` iterations lowering ``f`` by less than
``tol`` times its value) is a minimum, the round-off floor of the data, or a
plateau. On the authors' ResNet32 folded without rebalancing (float32
``basis x scale x coefficients``, exact at S16U1), stage 3 conv1 (64 filters
per layer, S64U4) stalls for about 60 iterations at a relative error of
4.18e-4 with a gradient 2.8e-5 times ``sqrt(f * sum ||W_l||^2)`` (1e-1 at
the start): a near-stationary point, so no rule on the gradient or on a
short window of ``f`` tells it from a minimum. Hence: a stall at a relative
error between ``floor`` (1e-6, far above the float32 rounding of a kernel,
2e-8) and ``ceiling`` (1e-2: a near-exact decomposition) restarts the L-BFGS
from the shared basis moved by a random tangent step (``escape_size`` 0.3
per row, seeded); the iteration stops once ``escapes`` (2) restarts in a row
have not lowered the stalled value by ``escape_gain`` (10 %), and the best
basis seen is returned. Measured on that group: the restart leaves the
plateau for each of 5 seeds (relative error 1.6e-7 to 2.0e-6 at the
500-iteration cap; with steps of 1e-3 or 1e-2 it fell back onto the plateau,
with 0.1 in 2 of 4 seeds), and the whole model round-trips to 2.7e-5 in the
logits (4.2e-4 relative error and 2.7e-2 in the logits without restarts; the
rebalanced kernels of `sb_keras.unshare` do not stall there). Stalls of
lossy approximations are not restarted: there, restarts never lowered the
error in the cases tried (the folded ResNet56 at S8U1 and S4U1, the ResNet32
at S8U1, plain; a random ResNet-20 at S4U1, whitened) and cost 2-4x the
iterations.
"""

import numpy as np


def split_unique(mats, basis, unique_rank):
    """Best unique bases for a fixed shared basis, and the residuals.

    Args:
        mats: list of ``(F_l, D)`` float64 arrays.
        basis: ``(S, D)`` array with orthonormal rows.
        unique_rank: ``u``.

    Returns:
        ``(uniques, residuals)``: lists of ``(u, D)`` arrays (orthonormal
        rows, orthogonal to ``basis``) and of ``(F_l, D)`` residuals
        ``W_l (I - P_B - P_U_l)``.
    """
    uniques, residuals = [], []
    for w in mats:
        m = w - (w @ basis.T) @ basis
        if unique_rank:
            v = _top_right_vectors(m, unique_rank)
            if v.shape[0] < unique_rank:  # fewer filters than u: pad
                v = _complete(np.vstack([basis, v]), unique_rank - v.shape[0], v)
            m = m - (m @ v.T) @ v
        else:
            v = np.zeros((0, w.shape[1]))
        uniques.append(v)
        residuals.append(m)
    return uniques, residuals


def _top_right_vectors(m, count):
    """Top-``count`` right singular vectors of ``m`` (rows), via its Gram.

    The eigenvectors of the small ``F x F`` Gram matrix ``m m^T`` give the
    right singular vectors as ``m^T e / sigma``; re-orthonormalised by a QR.
    Many times faster than an SVD of ``m`` when BLAS threads compete.
    """
    gram = m @ m.T
    values, vectors = np.linalg.eigh(gram)
    keep = values[::-1][:count] > 1e-300
    e = vectors[:, ::-1][:, :count][:, keep]
    v = m.T @ e
    if v.shape[1] == 0:
        return v.T
    q, _ = np.linalg.qr(v)
    return q.T


def _complete(used, count, rows):
    """``rows`` plus ``count`` orthonormal rows orthogonal to ``used``."""
    q, _ = np.linalg.qr(used.T, mode="complete")
    return np.vstack([rows, q[:, used.shape[0] : used.shape[0] + count].T])


def objective(mats, basis, unique_rank):
    """``(f, gradient)`` of the module docstring at ``basis``."""
    return _evaluate(mats, basis, unique_rank)[:2]


def _evaluate(mats, basis, unique_rank):
    """``(f, gradient, M)`` with ``M = sum_l A_l^T A_l``, ``A_l = W_l B^T``."""
    _, residuals = split_unique(mats, basis, unique_rank)
    value = 0.0
    grad = np.zeros_like(basis)
    metric = np.zeros((basis.shape[0], basis.shape[0]))
    for w, r in zip(mats, residuals):
        a = w @ basis.T
        value += float(np.sum(r * r))
        grad -= 2.0 * a.T @ r
        metric += a.T @ a
    return value, grad, metric


def _preconditioner(metric):
    """``q -> (2 M)^-1 q``: the Hessian of ``f`` in ``B`` with ``A_l`` fixed.

    The coefficients ``A_l`` weight the basis directions very unevenly in a
    trained network (the conditioning that makes plain gradient methods
    and the alternation slow); this block of the Hessian undoes it.
    """
    ridge = 1e-12 * max(float(np.trace(metric)) / len(metric), 1e-300)
    chol = np.linalg.cholesky(metric + ridge * np.eye(len(metric)))

    def apply(q):
        z = np.linalg.solve(chol, q)
        return 0.5 * np.linalg.solve(chol.T, z)

    return apply


def _polar(x):
    """The matrix with orthonormal rows closest to ``x`` (same row space)."""
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def _project(basis, v):
    """Tangent projection at ``basis``: rows of ``v`` made orthogonal to it."""
    return v - (v @ basis.T) @ basis


def _top_rows(mats, rank):
    stack = np.vstack(mats)
    _, _, vt = np.linalg.svd(stack, full_matrices=False)
    basis = vt[:rank]
    if basis.shape[0] < rank:
        basis = _complete(basis, rank - basis.shape[0], basis)
    return basis


def _check_ranks(mats, shared_rank, unique_rank):
    dims = {w.shape[1] for w in mats}
    if len(dims) != 1:
        raise ValueError(
            f"All matrices of a group need the same row length. Received: {dims}"
        )
    (dim,) = dims
    if shared_rank < 1 or unique_rank < 0 or shared_rank + unique_rank > dim:
        raise ValueError(
            f"Need 1 <= shared_rank and shared_rank + unique_rank <= {dim} (the "
            "filter dimension). Received: "
            f"shared_rank={shared_rank}, unique_rank={unique_rank}"
        )
    return dim


def shared_bases(
    mats,
    shared_rank,
    unique_rank,
    max_iter=500,
    tol=1e-6,
    patience=5,
    memory=20,
    precondition=True,
    rank_tol=1e-6,
    atol=1e-9,
    escapes=2,
    escape_size=0.3,
    escape_gain=0.1,
    floor=1e-6,
    ceiling=1e-2,
    seed=0,
):
    """Shared and unique bases of a group of weight matrices.

    Args:
        mats: list of ``(F_l, D)`` arrays (one filter per row).
        shared_rank: ``S``, rows of the shared basis.
        unique_rank: ``u``, rows of each unique basis.
        max_iter: most L-BFGS iterations.
        tol: relative-change rule of a stall: ``patience`` iterations
            together lower the objective by less than ``tol`` times its
            value. A stall at a relative error ``sqrt(f / sum ||W_l||^2)``
            outside ``(floor, ceiling)`` stops the iteration; inside, the L-BFGS is
            restarted from a perturbed basis (see the module docstring),
            until ``escapes`` restarts in a row gained nothing. The
            iteration also stops at ``max_iter``, when the relative error is
            below ``atol``, or when the line search cannot lower ``f``.
            ``tol=0`` runs to ``max_iter``.
        patience: iterations over which the relative change is measured.
        memory: pairs kept by the L-BFGS two-loop recursion.
        precondition: scale the search direction by the inverse of the
            ``B``-block of the Hessian (see `_preconditioner`).
        rank_tol: singular values of the stacked matrices below ``rank_tol``
            times the largest are dropped before the iteration (the problem
            is solved in the remaining row space; ``info["dimension"]``).
            Float32 kernels that are exactly low-rank have a noise floor
            near 1e-7; what is dropped is counted in the final error.
        atol: relative error at which the decomposition counts as exact
            (default far below the float32 precision of a kernel).
        escapes: restarts in a row without gain before a stall stops the
            iteration (0: the first stall stops it).
        escape_size: norm per row of the random tangent step of a restart.
        escape_gain: relative decrease of the stalled objective that counts
            as a gain.
        floor: relative error below which a stall is taken as the round-off
            floor of the data (no restart).
        ceiling: relative error above which a stall is taken as the minimum
            of a lossy approximation (no restart).
        seed: seed of the restarts' random steps.

    Returns:
        ``(basis, uniques, info)``: the ``(S, D)`` shared basis and the list
        of ``(u, D)`` unique bases (all rows orthonormal, unique rows
        orthogonal to the shared ones), and a dict with ``iterations``,
        ``relative_error`` (``sqrt(f / sum ||W_l||^2)``),
        ``initial_relative_error`` (the one-SVD start), ``escapes``
        (restarts), ``history`` (relative error per iteration) and
        ``gradient_norms`` (Frobenius norm of the gradient per iteration).
    """
    mats = [np.asarray(w, np.float64) for w in mats]
    dim = _check_ranks(mats, shared_rank, unique_rank)
    energy = sum(float(np.sum(w * w)) for w in mats) or 1.0
    # Work in the numerical row space of the stack (no loss: projecting a
    # basis onto the space that holds every filter cannot raise f).
    _, sing, vt = np.linalg.svd(np.vstack(mats), full_matrices=False)
    keep = int(np.sum(sing > rank_tol * sing[0])) if sing.size and sing[0] > 0 else 0
    keep = min(dim, max(keep, shared_rank + unique_rank))
    space = vt[:keep] if keep <= vt.shape[0] else _complete(vt, keep - len(vt), vt)
    full_mats, mats = mats, [w @ space.T for w in mats]
    basis = np.eye(keep)[:shared_rank]  # the top-S right singular vectors
    f, g, metric = _evaluate(mats, basis, unique_rank)
    history = [np.sqrt(f / energy)]
    gnorms = [float(np.linalg.norm(g))]
    pairs = []
    it = 0
    values = [f]
    rng = np.random.RandomState(seed)
    best = (f, basis)
    best_stall, failures, escaped = None, 0, 0
    while it < max_iter and f > atol**2 * energy:
        it += 1
        d = -_two_loop(g, pairs, _preconditioner(metric) if precondition else None)
        slope = float(np.sum(d * g))
        if slope >= 0:  # not a descent direction: restart
            pairs, d = [], -g
            slope = -float(np.sum(g * g))
        step, accepted = 1.0, None
        if not pairs and not precondition:
            step = min(1.0, 1.0 / np.sqrt(max(-slope, 1e-300)))
        for _ in range(40):
            trial = _polar(basis + step * d)
            f_new, g_new, m_new = _evaluate(mats, trial, unique_rank)
            if f_new <= f + 1e-4 * step * slope:
                accepted = (trial, f_new, g_new, m_new)
                break
            step *= 0.5
        if accepted is None:
            break
        trial, f_new, g_new, metric = accepted
        s = _project(trial, step * d)
        y = g_new - _project(trial, g)
        pairs = [(_project(trial, a), _project(trial, b)) for a, b in pairs]
        if float(np.sum(s * y)) > 1e-12 * np.sqrt(float(np.sum(s * s) * np.sum(y * y))):
            pairs.append((s, y))
            pairs = pairs[-memory:]
        basis, f, g = trial, f_new, g_new
        values.append(f)
        history.append(np.sqrt(max(f, 0.0) / energy))
        gnorms.append(float(np.linalg.norm(g)))
        if f < best[0]:
            best = (f, basis)
        if len(values) > patience and values[-1 - patience] - f <= tol * f:
            if not floor**2 * energy < f < ceiling**2 * energy:
                break
            if best_stall is None or f < (1 - escape_gain) * best_stall:
                best_stall, failures = f, 0
            else:
                failures += 1
            if failures >= escapes:
                break
            # A stall above the floor may be a saddle point (a vanishing
            # gradient, as on the ResNet32 plateau): perturb and go on.
            escaped += 1
            basis = _perturb(basis, escape_size, rng)
            f, g, metric = _evaluate(mats, basis, unique_rank)
            pairs, values = [], [f]
    f, basis = min((f, basis), best, key=lambda x: x[0])
    uniques, _ = split_unique(mats, basis, unique_rank)
    basis = basis @ space
    uniques = [v @ space for v in uniques]
    _, residuals = split_unique(full_mats, basis, 0)
    f = sum(float(np.sum((r - (r @ v.T) @ v) ** 2)) for r, v in zip(residuals, uniques))
    info = {
        "iterations": it,
        "escapes": escaped,
        "dimension": keep,
        "relative_error": float(np.sqrt(max(f, 0.0) / energy)),
        "initial_relative_error": float(history[0]),
        "history": [float(h) for h in history],
        "gradient_norms": gnorms,
    }
    return basis, uniques, info


def _perturb(basis, size, rng):
    """``basis`` moved by a random tangent step of norm ``size`` per row."""
    step = _project(basis, rng.standard_normal(basis.shape))
    step *= size * np.sqrt(len(basis)) / max(np.linalg.norm(step), 1e-300)
    return _polar(basis + step)


def _two_loop(g, pairs, precondition=None):
    """L-BFGS inverse-Hessian times ``g`` from the stored ``(s, y)`` pairs."""
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        rho = 1.0 / float(np.sum(y * s))
        a = rho * float(np.sum(s * q))
        q -= a * y
        alphas.append((rho, a, s, y))
    if precondition is not None:
        q = precondition(q)
    elif pairs:
        s, y = pairs[-1]
        q *= float(np.sum(s * y)) / float(np.sum(y * y))
    for rho, a, s, y in reversed(alphas):
        b = rho * float(np.sum(y * q))
        q += (a - b) * s
    return q


def alternate(mats, shared_rank, unique_rank, rounds=100):
    """The reference alternation (slow): unique from residual, shared by SVD.

    Each round sets ``U_l`` to the top-``u`` of ``W_l (I - P_B)`` and ``B``
    to the top-``S`` right singular vectors of the stacked
    ``W_l (I - P_U_l)``.

    Returns:
        ``(basis, uniques, history)`` with the relative error per round.
    """
    mats = [np.asarray(w, np.float64) for w in mats]
    _check_ranks(mats, shared_rank, unique_rank)
    energy = sum(float(np.sum(w * w)) for w in mats) or 1.0
    basis = _top_rows(mats, shared_rank)
    history = []
    for _ in range(rounds):
        uniques, residuals = split_unique(mats, basis, unique_rank)
        history.append(np.sqrt(sum(float(np.sum(r * r)) for r in residuals) / energy))
        basis = _top_rows(
            [w - (w @ v.T) @ v for w, v in zip(mats, uniques)], shared_rank
        )
    uniques, _ = split_unique(mats, basis, unique_rank)
    return basis, uniques, history


def _orth_rows(x):
    """Orthonormal rows spanning the row space of ``x`` (QR)."""
    if x.shape[0] == 0:
        return x
    q, _ = np.linalg.qr(x.T)
    return q.T


def _root(second_moment, ridge):
    """``(L, L^-1)``: symmetric square root of ``second_moment`` and inverse.

    Eigenvalues below ``ridge`` times their mean are raised to it, so a
    direction the calibration inputs never excite still has a small weight.
    """
    sym = 0.5 * (second_moment + second_moment.T)
    values, vectors = np.linalg.eigh(sym)
    floor = ridge * max(float(np.mean(values)), 1e-300)
    values = np.maximum(values, floor)
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _check_ranks_per_layer(mats, unique_rank):
    dim = mats[0].shape[1]
    if unique_rank < 1 or unique_rank > dim:
        raise ValueError(
            f"Without a shared basis, need 1 <= unique_rank <= {dim} (the "
            f"filter size). Received: shared_rank=0, unique_rank={unique_rank}"
        )


def decompose(mats, shared_rank, unique_rank, second_moment=None, ridge=1e-6, **kw):
    """Shared/unique bases and coefficients of a group, optionally whitened.

    Without ``second_moment`` ("plain") this is `shared_bases` on ``W_l``.
    With it ("whitened"), the objective weights each filter's error by the
    inputs it sees: ``sum_l ||(W_l - What_l) L||^2`` with ``L L = Sigma``,
    the pooled second moment of the layers' input patches, i.e. the
    expected squared output error ``E ||(W_l - What_l) x||^2`` over the
    calibration patches ``x``. It is solved as the plain problem on
    ``W_l L``; its bases are orthonormal in the whitened metric (``B Sigma
    B^T = I``) and are mapped back by ``L^-1``.

    In both cases the returned bases are then re-orthonormalised in the
    plain metric (same row spaces, so the same approximation): the shared
    rows orthonormal, each unique basis orthonormal and orthogonal to them,
    so the orthogonality penalty of sb_keras starts at round-off level.

    Args:
        mats: list of ``(F_l, D)`` arrays.
        shared_rank: ``S``; ``0`` gives each layer its own truncated SVD
            (no shared basis; the per-layer low-rank baseline).
        unique_rank: ``u``.
        second_moment: optional ``(D, D)`` input second moment.
        ridge: relative eigenvalue floor of ``second_moment``.
        **kw: passed to `shared_bases`.

    Returns:
        ``(basis, uniques, coefficients, info)``: ``(S, D)``, a list of
        ``(u, D)``, a list of ``(F_l, u + S)`` (columns: unique, then shared,
        the order of `BasisConv2D`) such that ``coefficients[l] @
        [uniques[l]; basis]`` is the approximation of ``W_l``, and the info
        of `shared_bases` plus ``plain_relative_error`` (unweighted).
    """
    mats = [np.asarray(w, np.float64) for w in mats]
    if second_moment is None:
        root = inv = None
        work = mats
    else:
        root, inv = _root(np.asarray(second_moment, np.float64), ridge)
        work = [w @ root for w in mats]
    if shared_rank == 0:
        # No shared basis: each layer's own truncated SVD (Eckart-Young).
        _check_ranks_per_layer(work, unique_rank)
        basis_w = np.zeros((0, work[0].shape[1]))
        uniques_w, residuals = split_unique(work, basis_w, unique_rank)
        num = sum(float(np.sum(r * r)) for r in residuals)
        den = sum(float(np.sum(w * w)) for w in work) or 1.0
        error = float(np.sqrt(num / den))
        info = {
            "relative_error": error,
            "initial_relative_error": error,
            "iterations": 0,
            "escapes": 0,
        }
    else:
        basis_w, uniques_w, info = shared_bases(work, shared_rank, unique_rank, **kw)
    approx = []
    for w, v in zip(work, uniques_w):
        a = (w @ basis_w.T) @ basis_w + (w @ v.T) @ v
        approx.append(a if inv is None else a @ inv)
    basis = _orth_rows(basis_w if inv is None else basis_w @ inv)
    uniques, coefficients = [], []
    for v, a in zip(uniques_w, approx):
        v = v if inv is None else v @ inv
        v = _orth_rows(v - (v @ basis.T) @ basis)
        uniques.append(v)
        coefficients.append(a @ np.vstack([v, basis]).T)
    num = sum(float(np.sum((w - a) ** 2)) for w, a in zip(mats, approx))
    den = sum(float(np.sum(w * w)) for w in mats) or 1.0
    info["plain_relative_error"] = float(np.sqrt(num / den))
    return basis, uniques, coefficients, info
