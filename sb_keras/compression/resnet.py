"""Compressing a trained plain ResNet into a shared-basis `sb_keras.ResNet`."""

import numpy as np

from sb_keras.compression import keras_resnet
from sb_keras.compression import svd
from sb_keras.compression.rebalance import rebalance
from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis
from sb_keras.models.resnet.resnet import IMAGENET_DEPTHS
from sb_keras.models.resnet.resnet import ResNet

METHODS = ("whitened", "plain")
SHARINGS = ("single", "double")


def _check_model(model):
    """``model`` as a plain basic-block `sb_keras.ResNet` (a Keras one rebuilt)."""
    if not isinstance(model, ResNet):
        return keras_resnet.plain_resnet(model)
    if model.share:
        raise ValueError(
            "`model` must be a plain (share=False) sb_keras.ResNet (bottleneck "
            "ones go to `compression.bottleneck`) or a functional Keras ResNet "
            "of a basic-block layout; found already shared. "
            f"Received: model={model.name!r}"
        )
    return model


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}. Received: {name}={value!r}")
    return int(value)


def _check_calibration(model, data):
    if data is None:
        return None
    x = np.asarray(data)
    expected = tuple(model.input_shape[1:])
    ok = x.ndim == len(expected) + 1 and len(x) > 0
    ok = ok and all(e is None or e == d for e, d in zip(expected, x.shape[1:]))
    if not ok or not np.issubdtype(x.dtype, np.number):
        raise ValueError(
            "`calibration_data` must be a non-empty numeric array of images of "
            f"shape (N, {', '.join(str(d) for d in expected)}). "
            f"Received: calibration_data of shape {x.shape} and dtype {x.dtype}"
        )
    return x.astype(np.float32)


def check_options(model, sharing, method, calibration_data):
    """``(method, calibration images)``, validated, for every source family."""
    if sharing not in SHARINGS:
        raise ValueError(
            f"`sharing` must be one of {SHARINGS}. Received: sharing={sharing!r}"
        )
    if method is None:
        method = "plain" if calibration_data is None else "whitened"
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}. Received: method={method!r}"
        )
    data = _check_calibration(model, calibration_data)
    if method == "whitened" and data is None:
        raise ValueError(
            "`method='whitened'` needs `calibration_data`. "
            "Received: calibration_data=None"
        )
    return method, data


def _kernel_matrix(kernel):
    """Keras ``(kh, kw, C, F)`` kernel -> ``(F, kh*kw*C)``, filters as rows."""
    kernel = np.asarray(kernel, np.float64)
    return kernel.reshape(-1, kernel.shape[-1]).T


def _as_kernel(rows, kernel_size, channels):
    """``(R, k*k*C)`` rows -> Keras ``(k, k, C, R)`` kernel."""
    return rows.T.reshape(kernel_size, kernel_size, channels, rows.shape[0])


def _patches(x):
    """3x3 "same" im2col patches of NHWC ``x``, ordered like a Keras kernel."""
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    return np.concatenate(cols, axis=-1).reshape(-1, 9 * x.shape[-1])


