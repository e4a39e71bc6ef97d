"""The authors' key layout of their CIFAR-100 DenseNet-121 and ResNeXt-50.

Key names follow ``models/cifar100/{densenet,resnext}.py`` of
``ssregibility/Net_RL2``: a shared basis appears once at the model level
(``shared_basis_{g}``) and again in every layer that uses it
(``....shared_basis.weight``), all mapped to the one Keras variable. In
the DenseNet's authors' layout, dense block 4's layers hold
``shared_basis_3`` and ``shared_basis_4`` is stored but used by none.
"""

import collections

import numpy as np

from sb_keras.checkpoints.authors import _bn_entries
from sb_keras.checkpoints.authors import _is_counter
from sb_keras.checkpoints.authors import _to_keras
from sb_keras.checkpoints.authors import _to_torch
from sb_keras.checkpoints.authors import _torch_shape
from sb_keras.checkpoints.reader import CheckpointError
from sb_keras.checkpoints.reader import read_state_dict
from sb_keras.checkpoints.writer import write_checkpoint


def _densenet_layout(model):
    get = model.get_layer
    entries = [("conv1.weight", get("stem_conv").kernel)]
    n_blocks = len(model.blocks)
    bases = {}
    if model.share:
        for b in range(n_blocks):
            bases[b] = get(f"block{b + 1}_basis").bases[0]
            entries.append((f"shared_basis_{b + 1}.weight", bases[b]))
    for b, n in enumerate(model.blocks):
        last = b == n_blocks - 1
        # The plain model names its last block "dense_block{b}".
        sep = "" if (last and not model.share) else "_layer_"
        block = f"features.dense_block{sep}{b}"
        for i in range(n):
            prefix = f"{block}.bottle_neck_layer_{i}"
            name = f"block{b + 1}_layer{i + 1}"
            conv2 = get(f"{name}_conv2")
            if not model.share:
                entries += _bn_entries(
                    f"{prefix}.residual_function.0", get(f"{name}_1_bn")
                )
                entries.append(
                    (
                        f"{prefix}.residual_function.2.weight",
                        get(f"{name}_conv1").kernel,
                    )
                )
                entries += _bn_entries(
                    f"{prefix}.residual_function.3", get(f"{name}_2_bn")
                )
                entries.append((f"{prefix}.residual_function.5.weight", conv2.kernel))
                continue
            used = 2 if (model.authors_layout and b == 3) else b
            entries += _bn_entries(f"{prefix}.bn0", get(f"{name}_1_bn"))
            entries.append((f"{prefix}.conv1.weight", get(f"{name}_conv1").kernel))
            entries += _bn_entries(f"{prefix}.bn1", get(f"{name}_2_bn"))
            if conv2.unique_kernel is not None:
                entries.append((f"{prefix}.basis_conv2.weight", conv2.unique_kernel))
            entries.append((f"{prefix}.shared_basis.weight", bases[used]))
            entries += _bn_entries(f"{prefix}.basis_bn2", conv2.basis_bn)
            entries.append((f"{prefix}.coeff_conv2.weight", conv2.coefficients))
        if not last:
            prefix = f"features.transition_layer_{b}.down_sample"
            entries += _bn_entries(f"{prefix}.0", get(f"transition{b + 1}_bn"))
            entries.append(
                (f"{prefix}.1.weight", get(f"transition{b + 1}_conv").kernel)
            )
    entries += _bn_entries("features.bn", get("final_bn"))
    return entries


