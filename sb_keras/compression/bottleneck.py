"""Compressing a trained plain bottleneck ResNet into its shared model.

The shared bottleneck `sb_keras.ResNet`s (50/101/152; method §1.6) share
whole kernels, without ranks: in every non-first block of a stage the 3x3
``conv2`` (``p -> p``) convolves with one stage-wide tensor, and with
``sharing="double"`` the last 1x1 ``conv3`` (``p -> 4p``) too; every BN and
``conv1`` stay per block. A trained plain network has no reason to agree
from block to block, but two symmetries of a block keep what it computes:

* its hidden channels can be permuted: the ones after ``conv1`` (a
  ``conv1`` filter, its ``bn1`` channel and a ``conv2`` input channel, i.e.
  9 entries of each ``conv2`` filter) and the ones after ``conv2`` (a
  ``conv2`` filter, its ``bn2`` channel and a ``conv3`` input column);
* a BN absorbs any per-filter scale of the conv before it (any sign).

So block ``l``'s ``conv2`` filter matrix ``W_l`` (rows: filters, flattened
``(3, 3, C)``) is represented by the shared ``K`` up to the error of
``W_l[Q_l][:, P_l] ~= diag(c_l) K`` (``Q_l``: output order, ``P_l``: input
channel order, moving 9 entries per row). `align_kernels` alternates two
exact minimizations of that error, so it never rises and the loop stops when
the input orders repeat (or after ``max_rounds``):

* given the input orders, `kernel_sharing.share_rows` (shared rows, row
  scales and output orders; it starts from the current orders, so it cannot
  do worse than they do);
* given ``K``, the scales and the output orders, each layer's input order is
  a linear assignment of its channels (gain: the inner product of the
  matching 9-entry column blocks with ``diag(c_l) K``'s).

It starts from orders that do not depend on the other symmetry: rows
matched to the first block's by their 9x9 spatial Gram matrices (invariant
to input permutation and row scale), channels by their 9x9 Gram matrices
over the scale-normalized rows (invariant to row permutation and scale);
or from the source orders where those fit better, so the result is never
worse than no alignment. On a plain model unshared from a shared one, with
its channels permuted and filters rescaled, these starts are already exact
(tested).

``conv3`` (``sharing="double"``): its rows are the residual stream and stay
in place; its input columns follow ``Q_l``; `share_rows` with
``align=False`` gives the shared kernel and row scales, which ``bn3``
absorbs. The whitened method weights each kernel's error by the pooled
second moment of its inputs on calibration images (3x3 patches for
``conv2``, in the aligned channel order; ``conv3``'s input channels): the
orders are aligned in the plain metric, then ``K`` and the output orders are
refitted in the whitened one.
"""

import numpy as np

from sb_keras.compression import kernel_sharing
from sb_keras.compression.rebalance import _factors
from sb_keras.compression.rebalance import _rescale_bn
from sb_keras.compression.rebalance import rebalance
from sb_keras.compression.resnet import _bn_statistics
from sb_keras.compression.resnet import _copy_unshared
from sb_keras.compression.resnet import _kernel_matrix
from sb_keras.compression.resnet import _patches
from sb_keras.compression.resnet import _set_bn
from sb_keras.compression.resnet import check_options
from sb_keras.models.resnet.resnet import IMAGENET_DEPTHS
from sb_keras.models.resnet.resnet import ResNet


def is_bottleneck(model):
    """Whether ``model`` is a bottleneck `sb_keras.ResNet` (50/101/152)."""
    return (
        isinstance(model, ResNet)
        and model.depth in IMAGENET_DEPTHS
        and IMAGENET_DEPTHS[model.depth][0] == "bottleneck"
    )


def check_no_ranks(model, shared_rank, unique_rank):
    """Bottleneck models share whole kernels: ranks are an error."""
    for arg, value in (("shared_rank", shared_rank), ("unique_rank", unique_rank)):
        if value is not None:
            raise ValueError(
                f"Bottleneck ResNet-{model.depth} shares whole kernels and has no "
                f"ranks: leave `{arg}` None. Received: {arg}={value!r}"
            )


def _blocks(model):
    """``[(stage index, [block name prefixes of the non-first blocks])]``."""
    out = []
    for g, n in enumerate(IMAGENET_DEPTHS[model.depth][1]):
        if n > 1:
            out.append((g, [f"stage{g + 1}_block{i}" for i in range(2, n + 1)]))
    return out


