"""The authors' key layout: their CIFAR ResNet state dicts <-> `sb_keras.ResNet`."""

import collections
import re

import numpy as np

from sb_keras.checkpoints.reader import CheckpointError
from sb_keras.checkpoints.reader import read_state_dict
from sb_keras.checkpoints.writer import write_checkpoint

# ---------------------------------------------------------------------------
# The authors' key layout
# ---------------------------------------------------------------------------

_BN = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
)


def _to_keras(array):
    """PyTorch ``(out, in, kh, kw)`` -> Keras ``(kh, kw, in, out)``; Linear too."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    return np.transpose(array)


def _to_torch(array):
    if array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    return np.ascontiguousarray(np.transpose(array))


def _bn_entries(prefix, bn):
    entries = [(f"{prefix}.{t}", getattr(bn, k)) for t, k in _BN]
    counter = getattr(bn, "num_batches_tracked", None)  # TorchBatchNormalization
    if counter is not None:
        entries.append((f"{prefix}.num_batches_tracked", counter))
    return entries


def _is_counter(key):
    return key.endswith(".num_batches_tracked")


def _layout(model):
    """``[(authors' key, keras variable)]`` of a CIFAR `sb_keras.ResNet`.

    A shared basis appears once at the model level (``shared_basis_{g}``
    or ``shared_basis_{g}_{1,2}``) and again in every block that uses it,
    all mapped to the one Keras variable.
    """
    from sb_keras.layers import BasisConv2D

    entries = [("conv1.weight", model.get_layer("stem_conv").kernel)]
    entries += _bn_entries("bn1", model.get_layer("stem_bn"))
    n = (model.depth - 2) // 6
    double = model.sharing == "double"
    for g in range(1, 4):
        bases = []
        if model.share and n > 1 and model.shared_rank:
            bases = model.get_layer(f"stage{g}_basis").bases
            names = [f"_{g}_{j + 1}" for j in range(2)] if double else [f"_{g}"]
            entries += [(f"shared_basis{s}.weight", b) for s, b in zip(names, bases)]
        for i in range(n):
            block = f"stage{g}_block{i + 1}"
            prefix = f"layer{g}.{i}"
            if bases and i > 0:
                names = ["_1", "_2"] if double else [""]
                entries += [
                    (f"{prefix}.shared_basis{s}.weight", b)
                    for s, b in zip(names, bases)
                ]
            for j in (1, 2):
                layer = model.get_layer(f"{block}_conv{j}")
                if isinstance(layer, BasisConv2D):
                    if layer.unique_kernel is not None:
                        entries.append(
                            (f"{prefix}.basis_conv{j}.weight", layer.unique_kernel)
                        )
                    entries += _bn_entries(f"{prefix}.basis_bn{j}", layer.basis_bn)
                    entries.append(
                        (f"{prefix}.coeff_conv{j}.weight", layer.coefficients)
                    )
                    entries += _bn_entries(f"{prefix}.bn{j}", layer.bn)
                else:
                    entries.append((f"{prefix}.conv{j}.weight", layer.kernel))
                    entries += _bn_entries(
                        f"{prefix}.bn{j}", model.get_layer(f"{block}_bn{j}")
                    )
    head = model.get_layer("predictions")
    entries += [("fc.weight", head.kernel), ("fc.bias", head.bias)]
    return entries


def _check_cifar_resnet(model):
    from sb_keras.models import ResNet

    if not (
        isinstance(model, ResNet)
        and model.stem == "cifar"
        and model.depth not in (18, 34, 50, 101, 152)
        and model.include_top
    ):
        raise ValueError(
            "The authors' key layout covers the CIFAR ResNets (depth 6n+2, "
            "with the classifier). Received: model="
            f"{getattr(model, 'name', model)!r}"
        )


# ---------------------------------------------------------------------------
# Checkpoint -> model
# ---------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
_MODEL_BASIS = re.compile(r"^shared_basis_\d+(_\d+)?\.weight$")


def _shape_of(state_dict, key, ndim):
    """The shape of ``state_dict[key]``, which must have ``ndim`` dimensions."""
    if key not in state_dict:
        raise CheckpointError(
            f"The state dict has no {key!r}, which every authors' CIFAR ResNet "
            f"has. Received: {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]}"
        )
    shape = tuple(np.shape(state_dict[key]))
    if len(shape) != ndim:
        raise CheckpointError(
            f"Checkpoint tensor {key!r} must have {ndim} dimensions in an "
            f"authors' CIFAR ResNet. Received: {key} of shape {shape}"
        )
    return shape


def infer_architecture(state_dict):
    """The `sb_keras.ResNet` arguments of an authors' CIFAR-10 state dict.

    Depth comes from the number of blocks ``layer{g}.{i}``, the sharing mode
    from the names of the model-level bases (``shared_basis_{g}`` single,
    ``shared_basis_{g}_{1,2}`` double; none: the authors' "NonShared"
    ablation, or the plain ResNet when no block is decomposed), the ranks
    from the shapes of stage 1 (``S_g = s * 2**(g-1)``, ``u_g = u *
    2**(g-1)``).

    Args:
        state_dict: ``{name: array}`` as returned by `read_state_dict`.

    Returns:
        A dict of `sb_keras.ResNet` constructor arguments.

    Example:

    >>> infer_architecture(read_state_dict("CIFAR10_ResNet56_S16U1_7.46err.pth.pth"))
    ... # doctest: +SKIP
    {'depth': 56, 'num_classes': 10, 'share': True, 'shared_rank': 16,
     'unique_rank': 1, 'sharing': 'single', 'preprocessing': 'imagenet',
     'orthogonality_include_unique': True}
    """
    blocks = collections.defaultdict(set)
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    stem = _shape_of(state_dict, "conv1.weight", 4)
    if sorted(blocks) != [1, 2, 3] or stem[:2] != (16, 3):
        raise CheckpointError(
            "Not an authors' CIFAR ResNet: expected a 16-channel stem "
            "'conv1.weight' of shape (16, 3, 3, 3) and stages layer1..layer3. "
            f"Received: conv1.weight {stem}, stages {sorted(blocks)}"
        )
    counts = {g: len(ids) for g, ids in blocks.items()}
    for g, ids in blocks.items():
        if ids != set(range(len(ids))):
            raise CheckpointError(
                f"Stage layer{g} has non-consecutive blocks. Received: {sorted(ids)}"
            )
    if len(set(counts.values())) != 1:
        raise CheckpointError(
            "A CIFAR ResNet has the same number of blocks in every stage. "
            f"Received: blocks per stage {counts}"
        )
    n = counts[1]
    num_classes = _shape_of(state_dict, "fc.weight", 2)[0]
    config = {"depth": 6 * n + 2, "num_classes": num_classes}
    decomposed = n > 1 and any(
        k.startswith("layer1.1.coeff_conv1.") for k in state_dict
    )
    if not decomposed:
        return {**config, "share": False, "preprocessing": "imagenet"}
    if "shared_basis_1_1.weight" in state_dict:
        sharing, s = "double", _shape_of(state_dict, "shared_basis_1_1.weight", 4)[0]
    elif "shared_basis_1.weight" in state_dict:
        sharing, s = "single", _shape_of(state_dict, "shared_basis_1.weight", 4)[0]
    else:
        sharing, s = "single", 0
    u = 0
    if "layer1.1.basis_conv1.weight" in state_dict:
        u = _shape_of(state_dict, "layer1.1.basis_conv1.weight", 4)[0]
    if s + u == 0:
        raise CheckpointError(
            "The decomposed blocks have neither a shared nor a unique basis. "
            "Received: no 'shared_basis_1*' and no 'layer1.1.basis_conv1.weight'"
        )
    return {
        **config,
        "share": True,
        "shared_rank": s,
        "unique_rank": u,
        "sharing": sharing,
        "preprocessing": "imagenet",
        # The authors' CIFAR-10 training also decorrelates the unique filters
        # from the shared ones (method section 2); fine-tuning keeps it.
        "orthogonality_include_unique": s > 0 and u > 0,
    }


def convert_state_dict(state_dict, strict=True, name=None, batchnorm="pytorch"):
    """Builds the `sb_keras.ResNet` of an authors' state dict, weights placed.

    Args:
        state_dict: ``{name: array}`` in the authors' layout (see
            `read_state_dict`).
        strict: refuse keys the model has no place for (``num_batches_tracked``
            is never refused).
        name: model name; defaults to the registry-style name
            (``resnet56_s16u1``).
        batchnorm: the model's BatchNorm convention (`sb_keras.ResNet`).
            `"pytorch"` (default) keeps training as the authors' code: the
            running variance averages the unbiased batch variance and each
            BN's ``num_batches_tracked`` is read from the checkpoint (0 where
            it has none) and counted on. `"keras"` builds Keras BNs and
            ignores ``num_batches_tracked``.

    Returns:
        The model, in inference mode equal to the authors' network in
        ``eval()`` mode. It takes RGB pixels in ``[0, 255]``.

    Raises:
        CheckpointError: a key is missing, a shape does not fit (the message
            names the key and both shapes), a per-block copy of a shared
            basis differs from the stage's basis, or (``strict``) a key is
            left over.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True, sharing="single")
    >>> clone = convert_state_dict(authors_state_dict(model))
    >>> clone.name
    'resnet20_s16u1'
    """
    from sb_keras.models import ResNet

    config = infer_architecture(state_dict)
    model = ResNet(**config, batchnorm=batchnorm, name=name)
    placed = {}
    used = set()
    for key, variable in _layout(model):
        if key not in state_dict and _is_counter(key):
            placed[id(variable)] = (key, None)  # torch < 0.4.1: stays 0
            continue
        if key not in state_dict:
            raise CheckpointError(
                f"The checkpoint has no {key!r}, which {model.name} needs with "
                f"shape {_torch_shape(variable)} (Keras variable "
                f"{variable.path} {tuple(variable.shape)})."
            )
        value = np.asarray(state_dict[key])
        expected = _torch_shape(variable)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, but "
                f"{model.name} needs {expected} there (Keras variable "
                f"{variable.path} {tuple(variable.shape)})."
            )
        if _is_counter(key):
            value = _counter_value(key, value)
        else:
            value = _to_keras(value.astype(np.float32))
        used.add(key)
        if id(variable) in placed:
            first_key, first = placed[id(variable)]
            if not np.array_equal(first, value):
                raise CheckpointError(
                    f"Checkpoint tensor {key!r} differs from {first_key!r}; in the "
                    "authors' model both are the one shared basis of the stage."
                )
            continue
        variable.assign(value)
        placed[id(variable)] = (key, value)
    missing = [v.path for v in model.weights if id(v) not in placed]
    if missing:  # a layout bug, not a user error
        raise RuntimeError(f"Variables left unassigned: {missing}")
    # Without decomposed blocks (depth 8 or a plain ResNet), the bases the
    # authors' model allocates at the top level are unused: ignore them.
    extra = sorted(
        k
        for k in state_dict
        if k not in used
        and not k.endswith("num_batches_tracked")
        and not (not model.share and _MODEL_BASIS.match(k))
    )
    if strict and extra:
        raise CheckpointError(
            f"The checkpoint has tensors {model.name} has no place for "
            f"(pass strict=False to ignore them). Received: {extra[:10]}"
        )
    return model


def _counter_value(key, value):
    if not (np.issubdtype(value.dtype, np.integer) and 0 <= int(value) < 2**63):
        raise CheckpointError(
            f"Checkpoint tensor {key!r} must be a non-negative integer count. "
            f"Received: {key}={value!r}"
        )
    return np.asarray(value, np.int64)


def _torch_shape(variable):
    """Keras ``(kh, kw, in, out)`` -> PyTorch ``(out, in, kh, kw)``."""
    keras_shape = tuple(variable.shape)
    if len(keras_shape) == 4:
        h, w, i, o = keras_shape
        return (o, i, h, w)
    return tuple(reversed(keras_shape))


def load_authors_checkpoint(path, strict=True, name=None, batchnorm="pytorch"):
    """Reads an authors' CIFAR-10 checkpoint into the matching `sb_keras.ResNet`.

    The file is read without torch and without running code from it (see
    `read_checkpoint`); the architecture (depth, ranks, single or double
    sharing) is inferred from the tensor names and shapes (see
    `infer_architecture`). The model keeps the authors' preprocessing: it
    takes RGB pixels in ``[0, 255]`` and normalizes them with the ImageNet
    mean and std inside the model.

    Args:
        path: a ``.pth`` file of ``ssregibility/Net_RL2`` (legacy or zip).
        strict: refuse tensors the model has no place for.
        name: model name (default: registry-style, e.g. ``resnet56_s16u1``).
        batchnorm: `"pytorch"` (default: fine-tuning continues as the
            authors' training step, ``num_batches_tracked`` kept) or
            `"keras"`; see `convert_state_dict`.

    Returns:
        The `sb_keras.ResNet`, ready for ``predict``, ``fit`` or ``save``.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.load_authors_checkpoint(
    ...     "CIFAR10_ResNet56_S16U1_7.46err.pth.pth")  # doctest: +SKIP
    >>> logits = model.predict(uint8_images)  # doctest: +SKIP
    """
    return convert_state_dict(
        read_state_dict(path), strict=strict, name=name, batchnorm=batchnorm
    )


# ---------------------------------------------------------------------------
# Model -> checkpoint (the authors' layout, torch format, written without torch)
# ---------------------------------------------------------------------------


def authors_state_dict(model):
    """A CIFAR `sb_keras.ResNet`'s weights in the authors' key layout.

    Kernels are transposed to PyTorch's ``(out, in, kh, kw)``, the shared
    bases appear once per stage and once per using block (one array object,
    as one tensor in the authors' model) and every BN gets its
    ``num_batches_tracked`` (int64): the count of a ``batchnorm="pytorch"``
    model, 0 for a model with Keras BNs, which count nothing.

    Returns:
        A ``dict`` of NumPy arrays, in the authors' key order per stage.
    """
    _check_cifar_resnet(model)
    layout = _layout(model)
    counted = any(_is_counter(key) for key, _ in layout)
    state = {}
    arrays = {}
    for key, variable in layout:
        if id(variable) not in arrays:
            if _is_counter(key):
                arrays[id(variable)] = np.asarray(variable.numpy(), np.int64)
            else:
                value = np.asarray(variable.numpy(), dtype=np.float32)
                arrays[id(variable)] = _to_torch(value)
        state[key] = arrays[id(variable)]
        if key.endswith(".running_var") and not counted:
            counter = key[: -len("running_var")] + "num_batches_tracked"
            state[counter] = np.array(0, dtype=np.int64)
    return state


def save_authors_state_dict(model, path, format="legacy", extra=None):
    """Writes a model as an authors' checkpoint (torch format, without torch).

    The file holds ``{"net_state_dict": authors_state_dict(model), **extra}``,
    as the authors' training script saves it, and loads with
    ``torch.load(path)`` as well as with `load_authors_checkpoint`.

    Args:
        model: a CIFAR `sb_keras.ResNet`.
        path: the output file.
        format: ``"legacy"`` (the authors' files) or ``"zip"`` (torch >= 1.6).
        extra: more top-level entries (ints, floats, strings, arrays).

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True)
    >>> save_authors_state_dict(model, "resnet20.pth")  # doctest: +SKIP
    """
    obj = {"net_state_dict": collections.OrderedDict(authors_state_dict(model))}
    obj.update(extra or {})
    write_checkpoint(obj, path, format=format)
