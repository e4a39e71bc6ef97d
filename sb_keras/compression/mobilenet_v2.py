"""Compressing a trained plain MobileNetV2 into the shared `sb_keras.MobileNetV2`.

The shared MobileNetV2 (method §1.6) shares *whole* 1x1 kernels, no basis
and coefficients: in the stages of out widths 32, 64, 96 and 160 the
expansion kernel (C -> 6C) of every non-first block is one tensor per stage
(``sharing="single"``); ``"double"`` also shares the projection kernel
(6C -> C). Every BN and depthwise convolution stays per block. So a block's
expansion is represented exactly by the shared kernel ``K`` when its filter
matrix ``W_l`` (rows: the 6C hidden channels) is ``W_l[o_l] = diag(c_l) K``:

* the hidden channels of a block are permutable (the expansion filter, its
  BN, the depthwise channel and its BN, and the projection's input column
  move together: the same function);
* a per-filter scale ``c`` of the expansion goes into its BN exactly (in
  inference): the shared conv outputs ``z = (W x) / c`` and the BN is
  rescaled so that it computes ``bn(c z)`` (`rebalance._rescale_bn`; a
  negative ``c`` flips gamma).

`kernel_sharing.share_rows` finds ``K``, ``c_l`` and ``o_l`` (alternating a
rank-one SVD per shared row with a linear assignment per block; the error
never increases and it stops when the orders repeat). It is started from
the identity orders and from each block's own rows matched to the others,
and the lowest error is kept. With ``"double"``, the projection matrices
(rows: the C output channels, which are the residual stream and cannot be
permuted) are taken with their columns in the blocks' new hidden orders
(set by the expansion alone) and shared with per-row scales only
(``align=False``), absorbed by the projection BNs in the same way.

The shared kernels keep unit rows (the orthogonality penalty's fixed point
for the rows; `rebalance` does not handle `SharedConv2D`, whose kernel feeds
several BNs). Everything else is copied.
"""

import numpy as np

from sb_keras.compression import kernel_sharing
from sb_keras.compression.rebalance import _rescale_bn
from sb_keras.compression.resnet import check_options
from sb_keras.layers import FilterBasis
from sb_keras.layers import SharedConv2D
from sb_keras.models.mobilenet_v2.mobilenet_v2 import SHARED_STAGES
from sb_keras.models.mobilenet_v2.mobilenet_v2 import STAGES
from sb_keras.models.mobilenet_v2.mobilenet_v2 import MobileNetV2

# A scale this small (relative to the group's RMS scale) is floored, so that
# its BN stays finite; the output changes by that fraction of the row.
_MIN_SCALE = 1e-6


def is_mobilenet_v2(model):
    """Whether ``model`` is an `sb_keras.MobileNetV2`."""
    return isinstance(model, MobileNetV2)


def _groups(model):
    """``[(stage name, [block names])]`` of the blocks that share."""
    out = []
    for g in SHARED_STAGES:
        n = STAGES[g][2]
        if n > 1:
            stage = f"stage{g + 1}"
            out.append((stage, [f"{stage}_block{i}" for i in range(2, n + 1)]))
    return out


def _matrix(layer):
    """A 1x1 Conv2D's kernel as ``(out, in)``, filters as rows (float64)."""
    return np.asarray(layer.kernel, np.float64)[0, 0].T