def _patch_moments(model, names, data, batch_size):
    """Per layer: (mean, second moment) of its 3x3 input patches (float64)."""
    import keras

    probe = keras.Model(model.inputs, [model.get_layer(n).input for n in names])
    sums = {n: [0.0, 0.0, 0] for n in names}
    for start in range(0, len(data), batch_size):
        outs = probe([data[start : start + batch_size]], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for n, out in zip(names, outs):
            p = _patches(np.asarray(out, np.float64))
            acc = sums[n]
            acc[0] = acc[0] + p.sum(axis=0)
            acc[1] = acc[1] + p.T @ p
            acc[2] += len(p)
    return {n: (m / c, s / c) for n, (m, s, c) in sums.items()}


def _groups(model, sharing):
    """``[(stage index, position, [conv names])]`` of the layers that share."""
    n_blocks = (
        ((model.depth - 2) // 6,) * 3
        if model.depth not in IMAGENET_DEPTHS
        else IMAGENET_DEPTHS[model.depth][1]
    )
    groups = []
    for g, n in enumerate(n_blocks):
        if n < 2:
            continue
        names = {
            j: [f"stage{g + 1}_block{i}_conv{j}" for i in range(2, n + 1)]
            for j in (1, 2)
        }
        if sharing == "single":
            merged = [x for pair in zip(names[1], names[2]) for x in pair]
            groups.append((g, "all", merged))
        else:
            groups += [(g, "conv1", names[1]), (g, "conv2", names[2])]
    return groups


def _copy_unshared(source, target):
    """Copies every weight layer of ``target`` outside the decomposition."""
    for layer in target.layers:
        if isinstance(layer, (BasisConv2D, FilterBasis)) or not layer.weights:
            continue
        layer.set_weights(source.get_layer(layer.name).get_weights())


def _bn_statistics(bn):
    """``(gamma, beta, moving_mean, moving_variance)`` of a BN of any convention."""
    return tuple(
        np.asarray(v) for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    )


def _set_bn(bn, gamma, beta, mean, variance):
    """Sets the four statistics by name (a PyTorch-convention BN also counts
    ``num_batches_tracked``, which stays as it is)."""
    for variable, value in zip(
        (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance),
        (gamma, beta, mean, variance),
    ):
        variable.assign(np.asarray(value, np.float32))


def compress(
    model,
    shared_rank=None,
    unique_rank=None,
    sharing="single",
    calibration_data=None,
    method=None,
    batch_size=64,
    max_iter=500,
    tol=1e-6,
):
    """Compresses a trained plain ResNet into shared filter bases.

    For each stage, the 3x3 kernels of the layers that share (Kang & Kim,
    method §1.3: both convolutions of every non-first block for
    ``sharing="single"``; the first and the second convolutions separately
    for ``"double"``) are written as filter matrices ``W_l`` (rows: the
    ``F`` filters, flattened ``(kh, kw, C)`` like the kernel) and
    approximated by ``A_l [U_l; B]`` with a stage-wide shared basis ``B``
    and per-layer unique bases ``U_l``, by `svd.decompose` (a Riemannian
    L-BFGS on the shared subspace, exact where an exact decomposition
    exists). Stage ``g`` (from 0) gets ``shared_rank * 2**g`` shared and
    ``unique_rank * 2**g`` unique filters, as `sb_keras.ResNet`.

    The new `BasisConv2D` computes, in inference, ``bn(conv(x, A_l [U_l;
    B]))``, i.e. the source conv + BN with the approximated kernel:

    * its basis BN is an identity in inference: moving mean ``m`` and
      variance ``v`` are the calibration statistics of the basis responses
      ``conv(x, [U_l, B])`` on the *source* model's activations (``0`` and
      ``1`` without calibration data), with ``gamma = sqrt(v + eps)`` and
      ``beta = m``, so in training mode (batch statistics) it stays close
      to an identity as well;
    * its coefficients are ``A_l``;
    * its output BN is a copy of the source layer's BN.

    Last, each layer's coefficient columns are brought to He-initialization
    norms and the factor moved into its output BN (`rebalance`: the same
    inference function, up to float rounding), so that SGD fine-tunes the
    model at a usual learning rate.

    The stem, the first block of each stage, the shortcuts and the
    classifier are copied unchanged.

    Args:
        model: a trained plain basic-block `sb_keras.ResNet`
            (``share=False``; CIFAR ResNet-6n+2 or ResNet-18/34, either
            stem), or a functional `keras.Model` of the same layout with any
            layer names, recognized by structure and rebuilt as that
            `sb_keras.ResNet` first (`keras_resnet.plain_resnet`; its module
            docstring lists the recognized layouts). A plain bottleneck
            `sb_keras.ResNet` (50/101/152) goes to
            `compression.bottleneck.compress_bottleneck` (whole shared
            kernels, no ranks: ``shared_rank`` and ``unique_rank`` must be
            None; ``max_iter`` and ``tol`` do not apply). Anything else
            raises a `ValueError`. A plain `sb_keras.MobileNetV2` goes to
            `mobilenet_v2.compress_mobilenet_v2` likewise (whole shared 1x1
            kernels, no ranks).
        shared_rank: ``S`` (stage-1 shared filters), >= 0; required for
            basic-block ResNets. ``0`` is the
            per-layer low-rank baseline (the "NonShared" `sb_keras.ResNet`):
            each layer's own truncated SVD, whitened with its own inputs'
            second moment, ``unique_rank`` filters; nothing is shared.
        unique_rank: ``u`` (stage-1 unique filters per layer), >= 0;
            ``S + u`` at most the stage-1 filter size ``9 C``. None: 1.
        sharing: `"single"` or `"double"`.
        calibration_data: optional images ``(N, H, W, 3)`` as the model
            takes them; used for the whitening and the basis BN statistics.
        method: `"whitened"` (weights each filter's error by the second
            moment of the layers' input patches on ``calibration_data``,
            pooled over the group: the expected squared output error) or
            `"plain"` (unweighted). Defaults to `"whitened"` when
            calibration data is given, else `"plain"`.
        batch_size: batch size of the calibration pass.
        max_iter: most L-BFGS iterations per group.
        tol: relative-change rule of a stall in `svd.shared_bases` (a stall
            at a relative error between 1e-6 and 1e-2 restarts the L-BFGS
            from a perturbed basis, twice at most without gain; ``tol=0``
            runs to ``max_iter``).

    Returns:
        ``(shared_model, report)``: the `sb_keras.ResNet` with
        ``share=True`` and the given ranks, and a dict with ``groups`` (per
        stage and group: ``relative_error`` of the kernels,
        ``objective_error`` in the method's metric,
        ``initial_relative_error`` of the one-SVD start, ``iterations``,
        ``escapes``: restarts from a stall),
        ``params_before`` and ``params_after`` (`sb_keras.count_params`).

    Example:

    >>> import sb_keras
    >>> plain = sb_keras.ResNet(depth=20)
    >>> shared, report = sb_keras.compress(plain, shared_rank=8)
    >>> report["params_after"] < report["params_before"]
    True
    """
    # MobileNetV2 sources: whole shared 1x1 kernels, no ranks.
    from sb_keras.compression import mobilenet_v2

    if mobilenet_v2.is_mobilenet_v2(model):
        return mobilenet_v2.compress(
            model,
            shared_rank,
            unique_rank,
            sharing=sharing,
            calibration_data=calibration_data,
            method=method,
            batch_size=batch_size,
        )
    # Bottleneck ResNets: whole shared kernels, no ranks.
    from sb_keras.compression import bottleneck
    from sb_keras.counting import count_params

    if bottleneck.is_bottleneck(model):
        bottleneck.check_no_ranks(model, shared_rank, unique_rank)
        return bottleneck.compress_bottleneck(
            model, sharing, calibration_data, method, batch_size
        )
    if shared_rank is None:
        raise ValueError(
            "`shared_rank` is required for a basic-block ResNet. "
            "Received: shared_rank=None"
        )
    unique_rank = 1 if unique_rank is None else unique_rank
    model = _check_model(model)
    method, data = check_options(model, sharing, method, calibration_data)
    shared_rank = _check_int("shared_rank", shared_rank, 0)
    unique_rank = _check_int("unique_rank", unique_rank, 0)
    if shared_rank + unique_rank == 0:
        raise ValueError(
            "`shared_rank + unique_rank` must be at least 1. "
            "Received: shared_rank=0, unique_rank=0"
        )
    width = model.get_layer("stem_conv").filters
    if shared_rank + unique_rank > 9 * width:
        raise ValueError(
            f"`shared_rank + unique_rank` can be at most {9 * width} = 3*3*{width}, "
            "the size of a stage-1 filter. "
            f"Received: shared_rank={shared_rank}, unique_rank={unique_rank}"
        )
    groups = _groups(model, sharing)
    if not groups:
        raise ValueError(
            f"ResNet-{model.depth} has one block per stage: nothing to share. "
            f"Received: model={model.name!r}"
        )
    moments = {}
    if data is not None:
        names = [n for _, _, group in groups for n in group]
        moments = _patch_moments(model, names, data, batch_size)

    config = model.get_config()
    config.update(
        share=True,
        shared_rank=shared_rank,
        unique_rank=unique_rank,
        sharing=sharing,
        name=f"{model.name}_s{shared_rank}u{unique_rank}",
    )
    target = ResNet(**config)
    _copy_unshared(model, target)

    report = {"method": method, "sharing": sharing, "groups": []}
    for g, position, names in groups:
        s, u = shared_rank * 2**g, unique_rank * 2**g
        if s == 0:
            basis, uniques, coeffs, info = _per_layer(model, names, u, method, moments)
        else:
            mats = [_kernel_matrix(model.get_layer(n).kernel) for n in names]
            second = None
            if method == "whitened":
                second = sum(moments[n][1] for n in names) / len(names)
            basis, uniques, coeffs, info = svd.decompose(
                mats, s, u, second_moment=second, max_iter=max_iter, tol=tol
            )
            channels = model.get_layer(names[0]).kernel.shape[2]
            owner = target.get_layer(f"stage{g + 1}_basis")
            index = 1 if position == "conv2" else 0
            owner.bases[index].assign(_as_kernel(basis, 3, channels).astype(np.float32))
        for name, v, a in zip(names, uniques, coeffs):
            _write_layer(model, target.get_layer(name), name, basis, v, a, moments)
        report["groups"].append(
            {
                "stage": g + 1,
                "group": position,
                "layers": len(names),
                "shared_rank": s,
                "unique_rank": u,
                "relative_error": info["plain_relative_error"],
                "objective_error": info["relative_error"],
                "initial_relative_error": info["initial_relative_error"],
                "iterations": info["iterations"],
                "escapes": info["escapes"],
            }
        )
    report["params_before"] = count_params(model)
    report["params_after"] = count_params(target)
    rebalance(target)  # fine-tunable scales, same function
    return target, report


def _per_layer(model, names, unique_rank, method, moments):
    """``shared_rank=0``: each layer's own (whitened) truncated SVD."""
    uniques, coeffs, num, den, squares = [], [], 0.0, 0.0, []
    for name in names:
        w = _kernel_matrix(model.get_layer(name).kernel)
        second = moments[name][1] if method == "whitened" else None
        basis, (v,), (a,), info = svd.decompose([w], 0, unique_rank, second)
        uniques.append(v)
        coeffs.append(a)
        norm = float(np.sum(np.asarray(w, np.float64) ** 2))
        num += info["plain_relative_error"] ** 2 * norm
        den += norm
        squares.append(info["relative_error"] ** 2)
    objective = float(np.sqrt(np.mean(squares)))  # per-layer metrics: RMS
    info = {
        "plain_relative_error": float(np.sqrt(num / (den or 1.0))),
        "relative_error": objective,
        "initial_relative_error": objective,
        "iterations": 0,
        "escapes": 0,
    }
    return basis, uniques, coeffs, info


def _write_layer(source, layer, name, basis, unique, coeff, moments):
    """Sets one `BasisConv2D` from its bases, coefficients and source BN."""
    channels = source.get_layer(name).kernel.shape[2]
    if layer.unique_kernel is not None:
        layer.unique_kernel.assign(_as_kernel(unique, 3, channels).astype(np.float32))
    layer.coefficients.assign(coeff.T[None, None].astype(np.float32))
    rows = np.vstack([unique, basis])  # the layer's [unique, shared] order
    eps = layer.basis_bn.epsilon
    if name in moments:
        mean_p, second_p = moments[name]
        mean = rows @ mean_p
        var = np.maximum(np.einsum("rd,de,re->r", rows, second_p, rows) - mean**2, 0.0)
    else:
        mean, var = np.zeros(len(rows)), np.ones(len(rows))
    _set_bn(layer.basis_bn, np.sqrt(var + eps), mean, mean, var)
    bn_name = name[: -len("conv1")] + "bn" + name[-1]
    layer.bn.set_weights(source.get_layer(bn_name).get_weights())


def unshare(model):
    """The plain `sb_keras.ResNet` that computes what a shared one computes.

    Every `BasisConv2D` becomes a plain 3x3 conv whose kernel is the
    composed ``basis x (basis BN scale) x coefficients`` and a BN that is
    the layer's output BN with the composed bias ``t_b @ A`` absorbed into
    its moving mean; every other layer is copied. Exact in inference mode
    (up to float32 rounding of the composed kernel). The composed kernels are
    then brought to He-initialization norms with the factor moved into their
    BNs (`sb_keras.compression.rebalance`), so that SGD can fine-tune the
    result at a usual learning rate.

    A shared bottleneck `sb_keras.ResNet` goes to
    `compression.bottleneck.unshare_bottleneck` (each block gets a copy of
    the shared kernels; exact, not rebalanced).

    Args:
        model: a shared (``share=True``) `sb_keras.ResNet` (a shared
            `sb_keras.MobileNetV2` goes to `mobilenet_v2.unshare`: copies of
            the shared kernels, exact).

    Returns:
        The plain (``share=False``) `sb_keras.ResNet` of the same depth,
        head and preprocessing.
    """
    # MobileNetV2: copies of the shared 1x1 kernels.
    from sb_keras.compression import mobilenet_v2

    if mobilenet_v2.is_mobilenet_v2(model):
        return mobilenet_v2.unshare(model)

    # Bottleneck ResNets: copies of the shared kernels.
    from sb_keras.compression import bottleneck

    if bottleneck.is_bottleneck(model):
        return bottleneck.unshare_bottleneck(model)
    if not (isinstance(model, ResNet) and model.share):
        raise ValueError(
            "`model` must be a shared basic-block sb_keras.ResNet. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    target = ResNet(**model.baseline_config())
    _copy_unshared_into_plain(model, target)
    rebalance(target)  # folded kernels are tiny: give them trainable scales
    return target


def _copy_unshared_into_plain(model, target):
    from sb_keras.export.folding import bn_affine

    bases = {}
    for layer in model.layers:
        if isinstance(layer, FilterBasis):
            bases[layer.name.split("_")[0]] = [
                np.asarray(v, np.float64) for v in layer.bases
            ]
    for layer in target.layers:
        if not layer.weights:
            continue
        if not _has(model, layer.name):
            continue  # a BN of a decomposed conv: set with its conv below
        src = model.get_layer(layer.name)
        if not isinstance(src, BasisConv2D):
            layer.set_weights(src.get_weights())
        else:
            stage = layer.name.split("_")[0]
            basis = _basis_of(src, bases.get(stage, []))
            s_b, t_b = bn_affine(src.basis_bn)
            coeff = np.asarray(src.coefficients, np.float64)[0, 0]
            kernel = np.tensordot(basis, s_b[:, None] * coeff, axes=([3], [0]))
            layer.set_weights([kernel.astype(np.float32)])
            bn = target.get_layer(layer.name[: -len("conv1")] + "bn" + layer.name[-1])
            gamma, beta, mean, var = _bn_statistics(src.bn)
            bias = t_b @ coeff
            _set_bn(bn, gamma, beta, mean.astype(np.float64) - bias, var)


def _basis_of(layer, stage_bases):
    parts = []
    if layer.unique_kernel is not None:
        parts.append(np.asarray(layer.unique_kernel, np.float64))
    if stage_bases:
        parts.append(stage_bases[layer.basis_index])
    return np.concatenate(parts, axis=-1)


def _has(model, name):
    return any(layer.name == name for layer in model.layers)