def _resnext_layout(model):
    get = model.get_layer
    entries = [("conv1.weight", get("stem_conv").kernel)]
    entries += _bn_entries("bn1", get("stem_bn"))
    for g, n in enumerate(model.blocks):
        basis = None
        if model.share and n > 1:
            basis = get(f"stage{g + 1}_basis").bases[0]
            entries.append((f"shared_basis_{g + 1}.weight", basis))
        for i in range(n):
            name = f"stage{g + 1}_block{i + 1}"
            prefix = f"layer{g + 1}.{i}"
            if basis is not None and i > 0:
                conv2 = get(f"{name}_conv2")
                entries.append((f"{prefix}.conv1.weight", get(f"{name}_conv1").kernel))
                entries += _bn_entries(f"{prefix}.bn1", get(f"{name}_bn1"))
                entries.append((f"{prefix}.basis_conv2.weight", conv2.unique_kernel))
                entries.append((f"{prefix}.shared_basis.weight", basis))
                entries += _bn_entries(f"{prefix}.bn2", conv2.basis_bn)
                entries.append((f"{prefix}.conv3.weight", conv2.coefficients))
                entries += _bn_entries(f"{prefix}.bn3", conv2.bn)
                continue
            rf = f"{prefix}.residual_function"
            for j, (conv, bn) in enumerate(((0, 1), (3, 4), (6, 7))):
                entries.append(
                    (f"{rf}.{conv}.weight", get(f"{name}_conv{j + 1}").kernel)
                )
                entries += _bn_entries(f"{rf}.{bn}", get(f"{name}_bn{j + 1}"))
            if i == 0 and _has_layer(model, f"{name}_shortcut"):
                entries.append(
                    (f"{prefix}.shortcut.0.weight", get(f"{name}_shortcut").kernel)
                )
                entries += _bn_entries(
                    f"{prefix}.shortcut.1", get(f"{name}_shortcut_bn")
                )
    return entries


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)


def layout(model):
    """``[(authors' key, Keras variable)]`` of a DenseNet or ResNeXt."""
    from sb_keras.models import DenseNet
    from sb_keras.models import ResNeXt

    if not getattr(model, "include_top", False) or not isinstance(
        model, (DenseNet, ResNeXt)
    ):
        raise ValueError(
            "The authors' DenseNet/ResNeXt key layout needs an sb_keras.DenseNet "
            "or sb_keras.ResNeXt with its classifier. Received: model="
            f"{getattr(model, 'name', model)!r}"
        )
    builder = _densenet_layout if isinstance(model, DenseNet) else _resnext_layout
    head = model.get_layer("predictions")
    return builder(model) + [("linear.weight", head.kernel), ("linear.bias", head.bias)]


def state_dict(model):
    """The model's weights in the authors' key layout (PyTorch shapes)."""
    state, arrays = collections.OrderedDict(), {}
    for key, variable in layout(model):
        if id(variable) not in arrays:
            value = np.asarray(variable.numpy())
            arrays[id(variable)] = (
                value.astype(np.int64)
                if _is_counter(key)
                else _to_torch(value.astype(np.float32))
            )
        state[key] = arrays[id(variable)]
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + "num_batches_tracked"
            state.setdefault(counter, np.array(0, dtype=np.int64))
    return state


def save_state_dict(model, path, format="legacy"):
    """Writes ``{"net_state_dict": state_dict(model)}`` as a torch file."""
    write_checkpoint({"net_state_dict": state_dict(model)}, path, format=format)


def load_state_dict(model, source, strict=True):
    """Places an authors' DenseNet/ResNeXt state dict (or file) in ``model``.

    ``model`` must have the checkpoint's architecture (e.g.
    ``sb_keras.get_model("densenet121_s16u1_authors")`` for their
    DenseNet121-S16U1 file). Every per-layer copy of a shared basis must
    equal the model-level one.

    Raises:
        CheckpointError: a key is missing, a shape differs, copies of a basis
            differ, or (``strict``) a key is left over.
    """
    sd = source if isinstance(source, dict) else read_state_dict(source)
    placed, used = {}, set()
    for key, variable in layout(model):
        if _is_counter(key):
            used.add(key)
            continue
        if key not in sd:
            raise CheckpointError(f"The checkpoint has no {key!r} ({model.name}).")
        value = np.asarray(sd[key])
        if tuple(value.shape) != _torch_shape(variable):
            raise CheckpointError(
                f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, but "
                f"{model.name} needs {_torch_shape(variable)}."
            )
        value = _to_keras(value.astype(np.float32))
        used.add(key)
        if id(variable) in placed:
            if not np.array_equal(placed[id(variable)][1], value):
                raise CheckpointError(
                    f"Checkpoint tensor {key!r} differs from "
                    f"{placed[id(variable)][0]!r}; both are one shared basis."
                )
            continue
        variable.assign(value)
        placed[id(variable)] = (key, value)
    extra = sorted(k for k in sd if k not in used and not _is_counter(k))
    if strict and extra:
        raise CheckpointError(
            f"The checkpoint has tensors {model.name} has no place for "
            f"(pass strict=False to ignore them). Received: {extra[:10]}"
        )
    return model