def _unit(x):
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _descriptors(mat, channels):
    """Row and channel descriptors of a ``(F, 9 C)`` filter matrix.

    Rows: the 9x9 Gram matrix of a filter's spatial taps (invariant to input
    permutations and to the filter's scale). Channels: the 9x9 Gram matrix of
    an input channel's taps summed over the unit-norm filters (invariant to
    filter permutations and scales). Both flattened and normalized.
    """
    taps = _unit(mat).reshape(len(mat), 9, channels)
    rows = (taps @ taps.transpose(0, 2, 1)).reshape(len(mat), -1)
    per_channel = taps.transpose(2, 0, 1)  # (C, F, 9)
    cols = (per_channel.transpose(0, 2, 1) @ per_channel).reshape(channels, -1)
    return _unit(rows), _unit(cols)


def _permute_inputs(mat, order, channels):
    """``mat``'s input channels reordered: new channel ``a`` is old ``order[a]``."""
    return mat.reshape(len(mat), 9, channels)[:, :, order].reshape(len(mat), -1)


def _input_order(target, mat, channels):
    """The input order of ``mat`` (rows matched) closest to ``target``."""
    t = target.reshape(-1, channels)  # (F * 9, C): the channels' tap columns
    return kernel_sharing.assign(t.T @ mat.reshape(-1, channels))


def align_kernels(mats, channels, max_rounds=50):
    """Output and input orders of 3x3 filter matrices that share one kernel.

    Args:
        mats: list of ``(F, 9 C)`` filter matrices (rows: filters, flattened
            ``(3, 3, C)``), one per block.
        channels: ``C``.
        max_rounds: most alternations (see the module docstring).

    Returns:
        ``(outputs, inputs, info)``: per layer the row order ``Q_l`` and the
        input channel order ``P_l`` (``W_l[Q_l]`` with channels ``P_l`` is
        the aligned matrix), and ``info`` with ``rounds`` and the plain
        ``relative_error`` per round (``errors``, non-increasing).
    """
    mats = [np.asarray(w, np.float64) for w in mats]
    ref_rows, ref_cols = _descriptors(mats[0], channels)
    outputs, inputs = [], []
    for w in mats:
        rows, cols = _descriptors(w, channels)
        outputs.append(kernel_sharing.assign(ref_rows @ rows.T))
        inputs.append(kernel_sharing.assign(ref_cols @ cols.T))
    start = [
        _permute_inputs(w[q], p, channels) for w, q, p in zip(mats, outputs, inputs)
    ]
    if kernel_sharing.fixed_order_error(mats) < kernel_sharing.fixed_order_error(start):
        # Never worse than the source orders.
        outputs = [np.arange(len(w)) for w in mats]
        inputs = [np.arange(channels) for _ in mats]
    errors, rounds = [], 0
    while rounds < max_rounds:
        rounds += 1
        aligned = [
            _permute_inputs(w[q], p, channels) for w, q, p in zip(mats, outputs, inputs)
        ]
        shared, scales, orders, info = kernel_sharing.share_rows(aligned)
        outputs = [q[o] for q, o in zip(outputs, orders)]
        errors.append(info["relative_error"])
        new = [
            _input_order(c[:, None] * shared, w[q], channels)
            for w, q, c in zip(mats, outputs, scales)
        ]
        if all(np.array_equal(a, b) for a, b in zip(new, inputs)):
            break
        inputs = new
    return outputs, inputs, {"rounds": rounds, "errors": errors}


def _moments(model, blocks, inputs, data, batch_size):
    """Calibration second moments, per stage and block.

    Returns ``(conv2, conv2_unaligned, conv3)``: per stage the pooled second
    moment of the ``conv2`` input patches with each block's channels in its
    aligned order (``inputs``) and in the source order; per block the second
    moment of ``conv3``'s inputs (source order).
    """
    import keras

    names = [(g, b) for g, group in blocks for b in group]
    probe = keras.Model(
        model.inputs,
        [model.get_layer(f"{b}_conv{j}").input for _, b in names for j in (2, 3)],
    )
    conv2, raw, conv3, count, count3 = {}, {}, {}, {}, {}
    for start in range(0, len(data), batch_size):
        outs = probe([data[start : start + batch_size]], training=False)
        for i, (g, b) in enumerate(names):
            x2 = np.asarray(outs[2 * i], np.float64)
            x3 = np.asarray(outs[2 * i + 1], np.float64)
            if model.get_layer(f"{b}_conv2").data_format == "channels_first":
                x2, x3 = np.moveaxis(x2, 1, -1), np.moveaxis(x3, 1, -1)
            patches = _patches(x2[..., inputs[b]])
            sigma = patches.T @ patches
            conv2[g] = conv2.get(g, 0.0) + sigma
            order = np.argsort(inputs[b])  # back to the source channel order
            idx = (np.arange(9)[:, None] * len(order) + order[None, :]).ravel()
            raw[g] = raw.get(g, 0.0) + sigma[np.ix_(idx, idx)]
            count[g] = count.get(g, 0) + len(patches)
            x3 = x3.reshape(-1, x3.shape[-1])
            conv3[b] = conv3.get(b, 0.0) + x3.T @ x3
            count3[b] = count3.get(b, 0) + len(x3)
    for g in conv2:
        conv2[g] = conv2[g] / count[g]
        raw[g] = raw[g] / count[g]
    return conv2, raw, {b: m / count3[b] for b, m in conv3.items()}


