"""Measurements on models: the orthogonality of their bases."""

from keras import ops

from sb_keras.layers import BasisConv2D
from sb_keras.layers import FilterBasis


def _walk(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer is not model:
            yield from _walk(layer)
        yield layer


def orthogonality(model):
    """The current deviation from orthonormality of every shared basis.

    Returns:
        A dict ``{basis layer name: mean((M M^T - I) ** 2)}`` over the rows of
        each basis (both kernels jointly for double sharing). 0 means the
        filters are orthonormal.

    Example:

    >>> import sb_keras
    >>> model = sb_keras.ResNet(depth=20, share=True)
    >>> {k: round(v, 6) for k, v in sb_keras.orthogonality(model).items()}
    {'stage1_basis': 0.0, 'stage2_basis': 0.0, 'stage3_basis': 0.0}
    """
    return {
        layer.name: float(ops.convert_to_numpy(layer.deviation()))
        for layer in _walk(model)
        if isinstance(layer, FilterBasis)
    }


def orthogonality_loss(model):
    """The orthogonality term the model adds to its loss, from its weights.

    This is ``lambda * R`` with the authors' pooled mean ``R``; it equals the
    sum of ``model.losses`` after a forward pass, computed here without one.
    """
    total = 0.0
    for layer in _walk(model):
        if isinstance(layer, FilterBasis) and layer.orthogonality > 0:
            total += float(ops.convert_to_numpy(layer.penalty()))
        elif (
            isinstance(layer, BasisConv2D)
            and layer.orthogonality > 0
            and layer.unique_kernel is not None
        ):
            bases = _bases_of(layer)
            if bases:
                total += float(ops.convert_to_numpy(layer.penalty(bases)))
    return total


def _bases_of(layer):
    """The basis variables a BasisConv2D is called with (from its node)."""
    node = layer._inbound_nodes[0]
    out = []
    for t in node.input_tensors[1:]:
        owner = t._keras_history.operation
        index = t._keras_history.tensor_index
        if isinstance(owner, FilterBasis):
            out.append(owner.bases[index])
    return out