def _channel_moments(model, names, data, batch_size):
    """Per layer: the second moment ``(C, C)`` of its input's channels."""
    import keras

    probe = keras.Model(model.inputs, [model.get_layer(n).input for n in names])
    sums = {n: [0.0, 0] for n in names}
    for start in range(0, len(data), batch_size):
        outs = probe([data[start : start + batch_size]], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for n, out in zip(names, outs):
            x = np.asarray(out, np.float64)
            if model.get_layer(n).data_format == "channels_first":
                x = np.moveaxis(x, 1, -1)
            x = x.reshape(-1, x.shape[-1])
            sums[n][0] = sums[n][0] + x.T @ x
            sums[n][1] += len(x)
    return {n: s / c for n, (s, c) in sums.items()}


def permute_hidden(model, block, order):
    """Permutes a block's hidden channels in place (the same function).

    New hidden channel ``j`` is old channel ``order[j]``: the expansion
    filters (if the block owns its kernel), the expansion BN, the depthwise
    kernel and its BN, and the projection's input columns (if owned).
    """
    order = np.asarray(order)
    for suffix in ("expand", "project"):
        layer = model.get_layer(f"{block}_{suffix}")
        if not isinstance(layer, SharedConv2D):
            kernel = np.asarray(layer.kernel)
            kernel = kernel[..., order] if suffix == "expand" else kernel[:, :, order]
            layer.kernel.assign(kernel)
    depthwise = model.get_layer(f"{block}_depthwise")
    depthwise.kernel.assign(np.asarray(depthwise.kernel)[:, :, order])
    for suffix in ("expand_bn", "depthwise_bn"):
        bn = model.get_layer(f"{block}_{suffix}")
        n = len(order)
        bn.set_weights(
            [w[order] if w.ndim == 1 and len(w) == n else w for w in bn.get_weights()]
        )


def _absorb(bn, scales):
    """The BN computes ``bn(c z)`` of the shared conv's output ``z``."""
    c = np.asarray(scales, np.float64)
    floor = _MIN_SCALE * (np.sqrt(np.mean(c * c)) or 1.0)
    c = np.where(np.abs(c) < floor, np.where(c < 0, -floor, floor), c)
    _rescale_bn(bn, 1.0 / c)


def _share(mats, second, align):
    """`share_rows` started from the identity and from each block's rows."""
    best = kernel_sharing.share_rows(mats, second, align=align)
    if not align:
        return best
    initial = best[3]["initial_objective_error"]
    work = mats
    if second is not None:
        root = kernel_sharing._root(second, 1e-6)[0]
        work = [w @ root for w in mats]
    for anchor in work:
        starts = [kernel_sharing.assign(kernel_sharing.gains(w, anchor)) for w in work]
        shared, scales, orders, info = kernel_sharing.share_rows(
            [w[s] for w, s in zip(mats, starts)], second, align=True
        )
        if info["objective_error"] < best[3]["objective_error"]:
            orders = [s[o] for s, o in zip(starts, orders)]
            best = shared, scales, orders, info
    best[3]["initial_objective_error"] = initial  # identity orders
    return best


def _entry(stage, group, layers, info):
    return {
        "stage": int(stage[len("stage") :]),
        "group": group,
        "layers": layers,
        "relative_error": info["relative_error"],
        "objective_error": info["objective_error"],
        "initial_objective_error": info["initial_objective_error"],
        "rounds": info["rounds"],
    }


def compress_mobilenet_v2(
    model,
    sharing="single",
    calibration_data=None,
    method=None,
    batch_size=64,
    align=True,
):
    """Compresses a trained plain MobileNetV2 into the shared one.

    See the module docstring for what is shared and how. Exact (up to float
    rounding) when the source's blocks are permuted, per-filter scaled copies
    of one kernel per stage (e.g. a shared model `unshare`d); otherwise the
    least-squares fit of `kernel_sharing.share_rows`.

    Args:
        model: a plain (``share=False``) `sb_keras.MobileNetV2`, either
            variant, any ``alpha``.
        sharing: `"single"` (expansion kernels) or `"double"` (expansion and
            projection kernels).
        calibration_data: optional images ``(N, H, W, 3)`` as the model
            takes them, for the whitening.
        method: `"whitened"` (each kernel's error weighted by the second
            moment of its input channels on ``calibration_data``, pooled over
            the blocks of the stage: the expected squared output error) or
            `"plain"`. Defaults to `"whitened"` with calibration data, else
            `"plain"`.
        batch_size: batch size of the calibration pass.
        align: search each block's hidden-channel order (False keeps them).

    Returns:
        ``(shared_model, report)``: the `sb_keras.MobileNetV2` with
        ``share=True`` and ``sharing``, and a dict with ``groups`` (per stage
        and kernel, ``"expand"`` or ``"project"``: ``relative_error`` of the
        kernels in the plain metric, ``objective_error`` in the method's,
        ``initial_objective_error`` with the blocks' own channel orders,
        ``rounds`` of the alternation), ``params_before`` and
        ``params_after`` (`sb_keras.count_params`).
    """
    from sb_keras.counting import count_params

    if not is_mobilenet_v2(model) or model.share:
        found = "already shared" if is_mobilenet_v2(model) else type(model).__name__
        raise ValueError(
            "`model` must be a plain (share=False) sb_keras.MobileNetV2; found "
            f"{found}. Received: model={getattr(model, 'name', model)!r}"
        )
    method, data = check_options(model, sharing, method, calibration_data)
    groups = _groups(model)
    moments = {}
    if method == "whitened":
        kinds = ("expand", "project") if sharing == "double" else ("expand",)
        names = [f"{b}_{k}" for _, blocks in groups for b in blocks for k in kinds]
        moments = _channel_moments(model, names, data, batch_size)

    config = model.get_config()
    suffix = "_shared" + ("_double" if sharing == "double" else "")
    config.update(share=True, sharing=sharing, name=f"{model.name}{suffix}")
    target = MobileNetV2(**config)
    for layer in target.layers:
        if layer.weights and not isinstance(layer, FilterBasis):
            layer.set_weights(model.get_layer(layer.name).get_weights())

    report = {"method": method, "sharing": sharing, "groups": []}
    for stage, blocks in groups:
        mats = [_matrix(model.get_layer(f"{b}_expand")) for b in blocks]
        second = None
        if moments:
            second = sum(moments[f"{b}_expand"] for b in blocks) / len(blocks)
        shared, scales, orders, info = _share(mats, second, align)
        basis = target.get_layer(f"{stage}_expand_basis").bases[0]
        basis.assign(shared.T[None, None].astype(np.float32))
        for b, o, c in zip(blocks, orders, scales):
            permute_hidden(target, b, o)
            _absorb(target.get_layer(f"{b}_expand_bn"), c)
        report["groups"].append(_entry(stage, "expand", len(blocks), info))
        if sharing != "double":
            continue
        mats = [
            _matrix(model.get_layer(f"{b}_project"))[:, o]
            for b, o in zip(blocks, orders)
        ]
        second = None
        if moments:
            second = sum(
                moments[f"{b}_project"][np.ix_(o, o)] for b, o in zip(blocks, orders)
            ) / len(blocks)
        shared, scales, _, info = kernel_sharing.share_rows(mats, second, align=False)
        basis = target.get_layer(f"{stage}_project_basis").bases[0]
        basis.assign(shared.T[None, None].astype(np.float32))
        for b, c in zip(blocks, scales):
            _absorb(target.get_layer(f"{b}_project_bn"), c)
        report["groups"].append(_entry(stage, "project", len(blocks), info))
    report["params_before"] = count_params(model)
    report["params_after"] = count_params(target)
    return target, report


def compress(model, shared_rank, unique_rank, **kwargs):
    """`sb_keras.compress` for a MobileNetV2: no ranks (whole kernels)."""
    given = [
        f"{k}={v!r}"
        for k, v in (("shared_rank", shared_rank), ("unique_rank", unique_rank))
        if v is not None
    ]
    if given:
        raise ValueError(
            "`shared_rank` and `unique_rank` do not apply to a MobileNetV2 (its "
            "shared model shares whole 1x1 kernels): leave them None. "
            f"Received: {', '.join(given)}"
        )
    return compress_mobilenet_v2(model, **kwargs)


def format_group(entry):
    """One line of `sb-keras compress`'s report for a MobileNetV2 group."""
    return (
        f"stage {entry['stage']} {entry['group']:7s} x{entry['layers']}: "
        f"relative error {entry['relative_error']:.3e} (objective "
        f"{entry['objective_error']:.3e}, own orders "
        f"{entry['initial_objective_error']:.3e}, {entry['rounds']} rounds)"
    )


def unshare(model):
    """The plain `sb_keras.MobileNetV2` that computes what a shared one does.

    Each block's `SharedConv2D` becomes a plain 1x1 `Conv2D` holding a copy
    of its stage's shared kernel; every other layer is copied. Exact.

    Args:
        model: an `sb_keras.MobileNetV2` with ``share=True``.

    Returns:
        The plain (``share=False``) `sb_keras.MobileNetV2` of the same config.
    """
    if not (is_mobilenet_v2(model) and model.share):
        raise ValueError(
            "`model` must be a shared (share=True) sb_keras.MobileNetV2. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    target = MobileNetV2(**model.baseline_config())
    return kernel_sharing.copy_into_plain(model, target)