def _absorb(bn, s):
    """Makes ``bn`` compute, on ``y``, what it computed on ``s * y`` (inference).

    A zero ``s`` (a filter the shared kernel cannot represent at all, e.g. a
    dead one) leaves the BN's constant output: gamma 0, beta ``bn(0)``.
    """
    s = np.asarray(s, np.float64)
    zero = np.abs(s) <= 1e-7 * max(float(np.max(np.abs(s))), 1e-300)
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in _bn_statistics(bn))
    _rescale_bn(bn, 1.0 / np.where(zero, 1.0, s))
    if np.any(zero):
        new = [np.asarray(v, np.float64) for v in _bn_statistics(bn)]
        constant = beta - gamma * mean / np.sqrt(var + bn.epsilon)
        new[0] = np.where(zero, 0.0, new[0])
        new[1] = np.where(zero, constant, new[1])
        _set_bn(bn, *new)


def _copy_bn(source, target, order):
    """Copies BN ``source`` into ``target`` with its channels in ``order``."""
    n = source.moving_mean.shape[0]
    target.set_weights(
        [w[order] if w.ndim == 1 and len(w) == n else w for w in source.get_weights()]
    )


def _check_source(model):
    if not is_bottleneck(model) or model.share:
        found = "already shared" if is_bottleneck(model) else "another model"
        raise ValueError(
            "`model` must be a plain (share=False) bottleneck sb_keras.ResNet "
            f"(depth 50, 101 or 152); found {found}. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )


def compress_bottleneck(
    model,
    sharing="single",
    calibration_data=None,
    method=None,
    batch_size=64,
    align=True,
    max_rounds=50,
):
    """Compresses a trained plain bottleneck ResNet into its shared model.

    Per stage, the ``conv2`` kernels of the non-first blocks become one
    shared 3x3 kernel (and the ``conv3`` kernels one shared 1x1 kernel with
    ``sharing="double"``), after aligning each block's hidden channels (see
    the module docstring); the per-filter scales go into ``bn2`` (``bn3``).
    The stem, every ``conv1`` and BN, the first blocks, the shortcuts and
    the classifier are copied (``conv1``/``bn1``/``bn2`` and, with
    ``"single"``, ``conv3`` with their channels in the aligned orders, which
    changes nothing they compute). Last, the shared kernels' filters are
    brought to He-initialization norms with the factors moved into the BNs,
    and every plain conv -> BN pair likewise (`rebalance`), so that SGD
    fine-tunes the model at a usual learning rate.

    Exact (up to float rounding) when the source's kernels are permuted,
    rescaled copies of shared ones, e.g. `unshare` of a shared model.

    Args:
        model: a plain (``share=False``) bottleneck `sb_keras.ResNet`.
        sharing: `"single"` (``conv2``) or `"double"` (``conv2`` and
            ``conv3``).
        calibration_data: optional images ``(N, H, W, 3)`` as the model takes
            them, for the whitened metric.
        method: `"whitened"` (each kernel's error weighted by the pooled
            second moment of its inputs on ``calibration_data``: the expected
            squared output error) or `"plain"`. Defaults to `"whitened"` with
            calibration data, else `"plain"`.
        batch_size: batch size of the calibration pass.
        align: search the hidden channel orders; False keeps the source
            orders (a baseline).
        max_rounds: most alternations of the alignment.

    Returns:
        ``(shared_model, report)``: the shared `sb_keras.ResNet` of the same
        config and a dict with ``groups`` (per stage and ``"conv2"`` /
        ``"conv3"``: ``relative_error`` of the kernels, ``objective_error``
        in the method's metric, ``initial_objective_error`` with the source
        orders, ``rounds`` of the alignment), ``params_before`` and
        ``params_after`` (`sb_keras.count_params`).
    """
    from sb_keras.counting import count_params

    _check_source(model)
    method, data = check_options(model, sharing, method, calibration_data)
    blocks = _blocks(model)
    plans, inputs = {}, {}
    for g, names in blocks:
        mats = [_kernel_matrix(model.get_layer(f"{b}_conv2").kernel) for b in names]
        p = mats[0].shape[0]
        if align:
            outs, ins, info = align_kernels(mats, p, max_rounds)
        else:
            outs = ins = [np.arange(p)] * len(mats)
            info = {"rounds": 0}
        plans[g] = (names, mats, outs, ins, info["rounds"])
        inputs.update(zip(names, ins))
    m2 = m2_raw = m3 = None
    if method == "whitened":
        m2, m2_raw, m3 = _moments(model, blocks, inputs, data, batch_size)

    config = model.get_config()
    config.update(share=True, sharing=sharing, name=f"{model.name}_shared")
    target = ResNet(**config)
    _copy_unshared(model, target)
    report = {"method": method, "sharing": sharing, "groups": []}
    for g, (names, mats, outs, ins, rounds) in plans.items():
        p = mats[0].shape[0]
        aligned = [_permute_inputs(w[q], i, p) for w, q, i in zip(mats, outs, ins)]
        second = None if m2 is None else m2[g]
        shared, scales, orders, info = kernel_sharing.share_rows(
            aligned, second, align=align
        )
        outs = [q[o] for q, o in zip(outs, orders)]
        raw = None if m2_raw is None else m2_raw[g]
        initial = kernel_sharing.fixed_order_error(mats, raw)
        h = _factors(shared.T, 9 * p, 9 * p)  # He norms, moved into the BNs
        kernel = (shared * h[:, None]).T.reshape(3, 3, p, p)
        target.get_layer(f"stage{g + 1}_basis").bases[0].assign(
            kernel.astype(np.float32)
        )
        for b, q, i, c in zip(names, outs, ins, scales):
            conv1 = np.asarray(model.get_layer(f"{b}_conv1").kernel)
            target.get_layer(f"{b}_conv1").kernel.assign(conv1[..., i])
            _copy_bn(model.get_layer(f"{b}_bn1"), target.get_layer(f"{b}_bn1"), i)
            bn2 = target.get_layer(f"{b}_bn2")
            _copy_bn(model.get_layer(f"{b}_bn2"), bn2, q)
            _absorb(bn2, c / h)
            if sharing == "single":
                conv3 = np.asarray(model.get_layer(f"{b}_conv3").kernel)
                target.get_layer(f"{b}_conv3").kernel.assign(conv3[:, :, q, :])
        report["groups"].append(_entry(g, "conv2", names, info, initial, rounds))
        if sharing == "double":
            report["groups"].append(_share_conv3(model, target, g, names, outs, m3))
    report["params_before"] = count_params(model)
    report["params_after"] = count_params(target)
    rebalance(target)  # fine-tunable scales of the plain convs, same function
    return target, report


def _entry(g, group, names, info, initial, rounds):
    return {
        "stage": g + 1,
        "group": group,
        "layers": len(names),
        "relative_error": info["relative_error"],
        "objective_error": info["objective_error"],
        "initial_objective_error": initial,
        "rounds": rounds,
    }


def _share_conv3(model, target, g, names, outs, m3):
    """One 1x1 ``conv3`` kernel for the stage; row scales into ``bn3``."""
    mats = [_kernel_matrix(model.get_layer(f"{b}_conv3").kernel) for b in names]
    second = raw = None
    if m3 is not None:
        second = sum(m3[b][np.ix_(q, q)] for b, q in zip(names, outs)) / len(names)
        raw = sum(m3[b] for b in names) / len(names)
    aligned = [w[:, q] for w, q in zip(mats, outs)]
    shared, scales, _, info = kernel_sharing.share_rows(aligned, second, align=False)
    initial = kernel_sharing.fixed_order_error(mats, raw)
    rows, p = shared.shape
    h = _factors(shared.T, p, rows)
    kernel = (shared * h[:, None]).T.reshape(1, 1, p, rows)
    target.get_layer(f"stage{g + 1}_basis_1x1").bases[0].assign(
        kernel.astype(np.float32)
    )
    for b, d in zip(names, scales):
        _absorb(target.get_layer(f"{b}_bn3"), d / h)
    return _entry(g, "conv3", names, info, initial, 0)


def unshare_bottleneck(model):
    """The plain bottleneck `sb_keras.ResNet` computing what a shared one does.

    Every ``conv2`` (and, for ``sharing="double"``, ``conv3``) of a non-first
    block gets a copy of its stage's shared kernel; every other weight is
    copied. Exact.

    Args:
        model: a bottleneck `sb_keras.ResNet` with ``share=True``.

    Returns:
        The plain (``share=False``) `sb_keras.ResNet` of the same config.
    """
    if not (is_bottleneck(model) and model.share):
        raise ValueError(
            "`model` must be a shared (share=True) bottleneck sb_keras.ResNet. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    return kernel_sharing.copy_into_plain(model, ResNet(**model.baseline_config()))
