"""Rebuilding a functional Keras graph node by node.

The export passes (folding, quantization-aware training) walk the nodes of
a functional model in topological order and emit a new graph in which some
layers are replaced. Nodes are read with Keras's functional internals
(``_nodes_by_depth``, ``node.arguments``); they are stable across Keras 3
releases and used the same way by ``keras.models.clone_model``.
"""

import keras
from keras import tree


class UnsupportedLayerError(ValueError):
    """A layer the export passes do not know how to convert."""


def producer(tensor):
    """``(layer, output index)`` that produced a symbolic ``tensor``."""
    history = tensor._keras_history
    return history.operation, history.tensor_index


def consumers(model):
    """Maps ``id(tensor)`` to the nodes of ``model`` that take it as input."""
    out = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.is_input:
                continue
            for t in node.input_tensors:
                out.setdefault(id(t), []).append(node)
    return out


def ordered_nodes(model):
    """The non-input nodes of a functional ``model``, inputs first."""
    if not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedLayerError(
            "Export needs a functional Keras model (sb_keras models are). "
            f"Received: model={type(model).__name__}"
        )
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                nodes.append(node)
    return nodes


def rebuild(model, handler, name=None):
    """A new functional model where every node goes through ``handler``.

    Args:
        model: a functional Keras model.
        handler: ``handler(node, args, kwargs) -> outputs``, where ``args``
            and ``kwargs`` are the node's call arguments with the new tensors
            filled in. It returns the new output tensor(s) of the node.
        name: name of the new model.

    Returns:
        A plain functional `keras.Model` with fresh inputs of the same shapes.
    """
    tensor_map = {}
    new_inputs = []
    for t in model.inputs:
        new = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name)
        tensor_map[id(t)] = new
        new_inputs.append(new)
    for node in ordered_nodes(model):
        if any(id(t) not in tensor_map for t in node.input_tensors):
            continue
        args, kwargs = node.arguments.fill_in(tensor_map)
        outputs = handler(node, args, kwargs)
        for old, new in zip(node.outputs, tree.flatten(outputs)):
            tensor_map[id(old)] = new
    outputs = tree.map_structure(lambda t: tensor_map[id(t)], model.outputs)
    if len(outputs) == 1:
        outputs = outputs[0]
    inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
    return keras.Model(inputs, outputs, name=name or model.name)


def is_keras_builtin(layer):
    """True for layers that ship with Keras (not user or sb_keras classes)."""
    return type(layer).__module__.startswith("keras.")


def copy_layer(layer, name=None, dtype=None):
    """A new, unbuilt layer with the same config (weights set by caller).

    ``dtype`` (a dtype policy), when given, replaces the layer's own.
    """
    config = layer.get_config()
    if name is not None:
        config["name"] = name
    if dtype is not None:
        config["dtype"] = dtype
    return type(layer).from_config(config)


def call_copy(layer, args, kwargs, dtype=None):
    """Calls a fresh copy of ``layer`` and gives it ``layer``'s weights.

    ``dtype`` (a dtype policy), when given, replaces the layer's own.
    """
    new = copy_layer(layer, dtype=dtype)
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    out = new(*args, **kwargs)
    if layer.weights:
        new.set_weights(layer.get_weights())
    return out
